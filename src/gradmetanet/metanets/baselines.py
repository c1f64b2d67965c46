"""Baselines in GradMetaNet's calling convention: each reads a GradientBatch, returns weight space.

- :class:`MLPConcat`: an MLP on the flattened decomposed gradients (no symmetry).
- :class:`NeuronAsymmetric`: DeepSets over examples of concatenated neuron features
  (example-order invariant, not neuron equivariant).
- :class:`BatchAsymmetric`: GradMetaNet with the examples folded into the features
  (neuron equivariant, not example-order invariant).
- :class:`WeightSpaceNet`: a permutation-equivariant weight-space network (NFN/DWS-style
  layers) on the dense per-example gradients, concatenated (``Theta[b]``) or averaged (``Theta[1]``).

All but :class:`WeightSpaceNet` depend on the base network's widths (and the set size): they
are built for one spec. :class:`WeightSpaceNet` runs at any depth and width; with ``concat`` it
depends on the set size.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..features.neurons import GradientBatch
from ..core.spec import NetworkSpec
from ..features.weightspace import WeightSpaceFeatures, WeightSpaceInput, read_weight_space, unflatten_weights
from .backbones import DWSNet
from .gradmetanet import GradientInput, GradMetaNet, _unbatch, as_gradient_batch
from .layers import MLP, make_activation

__all__ = ["FlatMLP", "FlatWeightMLP", "MLPConcat", "NeuronAsymmetric", "BatchAsymmetric", "WeightSpaceNet", "weight_space_inputs"]


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
        return _unbatch(unflatten_weights(flat, self.spec, self.out_features), single)


class FlatMLP(nn.Module):
    """An MLP on the flattened ``[b * N * f]`` features of a gradient set, one ``[out_features]`` vector per set:
    the invariant baseline with no symmetry (it runs on the set size and widths it was built for)."""

    def __init__(self, n_inputs: int, hidden: int = 64, out_features: int = 1) -> None:
        super().__init__()
        self.mlp = MLP([n_inputs, hidden, hidden, out_features])

    def forward(self, batch: GradientBatch) -> torch.Tensor:
        """``[M, b, N, f]`` features -> ``[M, out_features]``."""
        return self.mlp(batch.features.flatten(1))


class FlatWeightMLP(nn.Module):
    """An MLP on all weights of a network, flattened: weight-space features ``{name: [M, *shape, C]}`` ->
    ``[M, out_features]`` (no symmetry: the baseline of every invariant weight-space task)."""

    def __init__(self, n_inputs: int, hidden: int = 128, layers: int = 3, out_features: int = 1) -> None:
        super().__init__()
        self.mlp = MLP([n_inputs] + [hidden] * layers + [out_features])

    def forward(self, x: WeightSpaceInput) -> torch.Tensor:
        """Features are flattened in their spec's parameter order; a dict in its own key order."""
        if isinstance(x, WeightSpaceFeatures):
            return self.mlp(x.flatten())
        return self.mlp(torch.cat([v.flatten(1) for v in read_weight_space(x, None).values()], 1))


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
        return _unbatch(unflatten_weights(self.rho(pooled), self.spec, self.out_features), single)


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
        self.spec, self.mode = spec, mode
        self.net = DWSNet(spec, in_channels, out_features, hidden=hidden, layers=layers, pe_dim=pe_dim,
                          activation=activation)

    def forward(self, inputs: GradientInput | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        single, spec = False, self.spec
        if isinstance(inputs, dict):
            x = inputs
        else:
            batch, single = as_gradient_batch(inputs)
            spec = batch.spec
            x = weight_space_inputs(batch, self.mode)
        return _unbatch(self.net(x, spec), single)
