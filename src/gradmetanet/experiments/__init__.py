"""One module per paper experiment: a config dataclass, presets, run(config, out_dir) and a report."""

from __future__ import annotations

import math
from dataclasses import fields, replace
from types import UnionType
from typing import Iterable, Literal, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

Config = TypeVar("Config")


def apply_preset(presets: Mapping[str, Config], preset: str, overrides: Mapping[str, object]) -> Config:
    """``presets[preset]`` with ``overrides`` applied, every value checked against the field's type (lists become
    tuples: configs are hashable) and every count checked to be positive, before anything is computed; raises
    ``ValueError`` with one line naming the setting."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(presets)}")
    base = presets[preset]
    hints = get_type_hints(type(base))
    unknown = [k for k in overrides if k not in hints]
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; the settings are {list(hints)}")
    zero_allowed = {f.name for f in fields(base) if f.default == 0}
    fixed = {k: _checked(k, v, hints[k], k in zero_allowed) for k, v in overrides.items()}
    return replace(base, **fixed)


def _checked(name: str, value: object, hint: object, zero_allowed: bool) -> object:
    """``value`` as a value of type ``hint`` (int -> float, list -> tuple), or a one-line ``ValueError``. Integers
    are counts and sizes, at least 1 (0 where ``zero_allowed``: a default of 0 means "off"), seeds excepted."""
    converted = _convert(value, hint)
    if converted is _BAD:
        raise ValueError(f"setting {name}={value!r}: expected {_describe(hint)}")
    for number in _numbers(converted):
        minimum = 0 if zero_allowed else 1
        if isinstance(number, int) and not name.endswith("seed") and number < minimum:
            raise ValueError(f"setting {name}={value!r}: counts and sizes must be at least {minimum}")
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"setting {name}={value!r}: must be finite")
        if isinstance(number, float) and ("lr" in name or "fraction" in name or name in ("sigma", "omega_0")) \
                and number <= 0:
            raise ValueError(f"setting {name}={value!r}: must be positive")
    return converted


_BAD = object()


def _convert(value: object, hint: object) -> object:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        for option in args:
            converted = _convert(value, option)
            if converted is not _BAD:
                return converted
        return _BAD
    if hint is type(None):
        return None if value is None else _BAD
    if origin is Literal:
        return value if value in args else _BAD
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _BAD
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            return _BAD
        items = [_convert(v, k) for v, k in zip(value, kinds)]
        return _BAD if any(i is _BAD for i in items) else tuple(items)
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _BAD
    if hint is str:
        return value if isinstance(value, str) else _BAD
    return value


def _describe(hint: object) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        inner = _describe(args[0]) if len(args) == 2 and args[1] is Ellipsis else ", ".join(map(_describe, args))
        return f"a list of {inner}" if len(args) == 2 and args[1] is Ellipsis else f"a list [{inner}]"
    if origin is Literal:
        return f"one of {list(args)}"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _numbers(value: object) -> list:
    if isinstance(value, tuple):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (``None`` and NaN skipped); NaNs if none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    return mean, std


def format_mean_std(mean: float, std: float, runs: int, digits: int = 4) -> str:
    """``mean ± std`` over several runs; the mean alone for one run (whose spread is unknown, not zero)."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if runs > 1 else f"{mean:.{digits}f}"


def convergence_line(converged: Mapping[str, Iterable[bool]], patience: int | None, unit: str = "fits") -> str:
    """The sentence every table ends with: how many fits of each model stopped improving on validation
    (:func:`gradmetanet.metanets.training.has_converged`), ``converged {label: [flag per fit]}``."""
    window = f"last {patience} epochs" if patience else "last fifth of the epochs"
    counts = []
    for label, flags in converged.items():
        flags = list(flags)
        counts.append(f"{label} {sum(flags)}/{len(flags)}")
    return (f"Converged (no better validation loss, or less than 1% better, over the {window}; {unit} per "
            f"model): " + (", ".join(counts) if counts else "no learned model run") + ".")


def best_on_grid(scores: Mapping[float, float]) -> float:
    """The grid value (a learning rate, say) with the lowest score; a non-finite score (a diverged run) loses."""
    return min(scores, key=lambda value: scores[value] if math.isfinite(scores[value]) else math.inf)


def on_grid_edge(value: float, grid: Iterable[float]) -> bool:
    """Whether ``value`` is the smallest or largest value of ``grid`` (a wider grid may do better; a grid of one
    value is all edge)."""
    grid = list(grid)
    return value in (min(grid), max(grid))
