"""Small base networks that the library learns on: MLPs with a choice of activation, SIRENs."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["Sine", "make_mlp", "ACTIVATIONS"]


class Sine(nn.Module):
    """Element-wise ``sin(omega_0 * x)``, the SIREN activation."""

    def __init__(self, omega_0: float = 1.0) -> None:
        super().__init__()
        self.omega_0 = omega_0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.omega_0 * x)

    def extra_repr(self) -> str:
        return f"omega_0={self.omega_0}"


#: the one registry of activation names (base networks, zoos and metanetworks): name -> a module factory
ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "relu_inplace": lambda: nn.ReLU(inplace=True),
    "tanh": lambda: nn.Tanh(),
    "gelu": lambda: nn.GELU(),
    "silu": lambda: nn.SiLU(),
    "sine": lambda: Sine(),
}


def make_mlp(sizes: Sequence[int], activation: str = "relu", bias: bool = True) -> nn.Sequential:
    """``nn.Sequential`` MLP ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between layers.

    Layers sit at indices ``0, 2, 4, ...`` so parameter names are ``"0.weight"``, ``"2.bias"``...
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least two sizes, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)
