"""Cost of capturing decomposed gradients, against a plain backward and dense per-example peers.

    python benchmarks/capture.py [--widths 128 512 1024] [--device cpu|cuda] [--out benchmarks/results/capture.json]

Base networks: MLPs ``w -> w -> w -> w`` (three linear layers, ReLU), batch 128, float32.
Methods, each a full forward + backward of a cross-entropy batch loss:
  plain      the ordinary step, the reference (ratio 1.00);
  capture    the same under ``GradientCapture``, reading ``cap.gradients`` at the end;
  torch.func ``vmap(grad(...))`` dense per-example gradients;
  opacus     Opacus ``GradSampleModule`` dense per-example gradients (only when installed).
Time is the median of repeated runs, the methods interleaved run by run so that drifts in
machine speed hit all of them alike. Peak memory is measured in a fresh subprocess per cell:
on CPU the growth of the resident-set high-water mark (``VmHWM``, reset first) over the set-up, on CUDA
``torch.cuda.max_memory_allocated`` over the set-up. Prints a Markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from gradmetanet import GradientCapture
from gradmetanet.basenets import make_mlp
from gradmetanet.timing import interleaved_median_times

from common import machine, peak_extra_bytes, run_child, write_json

METHODS = ["plain", "capture", "torch.func", "opacus"]


def has_opacus() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


def make_step(method: str, width: int, batch: int, device: str):
    """A closure running one step of ``method``, and a function returning the bytes it keeps."""
    torch.manual_seed(0)
    model = make_mlp([width] * 4, "relu").to(device)
    x = torch.randn(batch, width, device=device)
    y = torch.randint(width, (batch,), device=device)
    kept: dict[str, int] = {}
    if method == "plain":
        def step():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
    elif method == "capture":
        def step():
            model.zero_grad(set_to_none=True)
            with GradientCapture(model) as cap:
                F.cross_entropy(model(x), y).backward()
            gs = cap.gradients
            kept["bytes"] = gs.nbytes()
            kept["dense_bytes"] = gs.dense_nbytes()
    elif method == "torch.func":
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss_one(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

        per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

        def step():
            grads = per_example(params, x, y)
            kept["bytes"] = sum(g.numel() * g.element_size() for g in grads.values())
    elif method == "opacus":
        from opacus import GradSampleModule
        wrapped = GradSampleModule(model, loss_reduction="mean")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")

        def step():
            wrapped.zero_grad(set_to_none=True)
            F.cross_entropy(wrapped(x), y).backward()
            kept["bytes"] = sum(p.grad_sample.numel() * p.grad_sample.element_size() for p in wrapped.parameters())
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return step, kept


def peak_memory(method: str, width: int, batch: int, device: str) -> int:
    """Peak extra bytes of a few steps of ``method``, measured in a fresh process."""
    return run_child(__file__, [method, str(width), str(batch), device])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="benchmarks/results/capture.json")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, width, batch, device = args.child
        print(peak_extra_bytes(make_step(method, int(width), int(batch), device)[0], device))
        return {}
    methods = [m for m in METHODS if m != "opacus" or has_opacus()]
    rows = []
    for width in args.widths:
        steps, kept, mems = {}, {}, {}
        for method in methods:
            steps[method], kept[method] = make_step(method, width, args.batch, args.device)
        times = interleaved_median_times(steps, repeats=args.repeats)
        for method in methods:
            mems[method] = peak_memory(method, width, args.batch, args.device)
        kept_bytes = {m: kept[m].get("bytes") for m in methods}
        dense_bytes = kept["capture"]["dense_bytes"]
        for method in methods:
            rows.append({
                "width": width, "method": method, "median_ms": 1e3 * times[method],
                "time_ratio_to_plain": times[method] / times["plain"], "peak_extra_bytes": mems[method],
                "per_example_bytes": kept_bytes[method], "dense_per_example_bytes": dense_bytes,
            })
    result = {"benchmark": "capture", **machine(args.device), "batch": args.batch, "dtype": "float32",
              "model": "MLP w-w-w-w (3 linear layers, ReLU)", "rows": rows}
    print(render_table(result))
    write_json(result, args.out)
    return result


def render_table(result: dict) -> str:
    lines = [f"Capture cost, batch {result['batch']}, {result['dtype']}, {result['device']} "
             f"({result['device_name']}, {result['threads']} threads, torch {result['torch']})", "",
             "| width | method | median ms | x plain | peak extra MiB | per-example storage MiB |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        stored = "-" if r["per_example_bytes"] is None else f"{r['per_example_bytes'] / 2**20:.2f}"
        if r["method"] == "capture":
            stored += f" (dense: {r['dense_per_example_bytes'] / 2**20:.1f})"
        lines.append(f"| {r['width']} | {r['method']} | {r['median_ms']:.2f} | {r['time_ratio_to_plain']:.2f} | "
                     f"{r['peak_extra_bytes'] / 2**20:.1f} | {stored} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
