"""GradientBatch: what metanetworks read, B base networks sharing one spec, b gradients each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..capture.gradients import GradientSet
from ..core.incidence import incidence_counts
from ..core.spec import NetworkSpec, SpecElement

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
        tokens: ``T``, the tokens per example folded into the set axis (``b = examples * T``,
            example-major), which :meth:`per_example_grads` sums back.
    """

    spec: NetworkSpec
    features: torch.Tensor
    params: dict[str, torch.Tensor] | None = None
    tokens: int = 1

    def __post_init__(self) -> None:
        if self.features.dim() != 4:
            raise ValueError(f"GradientBatch.features must be [B, b, N, f], got shape {list(self.features.shape)}")
        if self.features.shape[0] == 0 or self.features.shape[1] == 0:
            raise ValueError(f"GradientBatch is empty (features {list(self.features.shape)}); it needs at least one "
                             "network and one example")
        if self.features.shape[1] % self.tokens:
            raise ValueError(f"set axis of {self.features.shape[1]} rows is not a whole number of examples of "
                             f"{self.tokens} tokens")
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
        feats = torch.stack([gs.neuron_tensor() for gs in sets])
        tokens = feats.shape[1] // sets[0].batch_size
        stacked = None
        if params is not None:
            if len(params) != len(sets):
                raise ValueError(f"got {len(params)} parameter dicts for {len(sets)} gradient sets")
            stacked = {name: torch.stack([p[name].detach() for p in params]) for name in spec.param_shapes()}
        return cls(spec, feats, stacked, tokens)

    @property
    def set_size(self) -> int:
        return self.features.shape[1]

    def to(self, *args, **kwargs) -> "GradientBatch":
        params = None if self.params is None else {k: v.to(*args, **kwargs) for k, v in self.params.items()}
        return GradientBatch(self.spec, self.features.to(*args, **kwargs), params, self.tokens)

    def select(self, index: torch.Tensor | slice) -> "GradientBatch":
        """The networks ``index`` (a slice, index tensor or boolean mask) of the batch."""
        params = None if self.params is None else {k: v[index] for k, v in self.params.items()}
        return GradientBatch(self.spec, self.features[index], params, self.tokens)

    def transform(self, element: SpecElement, example_perm: torch.Tensor | None = None) -> "GradientBatch":
        """Move raw ``(a, g)`` features (channel 0 like activations, 1 like gradients) and the parameters by
        ``element``, and optionally permute the examples. Features with other channels: use
        ``spec.transform_neurons`` with their own roles."""
        roles = ("act", "grad") if self.features.shape[-1] == 2 else None
        feats = self.spec.transform_neurons(self.features, element, dim=2, roles=roles)
        if example_perm is not None:
            feats = feats.index_select(1, example_perm.to(feats.device))
        params = None if self.params is None else self.spec.transform_parameters(self.params, element, leading=1)
        return GradientBatch(self.spec, feats, params, self.tokens)

    def per_example_grads(self) -> dict[str, torch.Tensor]:
        """Dense per-example gradients ``[B, b, *param.shape]`` rebuilt from raw ``(a, g)`` features.

        Valid for features as :meth:`GradientSet.neuron_tensor` makes them (channel 0 activation,
        channel 1 gradient), before any normalisation; the ``tokens`` of an example are summed.
        """
        if self.features.shape[-1] != 2:
            raise ValueError("per_example_grads needs raw 2-channel features (activation, gradient)")
        other = self.spec.sites_not_whole()
        if other:
            raise ValueError(f"sites {other} are not whole linear layers, whose gradients are the outer products of "
                             "their neuron features; use GradientSet.per_example_grads()")
        pooled = [n for n, (r, w) in incidence_counts(self.spec).items() if r > 1 or w > 1]
        if pooled:
            raise ValueError(f"spaces {pooled} pool the incidences of several sites, so the features no longer hold "
                             "each site's own factors; use GradientSet.per_example_grads()")
        slices = self.spec.space_slices()
        grads: dict[str, torch.Tensor] = {}
        for site in self.spec.sites:
            B, T = self.features.shape[0], self.tokens
            a = self.features[:, :, slices[site.in_space], 0].reshape(B, -1, T, slices[site.in_space].stop -
                                                                       slices[site.in_space].start)
            g = self.features[:, :, slices[site.out_space], 1].reshape(B, -1, T, slices[site.out_space].stop -
                                                                        slices[site.out_space].start)
            grads[site.weight] = torch.einsum("xbto,xbti->xboi", g, a)
            if site.bias is not None:
                grads[site.bias] = g.sum(2)
        return grads
