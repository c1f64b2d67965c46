"""Supervised training of a metanetwork with best-validation model selection."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FitResult", "fit_regression", "evaluate_mse"]

#: ``predict(model, indices) -> [len(indices), P]`` predictions in normalised target units.
Predictor = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class FitResult:
    """Outcome of :func:`fit_regression`; errors are mean squared errors in the caller's units."""

    best_epoch: int
    best_val: float
    test: float
    val_history: list[float] = field(default_factory=list)
    train_history: list[float] = field(default_factory=list)


@torch.no_grad()
def evaluate_mse(model: nn.Module, predict: Predictor, indices: torch.Tensor, targets: torch.Tensor,
                 batch_size: int = 128) -> float:
    """Mean over ``indices`` and entries of ``(predict - targets[indices])^2``."""
    model.eval()
    total = 0.0
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        total += F.mse_loss(predict(model, idx), targets[idx], reduction="sum").item()
    model.train()
    return total / (len(indices) * targets.shape[1])


def fit_regression(model: nn.Module, predict: Predictor, targets: torch.Tensor, train_idx: torch.Tensor,
                   val_idx: torch.Tensor, test_idx: torch.Tensor, epochs: int, batch_size: int, lr: float,
                   seed: int, on_epoch: Callable[[int, float], None] | None = None) -> FitResult:
    """Adam on the MSE to ``targets`` (``[M, P]``, normalised); test error at the best-validation epoch.

    Error values are MSEs in target units; the caller rescales them to its metric.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best_val, best_state, best_epoch = float("inf"), copy.deepcopy(model.state_dict()), -1
    result = FitResult(best_epoch=-1, best_val=float("inf"), test=float("nan"))
    for epoch in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        running, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = F.mse_loss(predict(model, idx), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running, count = running + loss.item() * len(idx), count + len(idx)
        val = evaluate_mse(model, predict, val_idx, targets)
        result.val_history.append(val)
        result.train_history.append(running / count)
        if val < best_val:
            best_val, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, val)
    model.load_state_dict(best_state)
    result.best_epoch, result.best_val = best_epoch, best_val
    result.test = evaluate_mse(model, predict, test_idx, targets)
    return result
