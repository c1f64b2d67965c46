"""Wall-clock speed-up of PES meta-training sharded over processes (``torchrun``) against one process.

    python benchmarks/pes_distributed.py [--processes 1 2] [--rule ds] [--meta-steps 20] [--preset digits]
                                         [--out benchmarks/results/pes_distributed.json]

Runs ``gradmetanet run lopt --preset PRESET --meta-only`` (``digits``, or ``family-cpu``: four
members of different shapes) for one rule, ``--meta-steps`` meta-steps
(no meta-validation), once per process count, each process on one thread, in a fresh directory;
the time includes start-up and the staggering of the pairs, as a user's run would. Prints a
Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_json


def run_once(processes: int, rule: str, meta_steps: int, preset: str) -> float:
    """Seconds for one meta-training run on ``processes`` processes."""
    bin_dir = Path(sys.executable).parent
    overrides = ["--set", f"optimizers=('{rule}',)", "--set", f"meta_steps={meta_steps}", "--set", "evaluate_every=0"]
    with tempfile.TemporaryDirectory() as out:
        args = ["run", "lopt", "--preset", preset, "--meta-only", "--out", out, *overrides]
        if processes == 1:
            command = [str(bin_dir / "gradmetanet"), *args]
        else:
            command = [str(bin_dir / "torchrun"), f"--nproc-per-node={processes}", "-m", "gradmetanet.cli", *args]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, capture_output=True)
        return time.perf_counter() - start


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rule", default="ds")
    parser.add_argument("--meta-steps", type=int, default=20)
    parser.add_argument("--preset", default="digits", choices=["digits", "family-cpu"])
    parser.add_argument("--out", default=None, help="default: benchmarks/results/pes_distributed[-PRESET].json")
    args = parser.parse_args()
    out = args.out or f"benchmarks/results/pes_distributed{'' if args.preset == 'digits' else '-' + args.preset}.json"
    seconds = {n: run_once(n, args.rule, args.meta_steps, args.preset) for n in args.processes}
    base = seconds[args.processes[0]]
    rows = [{"processes": n, "seconds": s, "speedup": base / s} for n, s in seconds.items()]
    result = {"benchmark": "pes_distributed", **machine("cpu"), "rule": args.rule, "meta_steps": args.meta_steps,
              "preset": f"{args.preset} (8 pairs, truncation 50, horizon 1000)", "threads_per_process": 1, "rows": rows}
    lines = [f"PES meta-training, rule {args.rule}, {args.meta_steps} meta-steps of the {args.preset} preset, one thread "
             "per process", "", "| processes | seconds | speed-up |", "|---:|---:|---:|"]
    lines += [f"| {r['processes']} | {r['seconds']:.1f} | {r['speedup']:.2f} |" for r in rows]
    print("\n".join(lines))
    write_json(result, out)
    return result


if __name__ == "__main__":
    main()
