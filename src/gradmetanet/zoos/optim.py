"""The one vectorised trainer of the zoos: optimiser steps of ``N`` networks at once, each with its own rate.

Networks are ``{name: [N, *shape]}``; ``lr`` is a number or one rate per network ``[N]`` (0 freezes a network,
which is how networks of different training lengths run together). The rules are ``torch.optim``'s (SGD with
heavy-ball momentum, Adam without weight decay), written out so that one call steps every network.
"""

from __future__ import annotations

import torch

__all__ = ["adam_step", "heavy_ball_step"]


def _per_network(lr: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """``lr [N]`` viewed to broadcast over ``like [N, *shape]`` (a number as it is)."""
    return lr.view(-1, *[1] * (like.dim() - 1)) if isinstance(lr, torch.Tensor) else lr


def heavy_ball_step(params: dict[str, torch.Tensor], grads: list[torch.Tensor], velocity: dict[str, torch.Tensor],
                    lr: torch.Tensor | float, momentum: float = 0.9) -> dict[str, torch.Tensor]:
    """One SGD step with heavy-ball momentum (``torch.optim.SGD``'s rule); ``grads`` in the order of ``params``,
    ``velocity`` updated in place."""
    out = {}
    with torch.no_grad():
        for (k, v), g in zip(params.items(), grads):
            velocity[k] = momentum * velocity[k] + g
            out[k] = v - _per_network(lr, v) * velocity[k]
    return out


def adam_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
              moments: dict[str, tuple[torch.Tensor, torch.Tensor]], step: int, lr: torch.Tensor | float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """One Adam step (``torch.optim.Adam``'s rule); ``step`` counts from 1, ``moments {name: (first, second)}``
    are updated in place and start at zero when missing."""
    out = {}
    with torch.no_grad():
        for k, g in grads.items():
            if k not in moments:
                moments[k] = (torch.zeros_like(g), torch.zeros_like(g))
            first, second = moments[k]
            first.mul_(betas[0]).add_((1 - betas[0]) * g)
            second.mul_(betas[1]).add_((1 - betas[1]) * g.square())
            update = (first / (1 - betas[0] ** step)) / ((second / (1 - betas[1] ** step)).sqrt() + eps)
            out[k] = params[k] - _per_network(lr, params[k]) * update
    return out
