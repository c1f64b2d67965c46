"""How GradMetaNet and GradMetaNet++ scale with the set size, the base width and the base depth, and what
they cost beside a weight-space network on dense per-example gradients.

    python benchmarks/metanet_scaling.py [--device cpu|cuda] [--models gradmetanet gradmetanet++]
        [--set-sizes ...] [--widths ...] [--depths ...] [--out benchmarks/results/metanet_scaling.json]

Base networks: MLP specs ``32 -> w -> ... -> w -> 10`` (``depth`` hidden layers, 2 unless swept); inputs:
random ``(a, g)`` features, ``B = 4`` networks per batch, float32, glibc's allocator told to keep freed
memory (what ``gradmetanet run`` does). Each cell times one forward + backward of a sum of all outputs
(median of interleaved repeats) and measures its peak extra memory in a fresh process. Sweeps: the set size
``b`` at width 128, the width at ``b = 128``, the depth at width 128 and ``b = 128`` (``--at-width``,
``--at-set-size``); the scaling exponents are least-squares slopes of log time against log ``b``, log ``N``
(the number of neurons, over the width sweep) and log ``depth``. Tokens of a transformer are set elements: ``metanet_transformer.py`` sweeps them.
Side by side at width 256 (``--side-width``), ``b = 128``: the weight-space network (same hidden width) reads the
concatenated dense per-example gradients ``Theta[b]``, whose formation from the factors is
part of its cost.
"""

from __future__ import annotations

import argparse

import torch

from gradmetanet import GradientBatch, NetworkSpec
from gradmetanet.metanets import GradMetaNet, GradMetaNetPlusPlus, WeightSpaceNet
from gradmetanet.timing import interleaved_median_times

from common import machine, peak_extra_bytes, run_child, slope, use_retaining_allocator, write_json

HIDDEN = 64
NETWORKS = 4


def base_spec(width: int, depth: int) -> NetworkSpec:
    """The base MLP ``32 -> width (x depth) -> 10``."""
    return NetworkSpec.chain([32, *[width] * depth, 10])


def make_step(model_name: str, width: int, b: int, device: str, depth: int = 2):
    """A closure running forward + backward of ``model_name`` on one random batch."""
    torch.manual_seed(0)
    spec = base_spec(width, depth)
    batch = GradientBatch(spec, torch.randn(NETWORKS, b, spec.n_neurons, 2, device=device))
    if model_name == "gradmetanet":
        model = GradMetaNet(hidden=HIDDEN, set_layers=2, neuron_layers=2)
    elif model_name == "gradmetanet++":
        model = GradMetaNetPlusPlus(hidden=HIDDEN, heads=8, blocks=2, head_hidden=16)
    elif model_name == "ws_concat":
        model = WeightSpaceNet(spec, in_channels=b, hidden=HIDDEN, layers=3, mode="concat")
    else:
        raise ValueError(f"unknown model {model_name!r}")
    model = model.to(device)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(batch)
        sum(v.sum() for v in out.values()).backward()
    return step


def measure(models: list[str], width: int, b: int, device: str, repeats: int, depth: int = 2) -> dict[str, dict]:
    steps = {m: make_step(m, width, b, device, depth) for m in models}
    times = interleaved_median_times(steps, repeats=repeats, warmup=1)
    del steps
    cells = {m: {"width": width, "b": b, "depth": depth, "n_neurons": base_spec(width, depth).n_neurons,
                "median_ms": 1e3 * times[m],
                "peak_extra_bytes": run_child(__file__, [m, str(width), str(b), device, str(depth)])} for m in models}
    for m, r in cells.items():
        print(f"b {b:4d}  width {width:4d}  depth {depth}  {m:14s} {r['median_ms']:9.1f} ms "
              f"{r['peak_extra_bytes'] / 2**20:8.1f} MiB", flush=True)
    return cells


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--set-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--at-width", type=int, default=128, help="base width of the set-size and depth sweeps")
    parser.add_argument("--at-set-size", type=int, default=128, help="set size of the width and depth sweeps")
    parser.add_argument("--side-width", type=int, default=256, help="base width of the weight-space comparison")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8], help="hidden layers of the base MLP")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["gradmetanet", "gradmetanet++"],
                        choices=["gradmetanet", "gradmetanet++"], help="which metanetworks to sweep")
    parser.add_argument("--out", default="benchmarks/results/metanet_scaling.json")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    use_retaining_allocator()
    if args.child:
        name, width, b, device, depth = args.child
        print(peak_extra_bytes(make_step(name, int(width), int(b), device, int(depth)), device, runs=2))
        return {}
    models = args.models
    width, b = args.at_width, args.at_set_size
    by_b = [measure(models, width, size, args.device, args.repeats) for size in args.set_sizes]
    by_width = [measure(models, w, b, args.device, args.repeats) for w in args.widths]
    by_depth = [measure(models, width, b, args.device, args.repeats, depth) for depth in args.depths]

    def exponent(rows: list[dict], model: str, key: str) -> float:
        return slope([r[model][key] for r in rows], [r[model]["median_ms"] for r in rows])
    exponents = {m: {"b": exponent(by_b, m, "b"), "n_neurons": exponent(by_width, m, "n_neurons"),
                     "depth": exponent(by_depth, m, "depth")} for m in models}
    side = measure([*models, "ws_concat"], args.side_width, b, args.device, args.repeats)
    result = {"benchmark": "metanet_scaling", **machine(args.device), "hidden": HIDDEN, "networks_per_batch": NETWORKS,
              "base": "MLP 32-w (x depth)-10", "by_set_size": by_b, "by_width": by_width, "by_depth": by_depth, "exponents": exponents,
              "side_by_side": side}
    print(render(result))
    write_json(result, args.out)
    return result


def render(result: dict) -> str:
    lines = [f"Forward + backward, {result['networks_per_batch']} base networks per batch, hidden {result['hidden']}, "
             f"{result['device']} ({result['device_name']}, {result['threads']} threads)", "",
             "| sweep | b | width | depth | N | model | median ms | peak extra MiB |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for sweep, rows in (("set size", result["by_set_size"]), ("width", result["by_width"]),
                        ("depth", result["by_depth"])):
        for cell in rows:
            for m, r in cell.items():
                lines.append(f"| {sweep} | {r['b']} | {r['width']} | {r['depth']} | {r['n_neurons']} | {m} | "
                             f"{r['median_ms']:.1f} | {r['peak_extra_bytes'] / 2**20:.1f} |")
    lines += ["", "| model | time exponent in b | time exponent in N | time exponent in depth |", "|---|---:|---:|---:|"]
    for m, e in result["exponents"].items():
        lines.append(f"| {m} | {e['b']:.2f} | {e['n_neurons']:.2f} | {e['depth']:.2f} |")
    side = result["side_by_side"]
    ws = side["ws_concat"]
    first = next(iter(side.values()))
    lines += ["", f"Width {first['width']}, b = {first['b']}:", "", "| model | median ms | peak extra MiB | WS time / model | WS memory / model |",
              "|---|---:|---:|---:|---:|"]
    for m, r in side.items():
        lines.append(f"| {m} | {r['median_ms']:.1f} | {r['peak_extra_bytes'] / 2**20:.1f} | "
                     f"{ws['median_ms'] / r['median_ms']:.2f} | {ws['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
