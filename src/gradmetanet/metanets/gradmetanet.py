"""GradMetaNet (spec 3.1) and GradMetaNet++ (spec 3.4): metanetworks on sets of decomposed gradients."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..features.neurons import GradientBatch
from ..capture.gradients import GradientSet
from ..core.codes import neuron_codes
from .attention import attend
from .heads import InvariantHead, ProductHead, SetProductHead
from .layers import MLP, NeuronLayer, Reduction, SetNeuronLayer, SetPool, make_activation

__all__ = ["GradMetaNet", "GradMetaNetPlusPlus", "as_gradient_batch", "HeadKind"]

HeadKind = Literal["product", "parameter_product", "set_product", "invariant", "neuron"]
GradientInput = GradientBatch | GradientSet | Sequence[GradientSet]


def as_gradient_batch(inputs: GradientInput) -> tuple[GradientBatch, bool]:
    """Normalise a model input to a :class:`GradientBatch`; the flag says whether it was a single set."""
    if isinstance(inputs, GradientBatch):
        return inputs, False
    if isinstance(inputs, GradientSet):
        return GradientBatch.from_gradient_sets([inputs]), True
    if isinstance(inputs, (list, tuple)) and all(isinstance(g, GradientSet) for g in inputs):
        return GradientBatch.from_gradient_sets(list(inputs)), False
    raise TypeError(f"expected a GradientBatch, a GradientSet or a list of them, got {type(inputs).__name__}")


def _with_codes(batch: GradientBatch, pe_dim: int) -> torch.Tensor:
    """``[B, b, N, f + pe_dim]``: the features with every neuron's positional code appended."""
    x = batch.features
    codes = neuron_codes(batch.spec, pe_dim, x.dtype, x.device)
    return torch.cat([x, codes.expand(*x.shape[:2], -1, -1)], dim=-1)


def _unbatch(out, single: bool):
    if not single:
        return out
    if isinstance(out, dict):
        return {k: v[0] for k, v in out.items()}
    return out[0]


