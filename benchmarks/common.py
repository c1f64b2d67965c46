"""Measurement plumbing shared by the benchmarks: peak memory in a fresh process, machine facts, output."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; peak CPU memory needs Linux")


def peak_extra_bytes(step: Callable[[], object], device: str, runs: int = 3) -> int:
    """Peak memory that ``runs`` calls of ``step`` add over what is allocated before them.

    CUDA: ``max_memory_allocated`` over the allocated baseline. CPU: the resident-set
    high-water mark (``VmHWM``, reset first through ``/proc/self/clear_refs``) over the resident
    set before. Call it in a fresh process (see :func:`run_child`) so earlier work does not count.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(runs):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    for _ in range(runs):
        step()
    return proc_status_bytes("VmHWM") - base


def run_child(script: str, args: list[str]) -> int:
    """Run ``script --child *args`` in a fresh interpreter and return the integer it prints last.

    The caller first hands the memory it freed back to the system (glibc), so that the child's peak and the
    memory the caller kept from its own timings (:func:`use_retaining_allocator`) never add up.
    """
    from gradmetanet.performance import release_freed_memory
    release_freed_memory()
    out = subprocess.run([sys.executable, script, "--child", *args], check=True, capture_output=True, text=True,
                         env=os.environ.copy())
    return int(out.stdout.strip().splitlines()[-1])


def use_retaining_allocator() -> None:
    """Keep freed memory in the process, as ``gradmetanet run`` does (glibc only; a note on stderr elsewhere)."""
    from gradmetanet.performance import retain_freed_memory
    if not retain_freed_memory():
        print("retain_freed_memory: not glibc, allocator left as it is", file=sys.stderr)


def machine(device: str) -> dict:
    """What the figures were measured on."""
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return {"device": device, "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_count": os.cpu_count()}


def write_json(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x (a scaling exponent)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
