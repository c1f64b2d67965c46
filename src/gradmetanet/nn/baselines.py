"""Baselines in GradMetaNet's calling convention: each reads a GradientBatch, returns weight space.

- :class:`MLPConcat`: an MLP on the flattened decomposed gradients (no symmetry).
- :class:`NeuronAsymmetric`: DeepSets over examples of concatenated neuron features
  (example-order invariant, not neuron equivariant).
- :class:`BatchAsymmetric`: GradMetaNet with the examples folded into the features
  (neuron equivariant, not example-order invariant).
- :class:`WeightSpaceNet`: a permutation-equivariant weight-space network (NFN/DWS-style
  layers) on the dense per-example gradients, concatenated (``Theta[b]``) or averaged (``Theta[1]``).

All but :class:`WeightSpaceNet` depend on the base network's widths (and the set size): they
are built for one spec. :class:`WeightSpaceNet` depends on the depth and, with ``concat``, on
the set size.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..batch import GradientBatch
from ..spec import NetworkSpec
from .encoding import neuron_codes
from .gradmetanet import GradientInput, GradMetaNet, _unbatch, as_gradient_batch
from .layers import MLP, make_activation

__all__ = ["MLPConcat", "NeuronAsymmetric", "BatchAsymmetric", "WeightSpaceLayer", "WeightSpaceNet",
           "unflatten_weight_space", "weight_space_inputs"]


def unflatten_weight_space(flat: torch.Tensor, spec: NetworkSpec, out_features: int) -> dict[str, torch.Tensor]:
    """``[B, P * out] -> {param: [B, *param.shape, out]}`` in spec parameter order."""
    out, offset = {}, 0
    for name, shape in spec.param_shapes().items():
        n = shape.numel() * out_features
        out[name] = flat[:, offset:offset + n].reshape(flat.shape[0], *shape, out_features)
        offset += n
    return out


def _check_spec(model_spec: NetworkSpec, batch: GradientBatch, name: str) -> None:
    if batch.spec != model_spec:
        raise ValueError(f"{name} was built for another base network (spec {model_spec.to_json()}); "
                         "it only runs on the widths it was built for")


class MLPConcat(nn.Module):
    """MLP on the flattened ``[b * N * f]`` features of a fixed spec and set size."""

    def __init__(self, spec: NetworkSpec, set_size: int, in_features: int = 2, hidden: int = 64,
                 layers: int = 3, out_features: int = 1, activation: str = "gelu") -> None:
        super().__init__()
        self.spec, self.out_features = spec, out_features
        widths = [set_size * spec.n_neurons * in_features] + [hidden] * (layers - 1) + [spec.n_params * out_features]
        self.mlp = MLP(widths, activation)

    def forward(self, inputs: GradientInput) -> dict[str, torch.Tensor]:
        batch, single = as_gradient_batch(inputs)
        _check_spec(self.spec, batch, "MLPConcat")
        flat = self.mlp(batch.features.flatten(1))
        return _unbatch(unflatten_weight_space(flat, self.spec, self.out_features), single)


class NeuronAsymmetric(nn.Module):
    """DeepSets over examples: ``rho(mean_i phi(concat of example i's neuron features))``."""

    def __init__(self, spec: NetworkSpec, in_features: int = 2, hidden: int = 64, phi_layers: int = 2,
                 rho_layers: int = 2, out_features: int = 1, activation: str = "gelu") -> None:
        super().__init__()
        self.spec, self.out_features = spec, out_features
        self.phi = MLP([spec.n_neurons * in_features] + [hidden] * phi_layers, activation)
        self.act = make_activation(activation)
        self.rho = MLP([hidden] * rho_layers + [spec.n_params * out_features], activation)

    def forward(self, inputs: GradientInput) -> dict[str, torch.Tensor]:
        batch, single = as_gradient_batch(inputs)
        _check_spec(self.spec, batch, "NeuronAsymmetric")
        pooled = self.act(self.phi(batch.features.flatten(2))).mean(1)
        return _unbatch(unflatten_weight_space(self.rho(pooled), self.spec, self.out_features), single)


class BatchAsymmetric(nn.Module):
    """GradMetaNet on ``Gamma_1[b f]``: each neuron's features of all examples concatenated in order."""

    def __init__(self, set_size: int, in_features: int = 2, **gradmetanet_kwargs) -> None:
        super().__init__()
        self.set_size = set_size
        self.net = GradMetaNet(in_features=set_size * in_features, **gradmetanet_kwargs)

    def forward(self, inputs: GradientInput):
        batch, single = as_gradient_batch(inputs)
        if batch.set_size != self.set_size:
            raise ValueError(f"BatchAsymmetric was built for sets of {self.set_size} examples, got {batch.set_size}")
        folded = batch.features.transpose(1, 2).flatten(2).unsqueeze(1)       # [B, 1, N, b f]
        return _unbatch(self.net(GradientBatch(batch.spec, folded, batch.params)), single)


def weight_space_inputs(batch: GradientBatch, mode: Literal["concat", "average"]) -> dict[str, torch.Tensor]:
    """Dense per-example gradients as weight-space features ``{param: [B, *param.shape, C]}``.

    ``concat``: ``C = b`` (every example a channel, in order); ``average``: ``C = 1`` (the mean gradient).
    """
    grads = batch.per_example_grads()                          # [B, b, *shape]
    if mode == "concat":
        return {k: g.movedim(1, -1) for k, g in grads.items()}
    if mode == "average":
        return {k: g.mean(1).unsqueeze(-1) for k, g in grads.items()}
    raise ValueError(f"mode must be 'concat' or 'average', got {mode!r}")


class WeightSpaceLayer(nn.Module):
    """One equivariant linear layer on ``{param: [B, *shape, C_in]} -> [B, *shape, C_out]``.

    For weight ``W_l[m, n]`` between spaces ``s_in`` and ``s_out``::

        W'[m, n] = A W[m, n] + U_in z_in[n] + U_out z_out[m] + G q
        b'[m]    = A_b b[m] + V_out z_out[m] + G_b q

    where ``z_s`` summarises each neuron of space ``s`` (row-mean of the weights writing it, its
    bias, column-mean of the weights reading it, its positional code) and ``q`` holds the mean
    of every parameter tensor. Every term commutes with hidden-neuron permutations, as in the
    NP layers of Zhou et al. (NFN) and the DWS layers of Navon et al.; the positional codes of
    fixed neurons break the input/output symmetry that the group does not have.
    """

    def __init__(self, n_sites: int, in_channels: int, out_channels: int, pe_dim: int = 8) -> None:
        super().__init__()
        summary = 3 * in_channels + pe_dim
        n_global = 2 * in_channels * n_sites
        sites = range(n_sites)
        self.weight_self = nn.ModuleList(nn.Linear(in_channels, out_channels) for _ in sites)
        self.weight_in = nn.ModuleList(nn.Linear(summary, out_channels, bias=False) for _ in sites)
        self.weight_out = nn.ModuleList(nn.Linear(summary, out_channels, bias=False) for _ in sites)
        self.weight_global = nn.ModuleList(nn.Linear(n_global, out_channels, bias=False) for _ in sites)
        self.bias_self = nn.ModuleList(nn.Linear(in_channels, out_channels) for _ in sites)
        self.bias_out = nn.ModuleList(nn.Linear(summary, out_channels, bias=False) for _ in sites)
        self.bias_global = nn.ModuleList(nn.Linear(n_global, out_channels, bias=False) for _ in sites)
        self.n_sites, self.pe_dim = n_sites, pe_dim

    def forward(self, x: dict[str, torch.Tensor], spec: NetworkSpec) -> dict[str, torch.Tensor]:
        if len(spec.sites) != self.n_sites:
            raise ValueError(f"this weight-space layer was built for {self.n_sites} linear layers, "
                             f"got a network with {len(spec.sites)}")
        some = next(iter(x.values()))
        B, C = some.shape[0], some.shape[-1]
        codes = neuron_codes(spec, self.pe_dim, some.dtype, some.device)
        slices = spec.space_slices()
        summaries = {}
        for space in spec.spaces:
            parts = []
            writers, readers = spec.writers(space.name), spec.readers(space.name)
            zeros = some.new_zeros(B, space.size, C)
            parts.append(x[writers[0].weight].mean(2) if writers else zeros)
            parts.append(x[writers[0].bias] if writers and writers[0].bias is not None else zeros)
            parts.append(x[readers[0].weight].mean(1) if readers else zeros)
            parts.append(codes[slices[space.name]].expand(B, -1, -1))
            summaries[space.name] = torch.cat(parts, -1)
        q_parts = []
        for site in spec.sites:
            q_parts.append(x[site.weight].mean((1, 2)))
            q_parts.append(x[site.bias].mean(1) if site.bias is not None else some.new_zeros(B, C))
        q = torch.cat(q_parts, -1)
        out = {}
        for i, site in enumerate(spec.sites):
            z_in, z_out = summaries[site.in_space], summaries[site.out_space]
            out[site.weight] = (self.weight_self[i](x[site.weight]) + self.weight_in[i](z_in).unsqueeze(1)
                                + self.weight_out[i](z_out).unsqueeze(2) + self.weight_global[i](q)[:, None, None])
            if site.bias is not None:
                out[site.bias] = (self.bias_self[i](x[site.bias]) + self.bias_out[i](z_out)
                                  + self.bias_global[i](q)[:, None])
        return out


class WeightSpaceNet(nn.Module):
    """Equivariant weight-space network on dense per-example gradients (DWS/NFN-style baseline).

    Input: a :class:`GradientBatch` (turned into ``Theta[b]`` or ``Theta[1]`` by ``mode``) or a
    weight-space dict ``{param: [B, *shape, C]}`` with ``spec=``. Output ``{param: [B, *shape, out]}``.
    Its cost grows with ``P * b`` (``concat``), the point of the comparison with GradMetaNet.
    """

    def __init__(self, spec: NetworkSpec, in_channels: int, hidden: int = 32, layers: int = 3,
                 out_features: int = 1, mode: Literal["concat", "average"] = "concat", pe_dim: int = 8,
                 activation: str = "gelu") -> None:
        super().__init__()
        if layers < 1:
            raise ValueError("WeightSpaceNet needs at least one layer")
        self.spec, self.mode = spec, mode
        widths = [in_channels] + [hidden] * (layers - 1) + [out_features]
        self.layers = nn.ModuleList(WeightSpaceLayer(len(spec.sites), a, b, pe_dim)
                                    for a, b in zip(widths[:-1], widths[1:]))
        self.act = make_activation(activation)

    def forward(self, inputs: GradientInput | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        single, spec = False, self.spec
        if isinstance(inputs, dict):
            x = inputs
        else:
            batch, single = as_gradient_batch(inputs)
            spec = batch.spec
            x = weight_space_inputs(batch, self.mode)
        for i, layer in enumerate(self.layers):
            x = layer(x, spec)
            if i < len(self.layers) - 1:
                x = {k: self.act(v) for k, v in x.items()}
        return _unbatch(x, single)
