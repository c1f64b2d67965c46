"""Weight-space backbones: networks on weight-space features ``{param: [B, *param.shape, C]}``.

All three are built from a spec, ``Model(spec, in_features, out_features, ...)``, and return the
same keys with ``out_features`` channels (``readout="equivariant"``) or ``[B, out_features]``
(``readout="invariant"``):

- :class:`DWSNet`: DWS / NFN-style equivariant linear layers generated from the axis labels
  (:class:`~gradmetanet.metanets.WeightSpaceLayer`), permutation-equivariant.
- :class:`GMN`: a graph metanetwork on the spec's graph (:class:`NetworkGraph`: neurons as
  vertices with their biases, weights as edges): message passing along the edges (forward, or
  forward and backward), permutation-equivariant; vertex codes single out fixed neurons.
- :class:`ScaleGMN`: the same graph with the spec's sign (tanh, sine) and positive-scale (ReLU)
  groups. A vertex feature moves as ``q_i h_i`` and an edge feature as ``q_i e_ij / q_j``. Messages
  are products of equivariant features times *invariant* gates (symmetrisation ``phi(h) + phi(-h)``
  for signs, canonicalisation ``h / |h|`` for positive scales); equivariant paths carry no additive
  constants except on vertices no scaling moves. Backward messages (``bidirectional=True``) read
  the *reciprocal* edge ``1 / e_ij``, which moves as ``q_j / q_i``, so they are equivariant to positive
  scales too (the released bidirectional ScaleGMN reads ``e_ij`` there, which is right for signs only).
  The reciprocal is guarded: ``sign(e) / max(|e|, eps)``, exact wherever ``|e| > eps``; for a convolution
  kernel, an edge of ``T`` taps, it is the vector reciprocal ``k / |k|^2``, which moves as ``q_j / q_i`` too.
  ``symmetry=False`` gives the symmetry-broken ablation "GMN-B" of amortized fine-tuning: the same network with
  the canonicalisation and symmetrisation removed from every invariant sub-network.

GMN and ScaleGMN read convolutions too (channels are vertices, kernels are edges of ``T = kh kw`` taps,
see :class:`NetworkGraph`); weights then have ``T`` times the channels on the edges.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..core.codes import neuron_codes
from ..core.spec import NetworkSpec
from .layers import MLP, make_activation
from ..features.graph import NetworkGraph
from ..features.weightspace import WeightSpaceFeatures, WeightSpaceInput, answer_like, read_weight_space
from .weightspace_layers import WeightSpaceLayer

__all__ = ["DWSNet", "GMN", "ScaleGMN", "Readout"]

Readout = Literal["equivariant", "invariant"]


def _mean_pool(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, C]``: the mean over every entry of every parameter (invariant to every permutation)."""
    return torch.stack([t.flatten(1, -2).mean(1) for t in x.values()]).mean(0)


class DWSNet(nn.Module):
    """Stack of :class:`WeightSpaceLayer` with activations; equivariant output or an invariant readout."""

    def __init__(self, spec: NetworkSpec, in_features: int, out_features: int, hidden: int = 32, layers: int = 3,
                 readout: Readout = "equivariant", pe_dim: int = 8, activation: str = "gelu",
                 signatures: tuple[tuple[str, ...], ...] | None = None) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError("DWSNet needs at least one layer")
        self.spec, self.readout = spec, readout
        last = out_features if readout == "equivariant" else hidden
        widths = [in_features] + [hidden] * (layers - 1) + [last]
        extra = {} if signatures is None else {"signatures": signatures}
        self.layers = nn.ModuleList(WeightSpaceLayer(a, b, pe_dim, **extra) for a, b in zip(widths[:-1], widths[1:]))
        self.act = make_activation(activation)
        self.head = MLP([hidden, hidden, out_features], activation) if readout == "invariant" else None

    def forward(self, x: WeightSpaceInput, spec: NetworkSpec | None = None):
        """``x``: features of any spec (the layers' weights are shared by parameter kind), or tensors of ``spec``
        (default the one built with)."""
        spec = x.spec if isinstance(x, WeightSpaceFeatures) else spec or self.spec
        h = read_weight_space(x, None)
        for i, layer in enumerate(self.layers):
            h = layer(h, spec)
            if i < len(self.layers) - 1 or self.head is not None:
                h = {k: self.act(v) for k, v in h.items()}
        return answer_like(x, h) if self.head is None else self.head(_mean_pool(h))


