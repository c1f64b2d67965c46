"""INR zoo and image edits: SIRENs as the public benchmark has them, fitted at once, their sign symmetry,
a dilation equal to a brute-force max filter, and the IDX loader on files the test writes."""

from __future__ import annotations

import struct

import numpy as np
import torch

from gradmetanet.data.image_edits import dilate
from gradmetanet.zoos.inr import (INR_WIDTHS, InrZooConfig, digits_images, grid_coordinates,
                                      load_or_generate_inr_zoo, render)
from gradmetanet.models import siren_template
from gradmetanet import spec_of


def brute_force_dilation(img: np.ndarray, size: int = 3) -> np.ndarray:
    h, w = img.shape
    r = size // 2
    out = np.empty_like(img)
    for i in range(h):
        for j in range(w):
            out[i, j] = img[max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].max()
    return out


def test_dilation_is_a_grey_max_filter_with_clipped_borders():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    images[0] = 0
    images[0, 0, 0] = 200                       # a corner pixel spreads to a 2 x 2 block only
    got = dilate(torch.from_numpy(images))
    assert got.dtype == torch.uint8
    for i in range(5):
        np.testing.assert_array_equal(got[i].numpy(), brute_force_dilation(images[i]))
    assert got[0].sum().item() == 4 * 200
    np.testing.assert_array_equal(dilate(torch.from_numpy(images[1]), 5).numpy(), brute_force_dilation(images[1], 5))


def test_digits_are_upsampled_and_quantised():
    images, labels = digits_images()
    assert images.shape == (1797, 28, 28) and images.dtype == torch.uint8 and labels.shape == (1797,)
    assert images.max() == 255 and images.min() == 0


def test_siren_sign_symmetry_holds_for_the_benchmark_inrs():
    """A random element of the spec's group (permutations and sign flips of both hidden layers) leaves the
    rendered image unchanged: the symmetry ScaleGMN uses is true for these SIRENs (omega_0 = 30, +0.5)."""
    zoo = load_or_generate_inr_zoo(InrZooConfig(n_images=3, steps=20), cache_dir=None, progress=False)
    spec = spec_of(siren_template(INR_WIDTHS, 30.0), grid_coordinates()[:4])
    assert [s.group.name for s in spec.spaces] == ["trivial", "sign_perm", "sign_perm", "trivial"]
    params = {k: v[0].double() for k, v in zoo.params.items()}
    moved = spec.transform_parameters(params, spec.sample(torch.Generator().manual_seed(0)))
    assert not torch.equal(moved["0.weight"], params["0.weight"])
    torch.testing.assert_close(render(moved), render(params), atol=1e-10, rtol=0)
    # a positive scale is not a symmetry of a sine network: it changes the image
    from gradmetanet.core import Monomial
    scale = {spec.spaces[1].name: Monomial(torch.arange(32), torch.full((32,), 2.0, dtype=torch.float64))}
    assert (render(spec.transform_parameters(params, scale)) - render(params)).abs().max() > 1e-2


def write_idx(path, array: np.ndarray) -> None:
    code = {1: 0x08}[array.dtype.itemsize]
    with open(path, "wb") as fh:
        fh.write(bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape))
        fh.write(array.tobytes())


def test_inr_zoo_from_idx_files_fits_splits_and_caches(tmp_path):
    rng = np.random.default_rng(0)
    images = np.zeros((6, 28, 28), dtype=np.uint8)
    for k in range(6):                                   # smooth blobs, as digits are
        yy, xx = np.mgrid[:28, :28]
        images[k] = (255 * np.exp(-((yy - rng.integers(8, 20)) ** 2 + (xx - rng.integers(8, 20)) ** 2) / 30)).astype(
            np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(6, dtype=np.uint8))
    config = InrZooConfig(data_dir=str(tmp_path), steps=300, val_fraction=0.34, test_fraction=0.34)
    zoo = load_or_generate_inr_zoo(config, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(zoo.images, torch.from_numpy(images)) and zoo.labels.tolist() == list(range(6))
    assert zoo.psnr.min() > 30, zoo.psnr                  # fitted: 300 Adam steps
    assert sorted(torch.cat(list(zoo.splits.values())).tolist()) == list(range(6))
    manifest = (tmp_path / "cache" / f"inr_zoo_{config.key()}" / "manifest.json").read_text()
    assert '"inrs": 6' in manifest
    again = load_or_generate_inr_zoo(config, cache_dir=tmp_path / "cache", progress=False)
    assert all(torch.equal(again.params[k], zoo.params[k]) for k in zoo.params)


def test_a_shared_initialisation_zoo_starts_every_inr_from_the_same_weights():
    """One Adam step moves each weight by at most about lr: INRs of a shared-init zoo stay within 2 lr of each
    other after one step, those of the default zoo (one draw each) do not."""
    shared = load_or_generate_inr_zoo(InrZooConfig(n_images=4, steps=1, chunk=2, shared_init=True), cache_dir=None,
                                      progress=False)
    own = load_or_generate_inr_zoo(InrZooConfig(n_images=4, steps=1, chunk=2), cache_dir=None, progress=False)
    lr = InrZooConfig().lr
    for name, w in shared.params.items():
        assert (w - w[0]).abs().max() <= 2 * lr + 1e-6, name                  # across chunks too
    assert (own.params["2.weight"] - own.params["2.weight"][0]).abs().max() > 10 * lr
