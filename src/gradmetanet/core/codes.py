"""Positional codes that make fixed neurons unique and tag permutable neurons with their space."""

from __future__ import annotations

import math
import torch

from .constants import ConstantCache
from .groups import Blocks
from .spec import NetworkSpec

_CODES = ConstantCache()

__all__ = ["neuron_ids", "sinusoidal_codes", "neuron_codes"]


def neuron_ids(spec: NetworkSpec) -> torch.Tensor:
    """Integer id ``[N]`` per neuron, spaces concatenated in spec order.

    A neuron of a fixed space (inputs, outputs) gets an id of its own; all neurons of a
    permutable space share one id, the space's. Ids are consecutive and disjoint across spaces
    (the paper's ``e_in(j)``, ``e_layer(l)``, ``e_out(j)``), so a hidden-neuron permutation leaves
    the codes unchanged while an input or output permutation does not. The neurons of each head of a
    ``Blocks`` space (attention) share an id of their own: the paper's head-index code.
    """
    ids, next_id = [], 0
    for space in spec.spaces:
        if isinstance(space.group, Blocks):           # heads keep their identity: one id per head
            heads = space.group.heads
            ids.append(torch.arange(next_id, next_id + heads).repeat_interleave(space.size // heads))
            next_id += heads
        elif space.permutable:
            ids.append(torch.full((space.size,), next_id))
            next_id += 1
        else:
            ids.append(torch.arange(next_id, next_id + space.size))
            next_id += space.size
    return torch.cat(ids)


def sinusoidal_codes(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids ``[len(ids), dim]`` (``dim`` even) of integer positions."""
    if dim % 2:
        raise ValueError(f"sinusoidal code dimension must be even, got {dim}")
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = ids.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def neuron_codes(spec: NetworkSpec, dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``[N, dim]`` positional codes of every neuron of ``spec`` (see :func:`neuron_ids`).

    Kept per spec, size, dtype and device (:class:`~gradmetanet.core.constants.ConstantCache`):
    metanetworks inside an optimizer step would otherwise rebuild them every step. Do not modify
    the result in place.
    """
    return _CODES.get((spec, dim, dtype, str(device)),
                      lambda: sinusoidal_codes(neuron_ids(spec), dim).to(dtype=dtype, device=device))
