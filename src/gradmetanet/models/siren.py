"""SIRENs (Sitzmann et al. 2020): linear layers at ``0, 2, 4, ...`` with sine activations between them."""

from __future__ import annotations

import torch

from ..core.spec import NetworkSpec
from .mlp import Sine

__all__ = ["siren_module", "siren_spec", "siren_template"]


def siren_spec(widths: tuple[int, ...]) -> NetworkSpec:
    """The spec of :func:`siren_module` (linear layers at ``0, 2, 4, ...``; sine spaces are ``SignPerm``)."""
    return NetworkSpec.chain(widths, [str(2 * i) for i in range(len(widths) - 1)], activation="sine")


def siren_template(widths: tuple[int, ...], omega_0: float) -> torch.nn.Sequential:
    """An ``nn.Sequential`` SIREN of these widths (linear layers at ``0, 2, 4, ...``), default-initialised."""
    layers: list[torch.nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(d_in, d_out))
        if i < len(widths) - 2:
            layers.append(Sine(omega_0))
    return torch.nn.Sequential(*layers)


def siren_module(params: dict[str, torch.Tensor], widths: tuple[int, ...], omega_0: float) -> torch.nn.Sequential:
    """A SIREN holding one network's parameters (for checks and plots)."""
    model = siren_template(widths, omega_0).to(next(iter(params.values())).dtype)
    model.load_state_dict(params)
    return model
