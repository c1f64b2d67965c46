"""The graph view of a network, derived from its spec: vertices are neurons, edges are weight entries.

For every linear site ``y = W x + b`` from space ``s_in`` to ``s_out``, entry ``W[m, n]`` is an edge
from neuron ``n`` of ``s_in`` to neuron ``m`` of ``s_out``, and ``b[m]`` is a feature of vertex ``m``.
Convolutions are the same with channels as neurons: kernel ``K[m, n]`` (``kh x kw`` taps) is the edge
``n -> m``, and every edge carries ``taps`` values per channel, the largest kernel of the network; smaller
kernels are zero-padded around their centre and a dense weight is a ``1 x 1`` kernel in the centre tap
(as the neural graphs of Kofinas et al. and ScaleGMN do).
Vertices are the spec's neurons in its concatenated order (spaces one after the other), so a group
element of every space moves vertices exactly as it moves neuron tensors. This is the graph of the
graph metanetworks (GMN, ScaleGMN), built from the spec rather than rebuilt per architecture.

Shapes: vertex features ``[B, N, C]``, edge features ``[B, E, T C]`` (tap-major, ``T = kh kw`` of the
largest kernel, 1 for MLPs); ``src``, ``dst``: ``[E]``.
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
    kernel: tuple[int, int] = (1, 1)  # the taps every edge carries (the largest kernel)

    @classmethod
    def of(cls, spec: NetworkSpec) -> "NetworkGraph":
        """The graph of a spec whose sites are whole linear or convolution layers, one bias per vertex at most."""
        odd = spec.sites_not_whole(("linear", "conv"))
        if odd:
            raise ValueError(f"the graph view covers whole linear and convolution sites; {odd} are not (LayerNorm, "
                             "embedding, attention): use a DWS-style network (DWSNet) for them")
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
            i, o = slices[site.in_space], slices[site.out_space]     # conv: channels are the neurons
            d_in, d_out = i.stop - i.start, o.stop - o.start
            dst.append(torch.arange(o.start, o.stop).repeat_interleave(d_in))
            src.append(torch.arange(i.start, i.stop).repeat(d_out))
            offsets[site.weight] = total
            total += d_in * d_out
        kernels = [site.kernel for site in spec.sites if site.kind == "conv"]
        kernel = (max(k[0] for k in kernels), max(k[1] for k in kernels)) if kernels else (1, 1)
        return cls(spec, torch.cat(src), torch.cat(dst), offsets, kernel)

    @property
    def n_vertices(self) -> int:
        return self.spec.n_neurons

    @property
    def n_edges(self) -> int:
        return self.src.shape[0]

    @property
    def taps(self) -> int:
        """Values per edge and channel: ``kh kw`` of the largest kernel (1 for MLPs)."""
        return self.kernel[0] * self.kernel[1]

    def _window(self, site) -> tuple[slice, slice]:
        kh, kw = site.kernel if site.kind == "conv" else (1, 1)
        top, left = (self.kernel[0] - kh) // 2, (self.kernel[1] - kw) // 2
        return slice(top, top + kh), slice(left, left + kw)

    def to_graph(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``{param: [B, *shape, C]}`` -> vertex features ``[B, N, C]`` (biases; zeros where none) and edge
        features ``[B, E, T C]`` (weights, kernels padded to the largest)."""
        some = next(iter(x.values()))
        B, C = some.shape[0], some.shape[-1]
        slices = self.spec.space_slices()
        vertices = some.new_zeros(B, self.n_vertices, C)
        parts = []
        for site in self.spec.sites:
            w = x[site.weight]
            d_out, d_in = w.shape[1], w.shape[2]
            rows, cols = self._window(site)
            grid = w.new_zeros(B, d_out, d_in, *self.kernel, C)
            grid[:, :, :, rows, cols] = w.reshape(B, d_out, d_in, rows.stop - rows.start, cols.stop - cols.start, C)
            parts.append(grid.reshape(B, d_out * d_in, self.taps * C))
            if site.bias is not None:
                sl = slices[site.out_space]
                vertices = vertices.index_copy(1, torch.arange(sl.start, sl.stop, device=some.device), x[site.bias])
        return vertices, torch.cat(parts, 1)

    def from_graph(self, vertices: torch.Tensor, edges: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`to_graph`: ``{param: [B, *shape, C]}`` read off vertices (biases) and edges (weights)."""
        slices, shapes = self.spec.space_slices(), self.spec.param_shapes()
        B, C = edges.shape[0], edges.shape[-1] // self.taps
        out = {}
        for site in self.spec.sites:
            shape = shapes[site.weight]
            start, count = self.edge_offsets[site.weight], shape[0] * shape[1]
            grid = edges[:, start:start + count].reshape(B, count, *self.kernel, C)
            rows, cols = self._window(site)
            out[site.weight] = grid[:, :, rows, cols].reshape(B, *shape, C)
            if site.bias is not None:
                out[site.bias] = vertices[:, slices[site.out_space]]
        return out

    def to(self, device: torch.device | str) -> "NetworkGraph":
        return NetworkGraph(self.spec, self.src.to(device), self.dst.to(device), self.edge_offsets, self.kernel)
