"""Per-step wall-clock cost of the learned optimizers against Adam, measured side by side.

    python benchmarks/lopt_step.py [--hidden 32] [--repeats 300] [--device cpu|cuda]
                                   [--out benchmarks/results/lopt_step_cpu.json]

One training step of the digits MLP ``64 -> hidden -> 10`` at batch 128: ``zero_grad``,
forward, backward and ``step()`` (the GradMetaNet rule's capture included). The optimizers run
in turn within every repeat (interleaved), so machine noise falls on all of them alike; each
figure is a median. Rules have their initial weights: the cost does not depend on them.
The last row, the forward pass of the paper's per-parameter MLP alone (33 -> 32 -> 32 -> 32 -> 1
on all P parameters; no training step), is a floor under every DS-based rule's step.

FLOPs (``torch.utils.flop_counter``, matrix products only) of each whole step and of the model's
own forward + backward: their ratio is the arithmetic floor of a step's cost relative to plain
training, beside the measured time ratio.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from gradmetanet.lopt import DigitsMLPTask, NetworkOptimizer, learnable_sgdm
from gradmetanet.lopt.optimizers import make_rule
from gradmetanet.timing import interleaved_median_times

from common import machine, write_json

OPTIMIZERS = ("adam", "sgdm", "ds", "unf", "gradmetanet_ds")


def step_flops(step) -> int:
    """Matrix-product FLOPs of one call of ``step`` (after a warm-up call that builds optimizer state)."""
    from torch.utils.flop_counter import FlopCounterMode

    step()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def step_function(task: DigitsMLPTask, name: str, device: str):
    """A closure doing one full training step with optimizer ``name`` on its own model and batch."""
    gen = torch.Generator().manual_seed(0)
    model = task.make_model().to(device)
    if name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif name == "sgdm":
        opt = learnable_sgdm(model.parameters())
    else:
        opt = NetworkOptimizer(model, make_rule(name).to(device))
    x, y = (t[0].to(device) for t in task.sample_batch(1, gen))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    task = DigitsMLPTask(hidden=args.hidden)
    steps = {name: step_function(task, name, args.device) for name in OPTIMIZERS}
    mlp = make_rule("gradmetanet_ds").per_parameter.to(args.device)
    inputs = torch.randn(sum(p.numel() for p in task.make_model().parameters()), 33, device=args.device)

    @torch.no_grad()
    def mlp_only() -> None:
        mlp(inputs)
    steps["per-parameter MLP only"] = mlp_only
    flops = {name: step_flops(step) for name, step in steps.items()}
    times = interleaved_median_times(steps, repeats=args.repeats, warmup=20)
    info = machine(args.device)
    result = {"benchmark": "lopt_step", **info, "hidden": args.hidden, "batch": 128, "repeats": args.repeats,
              "ms_per_step": {k: 1e3 * v for k, v in times.items()},
              "ratio_to_adam": {k: v / times["adam"] for k, v in times.items()},
              "mflops_per_step": {k: v / 1e6 for k, v in flops.items()},
              "flop_ratio_to_adam": {k: v / flops["adam"] for k, v in flops.items()}}
    print(f"One training step of the digits MLP 64-{args.hidden}-10, batch 128 ({info['device_name']}, "
          f"{info['threads']} threads, torch {info['torch']}), median of {args.repeats} interleaved repeats\n")
    print("| optimizer | ms / step | × Adam | MFLOP / step | FLOPs × Adam (floor) |\n|---|---:|---:|---:|---:|")
    for name in steps:
        print(f"| {name} | {result['ms_per_step'][name]:.3f} | {result['ratio_to_adam'][name]:.2f} | "
              f"{result['mflops_per_step'][name]:.2f} | {result['flop_ratio_to_adam'][name]:.2f} |")
    write_json(result, args.out or f"benchmarks/results/lopt_step_{args.device}.json")


if __name__ == "__main__":
    main()
