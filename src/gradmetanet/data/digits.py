"""The scikit-learn 8x8 handwritten digits (1797 images), the one real image set shipped offline."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

__all__ = ["load_digits_split"]


def load_digits_split(test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train [n, 64], y_train [n], x_test [m, 64], y_test [m])``, pixels scaled to ``[0, 1]``.

    The split is a seeded random permutation, so the same seed gives the same split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=dtype) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]
