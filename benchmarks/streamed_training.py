"""Training a metanetwork on a zoo larger than its memory: shards read batch by batch (issue 25).

Makes a sharded zoo of ``--networks`` MLPs (``--widths``, random weights; network ``i`` draws from seed ``i`` and
has its weights scaled by ``s_i`` in [0.5, 2], the target a metanetwork learns), then trains DWSNet (invariant
readout) to predict ``s`` in a fresh process whose memory is capped at ``--cap-gib``: a cgroup (v1 memory
controller, when this user may make one: it counts the page cache the process reads through, and reclaims it
before it refuses memory) or else ``RLIMIT_AS`` (address space, a looser notion). The inputs are ``ShardedZoo.weights`` (each tensor divided by its RMS over the training networks, computed chunk by
chunk), read by ``metanets.fit`` batch by batch. Reports the zoo's bytes on disk, the training process's peak
resident memory and the cap, seconds and the fit's validation and test error against predicting the mean; and,
for contrast, the peak memory of a process that reads the whole zoo (``ShardedZoo.tensors``, no cap).

    OMP_NUM_THREADS=1 python benchmarks/streamed_training.py --out benchmarks/results/streamed_training_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gradmetanet.provenance import provenance
from gradmetanet.zoos import make_sharded_zoo

TRAIN = """
import json, resource, sys, time, torch
cap, folder, widths, epochs = int(sys.argv[1]), sys.argv[2], [int(w) for w in sys.argv[3].split(",")], int(sys.argv[4])
if cap:                                   # no cgroup could be made: cap the address space instead
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from gradmetanet.core import NetworkSpec
from gradmetanet.metanets import DWSNet, fit
from gradmetanet.zoos import ShardedZoo
torch.set_num_threads(1)
zoo = ShardedZoo(folder)
spec = NetworkSpec.chain(widths, [str(2 * i) for i in range(len(widths) - 1)])
start = time.perf_counter()
n = len(zoo)
order = torch.randperm(n, generator=torch.Generator().manual_seed(0))       # metanets.fit's split of seed 0
held_out = round(0.2 * n)
test, train = order[held_out:2 * held_out], order[2 * held_out:]
rms = zoo.weights(spec).tensor_rms(train.sort().values)
targets = zoo.column("scale")[:, None]
torch.manual_seed(0)
model = DWSNet(spec, 1, 1, hidden=4, layers=2, readout="invariant")
result = fit(model, zoo.weights(spec, scale=rms), targets, epochs=epochs, batch_size=16, lr=3e-3, progress=False)
spread = targets[test].var(unbiased=False).item()
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  * 1024, "val_mse": result.val_history, "test_mse": result.test, "mean_predictor_mse": spread,
                  "epochs_run": result.epochs_run}))
"""
READ_ALL = """
import resource, sys
from gradmetanet.zoos import ShardedZoo
held = sum(t.numel() * t.element_size() for t in ShardedZoo(sys.argv[1]).tensors().values())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, held)
"""


@dataclass(frozen=True)
class SyntheticZoo:
    widths: tuple[int, ...]


def networks_from(widths: list[int]):
    """``generate(start, stop)`` for ``make_sharded_zoo``: network ``i`` from seed ``i``, scaled by ``s_i``."""
    def generate(start: int, stop: int) -> dict[str, torch.Tensor]:
        out: dict[str, list[torch.Tensor]] = {}
        for i in range(start, stop):
            gen = torch.Generator().manual_seed(i)
            scale = 0.5 + 1.5 * torch.rand((), generator=gen)
            for k, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
                out.setdefault(f"params/{2 * k}.weight", []).append(
                    scale * torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in))
                out.setdefault(f"params/{2 * k}.bias", []).append(scale * 0.1 * torch.randn(d_out, generator=gen))
            out.setdefault("scale", []).append(scale)
        return {k: torch.stack(v) for k, v in out.items()}
    return generate


def memory_cgroup(cap: int) -> Path | None:
    """A fresh cgroup (v1 memory controller) limited to ``cap`` bytes, or ``None`` when none can be made here."""
    root = Path("/sys/fs/cgroup/memory")
    group = root / f"gradmetanet-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap))
        return group
    except OSError:
        if group.exists():
            group.rmdir()
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=73000)
    parser.add_argument("--widths", default="32,128,128,10")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cap-gib", type=float, default=0.6, help="the training process's memory cap")
    parser.add_argument("--folder", default=None, help="where the zoo is made (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp) / "zoo"
        start = time.perf_counter()
        make_sharded_zoo(folder, "synthetic_mlp_zoo", SyntheticZoo(tuple(widths)), args.networks, args.shard_size,
                         networks_from(widths), lambda: {"widths": torch.tensor(widths)}, rank=0, world=1)
        made = time.perf_counter() - start
        zoo_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        cap = int(args.cap_gib * 2 ** 30)
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        group = memory_cgroup(cap)
        try:
            done = subprocess.run([sys.executable, "-c", TRAIN, "0" if group else str(cap), str(folder), args.widths,
                                   str(args.epochs)], capture_output=True, text=True, env=env,
                                  preexec_fn=(lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
                                  if group else None)
            cgroup_peak = int((group / "memory.max_usage_in_bytes").read_text()) if group else None
        finally:
            if group:
                group.rmdir()
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        trained = json.loads(done.stdout.strip().splitlines()[-1])
        whole = subprocess.run([sys.executable, "-c", READ_ALL, str(folder)], capture_output=True, text=True,
                               env=env, check=True).stdout.split()
    row = {"networks": args.networks, "widths": widths, "parameters_per_network": sum(
        a * b + b for a, b in zip(widths[:-1], widths[1:])), "shard_size": args.shard_size, "zoo_bytes": zoo_bytes,
        "seconds_to_make": made, "cap": cap, "cap_kind": "cgroup memory" if group else "address space",
        "cgroup_peak_usage": cgroup_peak, **trained,
        "peak_rss_reading_whole_zoo": int(whole[0]), "zoo_to_cap": zoo_bytes / cap}
    gib = 2 ** 30
    charged = "n/a" if cgroup_peak is None else f"{cgroup_peak / gib:.2f} GiB"
    print(f"| zoo on disk | networks | training cap ({row['cap_kind']}) | peak charged to the cap | training peak RSS "
          "(shared libraries included) | zoo / cap | epochs, seconds | test MSE (mean predictor) | peak RSS reading "
          "the whole zoo |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {zoo_bytes / gib:.2f} GiB | {args.networks} | {cap / gib:.2f} GiB | {charged} | "
          f"{trained['peak_rss'] / gib:.2f} GiB | {zoo_bytes / cap:.1f}x | {trained['epochs_run']}, {trained['seconds']:.0f} s | "
          f"{trained['test_mse']:.4f} ({trained['mean_predictor_mse']:.4f}) | {row['peak_rss_reading_whole_zoo'] / gib:.2f} GiB |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": [row], "provenance": provenance("cpu")}, indent=2))


if __name__ == "__main__":
    main()
