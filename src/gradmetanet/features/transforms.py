"""Function-preserving changes of networks, for testing what metanetworks make of them.

Three kinds, each leaving every network's function exactly as it was:

- :func:`random_symmetry`: a random element of the spec's groups (permutations, signs of odd activations,
  positive scales of ReLU), the changes an equivariant metanetwork must not notice;
- :func:`widen` with ``how="zero"``: new neurons in a hidden space whose outgoing weights are zero (their
  incoming weights and biases are random, so they compute something nobody reads);
- :func:`widen` with ``how="split"``: copies of existing neurons (same incoming weights and bias), each
  original's outgoing weights split between it and its copy (fractions drawn in ``[0.2, 0.8]``).

A widened network has another spec (the space is larger), which :func:`widen` returns with the parameters.
Parameters are ``{name: [*lead, *shape]}`` with ``leading`` axes of networks in front (a zoo).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Mapping

import torch

from ..core.spec import NetworkSpec

__all__ = ["random_symmetry", "widen"]


def random_symmetry(params: Mapping[str, torch.Tensor], spec: NetworkSpec, generator: torch.Generator | None = None,
                    leading: int = 0) -> dict[str, torch.Tensor]:
    """``params`` moved by one random element of ``spec``'s groups (the same for every network of the lead axes)."""
    return spec.transform_parameters(params, spec.sample(generator), leading=leading)


def _check_widenable(spec: NetworkSpec, space: str) -> None:
    s = spec.space(space)
    if not s.permutable:
        raise ValueError(f"space {space!r} is {s.group.name}: its neurons are inputs or outputs of the network, and "
                         "adding some changes what the network reads or returns; widen a hidden space")
    for p in spec.parameters:
        on_space = [a for a in p.axes if a.space == space]
        if any(a.role == "diag" for a in on_space):
            raise ValueError(f"space {space!r} is read by {p.name!r} along its diagonal (a LayerNorm gain): a "
                             "normalisation over the space changes when neurons are added; widen another space")
        if on_space and p.rows is not None:
            raise ValueError(f"parameter {p.name!r} is a block of rows of a packed tensor; widening {space!r} would "
                             "shift the other blocks")
    for site in spec.readers(space):
        if site.kind not in ("linear", "conv"):
            raise ValueError(f"space {space!r} is read by site {site.name!r} of kind {site.kind!r}; only linear and "
                             "convolution readers are known to ignore a neuron whose outgoing weights are zero")


def widen(params: Mapping[str, torch.Tensor], spec: NetworkSpec, space: str, extra: int,
          how: Literal["zero", "split"] = "zero", generator: torch.Generator | None = None,
          leading: int = 0) -> tuple[dict[str, torch.Tensor], NetworkSpec]:
    """Add ``extra`` neurons to the hidden ``space`` without changing the function; returns the new parameters
    and the widened spec. ``how="zero"``: new neurons with random incoming weights and zero outgoing weights;
    ``"split"``: copies of ``extra`` distinct neurons chosen at random, outgoing weights split with the original.

    Refused (``ValueError``, naming the cause) where the change would not preserve the function: input or
    output spaces, spaces normalised by a LayerNorm, packed parameters, readers other than linear maps and
    convolutions.
    """
    if how not in ("zero", "split"):
        raise ValueError(f"how must be 'zero' or 'split', got {how!r}")
    _check_widenable(spec, space)
    size = spec.space(space).size
    if extra < 1 or (how == "split" and extra > size):
        raise ValueError(f"extra must be in 1..{size if how == 'split' else 'any'} for how={how!r}, got {extra}")
    source = torch.randperm(size, generator=generator)[:extra]
    fraction = 0.2 + 0.6 * torch.rand(extra, generator=generator, dtype=torch.float64)
    out = dict(params)
    for p in spec.parameters:
        t = out[p.name]
        for i, axis in enumerate(p.axes):
            if axis.space != space:
                continue
            dim = leading + i
            if axis.role == "row" and how == "zero":
                fresh = torch.randn(*t.shape[:dim], extra, *t.shape[dim + 1:], generator=generator, dtype=t.dtype)
                t = torch.cat([t, fresh * t.std().clamp_min(1e-3)], dim)
            elif axis.role == "row":
                t = torch.cat([t, t.index_select(dim, source)], dim)
            elif how == "zero":
                t = torch.cat([t, t.new_zeros(*t.shape[:dim], extra, *t.shape[dim + 1:])], dim)
            else:
                shape = [1] * t.dim()
                shape[dim] = extra
                keep = fraction.to(t.dtype).view(shape)
                moved = t.index_select(dim, source)
                t = torch.cat([t.index_copy(dim, source, moved * keep), moved * (1 - keep)], dim)
        out[p.name] = t
    spaces = tuple(replace(s, size=s.size + extra) if s.name == space else s for s in spec.spaces)
    return out, NetworkSpec(spaces, spec.sites, tuple(p for p in spec.parameters))
