"""Flat layout of a set of tensors: one ``[P]`` vector instead of a dict, as fused optimizers do.

A learned optimizer applies the same small network to every scalar parameter. Running it once
on all ``P`` parameters (rather than once per tensor) costs a handful of kernels whatever the
number of tensors, which is what keeps a learned step close to Adam's on small models. Per-tensor
statistics (the RMS normalisation of the features) become index-based segment reductions,
which vectorise under ``vmap``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from ..core.constants import ConstantCache

_SEGMENTS = ConstantCache()

__all__ = ["FlatLayout", "Segments", "segment_rms_normalise"]


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

    def segments(self, device: torch.device | str | None = None) -> "Segments":
        """The segments of this layout: one per tensor."""
        return Segments.of(self.sizes, device)


@dataclass(frozen=True)
class Segments:
    """Consecutive blocks of ``sizes`` entries, by index: ``ids [P]`` (the block of every entry) and ``counts [S]``.

    Reductions are ``index_add`` and gathers, never a dense ``[S, P]`` one-hot matrix (which is tens
    of GB for a transformer); they work under ``vmap``.
    """

    ids: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def of(cls, sizes: tuple[int, ...], device: torch.device | str | None = None) -> "Segments":
        """The segments of consecutive blocks of ``sizes`` (kept per sizes and device: a step reuses them)."""
        def build() -> "Segments":
            sizes_t = torch.tensor(sizes, device=device)
            return cls(torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes_t), sizes_t)
        return _SEGMENTS.get((tuple(sizes), str(device)), build)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """``[S, f]``: the mean of ``x [P, f]`` over each segment."""
        total = x.new_zeros(len(self.counts), *x.shape[1:]).index_add(0, self.ids, x)
        return total / self.counts.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """``[P, f]``: each entry gets its segment's value of ``values [S, f]``."""
        return values.index_select(0, self.ids)


def segment_rms_normalise(x: torch.Tensor, segments: Segments, eps: float = 1e-8) -> torch.Tensor:
    """Divide ``x [P, f]`` by the root mean square of its segment, feature by feature."""
    return x * segments.scatter(torch.rsqrt(segments.mean(x.square()) + eps))
