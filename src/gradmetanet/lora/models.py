"""Models on LoRA weights: GL-net (invariant to an independent GL(r) per layer) and its baselines.

Every model is ``Model(layer_shapes, out_features, ...)`` with ``layer_shapes = {module path:
(out, in)}`` and ``forward(batch: LoraBatch) -> [N, out_features]``; the rank is read from the
batch. Per layer the input is ``U = s B`` (``[N, out, r]``, the scaling folded in) and ``V = A^T``
(``[N, in, r]``), so that ``dW = U V^T`` and ``(U M, V M^-T)`` is the symmetry.

- :class:`GLNet`: per-layer maps on the *rows* of ``U`` and ``V`` (they commute with ``M`` on the
  right), a gate nonlinearity computed from the invariant ``U V^T`` without forming it, row
  dropout, and an invariant head on ``vec(U V^T)`` of the processed ``d x d`` factors. It never
  reads ``r``: trained on one rank, it runs on another.
- :class:`RawMLP`: an MLP on the flattened factors (not invariant; fixed rank).
- :class:`DenseMLP`: an MLP on every ``dW`` (invariant; a fixed random sketch ``P dW Q^T`` when a
  layer is larger than ``sketch`` entries).
- :class:`SpectrumMLP`: an MLP on the singular values of every ``dW``, from the ``r x r`` matrix
  ``R_U R_V^T`` of thin QR factorisations (invariant, lossy, fixed rank).
- :class:`AlignMLP`: an MLP on factors aligned to a template fine-tune by orthogonal Procrustes per
  layer (removes the ``O(r)`` part of the symmetry only; fixed rank).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from .sets import LoraBatch

__all__ = ["GLNet", "RawMLP", "DenseMLP", "SpectrumMLP", "AlignMLP", "factors"]


def factors(batch: LoraBatch, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``U = s B: [N, out, r]`` and ``V = A^T: [N, in, r]`` of one layer (``dW = U V^T``)."""
    B = batch.B[path]
    return batch.scaling[path].to(B.dtype).view(-1, 1, 1) * B, batch.A[path].transpose(1, 2)


def _head(in_features: int, hidden: int, out_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                         nn.Linear(hidden, out_features))


def _check_layers(model_shapes: Mapping[str, tuple[int, int]], batch: LoraBatch) -> None:
    got = {p: (batch.B[p].shape[1], batch.A[p].shape[2]) for p in batch.paths}
    if got != dict(model_shapes):
        raise ValueError(f"this model was built for layers {dict(model_shapes)}, the batch has {got}")


