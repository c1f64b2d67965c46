"""Loaders for image classification files the user supplies, downsampled to 8x8 as in the paper.

- FashionMNIST (and MNIST): IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, optionally gzipped (``.gz``).
- CIFAR-10 / CIFAR-100: the "python version" pickles (``data_batch_1`` ... ``data_batch_5``,
  ``test_batch``; or ``train``, ``test`` with ``fine_labels``), in the given directory or its
  ``cifar-10-batches-py`` / ``cifar-100-python`` sub-directory.

Nothing is downloaded. Images become ``[n, channels * 8 * 8]`` floats in ``[0, 1]`` by area
averaging (``adaptive_avg_pool2d``); colour is kept (192 inputs for CIFAR).
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["read_idx", "load_idx_images", "load_fashion_mnist", "load_cifar", "downsample"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into an array of its stated shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header promises {dims} ({expected} bytes) but {len(data) - offset} bytes follow")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def downsample(images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """``[n, c, h, w]`` -> ``[n, c * size * size]`` by area averaging."""
    return F.adaptive_avg_pool2d(images, size).flatten(1)


def _find(root: Path, names: list[str]) -> Path:
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.exists():
                return candidate
    raise FileNotFoundError(f"none of {names} (or .gz) in {root}; MNIST / FashionMNIST need the four IDX files "
                            "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                            "t10k-labels-idx1-ubyte")


def load_idx_images(root: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [n, h, w] uint8, labels [n])`` from MNIST-style IDX files in ``root`` (MNIST, FashionMNIST);
    ``split`` is ``train`` or ``test``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    root = Path(root)
    images = read_idx(_find(root, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]))
    labels = read_idx(_find(root, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(root: str | os.PathLike, split: str = "train", size: int = 8
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, size*size], y [n])`` from the IDX files in ``root``; ``split`` is ``train`` or ``test``."""
    images, labels = load_idx_images(root, split)
    return downsample(images.float().unsqueeze(1) / 255.0, size), labels


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is not a CIFAR pickle ({err})") from err


def load_cifar(root: str | os.PathLike, classes: int = 10, split: str = "train", size: int = 8
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, 3*size*size], y [n])`` from CIFAR-10 or CIFAR-100 python pickles in ``root``."""
    if classes not in (10, 100):
        raise ValueError(f"classes must be 10 or 100, got {classes}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    sub = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    base = sub if sub.is_dir() else root
    if classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = b"labels"
    else:
        names, label_key = [split], b"fine_labels"
    missing = [n for n in names if not (base / n).exists()]
    if missing:
        raise FileNotFoundError(f"CIFAR-{classes} files {missing} not found in {base}")
    data, labels = [], []
    for name in names:
        batch = _unpickle(base / name)
        if b"data" not in batch or label_key not in batch:
            raise ValueError(f"{base / name} lacks the keys b'data' and {label_key!r}")
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(data).astype(np.float32) / 255.0)
    return downsample(x, size), torch.from_numpy(np.concatenate(labels))
