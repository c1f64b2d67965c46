"""Lemma 1 of symmetry-aware amortized fine-tuning, made concrete: convolutions have less scaling freedom than
dense layers of the same shape.

Written as a matrix, a 2-D convolution is a doubly-block Toeplitz matrix ``T [C_out Ho Wo, C_in H W]``
whose entries repeat the kernel once per output position. A scaling multiplies row ``i`` by ``q_i`` and
column ``j`` by ``1 / p_j``. Every scaling keeps a dense matrix a dense layer: ``n_out + n_in - 1``
degrees of freedom (a common factor of ``q`` and ``p`` changes nothing).

The reconstructed statement of the lemma (``../shared/spec/scalegmn_amortization.md`` 6.5) says a
convolution keeps only scalings constant over each channel's positions, ``C_out + C_in - 1``. Counting
numerically (:func:`scaling_freedom`) finds more, and the extra directions are exact: positional
exponentials ``q_i = exp(l . s x_i)``, ``p_j = exp(l . x_j)`` (stride ``s``) multiply kernel tap ``o`` by
``exp(-l . o)``, which is again a convolution (2 directions), and with stride ``s`` the ``s^2`` phase
classes of input positions, read by disjoint kernel taps, scale separately per input channel. So a
convolution keeps ``C_out + C_in s^2 + 1`` (kernels of at least 2 x 2 whose windows read every input
pixel), still far fewer than a dense layer: the lemma's conclusion stands, its count does not. At the
network level the positional directions need the next layer's scaling to match and do not survive
global average pooling, whose inputs must be scaled alike at every position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["conv_matrix", "conv_matrix_basis", "scaling_freedom", "dense_scaling_freedom", "conv_scaling_freedom"]


def conv_matrix(kernel: torch.Tensor, size: tuple[int, int], stride: int = 1, padding: int = 0) -> torch.Tensor:
    """``[C_out Ho Wo, C_in H W]``: the matrix of ``F.conv2d(x, kernel, stride, padding)`` on ``C_in x H x W``
    inputs (columns: the convolution of every one-hot input)."""
    c_in = kernel.shape[1]
    n_in = c_in * size[0] * size[1]
    basis = torch.eye(n_in, dtype=kernel.dtype).view(n_in, c_in, *size)
    return F.conv2d(basis, kernel, stride=stride, padding=padding).reshape(n_in, -1).T


def conv_matrix_basis(shape: tuple[int, int, int, int], size: tuple[int, int], stride: int = 1, padding: int = 0,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[M N, K]``: column ``k`` is the flattened :func:`conv_matrix` of the ``k``-th one-hot kernel; its span is
    the set of matrices that are convolutions of this shape."""
    k = torch.Size(shape).numel()
    return torch.stack([conv_matrix(torch.eye(k, dtype=dtype)[i].view(shape), size, stride, padding).reshape(-1)
                        for i in range(k)], 1)


def _null_dimension(a: torch.Tensor, tol: float) -> int:
    s = torch.linalg.svdvals(a)
    return a.shape[1] - int((s > tol * max(s.max().item(), 1.0)).sum())


def scaling_freedom(matrix: torch.Tensor, family: torch.Tensor | None = None, tol: float = 1e-9) -> int:
    """Degrees of freedom of the scalings ``diag(q) W diag(p)^-1`` that keep ``matrix [M, N]`` in ``family`` (the
    span of the columns of ``family [M N, K]``; ``None``: every matrix, a dense layer), counted to first order:
    ``dim {(a, c) : a W - W c in family} - dim {(a, c) : a W - W c = 0}``."""
    m, n = matrix.shape
    tangent = torch.cat([(torch.eye(m, dtype=matrix.dtype).unsqueeze(2) * matrix.unsqueeze(0)).reshape(m, -1).T,
                         -(matrix.unsqueeze(2) * torch.eye(n, dtype=matrix.dtype).unsqueeze(0)).reshape(m * n, n)], 1)
    if family is None:
        leaving = tangent.new_zeros(1, m + n)
    else:
        q, _ = torch.linalg.qr(family)
        leaving = tangent - q @ (q.T @ tangent)          # the part of every direction outside the family
    return _null_dimension(leaving, tol) - _null_dimension(tangent, tol)


def dense_scaling_freedom(n_out: int, n_in: int) -> int:
    """``n_out + n_in - 1``: a dense layer keeps every row and column scaling (one common factor is void)."""
    return n_out + n_in - 1


def conv_scaling_freedom(c_out: int, c_in: int, stride: int = 1) -> int:
    """``C_out + C_in s^2 + 1``: per-channel scalings, two positional exponentials and, with stride ``s``, one
    scaling per input channel and phase class (see the module docstring for when it holds)."""
    return c_out + c_in * stride * stride + 1
