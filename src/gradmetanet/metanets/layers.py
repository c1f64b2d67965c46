"""The equivariant linear layers of GradMetaNet (spec section 3.1, blocks II-IV) and a plain MLP.

Shapes: ``B`` base networks, ``b`` examples per set, ``N`` neurons (all spaces concatenated,
identified by positional codes), ``f`` features. Every reduction is a mean by default, so a
trained model sees inputs of the same scale when ``b`` or ``N`` change (width transfer); the
paper writes sums, available as ``reduction="sum"``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from ..models.mlp import ACTIVATIONS

__all__ = ["SetNeuronLayer", "SetPool", "NeuronLayer", "MLP", "make_activation", "Reduction"]

Reduction = Literal["mean", "sum"]


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _reduce(x: torch.Tensor, dims: tuple[int, ...], reduction: Reduction) -> torch.Tensor:
    """The mean or sum over ``dims`` (kept). A mean is the sum scaled afterwards: its backward then broadcasts
    the small gradient as a view, where ``Tensor.mean``'s divides a full-size copy."""
    total = x.sum(dims, keepdim=True)
    if reduction == "sum":
        return total
    count = 1
    for d in dims:
        count *= x.shape[d]
    return total / count


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


class SetNeuronLayer(nn.Module):
    """Gradient set -> gradient set (block II): ``[B, b, N, f_in] -> [B, b, N, f_out]``.

    ``y = M1 x + M2 red_b x + M3 red_N x + M4 red_{b,N} x + c`` (Hartford et al.'s exchangeable
    layer on the example x neuron matrix). Invariant in form to both axes' permutations, so it
    commutes with them. Cost ``O(b N f_in f_out)``.

    With ``fixed_features > 0`` the layer adds ``M5 z_i`` to every neuron of example ``i``, where
    ``z_i [fixed_features]`` holds that example's features at the spec's fixed neurons (inputs,
    outputs). Fixed neurons are never permuted, so the term is equivariant; it gives every neuron
    a *same-example* view of the input, which a mean over neurons only blurs.
    """

    def __init__(self, in_features: int, out_features: int, reduction: Reduction = "mean",
                 fixed_features: int = 0) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction
        self.own = nn.Linear(in_features, out_features)
        self.over_set = nn.Linear(in_features, out_features, bias=False)
        self.over_neurons = nn.Linear(in_features, out_features, bias=False)
        self.over_both = nn.Linear(in_features, out_features, bias=False)
        self.from_fixed = nn.Linear(fixed_features, out_features, bias=False) if fixed_features else None

    def forward(self, x: torch.Tensor, codes: torch.Tensor | None = None,
                fixed: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, b, N, f]``; optional ``codes [N, c]``: per-neuron constants that act as if appended to every
        example's features (``f + c == in_features``), without materialising the ``[B, b, N, c]`` copy;
        ``fixed [B, b, fixed_features]`` when the layer was built with ``fixed_features``.

        The pooled terms are small (``[B, 1, N, f_out]``, ``[B, b, 1, f_out]``); they are broadcast into one
        full-size tensor, into which the per-entry matrix product accumulates (``addmm``), so a layer writes
        its ``[B, b, N, f_out]`` output once, and its backward reads the output gradient a few times but
        writes no full-size intermediate besides the input gradient.
        """
        if (fixed is None) != (self.from_fixed is None):
            raise ValueError("pass `fixed` exactly when the layer was built with fixed_features > 0")
        f, r = x.shape[-1], self.reduction
        if f + (0 if codes is None else codes.shape[-1]) != self.own.in_features:
            raise ValueError(f"features ({f}) + codes ({0 if codes is None else codes.shape[-1]}) != "
                             f"in_features ({self.own.in_features})")
        w = [layer.weight for layer in (self.own, self.over_set, self.over_neurons, self.over_both)]
        over_set = _reduce(x, (1,), r)                                               # [B, 1, N, f]
        per_neuron = (nn.functional.linear(over_set, w[1][:, :f], self.own.bias)
                      + nn.functional.linear(_reduce(over_set, (2,), r), w[3][:, :f]))  # [B, 1, N, f_out]
        if codes is not None:
            per_neuron = per_neuron + self._code_terms(codes, w, f, x.shape[1])
        per_example = nn.functional.linear(_reduce(x, (2,), r), w[2][:, :f])          # [B, b, 1, f_out]
        if fixed is not None:
            per_example = per_example + self.from_fixed(fixed).unsqueeze(2)
        y = per_neuron + per_example                                                # [B, b, N, f_out]
        return torch.addmm(y.flatten(0, -2), x.flatten(0, -2), w[0][:, :f].T).view(y.shape)

    def _code_terms(self, codes: torch.Tensor, w: list[torch.Tensor], f: int, b: int) -> torch.Tensor:
        """``[N, f_out]``: what the code columns of the four weights add, split off by linearity: they act on
        ``[N, c]`` (and its reduction over neurons) once, not on every example."""
        over_b = 1.0 if self.reduction == "mean" else float(b)          # reducing a constant over the set
        codes_n = _reduce(codes, (0,), self.reduction)                   # [1, c]
        return codes @ (w[0][:, f:] + over_b * w[1][:, f:]).T + codes_n @ (w[2][:, f:] + over_b * w[3][:, f:]).T


class SetPool(nn.Module):
    """Pool the set away (block III): ``[B, b, N, f_in] -> [B, N, f_out]``, ``M1 red_b x + M2 red_{b,N} x + c``."""

    def __init__(self, in_features: int, out_features: int, reduction: Reduction = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction
        self.per_neuron = nn.Linear(in_features, out_features)
        self.global_ = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = _reduce(x, (1,), self.reduction).squeeze(1)          # [B, N, f]
        return self.per_neuron(pooled) + self.global_(_reduce(pooled, (1,), self.reduction))


class NeuronLayer(nn.Module):
    """Gradient -> gradient (block IV), DeepSets over neurons: ``[B, N, f_in] -> [B, N, f_out]``."""

    def __init__(self, in_features: int, out_features: int, reduction: Reduction = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction
        self.own = nn.Linear(in_features, out_features)
        self.over_neurons = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.own(x) + self.over_neurons(_reduce(x, (1,), self.reduction))


class MLP(nn.Sequential):
    """``Linear -> act -> ... -> Linear`` through ``widths`` (no activation after the last layer)."""

    def __init__(self, widths: Sequence[int], activation: str = "gelu") -> None:
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(widths) - 2:
                layers.append(make_activation(activation))
        super().__init__(*layers)
