"""Flat layout of a set of tensors: one ``[P]`` vector instead of a dict, as fused optimizers do.

A learned optimizer applies the same small network to every scalar parameter. Running it once
on all ``P`` parameters (rather than once per tensor) costs a handful of kernels whatever the
number of tensors, which is what keeps a learned step close to Adam's on small models. Per-tensor
statistics (the RMS normalisation of the features) become segment reductions, written as
products with constant ``[S, P]`` segment matrices so that they vectorise under ``vmap``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

__all__ = ["FlatLayout", "Segments", "segments_of", "segment_rms_normalise"]


@dataclass(frozen=True)
class FlatLayout:
    """Names and shapes of the tensors, in order; ``flatten`` and ``unflatten`` convert."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        sizes = tuple(int(torch.Size(s).numel()) for s in self.shapes)
        object.__setattr__(self, "sizes", sizes)

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> "FlatLayout":
        return cls(tuple(tensors), tuple(tuple(t.shape) for t in tensors.values()))

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[P, *trailing]`` from ``{name: [*shape, *trailing]}`` (the trailing axes must agree)."""
        trailing = next(iter(tensors.values())).shape[len(self.shapes[0]):]
        return torch.cat([tensors[n].reshape(-1, *trailing) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: [*shape, *trailing]}`` views of ``flat [P, *trailing]``."""
        trailing = flat.shape[1:]
        return {n: chunk.view(*s, *trailing) for n, s, chunk in zip(self.names, self.shapes, flat.split(self.sizes))}

    def segments(self, dtype: torch.dtype, device: torch.device) -> "Segments":
        """The constant segment matrices of this layout (cached per dtype and device)."""
        return segments_of(self.sizes, dtype, device)


@dataclass(frozen=True)
class Segments:
    """``mean [S, P]`` averages each segment's entries; ``scatter [P, S]`` copies a segment value to its entries."""

    mean: torch.Tensor
    scatter: torch.Tensor


@lru_cache(maxsize=64)
def segments_of(sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Segments:
    """Segments of consecutive blocks of ``sizes`` entries (cached)."""
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    one_hot = torch.nn.functional.one_hot(ids, len(sizes)).to(dtype=dtype, device=device)     # [P, S]
    counts = torch.tensor(sizes, dtype=dtype, device=device)
    return Segments((one_hot / counts).T.contiguous(), one_hot.contiguous())


def segment_rms_normalise(x: torch.Tensor, segments: Segments, eps: float = 1e-8) -> torch.Tensor:
    """Divide ``x [P, f]`` by the root mean square of its segment, feature by feature."""
    return x * (segments.scatter @ torch.rsqrt(segments.mean @ x.square() + eps))
