"""Output heads: neuron features -> weight space (product heads) or -> an invariant vector.

A product head gives weight ``W_l[m, n]`` (joining input neuron ``n`` to output neuron ``m``) the
output of a small MLP on the pair of neuron features ``[h_in[n], h_out[m]]``, and bias
``b_l[m]`` an MLP of ``h_out[m]``. The first linear layer of the pair MLP is split into an
input-neuron part and an output-neuron part, computed per neuron and broadcast-added, so the
head costs ``O(N f h + P h^2)`` rather than ``O(P f h)``.

Parameters are read from their axis labels (:func:`per_parameter`): ``(row out, col in)`` is a
pair map, ``(col in, row out)`` (an embedding table) the same map transposed, ``(row s)`` a bias
map, and ``(diag s)`` (a LayerNorm gain, which joins each neuron to itself) the pair map on the
diagonal, ``(h[m], h[m])``. A convolution kernel ``(row out, col in, fixed kh, fixed kw)`` gets its
channel pair's output at every tap (neuron features average a convolution's activations over the taps,
so they carry nothing that tells taps apart; the learned optimizer adds per-entry features of its own).
Parameters cut into row blocks (attention's packed Q, K, V) are produced block by block and joined.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..core.spec import NetworkSpec, Parameter
from .layers import MLP, Reduction, make_activation

__all__ = ["ProductHead", "SetProductHead", "InvariantHead", "per_parameter"]

#: ``pair(in space, out space, part) -> [B, d_out, d_in, f]``; ``diagonal`` and ``bias``: ``(space, part) -> [B, d, f]``
PairMap = Callable[[str, str, Parameter], torch.Tensor]
NeuronMap = Callable[[str, Parameter], torch.Tensor]


def per_parameter(spec: NetworkSpec, pair: PairMap, diagonal: NeuronMap, bias: NeuronMap) -> dict[str, torch.Tensor]:
    """``{param: [B, *param.shape, f]}`` from the three maps, dispatched on each part's axis labels."""
    out: dict[str, torch.Tensor] = {}
    for name, parts in spec.parts().items():
        pieces = []
        for p in parts:
            lead = 0                       # leading axes of size 1 (a ViT table [1, V, d]) are carried along
            while lead < len(p.axes) and p.axes[lead].role == "fixed" and p.axes[lead].size == 1:
                lead += 1
            p = Parameter(p.name, p.axes[lead:], p.rows)
            roles = tuple(a.role for a in p.axes)
            if roles[:2] == ("row", "col") and all(r == "fixed" for r in roles[2:]):
                out_pair = pair(p.axes[1].space, p.axes[0].space, p)                  # [B, d_out, d_in, f]
                taps = [a.size for a in p.axes[2:]]
                pieces.append(out_pair.view(*out_pair.shape[:3], *[1] * len(taps), out_pair.shape[-1])
                              .expand(*out_pair.shape[:3], *taps, out_pair.shape[-1]))
            elif roles == ("col", "row"):
                pieces.append(pair(p.axes[0].space, p.axes[1].space, p).transpose(1, 2))
            elif roles == ("row",):
                pieces.append(bias(p.axes[0].space, p))
            elif roles == ("diag",):
                pieces.append(diagonal(p.axes[0].space, p))
            else:
                raise ValueError(f"parameter {name!r} has axes {roles}; product heads handle (row, col), (col, row), "
                                 "(row, col, fixed...), (row,) and (diag,)")
            if lead:
                pieces[-1] = pieces[-1].view(pieces[-1].shape[0], *[1] * lead, *pieces[-1].shape[1:])
        out[name] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
    return out


def _value(params: dict[str, torch.Tensor] | None, p: Parameter) -> torch.Tensor | None:
    """The base network's values of part ``p`` (``[B, *part shape]``), or ``None``."""
    if params is None:
        return None
    t = params[p.name]
    return t if p.rows is None else t[:, p.rows[0]:p.rows[1]]


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

    def forward(self, h_in: torch.Tensor, h_out: torch.Tensor, value: torch.Tensor | None,
                diagonal: bool = False) -> torch.Tensor:
        """``[..., d_out, d_in, out]`` from ``h_in [..., d_in, f]`` and ``h_out [..., d_out, f]``; with ``diagonal``
        the pairs ``(h[m], h[m])`` only, ``[..., d, out]`` (``h_in`` and ``h_out`` the same neurons)."""
        if diagonal:
            z = self.from_in(h_in) + self.from_out(h_out)
        else:
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
        sl = spec.space_slices()
        return per_parameter(
            spec,
            pair=lambda i, o, p: self.weight_mlp(h[:, sl[i]], h[:, sl[o]], _value(params, p)),
            diagonal=lambda s, p: self.weight_mlp(h[:, sl[s]], h[:, sl[s]], _value(params, p), diagonal=True),
            bias=lambda s, p: self.bias_mlp(h[:, sl[s]], _value(params, p)))


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
        scale = 1.0 / x.shape[1] if self.reduction == "mean" else 1.0
        phi, psi, chi = self.phi(x), self.psi(x), self.chi(x)            # [B, b, N, rank]
        if self.omega is not None:
            chi = chi * self.omega(x)
        # one copy each into the layouts the batched products read ([B, rank, N, b] and [B, rank, b, N]), then views
        # per space: the backward then joins contiguous gradient blocks instead of scattering into permuted ones
        left = spec.split_by_space(phi.permute(0, 3, 2, 1).contiguous(), 2)      # [B, rank, d, b] per space
        right = spec.split_by_space(psi.permute(0, 3, 1, 2).contiguous(), 3)     # [B, rank, b, d] per space
        chi_s = spec.split_by_space(chi.sum(1) * scale, 1)                        # [B, d, rank] per space

        def pair(i: str, o: str, p: Parameter) -> torch.Tensor:
            return self.weight_out(torch.matmul(left[o], right[i]).permute(0, 2, 3, 1) * scale)   # [B, d_out, d_in, f]

        def diagonal(s: str, p: Parameter) -> torch.Tensor:
            return self.weight_out((left[s] * right[s].transpose(2, 3)).sum(3).transpose(1, 2) * scale)

        return per_parameter(spec, pair, diagonal, bias=lambda s, p: self.bias_out(chi_s[s]))


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
