"""The iterative baseline: fine-tune every network separately by SGD on the same objective, vectorised."""

from __future__ import annotations

import time

import torch
from torch import nn

from .optim import heavy_ball_step
from .objective import objective

__all__ = ["sgd_finetune"]


def sgd_finetune(template: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, l1: float,
                 lr: float, epochs: tuple[int, ...], batch_size: int = 128, momentum: float = 0.9, seed: int = 0,
                 progress=None) -> dict[int, tuple[dict[str, torch.Tensor], float]]:
    """``{epoch: (params at that epoch, seconds spent so far)}`` for every epoch in ``epochs``.

    Each network ``{name: [N, *shape]}`` follows its own SGD (heavy-ball ``momentum``) on its own objective
    (:func:`~gradmetanet.zoos.objective`; the L1 term by its subgradient); the networks run together, one
    ``vmap``, and share the shuffled batches of ``(x, y)``. An epoch is one pass over ``x``. The seconds are
    the vectorised run's; divided by ``N`` they are what one network cost.
    """
    gen = torch.Generator().manual_seed(seed)
    p = {k: v.detach().clone() for k, v in params.items()}
    velocity = {k: torch.zeros_like(v) for k, v in p.items()}
    out, spent = {}, 0.0
    for epoch in range(1, max(epochs) + 1):
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            p = {k: v.requires_grad_() for k, v in p.items()}
            grads = torch.autograd.grad(objective(template, p, x[idx], y[idx], l1).sum(), list(p.values()))
            p = heavy_ball_step(p, grads, velocity, lr, momentum)
        spent += time.perf_counter() - start
        if epoch in epochs:
            out[epoch] = ({k: v.detach().clone() for k, v in p.items()}, spent)
        if progress is not None:
            progress.update()
    return out
