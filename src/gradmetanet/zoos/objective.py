"""The amortized fine-tuning objective and the metrics of its table.

``L(theta'; B) = lambda * ||theta'||_1 + CE(net_theta'(x), y)`` per network, averaged over networks; ``||.||_1``
sums every weight and bias. Sparsity is the percentage by which the total L1 norm fell against the input
network, ``100 (1 - ||theta'||_1 / ||theta||_1)``, averaged over networks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import batched_logits

__all__ = ["l1_norms", "objective", "ZooMetrics", "evaluate_networks"]


def l1_norms(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[N]``: the L1 norm of every network's parameters ``{name: [N, *shape]}``."""
    return sum(v.flatten(1).abs().sum(1) for v in params.values())


def objective(template: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              l1: float) -> torch.Tensor:
    """``[N]``: cross-entropy of each network on the shared batch ``x [B, ...]``, ``y [B]``, plus ``l1`` times its
    parameters' L1 norm."""
    logits = batched_logits(template, params, x)
    ce = F.cross_entropy(logits.transpose(1, 2), y.expand(logits.shape[0], -1), reduction="none").mean(1)
    return ce + l1 * l1_norms(params) if l1 else ce


@dataclass
class ZooMetrics:
    """One cell of the table: over the evaluated networks, on the test images."""

    mean_acc: float
    max_acc: float
    test_loss: float          # cross-entropy + lambda * L1, averaged over networks
    sparsity: float           # % reduction of the total L1 norm against the input networks
    seconds_per_net: float | None
    accuracies: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_networks(template: nn.Module, params: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
                      x: torch.Tensor, y: torch.Tensor, l1: float, seconds_per_net: float | None,
                      chunk: int = 500) -> ZooMetrics:
    """The metrics of the networks ``params`` (fine-tuned from ``original``) on the test images ``(x, y)``."""
    with torch.no_grad():
        hits, ce = 0, 0
        for i in range(0, len(x), chunk):
            logits = batched_logits(template, params, x[i:i + chunk])
            hits = hits + (logits.argmax(-1) == y[i:i + chunk]).float().sum(1)
            ce = ce + F.cross_entropy(logits.transpose(1, 2), y[i:i + chunk].expand(logits.shape[0], -1),
                                      reduction="none").sum(1)
        acc, ce = hits / len(x), ce / len(x)
        norms = l1_norms(params)
        sparsity = 100 * (1 - norms / l1_norms(original))
    return ZooMetrics(acc.mean().item(), acc.max().item(), (ce + l1 * norms).mean().item(), sparsity.mean().item(),
                      seconds_per_net, acc.tolist())
