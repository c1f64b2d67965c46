"""Small classification sets that run offline, as seeded train/test splits of flat feature vectors.

``digits`` (scikit-learn 8x8 digits, pixels in ``[0, 1]``), ``digits-std`` (the same, standardised
per pixel with training statistics: what a user who standardises every input gets), ``mnist1d``
(the MNIST-1D benchmark, 5,000 sequences of 40, made offline by the ``mnist1d`` package), and the
scikit-learn tabular sets ``wine``, ``breast_cancer`` and ``iris`` (standardised).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .digits import load_digits_split

__all__ = ["CLASSIFICATION_SETS", "load_classification_split", "mnist1d_arrays", "standardise"]

CLASSIFICATION_SETS = ("digits", "digits-std", "mnist1d", "wine", "breast_cancer", "iris")

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@lru_cache(maxsize=1)
def mnist1d_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """Every MNIST-1D sequence ``x [5000, 40]`` (the package's train then test part) and label ``y [5000]``,
    from the package's default arguments (seeded, so every call gives the same data)."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x = torch.as_tensor(data["x"].tolist() + data["x_test"].tolist(), dtype=torch.float32)
    y = torch.as_tensor(list(data["y"]) + list(data["y_test"]), dtype=torch.long)
    return x, y


def standardise(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets shifted and scaled per feature by the training set's mean and std (constant features: std 1)."""
    mean, std = x_train.mean(0), x_train.std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return (x_train - mean) / std, (x_test - mean) / std


def _seeded_split(x: torch.Tensor, y: torch.Tensor, seed: int, test_fraction: float) -> Split:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def load_classification_split(name: str, seed: int = 0, test_fraction: float = 0.25) -> Split:
    """``(x_train [n, d], y_train [n], x_test [m, d], y_test [m])`` of the set ``name``, split by ``seed``."""
    if name in ("digits", "digits-std"):
        x_train, y_train, x_test, y_test = load_digits_split(test_fraction, seed)
        if name == "digits-std":
            x_train, x_test = standardise(x_train, x_test)
        return x_train, y_train, x_test, y_test
    if name == "mnist1d":
        return _seeded_split(*mnist1d_arrays(), seed, test_fraction)
    if name in ("wine", "breast_cancer", "iris"):
        from sklearn import datasets

        data = getattr(datasets, f"load_{name}")()
        x_train, y_train, x_test, y_test = _seeded_split(torch.as_tensor(data.data, dtype=torch.float32),
                                                         torch.as_tensor(data.target, dtype=torch.long),
                                                         seed, test_fraction)
        x_train, x_test = standardise(x_train, x_test)
        return x_train, y_train, x_test, y_test
    raise ValueError(f"unknown classification set {name!r}; choose from {list(CLASSIFICATION_SETS)}")
