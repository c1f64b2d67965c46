"""Closed-form reference estimators of the curvature experiment, and per-layer error shares.

They are not baselines of the paper; they explain its table:

* **product of means** -- every weight ``W[m, n]`` estimated by ``mean_i g_i[m]^2 * mean_i a_i[n]^2``
  (biases exactly): the best a head can do that sees one pooled vector per neuron and combines
  the two neurons of a weight additively, as GradMetaNet's pooled product head does.
* **quadrature** -- the squared per-point gradients integrated by the trapezoid rule over the
  sorted points of each half ``[-1, 0]`` and ``[0, 1]``, weighted by the fraction of points in
  each half: what knowing the *form* of the input distribution ``X_p`` is worth.
* **target noise** -- the Monte-Carlo variance of the target itself (``var_x h / target_points``):
  the expected error of an oracle that returned the exact Fisher diagonal, a floor for every row.

Shapes: ``M`` networks, ``b`` points, ``N`` neurons, ``P`` parameters in spec order.
"""

from __future__ import annotations

import torch

from ..core.spec import NetworkSpec
from ..zoos.siren import SirenZoo, siren_factors

__all__ = ["squared_point_gradients", "product_of_means", "quadrature_weights", "quadrature",
           "target_noise", "per_layer_shares"]


def _factors(spec: NetworkSpec, features: torch.Tensor):
    """Per site ``(a [M, b, d_in], g [M, b, d_out])`` from neuron features ``[M, b, N, 2]`` of a chain."""
    slices = spec.space_slices()
    for site in spec.sites:
        yield site, features[..., slices[site.in_space], 0], features[..., slices[site.out_space], 1]


def squared_point_gradients(spec: NetworkSpec, features: torch.Tensor) -> torch.Tensor:
    """``[M, b, P]``: every point's squared gradient of every parameter (``(g[m] a[n])^2``, ``g[m]^2``)."""
    parts = []
    for site, a, g in _factors(spec, features):
        parts.append((g.square().unsqueeze(-1) * a.square().unsqueeze(-2)).flatten(-2))
        if site.bias is not None:
            parts.append(g.square())
    return torch.cat(parts, -1)


def product_of_means(spec: NetworkSpec, features: torch.Tensor) -> torch.Tensor:
    """``[M, P]``: ``mean_i g_i[m]^2 * mean_i a_i[n]^2`` for weights, ``mean_i g_i[m]^2`` for biases."""
    parts = []
    for site, a, g in _factors(spec, features):
        g2 = g.square().mean(-2)
        parts.append((g2.unsqueeze(-1) * a.square().mean(-2).unsqueeze(-2)).flatten(-2))
        if site.bias is not None:
            parts.append(g2)
    return torch.cat(parts, -1)


def quadrature_weights(points: torch.Tensor, split: float = 0.0, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """``[M, b]`` weights ``w`` with ``sum_i w_i h(x_i)`` the stratified trapezoid rule for ``E h(x)``.

    ``points [M, b]`` lie in ``[low, high]``; within each of ``[low, split]`` and ``[split, high]``
    the sorted points are joined by the trapezoid rule, extended as constants to the interval's
    ends, and each half's average is weighted by the fraction of points in it (the estimate of
    ``p`` in ``X_p``). Each weight is ``(next - previous) / 2`` with the neighbours mirrored at the
    ends, scaled by ``fraction / length``.
    """
    x, order = points.sort(-1)
    left = x < split
    lo = torch.where(left, torch.full_like(x, low), torch.full_like(x, split))
    hi = torch.where(left, torch.full_like(x, split), torch.full_like(x, high))
    same_prev = torch.zeros_like(left)
    same_prev[:, 1:] = left[:, 1:] == left[:, :-1]
    same_next = torch.zeros_like(left)
    same_next[:, :-1] = left[:, :-1] == left[:, 1:]
    prev = torch.where(same_prev, x.roll(1, -1), 2 * lo - x)
    nxt = torch.where(same_next, x.roll(-1, -1), 2 * hi - x)
    fraction = torch.where(left, left.float().mean(-1, keepdim=True), 1 - left.float().mean(-1, keepdim=True))
    w_sorted = (nxt - prev) / 2 * fraction.to(x.dtype) / (hi - lo)
    return torch.empty_like(w_sorted).scatter_(-1, order, w_sorted)


def quadrature(spec: NetworkSpec, features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``[M, P]``: the stratified trapezoid rule (:func:`quadrature_weights`) on the squared point gradients."""
    weights = quadrature_weights(points.double())
    return torch.einsum("mb,mbp->mp", weights, squared_point_gradients(spec, features.double())).to(features.dtype)


def target_noise(zoo: SirenZoo, index: torch.Tensor, chunk: int = 20) -> torch.Tensor:
    """``[len(index), P]``: the variance of each target entry as a Monte-Carlo mean (``var_x h / n``)."""
    out = []
    for start in range(0, len(index), chunk):
        idx = index[start:start + chunk]
        params = {k: v[idx].double() for k, v in zoo.params.items()}
        *_, feats = siren_factors(params, zoo.target_inputs[idx].double(), zoo.config.widths, zoo.config.omega_0)
        h = squared_point_gradients(zoo.spec, feats)
        out.append(h.var(1) / h.shape[1])
    return torch.cat(out).float()


def per_layer_shares(spec: NetworkSpec, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Parameter name -> its share of the total squared error of ``prediction [M, P]`` against ``target``."""
    squared = (prediction.double() - target.double()).square().sum(0)
    total = squared.sum().clamp_min(torch.finfo(torch.float64).tiny)
    shares, offset = {}, 0
    for name, shape in spec.param_shapes().items():
        size = int(torch.Size(shape).numel())
        shares[name] = (squared[offset:offset + size].sum() / total).item()
        offset += size
    return shares
