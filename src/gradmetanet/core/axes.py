"""The labels of a parameter's axes: which space each axis lives on, and in which role (row, column, diagonal)
or a fixed size. A :class:`~gradmetanet.core.spec.Site` declares its :class:`Parameter` s through its kind
(:mod:`gradmetanet.core.kinds`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Axis", "Parameter"]


@dataclass(frozen=True)
class Axis:
    """One axis of a parameter: ``role`` is ``row``, ``col`` or ``diag`` of ``space``, or ``fixed`` of ``size``."""

    role: Literal["row", "col", "diag", "fixed"]
    space: str | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if self.role == "fixed":
            if self.size is None or self.space is not None:
                raise ValueError("a fixed axis has a size and no space")
        elif self.role in ("row", "col", "diag"):
            if self.space is None:
                raise ValueError(f"a {self.role} axis names its space")
        else:
            raise ValueError(f"unknown axis role {self.role!r}; choose row, col, diag or fixed")


@dataclass(frozen=True)
class Parameter:
    """A tensor of the network (``name`` as in ``model.named_parameters()``) and its axis labels.

    ``rows = (start, stop)`` makes it a block of rows (axis 0) of the named tensor: the packed
    ``in_proj_weight`` of an ``nn.MultiheadAttention`` is three such parts, one per Q, K, V site.
    """

    name: str
    axes: tuple[Axis, ...]
    rows: tuple[int, int] | None = None