class GradMetaNet(nn.Module):
    """The GradMetaNet pipeline ``head . L_Gamma^k2 . L_Pool . L_Gamma_b^k1 . PE`` (spec eq. 9).

    Its parameters depend on hyper-parameters only, never on the base network's widths, so one
    model runs on MLPs of any width. It is invariant to the order of the examples and
    equivariant to permutations of every permutable neuron space of the spec.

    Args:
        in_features: features per neuron and example (2 for raw ``(a, g)``).
        hidden: width of every equivariant layer.
        set_layers: number of set -> set layers before pooling (``k1``).
        neuron_layers: number of neuron -> neuron layers after pooling (``k2``).
        out_features: features per output entry (per parameter, per neuron, or of the invariant vector).
        head: ``"product"`` (weight space from the pooled neuron features, the paper's head),
            ``"parameter_product"`` (the same, reading the base weights too, spec 3.3),
            ``"set_product"`` (weight space by products of the two neurons' features formed per
            example and then averaged over the set, spec 3.4: it can express same-example
            products such as ``mean_i g_i[m]^2 a_i[n]^2``, which a pooled head cannot),
            ``"invariant"`` (a vector, spec 3.2) or ``"neuron"`` (per-neuron outputs ``{space: [B, n, out]}``).
        head_hidden: width of the head MLPs (default ``hidden``).
        pe_dim: size of the sinusoidal neuron codes.
        reduction: ``"mean"`` (default: outputs keep their scale when ``b`` or ``N`` change, which
            width transfer needs) or ``"sum"`` (as the paper writes the layers).
        fixed_neurons: if > 0, the number of fixed (``Trivial``) neurons of the specs this model
            reads; every set layer then also sees, per example, the features of those neurons
            (:class:`SetNeuronLayer`'s ``fixed_features``). Ties the model to that count.
        head_rank: rank of the ``"set_product"`` head (default ``head_hidden``).
        bias_product: the ``"set_product"`` head's biases read a same-example product too
            (:class:`SetProductHead`).

    ``forward`` takes a :class:`GradientBatch` ``[B, b, N, f]`` (or one / a list of GradientSets)
    and returns ``{param: [B, *param.shape, out]}`` (no ``B`` axis for a single GradientSet),
    ``[B, out]`` for the invariant head, or ``{space: [B, n, out]}`` for the neuron head.
    """

    def __init__(self, in_features: int = 2, hidden: int = 64, set_layers: int = 2, neuron_layers: int = 2,
                 out_features: int = 1, head: HeadKind = "product", head_hidden: int | None = None,
                 head_layers: int = 2, pe_dim: int = 16, activation: str = "gelu",
                 reduction: Reduction = "mean", fixed_neurons: int = 0, head_rank: int | None = None,
                 bias_product: bool = False) -> None:
        super().__init__()
        if set_layers < 0 or neuron_layers < 0 or fixed_neurons < 0:
            raise ValueError("set_layers, neuron_layers and fixed_neurons must be >= 0")
        if head == "set_product" and set_layers == 0:
            raise ValueError("the set_product head reads the last set layer; use set_layers >= 1")
        self.pe_dim, self.head_kind, self.fixed_neurons = pe_dim, head, fixed_neurons
        widths = [in_features + pe_dim] + [hidden] * set_layers
        fixed_widths = [in_features] + [hidden] * set_layers
        self.set_layers = nn.ModuleList(SetNeuronLayer(a, b, reduction, fixed_neurons * f)
                                        for a, b, f in zip(widths[:-1], widths[1:], fixed_widths))
        self.pool = SetPool(widths[-1], hidden, reduction)
        self.neuron_layers = nn.ModuleList(NeuronLayer(hidden, hidden, reduction) for _ in range(neuron_layers))
        self.act = make_activation(activation)
        head_hidden = head_hidden or hidden
        if head in ("product", "parameter_product"):
            self.head = ProductHead(hidden, out_features, head_hidden, head_layers, activation,
                                    parameter_aware=head == "parameter_product")
        elif head == "set_product":
            self.lift = nn.Linear(hidden, hidden)
            self.head = SetProductHead(hidden, out_features, head_hidden, head_layers, activation, reduction,
                                       head_rank, bias_product)
        elif head == "invariant":
            self.head = InvariantHead(hidden, out_features, head_hidden, head_layers, activation, reduction)
        elif head == "neuron":
            self.head = MLP([hidden] + [head_hidden] * (head_layers - 1) + [out_features], activation)
        else:
            raise ValueError(f"unknown head {head!r}; choose product, parameter_product, set_product, "
                             "invariant or neuron")

    def _fixed_index(self, batch: GradientBatch) -> torch.Tensor | None:
        if not self.fixed_neurons:
            return None
        index = batch.spec.fixed_neurons()
        if len(index) != self.fixed_neurons:
            raise ValueError(f"this GradMetaNet was built for specs with {self.fixed_neurons} fixed neurons; "
                             f"this spec has {len(index)} (build it with fixed_neurons={len(index)})")
        return torch.tensor(index, device=batch.features.device)

    def _trunk(self, batch: GradientBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The last set layer's output ``[B, b, N, hidden]`` and the pooled, processed neuron features ``[B, N, hidden]``."""
        x = batch.features
        codes = neuron_codes(batch.spec, self.pe_dim, x.dtype, x.device)      # [N, pe_dim]
        fixed = self._fixed_index(batch)
        for i, layer in enumerate(self.set_layers):
            x = self.act(layer(x, codes if i == 0 else None, None if fixed is None else x[:, :, fixed].flatten(2)))
        h = self.pool(x if len(self.set_layers) else _with_codes(batch, self.pe_dim))
        for layer in self.neuron_layers:
            h = self.act(layer(h))
        return x, h

    def neuron_embeddings(self, batch: GradientBatch) -> torch.Tensor:
        """``[B, N, hidden]``: the pooled, processed neuron features that the pooled heads read."""
        return self._trunk(batch)[1]

    def forward(self, inputs: GradientInput):
        batch, single = as_gradient_batch(inputs)
        if self.head_kind == "set_product":
            x, h = self._trunk(batch)
            return _unbatch(self.head(x + self.lift(h).unsqueeze(1), batch.spec), single)
        h = self.neuron_embeddings(batch)
        if self.head_kind == "invariant":
            out = self.head(h)
        elif self.head_kind == "neuron":
            y = self.head(h)
            out = {name: y[:, sl] for name, sl in batch.spec.space_slices().items()}
        else:
            out = self.head(h, batch.spec, batch.params if self.head_kind == "parameter_product" else None)
        return _unbatch(out, single)


class _SelfAttention(nn.Module):
    """Multi-head self-attention along one axis of ``[B, X, Y, f]`` (one packed projection, :func:`attend`).

    What ``nn.MultiheadAttention`` computes, without its packed-projection bookkeeping (whose backward
    zero-fills and copies the whole projection three times) and without transposing the tensor so that the
    attended axis comes next to the features: :func:`attend` reads the projection in place.
    """

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        # initialised as nn.MultiheadAttention is (same random draws in the same order, so seeded models are
        # those of earlier versions): out-projection as nn.Linear with a zero bias, packed projection Xavier
        self.qkv_weight = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.qkv_bias = nn.Parameter(torch.zeros(3 * hidden))
        self.out = nn.Linear(hidden, hidden)
        nn.init.xavier_uniform_(self.qkv_weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """``x [B, X, Y, f]`` -> ``[B, X, Y, f]``, attending along ``seq_dim`` (1 or 2)."""
        return self.out(attend(F.linear(x, self.qkv_weight, self.qkv_bias), self.heads, seq_dim))


class _AttentionBlock(nn.Module):
    """Pre-norm block: attention across the set, attention across neurons, feed-forward.

    ``x = x + SetAttn(LN(x))``: for every neuron, its ``b`` example features attend to each other.
    ``x = x + NeuronAttn(LN(x))``: for every example, its ``N`` neurons attend to each other.
    ``x = x + FFN(LN(x))``. Cost ``O((b^2 N + N^2 b) f)``. The spec leaves the combination open;
    this is the Set-Transformer recipe, applied one axis after the other.
    """

    def __init__(self, hidden: int, heads: int, ffn_mult: int, activation: str) -> None:
        super().__init__()
        self.norm_set, self.norm_neuron, self.norm_ffn = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.set_attn = _SelfAttention(hidden, heads)
        self.neuron_attn = _SelfAttention(hidden, heads)
        self.ffn = MLP([hidden, ffn_mult * hidden, hidden], activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, b, N, f]`` -> ``[B, b, N, f]``."""
        x = x + self.set_attn(self.norm_set(x), seq_dim=1)
        x = x + self.neuron_attn(self.norm_neuron(x), seq_dim=2)
        return x + self.ffn(self.norm_ffn(x))


class GradMetaNetPlusPlus(nn.Module):
    """GradMetaNet++ (spec 3.4): attention blocks over the set and over neurons, then a set product head.

    There is no pooling stage: the head reads the whole processed set and reduces over examples
    inside its pair MLPs. Same input and output conventions as :class:`GradMetaNet`; heads
    ``"product"`` and ``"invariant"``.
    """

    def __init__(self, in_features: int = 2, hidden: int = 64, blocks: int = 3, heads: int = 8,
                 out_features: int = 1, head: Literal["product", "invariant"] = "product",
                 head_hidden: int | None = None, head_layers: int = 2, pe_dim: int = 16, ffn_mult: int = 2,
                 activation: str = "gelu", reduction: Reduction = "mean", head_rank: int | None = None) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.pe_dim, self.head_kind, self.reduction = pe_dim, head, reduction
        self.embed = nn.Linear(in_features + pe_dim, hidden)
        self.blocks = nn.ModuleList(_AttentionBlock(hidden, heads, ffn_mult, activation) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        head_hidden = head_hidden or hidden
        if head == "product":
            self.head = SetProductHead(hidden, out_features, head_hidden, head_layers, activation, reduction, head_rank)
        elif head == "invariant":
            self.head = InvariantHead(hidden, out_features, head_hidden, head_layers, activation, reduction)
        else:
            raise ValueError(f"unknown head {head!r} for GradMetaNet++; choose product or invariant")

    def forward(self, inputs: GradientInput):
        batch, single = as_gradient_batch(inputs)
        x = self.embed(_with_codes(batch, self.pe_dim))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.head_kind == "invariant":
            out = self.head(x.mean(1) if self.reduction == "mean" else x.sum(1))
        else:
            out = self.head(x, batch.spec)
        return _unbatch(out, single)