def _segment_mean(values: torch.Tensor, index: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n, H]``: the mean of ``values [B, E, H]`` over the edges with each ``index``."""
    total = values.new_zeros(values.shape[0], n, values.shape[-1]).index_add(1, index, values)
    return total / counts.clamp_min(1).to(values.dtype).view(1, -1, 1)


class _GMNLayer(nn.Module):
    def __init__(self, hidden: int, bidirectional: bool, activation: str) -> None:
        super().__init__()
        self.forward_message = MLP([3 * hidden, hidden, hidden], activation)
        self.backward_message = MLP([3 * hidden, hidden, hidden], activation) if bidirectional else None
        self.vertex = MLP([(3 if bidirectional else 2) * hidden, hidden, hidden], activation)
        self.edge = MLP([3 * hidden, hidden, hidden], activation)

    def forward(self, v: torch.Tensor, e: torch.Tensor, graph: NetworkGraph, counts: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        vs, vd = v[:, graph.src], v[:, graph.dst]
        parts = [v, _segment_mean(self.forward_message(torch.cat([vs, vd, e], -1)), graph.dst, counts[0], v.shape[1])]
        if self.backward_message is not None:
            parts.append(_segment_mean(self.backward_message(torch.cat([vd, vs, e], -1)), graph.src, counts[1],
                                       v.shape[1]))
        v = v + self.vertex(torch.cat(parts, -1))
        e = e + self.edge(torch.cat([v[:, graph.src], v[:, graph.dst], e], -1))
        return v, e


class GMN(nn.Module):
    """Graph metanetwork on the spec's graph: vertices (biases + neuron codes), edges (weights), message passing."""

    def __init__(self, spec: NetworkSpec, in_features: int, out_features: int, hidden: int = 64, layers: int = 3,
                 bidirectional: bool = False, readout: Readout = "equivariant", pe_dim: int = 16,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.spec, self.graph, self.pe_dim, self.readout = spec, NetworkGraph.of(spec), pe_dim, readout
        taps = self.graph.taps
        self.embed_vertex = nn.Linear(in_features + pe_dim, hidden)
        self.embed_edge = nn.Linear(in_features * taps, hidden)
        self.layers = nn.ModuleList(_GMNLayer(hidden, bidirectional, activation) for _ in range(layers))
        if readout == "equivariant":
            self.out_vertex, self.out_edge = nn.Linear(hidden, out_features), nn.Linear(hidden, out_features * taps)
        else:
            self.head = MLP([2 * hidden, hidden, out_features], activation)

    def forward(self, x: WeightSpaceInput):
        tensors = read_weight_space(x, self.spec)
        graph = self.graph.to(next(iter(tensors.values())).device)
        v, e = graph.to_graph(tensors)
        codes = neuron_codes(self.spec, self.pe_dim, v.dtype, v.device).expand(v.shape[0], -1, -1)
        v, e = self.embed_vertex(torch.cat([v, codes], -1)), self.embed_edge(e)
        counts = (torch.bincount(graph.dst, minlength=v.shape[1]), torch.bincount(graph.src, minlength=v.shape[1]))
        for layer in self.layers:
            v, e = layer(v, e, graph, counts)
        if self.readout == "invariant":
            return self.head(torch.cat([v.mean(1), e.mean(1)], -1))
        return answer_like(x, graph.from_graph(self.out_vertex(v), self.out_edge(e)))


# ---------------------------------------------------------------------------------------------- ScaleGMN
#: how a vertex or edge feature may be scaled: not at all, by a sign, by a positive scale, by any nonzero number
_NONE, _SIGN, _SCALE, _ANY = 0, 1, 2, 3


def _vertex_kinds(spec: NetworkSpec) -> torch.Tensor:
    """``[N]``: per neuron, whether its group scales it not at all, by signs, or by positive scales."""
    kind = {"sign_perm": _SIGN, "scale_perm": _SCALE}
    return torch.cat([torch.full((s.size,), kind.get(s.group.name, _NONE)) for s in spec.spaces])


def _edge_kinds(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """An edge moves by ``q_target / q_source``: a sign, a positive scale, or (sign and scale) any number."""
    signed = (source == _SIGN) | (target == _SIGN)
    scaled = (source == _SCALE) | (target == _SCALE)
    return torch.where(signed & scaled, _ANY, torch.where(scaled, _SCALE, torch.where(signed, _SIGN, _NONE)))


class _Invariant(nn.Module):
    """``[..., C] -> [..., H]``, invariant to the scaling of each entry's kind.

    Positive scales: ``phi(h / |h|)`` (canonicalisation, ``|h|`` over the channels, guarded by ``eps``);
    signs: ``phi(h) + phi(-h)`` (symmetrisation); any nonzero number: both; none: ``phi(h)``.
    ``canonicalise=False`` reads every entry as ``phi(h)``: the symmetry-broken ablation.
    """

    def __init__(self, in_features: int, hidden: int, activation: str, eps: float, canonicalise: bool = True) -> None:
        super().__init__()
        self.phi = MLP([in_features, hidden, hidden], activation)
        self.eps, self.canonicalise = eps, canonicalise

    def forward(self, h: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        if not self.canonicalise:
            return self.phi(h)
        kinds = kinds.view(*([1] * (h.dim() - 2)), -1, 1)
        scaled = (kinds == _SCALE) | (kinds == _ANY)
        x = torch.where(scaled, h / h.norm(dim=-1, keepdim=True).clamp_min(self.eps), h)
        plain = self.phi(x)
        return torch.where((kinds == _SIGN) | (kinds == _ANY), plain + self.phi(-x), plain)


def _gate(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A bounded invariant gate in ``(0, 2)``, 1 where the MLP gives 0: products of gates cannot blow up."""
    return 2 * torch.sigmoid(mlp(x))


def _stabilise(x: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """``x / (1 + |x| / sqrt(C))`` for the entries whose group is signs (or nothing): there the norm over the
    channels is invariant, so the map stays equivariant; entries that positive scales move are left alone
    (dividing by their norm would make them invariant)."""
    signed = ((kinds == _NONE) | (kinds == _SIGN)).view(*([1] * (x.dim() - 2)), -1, 1)
    damp = 1 + x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5
    return torch.where(signed, x / damp, x)


def _reciprocal(e: torch.Tensor, eps: float) -> torch.Tensor:
    """``[..., T]``: the reciprocal ``e / |e|^2`` of every edge's taps (``1 / e`` for a scalar edge), guarded: exact
    wherever ``|e| > eps``, zero for a zero edge. It moves as ``1 / q`` when ``e`` moves as ``q``."""
    return e / e.square().sum(-1, keepdim=True).clamp_min(eps * eps)


class _ScaleGMNLayer(nn.Module):
    def __init__(self, hidden: int, bidirectional: bool, activation: str, eps: float, symmetry: bool) -> None:
        super().__init__()
        inv = 3 * hidden                                       # invariants of the two vertices and the edge
        self.gate_forward = MLP([inv, hidden, hidden], activation)
        self.mix_edge, self.mix_source = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
        self.bidirectional = bidirectional
        if bidirectional:
            self.gate_backward = MLP([inv, hidden, hidden], activation)
            self.mix_reciprocal = nn.Linear(hidden, hidden, bias=False)
            self.mix_target = nn.Linear(hidden, hidden, bias=False)
            self.reciprocal_gate = MLP([inv, hidden, hidden], activation)
            self.reciprocal_mix = nn.Linear(hidden, hidden, bias=False)
        parts = 3 if bidirectional else 2
        self.vertex_gate = MLP([(parts + 1) * hidden, hidden, parts * hidden], activation)
        self.vertex_mix = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(parts))
        self.edge_gate = MLP([inv, hidden, hidden], activation)
        self.edge_mix = nn.Linear(hidden, hidden, bias=False)
        self.invariant_vertex = _Invariant(hidden, hidden, activation, eps, symmetry)
        self.invariant_edge = _Invariant(hidden, hidden, activation, eps, symmetry)

    def forward(self, v: torch.Tensor, e: torch.Tensor, r: torch.Tensor | None, graph: NetworkGraph,
                kinds: torch.Tensor, edge_kinds: torch.Tensor, counts: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Vertices ``v [B, N, H]`` (move as ``q_i``), edges ``e [B, E, H]`` (``q_dst / q_src``) and, when
        bidirectional, reciprocal edges ``r [B, E, H]`` (``q_src / q_dst``)."""
        inv_v = self.invariant_vertex(v, kinds)                               # [B, N, H]
        inv_e = self.invariant_edge(e, edge_kinds)                            # [B, E, H]
        context = torch.cat([inv_v[:, graph.src], inv_v[:, graph.dst], inv_e], -1)
        # to the destination i from the source j: e_ij h_j moves as q_i
        forward = self.mix_edge(e) * self.mix_source(v[:, graph.src]) * _gate(self.gate_forward, context)
        parts = [v, _segment_mean(forward, graph.dst, counts[0], v.shape[1])]
        if self.bidirectional:
            # to the source j from the destination i: h_i / e_ij moves as q_j
            backward = self.mix_reciprocal(r) * self.mix_target(v[:, graph.dst]) * _gate(self.gate_backward, context)
            parts.append(_segment_mean(backward, graph.src, counts[1], v.shape[1]))
        gates = _gate(self.vertex_gate, torch.cat([inv_v] + [self.invariant_vertex(p, kinds) for p in parts], -1))
        v = _stabilise(sum(mix(p) * g for mix, p, g in zip(self.vertex_mix, parts, gates.chunk(len(parts), -1))),
                       kinds)
        inv_v = self.invariant_vertex(v, kinds)
        context = torch.cat([inv_v[:, graph.src], inv_v[:, graph.dst], inv_e], -1)
        e = _stabilise(e + self.edge_mix(e) * _gate(self.edge_gate, context), edge_kinds)
        if r is not None:
            r = _stabilise(r + self.reciprocal_mix(r) * _gate(self.reciprocal_gate, context), edge_kinds)
        return v, e, r


class ScaleGMN(nn.Module):
    """Scale- and sign-equivariant graph metanetwork (see the module docstring); ``eps`` guards norms and
    reciprocals. Permutations come with the graph; neuron codes enter only invariant paths and the additive
    embedding of vertices that no scaling moves (inputs, outputs, spaces with permutations only).
    ``symmetry=False``: the same network with canonicalisation removed (equivariant to permutations only)."""

    def __init__(self, spec: NetworkSpec, in_features: int, out_features: int, hidden: int = 32, layers: int = 3,
                 bidirectional: bool = False, readout: Readout = "equivariant", pe_dim: int = 16,
                 activation: str = "gelu", eps: float = 1e-6, symmetry: bool = True) -> None:
        super().__init__()
        self.spec, self.graph, self.pe_dim, self.readout = spec, NetworkGraph.of(spec), pe_dim, readout
        taps = self.graph.taps
        kinds = _vertex_kinds(spec)
        self.register_buffer("kinds", kinds, persistent=False)
        self.register_buffer("edge_kinds", _edge_kinds(kinds[self.graph.src], kinds[self.graph.dst]), persistent=False)
        self.embed_vertex = nn.Linear(in_features, hidden, bias=False)
        self.embed_edge = nn.Linear(in_features * taps, hidden, bias=False)
        self.embed_reciprocal = nn.Linear(taps, hidden, bias=False) if bidirectional else None
        self.vertex_code = nn.Linear(pe_dim, hidden)
        self.eps = eps
        self.layers = nn.ModuleList(_ScaleGMNLayer(hidden, bidirectional, activation, eps, symmetry)
                                    for _ in range(layers))
        if readout == "equivariant":
            self.out_vertex = nn.Linear(hidden, out_features, bias=False)
            self.out_edge = nn.Linear(hidden, out_features * taps, bias=False)
        else:
            self.invariant_vertex = _Invariant(hidden, hidden, activation, eps, symmetry)
            self.invariant_edge = _Invariant(hidden, hidden, activation, eps, symmetry)
            self.head = MLP([2 * hidden, hidden, out_features], activation)

    def forward(self, x: WeightSpaceInput):
        tensors = read_weight_space(x, self.spec)
        graph = self.graph.to(next(iter(tensors.values())).device)
        v, e = graph.to_graph(tensors)
        codes = neuron_codes(self.spec, self.pe_dim, v.dtype, v.device)
        unscaled = (self.kinds == _NONE).to(v.dtype).view(1, -1, 1)
        v = self.embed_vertex(v) + unscaled * self.vertex_code(codes)
        if self.embed_reciprocal is not None:        # the taps of the first channel (the weights themselves)
            r = self.embed_reciprocal(_reciprocal(e.unflatten(-1, (self.graph.taps, -1))[..., 0], self.eps))
        else:
            r = None
        e = self.embed_edge(e)
        counts = (torch.bincount(graph.dst, minlength=v.shape[1]), torch.bincount(graph.src, minlength=v.shape[1]))
        for layer in self.layers:
            v, e, r = layer(v, e, r, graph, self.kinds, self.edge_kinds, counts)
        if self.readout == "invariant":
            pooled = torch.cat([self.invariant_vertex(v, self.kinds).mean(1),
                                self.invariant_edge(e, self.edge_kinds).mean(1)], -1)
            return self.head(pooled)
        return answer_like(x, graph.from_graph(self.out_vertex(v), self.out_edge(e)))
