"""Per-parameter input features of learned optimizers (as learned_optimization's ``mlp_lopt``).

For every scalar parameter: its value, its gradient, six gradient momenta (EMAs with decays
0.1 ... 0.9999) and eleven features of the step count, ``tanh(t / tau)`` for time scales
``tau = 1, 3, 10, ..., 1e5``: 19 features. Value, gradient and momenta are normalised per
tensor by their root mean square (``x / sqrt(mean(x^2) + eps)``), so one learned rule serves
tensors of any scale.
"""

from __future__ import annotations

import torch

from ..core.constants import ConstantCache
from .layout import Segments, segment_rms_normalise

_CONSTANTS = ConstantCache()

__all__ = ["MOMENTUM_DECAYS", "TIME_SCALES", "N_FEATURES", "time_features", "parameter_features",
           "update_momenta"]

MOMENTUM_DECAYS: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
TIME_SCALES: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
N_FEATURES = 2 + len(MOMENTUM_DECAYS) + len(TIME_SCALES)


def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """A small constant vector, kept per dtype and device (not rebuilt every optimizer step)."""
    return _CONSTANTS.get((values, dtype, str(device)), lambda: torch.tensor(values, dtype=dtype, device=device))


def time_features(step: int | torch.Tensor, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """``[11]`` (or ``[*step.shape, 11]``): ``tanh(step / tau)`` for every time scale."""
    t = step.to(dtype) if isinstance(step, torch.Tensor) else torch.tensor(float(step), dtype=dtype, device=device)
    scales = _constant(TIME_SCALES, dtype, t.device if device is None else device)
    return torch.tanh(t.unsqueeze(-1) / scales)


def update_momenta(momenta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """EMAs ``m_k <- d_k m_k + (1 - d_k) grad``; ``momenta: [*shape, 6]``, ``grad: [*shape]``."""
    decays = _constant(MOMENTUM_DECAYS, grad.dtype, grad.device)
    return momenta * decays + grad.unsqueeze(-1) * (1 - decays)


def parameter_features(param: torch.Tensor, grad: torch.Tensor, momenta: torch.Tensor,
                       step: int | torch.Tensor, segments: Segments | None = None) -> torch.Tensor:
    """``[*param.shape, 19]`` features (see the module docstring).

    ``param`` is one tensor, or with ``segments`` the flat concatenation ``[P]`` of several,
    each normalised by its own root mean square (:class:`~gradmetanet.lopt.layout.Segments`).
    """
    raw = torch.cat([param.unsqueeze(-1), grad.unsqueeze(-1), momenta], dim=-1)
    flat = raw.reshape(-1, raw.shape[-1])
    segments = segments or Segments.of((flat.shape[0],), flat.device)
    normalised = segment_rms_normalise(flat, segments).view_as(raw)
    times = time_features(step, param.dtype, param.device).expand(*param.shape, len(TIME_SCALES))
    return torch.cat([normalised, times], dim=-1)
