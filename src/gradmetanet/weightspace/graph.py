"""The graph view of a network, derived from its spec: vertices are neurons, edges are weight entries.

For every linear site ``y = W x + b`` from space ``s_in`` to ``s_out``, entry ``W[m, n]`` is an edge
from neuron ``n`` of ``s_in`` to neuron ``m`` of ``s_out``, and ``b[m]`` is a feature of vertex ``m``.
Vertices are the spec's neurons in its concatenated order (spaces one after the other), so a group
element of every space moves vertices exactly as it moves neuron tensors. This is the graph of the
graph metanetworks (GMN, ScaleGMN), built from the spec rather than rebuilt per architecture.

Shapes: vertex features ``[B, N, C]``, edge features ``[B, E, C]``; ``src``, ``dst``: ``[E]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.spec import NetworkSpec

__all__ = ["NetworkGraph"]


@dataclass(frozen=True)
class NetworkGraph:
    """Edge list of ``spec`` and the maps between weight-space features and graph features."""

    spec: NetworkSpec
    src: torch.Tensor            # [E] source vertex of every edge (the weight's column neuron)
    dst: torch.Tensor            # [E] destination vertex (the weight's row neuron)
    edge_offsets: dict[str, int]  # weight name -> its first edge (entries row-major: m * d_in + n)

    @classmethod
    def of(cls, spec: NetworkSpec) -> "NetworkGraph":
        """The graph of a spec whose sites are whole linear layers, one bias per vertex at most."""
        odd = [s.name for s in spec.sites if s.kind != "linear" or s.rows is not None]
        if odd:
            raise ValueError(f"the graph view covers whole linear sites; {odd} are not (LayerNorm, embedding, "
                             "attention): use a DWS-style network (DWSNet) for them")
        biased: dict[str, str] = {}
        for site in spec.sites:
            if site.bias is not None:
                if site.out_space in biased:
                    raise ValueError(f"space {site.out_space!r} gets biases from sites {biased[site.out_space]!r} and "
                                     f"{site.name!r}; the graph view keeps one bias per vertex")
                biased[site.out_space] = site.name
        slices = spec.space_slices()
        src, dst, offsets, total = [], [], {}, 0
        for site in spec.sites:
            i, o = slices[site.in_space], slices[site.out_space]
            d_in, d_out = i.stop - i.start, o.stop - o.start
            dst.append(torch.arange(o.start, o.stop).repeat_interleave(d_in))
            src.append(torch.arange(i.start, i.stop).repeat(d_out))
            offsets[site.weight] = total
            total += d_in * d_out
        return cls(spec, torch.cat(src), torch.cat(dst), offsets)

    @property
    def n_vertices(self) -> int:
        return self.spec.n_neurons

    @property
    def n_edges(self) -> int:
        return self.src.shape[0]

    def to_graph(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``{param: [B, *shape, C]}`` -> vertex features ``[B, N, C]`` (biases; zeros where none) and edge
        features ``[B, E, C]`` (weights)."""
        some = next(iter(x.values()))
        B, C = some.shape[0], some.shape[-1]
        slices = self.spec.space_slices()
        vertices = some.new_zeros(B, self.n_vertices, C)
        parts = []
        for site in self.spec.sites:
            parts.append(x[site.weight].reshape(B, -1, C))
            if site.bias is not None:
                sl = slices[site.out_space]
                vertices = vertices.index_copy(1, torch.arange(sl.start, sl.stop, device=some.device), x[site.bias])
        return vertices, torch.cat(parts, 1)

    def from_graph(self, vertices: torch.Tensor, edges: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`to_graph`: ``{param: [B, *shape, C]}`` read off vertices (biases) and edges (weights)."""
        slices, shapes = self.spec.space_slices(), self.spec.param_shapes()
        B, C = edges.shape[0], edges.shape[-1]
        out = {}
        for site in self.spec.sites:
            shape = shapes[site.weight]
            start = self.edge_offsets[site.weight]
            out[site.weight] = edges[:, start:start + shape.numel()].reshape(B, *shape, C)
            if site.bias is not None:
                out[site.bias] = vertices[:, slices[site.out_space]]
        return out

    def to(self, device: torch.device | str) -> "NetworkGraph":
        return NetworkGraph(self.spec, self.src.to(device), self.dst.to(device), self.edge_offsets)
