"""Lemma 1 made concrete: a convolution keeps fewer scalings than a dense layer of the same shape, counted
numerically and checked with explicit scalings that keep a convolution a convolution and ones that do not."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradmetanet.features.gauge import conv_matrix, conv_matrix_basis, conv_scaling_freedom, dense_scaling_freedom, scaling_freedom


def test_conv_matrix_is_the_convolution():
    torch.manual_seed(0)
    kernel, x = torch.randn(3, 2, 3, 3, dtype=torch.float64), torch.randn(2, 5, 5, dtype=torch.float64)
    for stride, padding in ((1, 1), (2, 0)):
        want = F.conv2d(x[None], kernel, stride=stride, padding=padding).reshape(-1)
        torch.testing.assert_close(conv_matrix(kernel, (5, 5), stride, padding) @ x.reshape(-1), want)


def test_a_convolution_has_fewer_scaling_directions_than_a_dense_layer():
    torch.manual_seed(0)
    for c_out, c_in, stride, padding in ((3, 2, 1, 1), (1, 1, 1, 1), (2, 3, 2, 1)):
        kernel = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64)
        T = conv_matrix(kernel, (5, 5), stride, padding)
        basis = conv_matrix_basis(tuple(kernel.shape), (5, 5), stride, padding)
        conv = scaling_freedom(T, basis)
        dense = scaling_freedom(torch.randn_like(T))
        assert conv == conv_scaling_freedom(c_out, c_in, stride) > c_out + c_in - 1
        assert dense == dense_scaling_freedom(*T.shape) and conv < dense


def test_channel_constant_scalings_keep_a_convolution_and_per_position_ones_do_not():
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    T = conv_matrix(kernel, (5, 5), 1, 1)
    q_channel = torch.rand(3, dtype=torch.float64) * 9.9 + 0.1
    p_channel = torch.rand(2, dtype=torch.float64) * 9.9 + 0.1
    q, p = q_channel.repeat_interleave(25), p_channel.repeat_interleave(25)
    scaled = q[:, None] * T / p[None, :]
    kernel_scaled = kernel * q_channel[:, None, None, None] / p_channel[None, :, None, None]
    torch.testing.assert_close(scaled, conv_matrix(kernel_scaled, (5, 5), 1, 1))    # still a convolution
    basis = conv_matrix_basis(tuple(kernel.shape), (5, 5), 1, 1)
    q_position = q * (1 + 0.5 * torch.rand(75, dtype=torch.float64))                # unequal within a channel
    off = q_position[:, None] * T / p[None, :]
    coefficients = torch.linalg.lstsq(basis, off.reshape(-1, 1)).solution
    residual = (basis @ coefficients - off.reshape(-1, 1)).norm() / off.norm()
    assert residual > 1e-2                                                           # no kernel gives it


def test_a_positional_exponential_scaling_keeps_a_convolution():
    """q_i = exp(l . x_i) on output positions and p_j = exp(l . x_j) on input positions: the scaled matrix is the
    convolution with kernel tap o multiplied by exp(l . o) (here o = x_i - x_j, stride 1)."""
    torch.manual_seed(0)
    kernel = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    T = conv_matrix(kernel, (5, 5), 1, 1)
    lam = torch.tensor([0.7, -0.4], dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(5.0, dtype=torch.float64), torch.arange(5.0, dtype=torch.float64),
                            indexing="ij")
    phase = torch.exp(lam[0] * yy + lam[1] * xx).reshape(-1)
    q, p = phase.repeat(2), phase.repeat(2)
    oy, ox = torch.meshgrid(torch.arange(-1.0, 2.0, dtype=torch.float64), torch.arange(-1.0, 2.0, dtype=torch.float64),
                            indexing="ij")
    modulated = kernel * torch.exp(-(lam[0] * oy + lam[1] * ox))       # tap o reads input x_i + o
    torch.testing.assert_close(q[:, None] * T / p[None, :], conv_matrix(modulated, (5, 5), 1, 1))
