"""Training-step throughput of the metanetworks and the weight-space backbones, against an earlier version.

    python benchmarks/metanet_throughput.py [--cases ...] [--device cpu|cuda] [--allocator retain|default] [--out FILE]
    python benchmarks/metanet_throughput.py --compare OLD.json NEW.json [NEW2.json ...]   # the speed-up table
    python benchmarks/metanet_throughput.py --attention-kernels --out FILE   # GradMetaNet++: compiled vs chunked
    python benchmarks/metanet_throughput.py --torch-compile --out FILE       # eager vs torch.compile'd models

One training step = forward, backward of a squared-output loss, ``torch.optim.Adam`` step, on ``B = 32``
inputs, float32, on the threads given (default one). Cases (the issue's set-up):

- ``gradmetanet-b128``: GradMetaNet (hidden 64, 2 set + 2 neuron layers, product head) on gradient sets of
  SIREN ``1-32-32-1`` (66 neurons), ``b = 128`` examples;
- ``gradmetanet++-b64``, ``gradmetanet++-b128``: GradMetaNet++ (hidden 64, 3 blocks, 8 heads, set product head);
- ``{dws,gmn,scalegmn}-{inr,cnn}``: the backbones as INR editing (hidden 32, 3 layers, 9 channels: weights and
  8 gradient features) and amortized fine-tuning (hidden 32, 3 layers, 1 channel) build them, on the INR
  zoo's SIREN and (GMN, ScaleGMN: DWSNet reads no convolutions) on the Small CNN Zoo network.

Every case reports the median step time of interleaved repeats, its FLOPs (``torch.utils.flop_counter``:
matrix products only) and the GFLOP/s they run at, beside the rate of a plain ``1024 x 1024`` matrix product
on the same threads. The script uses only APIs every version since 0.6 has, so the same file measures an
older checkout: ``PYTHONPATH=<checkout>/src python benchmarks/metanet_throughput.py --allocator default``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from gradmetanet import GradientBatch, NetworkSpec
from gradmetanet.metanets import GradMetaNet, GradMetaNetPlusPlus
from gradmetanet.timing import interleaved_median_times

from common import machine, use_retaining_allocator, write_json
from gradmetanet import spec_of

NETWORKS = 32
CASES = ("gradmetanet-b128", "gradmetanet++-b64", "gradmetanet++-b128", "dws-inr", "gmn-inr", "scalegmn-inr",
         "gmn-cnn", "scalegmn-cnn")


def _gradient_step(name: str, device: str):
    """Model and input of a gradient-set case."""
    spec = NetworkSpec.chain([1, 32, 32, 1])
    b = int(name.rsplit("-b", 1)[1])
    batch = GradientBatch(spec, torch.randn(NETWORKS, b, spec.n_neurons, 2).to(device))
    if name.startswith("gradmetanet++"):
        return GradMetaNetPlusPlus(hidden=64, blocks=3, heads=8), batch
    return GradMetaNet(hidden=64, set_layers=2, neuron_layers=2), batch


def _backbone_step(name: str, device: str):
    """Model and input of a weight-space backbone case."""
    from gradmetanet.metanets import DWSNet, GMN, ScaleGMN
    kind, zoo = name.split("-")
    if zoo == "inr":
        from gradmetanet.experiments.inr_edit import inr_spec
        spec, channels = inr_spec(), 9
    else:
        from gradmetanet.models import small_cnn_zoo_template
        spec, channels = spec_of(small_cnn_zoo_template("tanh"), torch.randn(2, 1, 28, 28)), 1
    options = {} if kind == "dws" else {"bidirectional": True}
    model = {"dws": DWSNet, "gmn": GMN, "scalegmn": ScaleGMN}[kind](spec, channels, 1, hidden=32, layers=3, **options)
    return model, {n: torch.randn(NETWORKS, *shape, channels).to(device) for n, shape in spec.param_shapes().items()}


def make_step(name: str, device: str = "cpu", compiled: bool = False):
    """A closure running one training step of case ``name`` (seeded model and input) on ``device``; with
    ``compiled`` the model runs through ``torch.compile`` (inductor; graph breaks around the fused attention)."""
    torch.manual_seed(0)
    model, inputs = (_gradient_step if name.startswith("gradmetanet") else _backbone_step)(name, device)
    model = model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    forward = torch.compile(model, dynamic=False) if compiled else model

    def step():
        optimiser.zero_grad(set_to_none=True)
        out = forward(inputs)
        sum(v.square().mean() for v in out.values()).backward()
        optimiser.step()
    return step


def step_flops(step) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def matmul_rate(device: str, size: int = 1024, repeats: int = 20) -> float:
    """GFLOP/s of a ``size x size`` float32 matrix product on ``device`` (the current threads on CPU; best of
    ``repeats``)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def measure(cases: list[str], repeats: int, device: str) -> dict[str, dict]:
    steps = {c: make_step(c, device) for c in cases}
    flops = {c: step_flops(s) for c, s in steps.items()}
    times = interleaved_median_times(steps, repeats=repeats, warmup=1)
    return {c: {"median_s": times[c], "gflop": flops[c] / 1e9, "gflop_per_s": flops[c] / 1e9 / times[c]}
            for c in cases}