class GLNet(nn.Module):
    """GL(r)^L-invariant network on LoRA factors (see the module docstring).

    Args:
        layer_shapes: module path -> ``(out, in)`` of each adapted layer (order is kept).
        out_features: outputs per LoRA set.
        hidden: ``d``, the rows of every processed factor.
        layers: equivariant layers (the first projects ``out`` / ``in`` rows to ``d``; each further one is
            gate -> row dropout -> ``d x d`` row maps).
        head_hidden, dropout: the invariant head's MLP on the concatenated ``vec(U V^T)`` (``L d^2`` inputs).
    """

    def __init__(self, layer_shapes: Mapping[str, tuple[int, int]], out_features: int, hidden: int = 16,
                 layers: int = 2, head_hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError("GLNet needs at least one equivariant layer")
        self.layer_shapes = dict(layer_shapes)
        n_layers, d = len(self.layer_shapes), hidden
        self.project_u = nn.ParameterList(nn.Parameter(torch.randn(d, out) / math.sqrt(out))
                                          for out, _ in self.layer_shapes.values())
        self.project_v = nn.ParameterList(nn.Parameter(torch.randn(d, inp) / math.sqrt(inp))
                                          for _, inp in self.layer_shapes.values())
        self.mix_u = nn.Parameter(torch.randn(layers - 1, n_layers, d, d) / math.sqrt(d))
        self.mix_v = nn.Parameter(torch.randn(layers - 1, n_layers, d, d) / math.sqrt(d))
        self.dropout = dropout
        self.head = _head(n_layers * d * d, head_hidden, out_features, dropout)

    @staticmethod
    def gate(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the rows of ``U`` whose row of ``Z = U V^T`` sums positive, and the rows of ``V`` whose column of
        ``Z`` does: ``Z 1 = U (V^T 1)``, ``1^T Z = (U^T 1)^T V^T``, never forming ``Z``. Invariant gates, applied
        on the left: equivariant."""
        rows = (u @ v.sum(1, keepdim=True).transpose(1, 2)).squeeze(-1) > 0            # [N, d]
        cols = (v @ u.sum(1, keepdim=True).transpose(1, 2)).squeeze(-1) > 0            # [N, d]
        return u * rows.unsqueeze(-1).to(u.dtype), v * cols.unsqueeze(-1).to(v.dtype)

    def row_dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Zero whole rows (a diagonal left factor: equivariant), scaled to keep the expectation."""
        if not self.training or self.dropout == 0:
            return x
        keep = torch.rand(*x.shape[:2], 1, device=x.device) >= self.dropout
        return x * keep.to(x.dtype) / (1 - self.dropout)

    def forward(self, batch: LoraBatch) -> torch.Tensor:
        _check_layers(self.layer_shapes, batch)
        features = []
        for l, path in enumerate(self.layer_shapes):
            u, v = factors(batch, path)
            u, v = self.project_u[l].to(u.dtype) @ u, self.project_v[l].to(v.dtype) @ v        # [N, d, r]
            for k in range(self.mix_u.shape[0]):
                u, v = self.gate(u, v)
                u, v = self.row_dropout(u), self.row_dropout(v)
                u, v = self.mix_u[k, l].to(u.dtype) @ u, self.mix_v[k, l].to(v.dtype) @ v
            features.append((u @ v.transpose(1, 2)).flatten(1))                             # vec(U V^T): [N, d^2]
        return self.head(torch.cat(features, 1))


class RawMLP(nn.Module):
    """An MLP on the concatenated, flattened ``U`` and ``V`` of every layer (not GL-invariant)."""

    def __init__(self, layer_shapes: Mapping[str, tuple[int, int]], out_features: int, rank: int,
                 hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.layer_shapes, self.rank = dict(layer_shapes), rank
        inputs = sum((out + inp) * rank for out, inp in self.layer_shapes.values())
        self.mlp = _head(inputs, hidden, out_features, dropout)

    def forward(self, batch: LoraBatch) -> torch.Tensor:
        _check_layers(self.layer_shapes, batch)
        if batch.rank != self.rank:
            raise ValueError(f"RawMLP was built for rank {self.rank}; the batch has rank {batch.rank} (its input "
                             "size depends on the rank: use GLNet for other ranks)")
        parts = [t.flatten(1) for p in self.layer_shapes for t in factors(batch, p)]
        return self.mlp(torch.cat(parts, 1))


class DenseMLP(nn.Module):
    """An MLP on every layer's ``dW`` (invariant, any rank); a layer with more than ``sketch`` entries is
    replaced by a fixed Gaussian sketch ``P dW Q^T`` (``P: [k, out]``, ``Q: [k, in]``, ``k^2 <= sketch``)."""

    def __init__(self, layer_shapes: Mapping[str, tuple[int, int]], out_features: int, hidden: int = 64,
                 sketch: int = 4096, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.layer_shapes = dict(layer_shapes)
        gen = torch.Generator().manual_seed(seed)
        inputs = 0
        for i, (out, inp) in enumerate(self.layer_shapes.values()):
            if out * inp > sketch:
                k = int(math.isqrt(sketch))
                self.register_buffer(f"left_{i}", torch.randn(k, out, generator=gen) / math.sqrt(k))
                self.register_buffer(f"right_{i}", torch.randn(k, inp, generator=gen) / math.sqrt(k))
                inputs += k * k
            else:
                inputs += out * inp
        self.mlp = _head(inputs, hidden, out_features, dropout)

    def forward(self, batch: LoraBatch) -> torch.Tensor:
        _check_layers(self.layer_shapes, batch)
        parts = []
        for i, path in enumerate(self.layer_shapes):
            u, v = factors(batch, path)
            if hasattr(self, f"left_{i}"):                  # sketch from the factors: P U (Q V)^T, no dW formed
                u, v = getattr(self, f"left_{i}").to(u.dtype) @ u, getattr(self, f"right_{i}").to(v.dtype) @ v
            parts.append((u @ v.transpose(1, 2)).flatten(1))
        return self.mlp(torch.cat(parts, 1))


class SpectrumMLP(nn.Module):
    """An MLP on the ``r`` singular values of every layer's ``dW`` (invariant, lossy, fixed rank).

    With thin QR ``U = Q_U R_U`` and ``V = Q_V R_V``, ``dW = Q_U (R_U R_V^T) Q_V^T``: its non-zero singular
    values are those of the ``r x r`` matrix ``R_U R_V^T``.
    """

    def __init__(self, layer_shapes: Mapping[str, tuple[int, int]], out_features: int, rank: int,
                 hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.layer_shapes, self.rank = dict(layer_shapes), rank
        self.mlp = _head(len(self.layer_shapes) * rank, hidden, out_features, dropout)

    def forward(self, batch: LoraBatch) -> torch.Tensor:
        _check_layers(self.layer_shapes, batch)
        if batch.rank != self.rank:
            raise ValueError(f"SpectrumMLP was built for rank {self.rank}; the batch has rank {batch.rank}")
        values = []
        for path in self.layer_shapes:
            u, v = factors(batch, path)
            r_u, r_v = torch.linalg.qr(u, mode="r")[1], torch.linalg.qr(v, mode="r")[1]
            values.append(torch.linalg.svdvals(r_u @ r_v.transpose(1, 2)))
        return self.mlp(torch.cat(values, 1))


class AlignMLP(RawMLP):
    """:class:`RawMLP` on factors rotated to a template: per layer ``S = [U; V]`` is replaced by ``S R`` with the
    orthogonal ``R`` closest to mapping ``S`` onto the template's ``S_t`` (``R = P Q^T`` from the SVD of
    ``S^T S_t``). ``(U R, V R)`` has the same ``dW``; the alignment removes ``O(r)``, not all of ``GL(r)``."""

    def __init__(self, layer_shapes: Mapping[str, tuple[int, int]], out_features: int, rank: int,
                 template: LoraBatch, hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__(layer_shapes, out_features, rank, hidden, dropout)
        for i, path in enumerate(self.layer_shapes):
            u, v = factors(template, path)
            self.register_buffer(f"template_{i}", torch.cat([u[0], v[0]]).float())

    def forward(self, batch: LoraBatch) -> torch.Tensor:
        _check_layers(self.layer_shapes, batch)
        if batch.rank != self.rank:
            raise ValueError(f"AlignMLP was built for rank {self.rank}; the batch has rank {batch.rank}")
        parts = []
        for i, path in enumerate(self.layer_shapes):
            u, v = factors(batch, path)
            s = torch.cat([u, v], 1)                                                  # [N, out + in, r]
            p, _, q = torch.linalg.svd(s.transpose(1, 2) @ getattr(self, f"template_{i}").to(s.dtype))
            rotated = s @ (p @ q)
            parts.append(rotated.flatten(1))
        return self.mlp(torch.cat(parts, 1))
