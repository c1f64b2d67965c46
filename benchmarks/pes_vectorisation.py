"""What vectorising the inner runs of PES buys: n runs in lockstep vs n runs one after another.

    python benchmarks/pes_vectorisation.py [--runs 16] [--steps 10] [--out benchmarks/results/pes_vectorisation.json]

Rule: the per-parameter "DS" learned optimizer; task: the digits MLP 64-32-10, batch 128.
Each cell is the median of 5 timed unrolls of ``--steps`` inner steps (after one warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.utils import parameters_to_vector

from gradmetanet.lopt.optimizers import deepsets_rule
from gradmetanet.lopt.pes import TruncatedInnerRuns, stack_meta_parameters
from gradmetanet.lopt.tasks import DigitsMLPTask

from common import machine, write_json


def time_unroll(task, rule, n: int, steps: int, repeats: int = 5) -> float:
    gen = torch.Generator().manual_seed(0)
    runs = TruncatedInnerRuns(task, rule, n, horizon=10**9, generator=gen)
    meta = stack_meta_parameters(rule, parameters_to_vector(rule.parameters()).detach().expand(n, -1))
    runs.unroll(meta, steps, gen)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runs.unroll(meta, steps, gen)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/pes_vectorisation.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    task, rule = DigitsMLPTask(), deepsets_rule()
    vectorised = time_unroll(task, rule, args.runs, args.steps)
    one = time_unroll(task, rule, 1, args.steps)
    sequential = args.runs * one
    result = {"benchmark": "pes_vectorisation", **machine("cpu"), "runs": args.runs, "steps": args.steps,
              "vectorised_s": vectorised, "one_run_s": one, "sequential_s": sequential,
              "speedup": sequential / vectorised}
    print(f"{args.runs} inner runs x {args.steps} steps of the DS rule on the digits MLP "
          f"({result['device_name']}, {result['threads']} threads)\n")
    print("| how | seconds | speed-up |\n|---|---:|---:|")
    print(f"| {args.runs} runs one after another | {sequential:.3f} | 1.00 |")
    print(f"| {args.runs} runs vectorised (vmap) | {vectorised:.3f} | {result['speedup']:.2f} |")
    write_json(result, args.out)


if __name__ == "__main__":
    main()
