"""How GradMetaNet and GradMetaNet++ scale with the set size and the base width, and what they
cost beside a weight-space network on dense per-example gradients.

    python benchmarks/metanet_scaling.py [--device cpu|cuda] [--out benchmarks/results/metanet_scaling.json]

Base networks: MLP specs ``32 -> w -> w -> 10``; inputs: random ``(a, g)`` features, ``B = 4``
networks per batch, float32. Each cell times one forward + backward of a sum of all outputs
(median of interleaved repeats) and measures its peak extra memory in a fresh process.
Sweeps: the set size ``b`` at width 128, and the width at ``b = 128``; the scaling exponent is
the least-squares slope of log time against log ``b`` (or log ``N``, the number of neurons).
Side by side at width 256, ``b = 128``: the weight-space network (same hidden width) reads the
concatenated dense per-example gradients ``Theta[b]``, whose formation from the factors is
part of its cost.
"""

from __future__ import annotations

import argparse

import torch

from gradmetanet import GradientBatch, NetworkSpec
from gradmetanet.metanets import GradMetaNet, GradMetaNetPlusPlus, WeightSpaceNet
from gradmetanet.timing import interleaved_median_times

from common import machine, peak_extra_bytes, run_child, slope, write_json

HIDDEN = 64
NETWORKS = 4


def make_step(model_name: str, width: int, b: int, device: str):
    """A closure running forward + backward of ``model_name`` on one random batch."""
    torch.manual_seed(0)
    spec = NetworkSpec.chain([32, width, width, 10])
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


def measure(models: list[str], width: int, b: int, device: str, repeats: int) -> dict[str, dict]:
    steps = {m: make_step(m, width, b, device) for m in models}
    times = interleaved_median_times(steps, repeats=repeats, warmup=1)
    return {m: {"width": width, "b": b, "n_neurons": 42 + 2 * width, "median_ms": 1e3 * times[m],
                "peak_extra_bytes": run_child(__file__, [m, str(width), str(b), device])} for m in models}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--set-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["gradmetanet", "gradmetanet++"],
                        choices=["gradmetanet", "gradmetanet++"], help="which metanetworks to sweep")
    parser.add_argument("--out", default="benchmarks/results/metanet_scaling.json")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, width, b, device = args.child
        print(peak_extra_bytes(make_step(name, int(width), int(b), device), device, runs=2))
        return {}
    models = args.models
    by_b = [measure(models, 128, b, args.device, args.repeats) for b in args.set_sizes]
    by_width = [measure(models, w, 128, args.device, args.repeats) for w in args.widths]
    exponents = {m: {"b": slope([r[m]["b"] for r in by_b], [r[m]["median_ms"] for r in by_b]),
                     "n_neurons": slope([r[m]["n_neurons"] for r in by_width], [r[m]["median_ms"] for r in by_width])}
                 for m in models}
    side = measure([*models, "ws_concat"], 256, 128, args.device, args.repeats)
    result = {"benchmark": "metanet_scaling", **machine(args.device), "hidden": HIDDEN, "networks_per_batch": NETWORKS,
              "base": "MLP 32-w-w-10", "by_set_size": by_b, "by_width": by_width, "exponents": exponents,
              "side_by_side": side}
    print(render(result))
    write_json(result, args.out)
    return result


def render(result: dict) -> str:
    lines = [f"Forward + backward, {result['networks_per_batch']} base networks per batch, hidden {result['hidden']}, "
             f"{result['device']} ({result['device_name']}, {result['threads']} threads)", "",
             "| sweep | b | width | N | model | median ms | peak extra MiB |", "|---|---:|---:|---:|---|---:|---:|"]
    for sweep, rows in (("set size", result["by_set_size"]), ("width", result["by_width"])):
        for cell in rows:
            for m, r in cell.items():
                lines.append(f"| {sweep} | {r['b']} | {r['width']} | {r['n_neurons']} | {m} | {r['median_ms']:.1f} | "
                             f"{r['peak_extra_bytes'] / 2**20:.1f} |")
    lines += ["", "| model | time exponent in b | time exponent in N |", "|---|---:|---:|"]
    for m, e in result["exponents"].items():
        lines.append(f"| {m} | {e['b']:.2f} | {e['n_neurons']:.2f} |")
    side = result["side_by_side"]
    ws = side["ws_concat"]
    lines += ["", "Width 256, b = 128:", "", "| model | median ms | peak extra MiB | WS time / model | WS memory / model |",
              "|---|---:|---:|---:|---:|"]
    for m, r in side.items():
        lines.append(f"| {m} | {r['median_ms']:.1f} | {r['peak_extra_bytes'] / 2**20:.1f} | "
                     f"{ws['median_ms'] / r['median_ms']:.2f} | {ws['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
