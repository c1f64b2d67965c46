"""Normalisers of metanetwork inputs that respect the spec's groups.

A statistic computed per neuron of a permutable space would differ between neurons that a
symmetry exchanges, and the normalised input would no longer move with the group: a model that
is exactly equivariant would stop being so on normalised data. These normalisers therefore share
statistics over every neuron of a permutable space (per space and channel), and keep per-neuron
statistics only on ``Trivial`` spaces (inputs, outputs), where neurons have an identity.
Subtracting a mean commutes with permutations only: on a space whose group also flips signs or
scales neurons (``SignPerm``, ``ScalePerm``, ``GL``), and on tensors with an axis there, the
normalisers divide by a fitted root mean square and subtract nothing (division by a constant
commutes with every linear action). Statistics are buffers (saved with ``state_dict``), fitted
once on training data.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..core.groups import Blocks, Group, Perm, Trivial
from ..core.spec import NetworkSpec

__all__ = ["NeuronNormaliser", "WeightSpaceNormaliser", "GradientScale", "permutes_only", "space_rms"]


def space_rms(features: torch.Tensor, spec: NetworkSpec, eps: float = 1e-12) -> torch.Tensor:
    """``[M, 1, N, C]``: each network's root mean square of ``features [M, b, N, C]`` per channel over its set and
    each space's neurons (clamped at ``eps``), repeated over the space: a statistic every permutation and sign
    flip leaves unchanged, so dividing by it keeps the features' symmetry (one network's scale, not the zoo's)."""
    scale = features.new_ones(features.shape[0], 1, *features.shape[2:])
    for sl in spec.space_slices().values():
        scale[:, :, sl] = features[:, :, sl].square().mean((1, 2), keepdim=True).sqrt().clamp_min(eps)
    return scale


def permutes_only(group: Group) -> bool:
    """Whether every element of ``group`` acts by a permutation (so subtracting a shared mean commutes with it)."""
    if isinstance(group, Blocks):
        return permutes_only(group.inner)
    return isinstance(group, (Trivial, Perm))


def _centre_and_scale(values: torch.Tensor, dims, centred: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` over ``dims``; uncentred (``0`` and the root mean square) when ``centred`` is false."""
    if centred:
        return values.mean(dims), values.std(dims).clamp_min(eps)
    rms = values.square().mean(dims).sqrt().clamp_min(eps)
    return torch.zeros_like(rms), rms


class NeuronNormaliser(nn.Module):
    """Standardise neuron features ``[..., N, f]``: ``(x - mean) / std`` with ``mean, std: [N, f]``.

    Permutable spaces share one statistic per channel (uncentred where the group flips signs or
    scales, see the module docstring); ``per_fixed_neuron=True`` gives each neuron of a ``Trivial``
    space its own (``False`` shares within those spaces too).
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
            dims = (0, 1) if space.permutable or not self.per_fixed_neuron else 0
            self.mean[sl], self.std[sl] = _centre_and_scale(block, dims, permutes_only(space.group), self.eps)
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean.to(features.dtype)) / self.std.to(features.dtype)

    def inverse(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.std.to(features.dtype) + self.mean.to(features.dtype)


class WeightSpaceNormaliser(nn.Module):
    """Standardise weight-space features ``{param: [B, *shape, C]}`` with one mean and std per parameter tensor.

    The statistics are constants once fitted. Subtracting one constant from every entry commutes
    with permuting them, but not with flipping or scaling them: a tensor with an axis on a space
    whose group does more than permute (``SignPerm``, ``ScalePerm``, ``GL``) is divided by its root
    mean square and not centred, so the normalised features move with every group of the spec
    exactly as the raw ones do.
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
            axes = [a for p in self.spec.parts()[name] for a in p.axes if a.space is not None]
            centred = all(permutes_only(self.spec.space(a.space).group) for a in axes)
            self.mean[i], self.std[i] = _centre_and_scale(tensors[name], None, centred, self.eps)
        return self

    def forward(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for i, name in enumerate(self.names):
            t = tensors[name]
            out[name] = (t - self.mean[i].to(t.dtype)) / self.std[i].to(t.dtype)
        return out


class GradientScale(nn.Module):
    """Per-network, per-space scale of the output gradients, for targets that are homogeneous in ``g``.

    Gradient sizes vary over orders of magnitude between networks, and a Fisher diagonal scales
    with them (``F[W[m, n]] = mean_i g_i[m]^2 a_i[n]^2`` is of degree 2 in ``g``). A model that reads
    ``g`` as it is must learn that product over every scale; dividing each network's ``g`` by its
    root-mean-square over the set and the neurons of a space, and multiplying the model's output by
    the square of that scale (:meth:`output_scale`), leaves it a problem of one scale. A mean over
    a whole space is unchanged by permuting or sign-flipping its neurons, so the normalised input
    moves with those groups exactly; a per-neuron positive scaling (``ScalePerm``) or a ``GL`` action
    changes the mean, so specs with such spaces are refused.

    Shapes: ``features [M, b, N, f]`` with ``g`` in channel ``channel``; scales ``[M, N]``.
    """

    def __init__(self, spec: NetworkSpec, channel: int = 1, eps: float = 1e-30) -> None:
        super().__init__()
        scaled = [s.name for s in spec.spaces if s.group.name in ("scale_perm", "gl")]
        if scaled:
            raise ValueError(f"GradientScale cannot respect the groups of spaces {scaled}: a per-space mean of g^2 "
                             "changes when neurons are rescaled (ScalePerm, GL); use it on specs whose groups "
                             "permute or flip signs, or normalise with NeuronNormaliser")
        self.spec, self.channel, self.eps = spec, channel, eps

    def scales(self, features: torch.Tensor) -> torch.Tensor:
        """``[M, N]``: the mean of ``g^2`` over the set and the neuron's space (1 where a space has no gradient)."""
        g2 = features[..., self.channel].square()
        out = torch.ones(features.shape[0], self.spec.n_neurons, dtype=features.dtype, device=features.device)
        for sl in self.spec.space_slices().values():
            mean = g2[:, :, sl].mean((1, 2))
            out[:, sl] = torch.where(mean > self.eps, mean, torch.ones_like(mean)).unsqueeze(1)
        return out

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` with ``g`` divided by its scale's root, and the scales ``[M, N]``."""
        scales = self.scales(features)
        out = features.clone()
        out[..., self.channel] = features[..., self.channel] / scales.sqrt().unsqueeze(1)
        return out, scales

    def output_scale(self, scales: torch.Tensor) -> torch.Tensor:
        """``[M, P]`` in the spec's parameter order: each parameter's scale of degree 2 in ``g`` (its out-space's)."""
        slices = self.spec.space_slices()
        other = self.spec.sites_not_whole()
        if other:
            raise ValueError(f"GradientScale.output_scale handles whole linear sites; {other} are not (LayerNorm, "
                             "embedding or attention sites have other gradient degrees per axis)")
        site_of = {name: site for site in self.spec.sites for name in (site.weight, site.bias) if name}
        parts = []
        for name, shape in self.spec.param_shapes().items():
            if name not in site_of:
                raise ValueError(f"parameter {name!r} belongs to no site, so it has no output-gradient scale; "
                                 "GradientScale handles specs whose parameters are all site weights and biases")
            site = site_of[name]
            out_scale = scales[:, slices[site.out_space]]                    # [M, d_out]
            parts.append(out_scale.reshape(-1, *([out_scale.shape[1]] + [1] * (len(shape) - 1))).expand(-1, *shape)
                         .flatten(1))
        return torch.cat(parts, 1)
