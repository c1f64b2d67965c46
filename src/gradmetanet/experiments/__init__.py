"""One module per paper experiment: a config dataclass, presets, run(config, out_dir) and a report."""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, TypeVar

Config = TypeVar("Config")


def apply_preset(presets: Mapping[str, Config], preset: str, overrides: Mapping[str, object]) -> Config:
    """``presets[preset]`` with ``overrides`` applied; lists become tuples (configs are hashable)."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(presets)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(presets[preset], **fixed)
