"""Image-file loaders on tiny files the tests write: IDX (FashionMNIST) and CIFAR pickles."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from gradmetanet.data.image_files import load_cifar, load_fashion_mnist, read_idx


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_idx_roundtrip_and_downsampling(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels, compress)
    x, y = load_fashion_mnist(tmp_path, "test")
    assert x.shape == (5, 64) and y.tolist() == [3, 1, 4, 1, 5]
    # 28 -> 8 area averaging: output pixel (0, 0) averages input rows and columns 0..3
    expected = torch.from_numpy(images[:, :4, :4].astype(np.float32) / 255).mean((1, 2))
    torch.testing.assert_close(x[:, 0], expected, atol=1e-6, rtol=0)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match="header promises"):
        read_idx(short)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickles(tmp_path, classes):
    rng = np.random.default_rng(0)
    folder = tmp_path / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir()
    key = b"labels" if classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), key: [1, classes - 1]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    x, y = load_cifar(tmp_path, classes, "train")
    assert x.shape == ((10 if classes == 10 else 2), 192) and int(y.max()) == classes - 1
    x_test, _ = load_cifar(tmp_path, classes, "test")
    assert x_test.shape == (2, 192)
    with open(folder / names[-1], "rb") as fh:      # 32 -> 8: exact 4 x 4 block means, channel-major
        raw = pickle.load(fh)[b"data"].reshape(2, 3, 8, 4, 8, 4).astype(np.float32) / 255
    torch.testing.assert_close(x_test, torch.from_numpy(raw.mean((3, 5)).reshape(2, 192)), atol=1e-6, rtol=0)
    (folder / names[-1]).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a CIFAR pickle"):
        load_cifar(tmp_path, classes, "test")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_cifar(tmp_path / "nowhere", classes)


def test_tasks_from_files_train_the_paper_mlps(tmp_path):
    """The loaders feed the learned-optimizer tasks: shapes of the paper's FashionMNIST and CIFAR-100 MLPs."""
    from gradmetanet.lopt import cifar_task, fashion_mnist_task
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (6, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(6) % 10)
    task = fashion_mnist_task(str(tmp_path), batch_size=4)
    assert dict(task.spec.param_shapes())["0.weight"] == (32, 64)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"fine_labels": [0, 5, 99]}, fh)
    task = cifar_task(str(tmp_path), classes=100, batch_size=2)
    shapes = dict(task.spec.param_shapes())
    assert shapes["0.weight"] == (128, 192) and shapes["2.weight"] == (100, 128)
    gen = torch.Generator().manual_seed(0)
    params = {k: v[0] for k, v in task.init_params(1, gen).items()}
    loss = task.loss(params, tuple(t[0] for t in task.sample_batch(1, gen)))
    assert torch.isfinite(loss)


def test_tabular_tasks_are_standardised_and_checked():
    from gradmetanet.lopt.tasks import tabular_task
    task = tabular_task("wine")
    assert task.in_dim == 13 and task.classes == 3
    torch.testing.assert_close(task.x_train.mean(0), torch.zeros(13), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown tabular task"):
        tabular_task("mnist")
