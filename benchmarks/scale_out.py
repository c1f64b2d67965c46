"""Zoo generation on 1 and 2 processes, and reading a sharded zoo shard by shard (issue 25).

For each zoo kind (ReLU MLPs and tanh CNNs of the classifier zoo, default recipes: 20-300 SGD steps each), make
``--networks`` networks into a sharded folder with 1 process and with 2 (as ``torchrun`` starts them: ``RANK``,
``WORLD_SIZE``), and report networks per second and the speed-up. Then read the 2-process zoo back two ways in a
fresh process each and report the peak resident memory: every shard at once (``ShardedZoo.tensors``) and one
shard at a time (what a streaming reader holds). Prints a Markdown table and writes JSON with provenance.

    OMP_NUM_THREADS=1 python benchmarks/scale_out.py --networks 64 --out benchmarks/results/scale_out_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradmetanet.provenance import provenance

MAKE = "import sys; from gradmetanet.cli import main; sys.exit(main(sys.argv[1:]))"
READ = """
import resource, sys, torch
from gradmetanet.zoos import ShardedZoo
zoo = ShardedZoo(sys.argv[1])
if sys.argv[2] == "all":
    held = sum(t.numel() * t.element_size() for t in zoo.tensors().values())
else:
    held = 0
    for k in range(zoo.manifest["shards"]):
        held = max(held, sum(t.numel() * t.element_size() for t in zoo.shard(k).values()))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, held)
"""
KINDS = {"mlp-relu": ["--set", "architecture='mlp'", "--set", "activation='relu'"],
         "cnn-tanh": ["--set", "architecture='cnn'", "--set", "activation='tanh'"]}


def make(folder: Path, kind: str, networks: int, shard_size: int, processes: int) -> float:
    """Seconds to make the zoo with ``processes`` processes at once."""
    args = ["zoo", "make", "classifier", "--out", str(folder), "--shard-size", str(shard_size),
            "--set", f"networks={networks}", *KINDS[kind]]
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", MAKE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=os.environ | {"RANK": str(r), "WORLD_SIZE": str(processes), "OMP_NUM_THREADS": "1"})
             for r in range(processes)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(err.decode())
    return time.perf_counter() - start


def peak_memory(folder: Path, how: str) -> tuple[int, int]:
    """``(peak RSS bytes, tensor bytes held)`` of a fresh process reading the zoo ``how`` (``all`` or ``shards``)."""
    out = subprocess.run([sys.executable, "-c", READ, str(folder), how], capture_output=True, text=True, check=True,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    rss, held = out.stdout.split()
    return int(rss), int(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            one = make(Path(tmp) / f"{kind}-1", kind, args.networks, args.shard_size, 1)
            two = make(Path(tmp) / f"{kind}-2", kind, args.networks, args.shard_size, 2)
            whole, whole_held = peak_memory(Path(tmp) / f"{kind}-2", "all")
            streamed, shard_held = peak_memory(Path(tmp) / f"{kind}-2", "shards")
            rows.append({"zoo": kind, "networks": args.networks, "shard_size": args.shard_size,
                         "seconds_1_process": one, "seconds_2_processes": two,
                         "networks_per_second_1": args.networks / one, "networks_per_second_2": args.networks / two,
                         "speedup": one / two, "peak_rss_whole": whole, "tensor_bytes_whole": whole_held,
                         "peak_rss_streamed": streamed, "tensor_bytes_one_shard": shard_held})
    print("| zoo | networks | 1 process (networks/s) | 2 processes (networks/s) | speed-up | peak RSS, whole zoo "
          "| peak RSS, shard by shard | tensors held: whole / one shard |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['zoo']} | {r['networks']} | {r['networks_per_second_1']:.2f} | {r['networks_per_second_2']:.2f} | "
              f"{r['speedup']:.2f}x | {r['peak_rss_whole'] / 2 ** 20:.0f} MiB | {r['peak_rss_streamed'] / 2 ** 20:.0f} MiB"
              f" | {r['tensor_bytes_whole'] / 2 ** 20:.2f} / {r['tensor_bytes_one_shard'] / 2 ** 20:.2f} MiB |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "provenance": provenance("cpu")}, indent=2))


if __name__ == "__main__":
    main()
