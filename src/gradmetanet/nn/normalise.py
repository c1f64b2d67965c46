"""Normalisers of metanetwork inputs that respect the spec's groups.

A statistic computed per neuron of a permutable space would differ between neurons that a
symmetry exchanges, and the normalised input would no longer move with the group: a model that
is exactly equivariant would stop being so on normalised data. These normalisers therefore share
statistics over every neuron of a permutable space (per space and channel), and keep per-neuron
statistics only on ``Trivial`` spaces (inputs, outputs), where neurons have an identity.
Statistics are buffers (saved with ``state_dict``), fitted once on training data.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..core.spec import NetworkSpec

__all__ = ["NeuronNormaliser", "WeightSpaceNormaliser"]


class NeuronNormaliser(nn.Module):
    """Standardise neuron features ``[..., N, f]``: ``(x - mean) / std`` with ``mean, std: [N, f]``.

    Permutable spaces share one statistic per channel; ``per_fixed_neuron=True`` gives each neuron
    of a ``Trivial`` space its own (``False`` shares within those spaces too).
    """

    def __init__(self, spec: NetworkSpec, features: int = 2, per_fixed_neuron: bool = False,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.spec, self.per_fixed_neuron, self.eps = spec, per_fixed_neuron, eps
        self.register_buffer("mean", torch.zeros(spec.n_neurons, features))
        self.register_buffer("std", torch.ones(spec.n_neurons, features))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> "NeuronNormaliser":
        """Statistics from training features ``[..., N, f]`` (every leading axis is pooled)."""
        flat = features.reshape(-1, *features.shape[-2:]).to(self.mean.dtype)
        for space, sl in zip(self.spec.spaces, self.spec.space_slices().values()):
            block = flat[:, sl]
            if space.permutable or not self.per_fixed_neuron:
                self.mean[sl] = block.mean((0, 1))
                self.std[sl] = block.std((0, 1)).clamp_min(self.eps)
            else:
                self.mean[sl] = block.mean(0)
                self.std[sl] = block.std(0).clamp_min(self.eps)
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean.to(features.dtype)) / self.std.to(features.dtype)

    def inverse(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.std.to(features.dtype) + self.mean.to(features.dtype)


class WeightSpaceNormaliser(nn.Module):
    """Standardise weight-space features ``{param: [B, *shape, C]}`` with one mean and std per parameter tensor.

    A statistic over a whole tensor is invariant to every permutation of its axes, so the
    normalised features move with the group exactly as the raw ones do.
    """

    def __init__(self, spec: NetworkSpec, eps: float = 1e-12) -> None:
        super().__init__()
        self.spec, self.eps = spec, eps
        self.names = list(spec.param_shapes())
        self.register_buffer("mean", torch.zeros(len(self.names)))
        self.register_buffer("std", torch.ones(len(self.names)))

    @torch.no_grad()
    def fit(self, tensors: Mapping[str, torch.Tensor]) -> "WeightSpaceNormaliser":
        for i, name in enumerate(self.names):
            self.mean[i] = tensors[name].mean()
            self.std[i] = tensors[name].std().clamp_min(self.eps)
        return self

    def forward(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for i, name in enumerate(self.names):
            t = tensors[name]
            out[name] = (t - self.mean[i].to(t.dtype)) / self.std[i].to(t.dtype)
        return out
