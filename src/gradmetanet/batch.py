"""GradientBatch: what metanetworks read, B base networks sharing one spec, b gradients each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .gradients import GradientSet
from .spec import NetworkSpec

__all__ = ["GradientBatch"]


@dataclass
class GradientBatch:
    """Stacked neuron features of ``B`` gradient sets over one spec.

    Attributes:
        spec: the shared base-network spec.
        features: ``[B, b, N, f]``: for each network, example and neuron (all spaces concatenated
            in spec order), ``f`` features (``f = 2`` for raw decomposed gradients: activation, gradient).
        params: optional base-network parameters, name -> ``[B, *param.shape]``, for heads and
            weight-space networks that read the weights as well as the gradients.
    """

    spec: NetworkSpec
    features: torch.Tensor
    params: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.features.dim() != 4:
            raise ValueError(f"GradientBatch.features must be [B, b, N, f], got shape {list(self.features.shape)}")
        if self.features.shape[2] != self.spec.n_neurons:
            raise ValueError(f"GradientBatch.features has {self.features.shape[2]} neurons but the spec has "
                             f"{self.spec.n_neurons} ({[(s.name, s.size) for s in self.spec.spaces]})")
        if self.params is not None:
            shapes = self.spec.param_shapes()
            for name, shape in shapes.items():
                got = self.params.get(name)
                if got is None or tuple(got.shape[1:]) != tuple(shape) or got.shape[0] != self.features.shape[0]:
                    raise ValueError(f"GradientBatch.params[{name!r}] must be [B, {', '.join(map(str, shape))}], "
                                     f"got {None if got is None else list(got.shape)}")

    @classmethod
    def from_gradient_sets(cls, sets: GradientSet | Sequence[GradientSet],
                           params: Sequence[Mapping[str, torch.Tensor]] | None = None) -> "GradientBatch":
        """Stack the neuron features of gradient sets that share a spec and a set size."""
        sets = [sets] if isinstance(sets, GradientSet) else list(sets)
        if not sets:
            raise ValueError("from_gradient_sets needs at least one GradientSet")
        spec = sets[0].spec
        for i, gs in enumerate(sets[1:], 1):
            if gs.spec != spec:
                raise ValueError(f"gradient set {i} has another spec than gradient set 0; a batch shares one spec")
            if gs.batch_size != sets[0].batch_size:
                raise ValueError(f"gradient sets hold {gs.batch_size} and {sets[0].batch_size} examples; "
                                 "a batch needs equal set sizes (select() a common number)")
        feats = torch.stack([torch.cat(list(gs.neuron_features().values()), dim=1) for gs in sets])
        stacked = None
        if params is not None:
            if len(params) != len(sets):
                raise ValueError(f"got {len(params)} parameter dicts for {len(sets)} gradient sets")
            stacked = {name: torch.stack([p[name].detach() for p in params]) for name in spec.param_shapes()}
        return cls(spec, feats, stacked)

    @property
    def set_size(self) -> int:
        return self.features.shape[1]

    def to(self, *args, **kwargs) -> "GradientBatch":
        params = None if self.params is None else {k: v.to(*args, **kwargs) for k, v in self.params.items()}
        return GradientBatch(self.spec, self.features.to(*args, **kwargs), params)

    def permute(self, perms: Mapping[str, torch.Tensor], example_perm: torch.Tensor | None = None) -> "GradientBatch":
        """Apply neuron permutations (and optionally a permutation of the examples) to the batch."""
        feats = self.features.index_select(2, self.spec.neuron_index(perms).to(self.features.device))
        if example_perm is not None:
            feats = feats.index_select(1, example_perm.to(feats.device))
        params = None if self.params is None else self.spec.permute_parameters(self.params, perms, leading=1)
        return GradientBatch(self.spec, feats, params)

    def per_example_grads(self) -> dict[str, torch.Tensor]:
        """Dense per-example gradients ``[B, b, *param.shape]`` rebuilt from raw ``(a, g)`` features.

        Valid for features as :meth:`GradientSet.neuron_features` makes them (channel 0 activation,
        channel 1 gradient, one token per example), before any normalisation.
        """
        if self.features.shape[-1] != 2:
            raise ValueError("per_example_grads needs raw 2-channel features (activation, gradient)")
        slices = self.spec.space_slices()
        grads: dict[str, torch.Tensor] = {}
        for site in self.spec.sites:
            a = self.features[:, :, slices[site.in_space], 0]
            g = self.features[:, :, slices[site.out_space], 1]
            grads[site.weight] = g.unsqueeze(-1) * a.unsqueeze(-2)
            if site.bias is not None:
                grads[site.bias] = g
        return grads