def attention_kernels(cases: list[str], repeats: int) -> dict[str, dict]:
    """GradMetaNet++ steps with the compiled and the chunked CPU attention kernel, interleaved in one process (the
    ratio is immune to the machine's drift between runs): ``{case: {"fused_s", "chunked_s", "speedup"}}``."""
    import gradmetanet.metanets.attention as attention

    compiled = attention.fused_kernel
    if compiled() is None:
        raise SystemExit("the compiled attention kernel is not available here (see the warning above)")

    def chunked(step):
        def run():
            attention.fused_kernel = lambda: None
            try:
                step()
            finally:
                attention.fused_kernel = compiled
        return run

    out = {}
    for case in cases:
        times = interleaved_median_times({"fused": make_step(case), "chunked": chunked(make_step(case))},
                                         repeats=repeats, warmup=1)
        out[case] = {"fused_s": times["fused"], "chunked_s": times["chunked"],
                     "speedup": times["chunked"] / times["fused"]}
        print(f"{case:20s} fused {times['fused']:.3f} s, chunked {times['chunked']:.3f} s: "
              f"{out[case]['speedup']:.2f}x", flush=True)
    return out


def torch_compile(cases: list[str], repeats: int, device: str) -> dict[str, dict]:
    """Each case eager and through ``torch.compile``, steps interleaved in one process: ``{case: {"eager_s",
    "compiled_s", "speedup", "compile_s"}}`` (``compile_s``: the first compiled step, compilation included)."""
    out = {}
    for case in cases:
        compiled = make_step(case, device, compiled=True)
        start = time.perf_counter()
        compiled()
        compile_s = time.perf_counter() - start
        times = interleaved_median_times({"eager": make_step(case, device), "compiled": compiled},
                                         repeats=repeats, warmup=1)
        out[case] = {"eager_s": times["eager"], "compiled_s": times["compiled"],
                     "speedup": times["eager"] / times["compiled"], "compile_s": compile_s}
        print(f"{case:20s} eager {times['eager']:.3f} s, compiled {times['compiled']:.3f} s: "
              f"{out[case]['speedup']:.2f}x (first compiled step {compile_s:.0f} s)", flush=True)
    return out


def compare(old_path: str, new_paths: list[str]) -> str:
    """A Markdown table of step times: the old run and each new one, with the speed-up over the old."""
    old = json.loads(open(old_path).read())
    news = [json.loads(open(p).read()) for p in new_paths]
    head = f"| case | {old['label']} (s) | " + " | ".join(f"{n['label']} (s) | speed-up" for n in news) + " | GFLOP/s |"
    lines = [head, "|" + "---|" * (2 + 2 * len(news) + 1)]
    for case, before in old["cases"].items():
        cells = [f"{before['median_s']:.3f}"]
        for n in news:
            now = n["cases"].get(case)
            cells += [f"{now['median_s']:.3f}", f"{before['median_s'] / now['median_s']:.2f}x"] if now else ["-", "-"]
        rate = news[-1]["cases"].get(case, before)["gflop_per_s"]
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {rate:.1f} |")
    where = news[-1]["machine"]
    lines.append(f"\nmatrix product rate: {news[-1]['matmul_gflop_per_s']:.1f} GFLOP/s "
                 f"({where['device_name']}, {where['threads']} CPU thread(s))")
    return "\n".join(lines)


def source_commit() -> str:
    """The git commit of the gradmetanet source these measurements ran (the package metadata would name the
    installed version, not an older checkout put first on ``PYTHONPATH``)."""
    import subprocess
    from pathlib import Path

    import gradmetanet
    root = Path(gradmetanet.__file__).resolve().parent
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--allocator", choices=["retain", "default"], default="retain",
                        help="retain: gradmetanet.performance.retain_freed_memory() first (what `gradmetanet run` does)")
    parser.add_argument("--label", default=None, help="name of this run in comparison tables (default: the version)")
    parser.add_argument("--out", default="benchmarks/results/metanet_throughput_cpu.json")
    parser.add_argument("--compare", nargs="+", metavar="JSON", help="print the table of OLD.json against NEW.json...")
    parser.add_argument("--attention-kernels", action="store_true",
                        help="GradMetaNet++ cases only: the compiled against the chunked attention kernel, interleaved")
    parser.add_argument("--torch-compile", action="store_true",
                        help="every case eager against torch.compile'd, interleaved")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(args.compare[0], args.compare[1:]))
        return {}
    torch.set_num_threads(args.threads)
    if args.allocator == "retain":
        use_retaining_allocator()
    if args.attention_kernels:
        cases = [c for c in args.cases if c.startswith("gradmetanet++")]
        result = {"label": "compiled vs chunked attention", "source_commit": source_commit(),
                  "machine": machine(args.device), "cases": attention_kernels(cases, args.repeats)}
        write_json(result, args.out)
        return result
    if args.torch_compile:
        result = {"label": "eager vs torch.compile", "source_commit": source_commit(), "machine": machine(args.device),
                  "torch": torch.__version__, "cases": torch_compile(args.cases, args.repeats, args.device)}
        write_json(result, args.out)
        return result
    source = source_commit()
    result = {"label": args.label or f"{source[:7]} ({args.allocator} allocator)", "source_commit": source,
              "allocator": args.allocator, "networks": NETWORKS, "machine": machine(args.device),
              "matmul_gflop_per_s": matmul_rate(args.device), "cases": {}}
    for case in args.cases:              # one case at a time: cases of very different cost would wait on each other
        result["cases"].update(measure([case], args.repeats, args.device))
        c = result["cases"][case]
        print(f"{case:20s} {c['median_s']:8.3f} s  {c['gflop']:8.1f} GFLOP  {c['gflop_per_s']:6.1f} GFLOP/s", flush=True)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
