"""Wall-clock timing helpers shared by the demo and the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["median_time"]


def median_time(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CUDA-synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_times(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3
                             ) -> dict[str, float]:
    """Median seconds of each function, running them in turn within every repeat.

    Interleaving puts the same machine noise (frequency changes, other processes) on every
    function, which matters when the quantity of interest is a ratio between them.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
