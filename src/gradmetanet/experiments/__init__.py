"""One module per paper experiment: a config dataclass, presets, run(config, out_dir) and a report."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterable, Mapping, TypeVar

Config = TypeVar("Config")


def apply_preset(presets: Mapping[str, Config], preset: str, overrides: Mapping[str, object]) -> Config:
    """``presets[preset]`` with ``overrides`` applied; lists become tuples (configs are hashable)."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(presets)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(presets[preset], **fixed)


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (``None`` and NaN skipped); NaNs if none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    return mean, std
