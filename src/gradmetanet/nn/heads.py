"""Output heads: neuron features -> weight space (product heads) or -> an invariant vector.

A product head gives weight ``W_l[m, n]`` (joining input neuron ``n`` to output neuron ``m``) the
output of a small MLP on the pair of neuron features ``[h_in[n], h_out[m]]``, and bias
``b_l[m]`` an MLP of ``h_out[m]``. The first linear layer of the pair MLP is split into an
input-neuron part and an output-neuron part, computed per neuron and broadcast-added, so the
head costs ``O(N f h + P h^2)`` rather than ``O(P f h)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.spec import NetworkSpec
from .layers import MLP, Reduction, make_activation

__all__ = ["ProductHead", "SetProductHead", "InvariantHead"]


class _PairMLP(nn.Module):
    """MLP on the pair ``(h_in[n], h_out[m] (, w[m, n]))`` for all pairs, with the first layer split.

    The first layer on the concatenation is ``A h_in[n] + B h_out[m] (+ c w[m, n])``, computed
    per neuron and broadcast over pairs.
    """

    def __init__(self, in_features: int, hidden: int, out_features: int, layers: int, activation: str,
                 extra_scalar: bool) -> None:
        super().__init__()
        self.from_in = nn.Linear(in_features, hidden)
        self.from_out = nn.Linear(in_features, hidden, bias=False)
        self.from_value = nn.Linear(1, hidden, bias=False) if extra_scalar else None
        self.act = make_activation(activation)
        self.rest = MLP([hidden] * (layers - 1) + [out_features], activation)

    def forward(self, h_in: torch.Tensor, h_out: torch.Tensor, value: torch.Tensor | None) -> torch.Tensor:
        """``[..., d_out, d_in, out]`` from ``h_in [..., d_in, f]`` and ``h_out [..., d_out, f]``."""
        z = self.from_in(h_in).unsqueeze(-3) + self.from_out(h_out).unsqueeze(-2)
        if self.from_value is not None:
            if value is None:
                raise ValueError("this parameter-aware head needs the base network's parameters "
                                 "(GradientBatch.params)")
            z = z + self.from_value(value.unsqueeze(-1))
        return self.rest(self.act(z))


class _NeuronMLP(nn.Module):
    """MLP on ``[h[m] (, b[m])]`` for the biases."""

    def __init__(self, in_features: int, hidden: int, out_features: int, layers: int, activation: str,
                 extra_scalar: bool) -> None:
        super().__init__()
        self.extra_scalar = extra_scalar
        self.mlp = MLP([in_features + int(extra_scalar)] + [hidden] * (layers - 1) + [out_features], activation)

    def forward(self, h: torch.Tensor, value: torch.Tensor | None) -> torch.Tensor:
        if self.extra_scalar:
            if value is None:
                raise ValueError("this parameter-aware head needs the base network's parameters (GradientBatch.params)")
            h = torch.cat([h, value.unsqueeze(-1)], dim=-1)
        return self.mlp(h)


class ProductHead(nn.Module):
    """Neuron features ``[B, N, f]`` -> per-parameter outputs ``{name: [B, *param.shape, out]}`` (block V).

    With ``parameter_aware=True`` each weight's own value joins its pair (spec 3.3), which lets
    the model output e.g. ``theta^2 * diag(F)`` (OBD saliencies).
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 64, layers: int = 2,
                 activation: str = "gelu", parameter_aware: bool = False) -> None:
        super().__init__()
        if layers < 2:
            raise ValueError("a product head needs at least 2 layers (the pair layer and an output layer)")
        self.weight_mlp = _PairMLP(in_features, hidden, out_features, layers, activation, parameter_aware)
        self.bias_mlp = _NeuronMLP(in_features, hidden, out_features, layers, activation, parameter_aware)

    def forward(self, h: torch.Tensor, spec: NetworkSpec,
                params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        slices = spec.space_slices()
        out: dict[str, torch.Tensor] = {}
        for site in spec.sites:
            h_in, h_out = h[:, slices[site.in_space]], h[:, slices[site.out_space]]
            w = None if params is None else params[site.weight]
            out[site.weight] = self.weight_mlp(h_in, h_out, w)
            if site.bias is not None:
                out[site.bias] = self.bias_mlp(h_out, None if params is None else params[site.bias])
        return out


class SetProductHead(nn.Module):
    """Gradient *set* ``[B, b, N, f]`` -> weight space by a learned outer product summed over the set (GradMetaNet++).

    ``W_l[m, n] = MLP_w(red_i phi(x_i[m]) * psi(x_i[n]))`` and ``b_l[m] = MLP_b(red_i chi(x_i[m]))``,
    with per-neuron MLPs ``phi, psi, chi`` to ``rank`` features and ``red`` a mean (or sum).
    This is the spec's "sum over the batch of pair MLPs" with a multiplicative pair
    interaction: it contains ``sum_i g_i a_i^T`` (the gradient) and ``sum_i g_i^2 (a_i^2)^T`` (the
    empirical Fisher diagonal) as special cases, and the reduction over examples is ``rank``
    batched matrix products, ``O(b P rank)`` work in BLAS and no ``[b, P, hidden]`` intermediate.
    An additive pair MLP inside the sum would cost ``O(b P hidden^2)`` elementwise work and memory.
    With ``bias_product=True`` the bias reads ``red_i chi(x_i[m]) * omega(x_i[m])``, a same-example
    product of two maps of its neuron, as the weights do (``mean_i g_i[m]^2`` weighted by a
    function of the example).
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 32, layers: int = 2,
                 activation: str = "gelu", reduction: Reduction = "mean", rank: int | None = None,
                 bias_product: bool = False) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError("a set product head needs at least 1 output layer")
        rank = rank or hidden
        self.phi = MLP([in_features, hidden, rank], activation)
        self.psi = MLP([in_features, hidden, rank], activation)
        self.chi = MLP([in_features, hidden, rank], activation)
        self.omega = MLP([in_features, hidden, rank], activation) if bias_product else None
        self.weight_out = MLP([rank] + [hidden] * (layers - 1) + [out_features], activation)
        self.bias_out = MLP([rank] + [hidden] * (layers - 1) + [out_features], activation)
        self.reduction = reduction

    def forward(self, x: torch.Tensor, spec: NetworkSpec) -> dict[str, torch.Tensor]:
        slices = spec.space_slices()
        scale = 1.0 / x.shape[1] if self.reduction == "mean" else 1.0
        phi, psi, chi = self.phi(x), self.psi(x), self.chi(x)            # [B, b, N, rank]
        if self.omega is not None:
            chi = chi * self.omega(x)
        out: dict[str, torch.Tensor] = {}
        for site in spec.sites:
            left = phi[:, :, slices[site.out_space]].permute(0, 3, 2, 1)   # [B, rank, d_out, b]
            right = psi[:, :, slices[site.in_space]].permute(0, 3, 1, 2)   # [B, rank, b, d_in]
            pooled = torch.matmul(left, right).permute(0, 2, 3, 1) * scale  # [B, d_out, d_in, rank]
            out[site.weight] = self.weight_out(pooled)
            if site.bias is not None:
                out[site.bias] = self.bias_out(chi[:, :, slices[site.out_space]].sum(1) * scale)
        return out


class InvariantHead(nn.Module):
    """Neuron features ``[B, N, f]`` -> ``[B, out]``: an MLP of the neuron mean (or sum); spec 3.2."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 64, layers: int = 2,
                 activation: str = "gelu", reduction: Reduction = "mean") -> None:
        super().__init__()
        self.reduction = reduction
        self.mlp = MLP([in_features] + [hidden] * (layers - 1) + [out_features], activation)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pooled = h.mean(1) if self.reduction == "mean" else h.sum(1)
        return self.mlp(pooled)
