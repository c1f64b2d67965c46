"""A zoo of implicit neural representations (INRs) of images, as the public INR benchmark has them.

Every INR is a SIREN ``2 -> 32 -> 32 -> 1`` (sine with ``omega_0 = 30`` on both hidden layers, a
linear last layer, **plus 0.5 on the output**; first layer initialised ``U(±1/d_in)``, later layers
``U(±sqrt(6/d_in)/30)``, biases as PyTorch's default) fitted to one 28 x 28 grey image in ``[0, 1]``
on the ``linspace(-1, 1)`` grid (``meshgrid(..., indexing="ij")``: row index first, the image's
``[row, col]`` flattened row-major). All INRs of a chunk are fitted at once (``vmap``, a functional
Adam), and the zoo is cached on disk with its splits and a manifest (``manifest.json``: the
configuration, split sizes and the fit's PSNR).

Images: by default the 1,797 scikit-learn digits (8 x 8, values 0..16) scaled to ``[0, 1]`` and
upsampled to 28 x 28 by bilinear interpolation (``F.interpolate``, ``align_corners=False``), then
quantised to 0..255 as the benchmark's MNIST images are, so that edits such as a grey dilation work
on the same integer images; or MNIST / FashionMNIST IDX files from a directory the user names (the
paper's data).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from .cache import cached_zoo
from .shards import complete_sharded_zoo, make_sharded_zoo
from .optim import adam_step
from ..data.image_files import load_idx_images
from ..models.siren import siren_template

__all__ = ["InrZooConfig", "InrZoo", "load_or_generate_inr_zoo", "make_sharded_inr_zoo", "load_sharded_inr_zoo", "grid_coordinates", "render", "digits_images",
           "INR_WIDTHS", "OMEGA_0", "OUTPUT_OFFSET"]

#: how the INRs are fitted: caches made otherwise (0.9 and before: Adam written out here, its step rounded in another
#: order) are rebuilt
FITTER = "zoos.optim.adam_step"
INR_WIDTHS = (2, 32, 32, 1)
OMEGA_0 = 30.0
OUTPUT_OFFSET = 0.5
SIDE = 28


@dataclass(frozen=True)
class InrZooConfig:
    """What defines a zoo; any change gives another cache file. ``data_dir``: MNIST-style IDX files (else digits)."""

    n_images: int | None = None          # the first n images (all by default)
    data_dir: str | None = None
    split: str = "train"                 # which IDX split (train or test) with data_dir
    steps: int = 300
    lr: float = 1e-3
    chunk: int = 256
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    shared_init: bool = False            # every INR starts from the same initial weights (else each its own draw)

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [1797, 28, 28] uint8, labels [1797])``: the digits upsampled bilinearly and quantised."""
    data = load_digits()
    small = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(small, size=(SIDE, SIDE), mode="bilinear", align_corners=False).squeeze(1).clamp(0, 1)
    return (big * 255).round().to(torch.uint8), torch.as_tensor(data.target, dtype=torch.long)


def grid_coordinates(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[784, 2]``: the 28 x 28 ``linspace(-1, 1)`` grid, row-major (pixel ``[r, c]`` is row ``28 r + c``)."""
    axis = torch.linspace(-1, 1, SIDE, dtype=dtype)
    return torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)


_TEMPLATE = siren_template(INR_WIDTHS, OMEGA_0)


def render(params: dict[str, torch.Tensor], coords: torch.Tensor | None = None) -> torch.Tensor:
    """``[..., n]``: one INR's values at ``coords [n, 2]`` (the full grid by default); vmap it over INRs."""
    coords = grid_coordinates(next(iter(params.values())).dtype) if coords is None else coords
    return functional_call(_TEMPLATE, params, (coords,))[..., 0] + OUTPUT_OFFSET


def _init(m: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    params = {}
    for i, (d_in, d_out) in enumerate(zip(INR_WIDTHS[:-1], INR_WIDTHS[1:])):
        bound = 1.0 / d_in if i == 0 else math.sqrt(6.0 / d_in) / OMEGA_0
        params[f"{2 * i}.weight"] = (torch.rand(m, d_out, d_in, generator=gen) * 2 - 1) * bound
        params[f"{2 * i}.bias"] = (torch.rand(m, d_out, generator=gen) * 2 - 1) / math.sqrt(d_in)
    return params


def _own_inits(config: InrZooConfig, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Initial parameters of INRs ``start .. stop - 1``, each from its own seed ``(config.seed, index)``: the same for
    any chunk, shard or process that fits it (the sharded zoo's draw)."""
    inits = [_init(1, torch.Generator().manual_seed(config.seed * 1_000_003 + i)) for i in range(start, stop)]
    return {k: torch.cat([p[k] for p in inits]) for k in inits[0]}


def _fit(targets: torch.Tensor, config: InrZooConfig, init: dict[str, torch.Tensor] | None
         ) -> dict[str, torch.Tensor]:
    """Fit one SIREN to each of ``targets [m, 784]`` (values in ``[0, 1]``) with Adam from ``init`` (one
    initialisation per INR) or, with ``config.shared_init``, from the zoo's one initialisation (drawn from the
    zoo's seed)."""
    m = targets.shape[0]
    if config.shared_init:
        params = {k: v.expand(m, *v.shape[1:]).clone()
                  for k, v in _init(1, torch.Generator().manual_seed(config.seed)).items()}
    else:
        params = init

    def loss(p: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return (render(p) - target).square().mean()

    gradient = vmap(grad(loss))
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in range(1, config.steps + 1):
        params = adam_step(params, gradient(params, targets), moments, t, config.lr)
    return params


@dataclass
class InrZoo:
    """``params[name]: [M, *shape]`` of ``M`` SIRENs, their ``images [M, 28, 28]`` (uint8) and ``labels [M]``,
    ``psnr [M]`` of the fit (dB), and ``splits`` (``train``, ``val``, ``test`` index tensors)."""

    config: Any                         # the InrZooConfig it was fitted with, or the PublicInrSource it was read from
    params: dict[str, torch.Tensor]
    images: torch.Tensor
    labels: torch.Tensor
    psnr: torch.Tensor
    splits: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.images.shape[0]

    def targets(self) -> torch.Tensor:
        """``[M, 784]``: the images in ``[0, 1]``, flattened as the grid is."""
        return self.images.reshape(len(self), -1).float() / 255.0


def _splits(m: int, config: InrZooConfig) -> dict[str, torch.Tensor]:
    order = torch.randperm(m, generator=torch.Generator().manual_seed(config.seed))
    n_val, n_test = int(round(config.val_fraction * m)), int(round(config.test_fraction * m))
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


def _images(config: InrZooConfig) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_idx_images(config.data_dir, config.split) if config.data_dir else digits_images()
    if config.n_images is not None:
        images, labels = images[:config.n_images], labels[:config.n_images]
    return images, labels


def _psnr(params: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """``[m]``: each INR's fit (dB) against its target ``[m, 784]``."""
    with torch.no_grad():
        mse = vmap(lambda p, t: (render(p) - t).square().mean())(params, targets)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def generate_inr_zoo(config: InrZooConfig, progress: bool = True) -> InrZoo:
    """Fit the zoo in memory, chunk by chunk, the initialisations drawn from one stream seeded by ``config.seed``
    (the cached zoo of every experiment; a sharded zoo draws each INR's own, see :func:`make_sharded_inr_zoo`)."""
    images, labels = _images(config)
    targets = images.reshape(len(images), -1).float() / 255.0
    gen = torch.Generator().manual_seed(config.seed)
    parts = []
    for start in tqdm(range(0, len(images), config.chunk), desc="fit INRs", unit="chunk", disable=not progress):
        chunk = targets[start:start + config.chunk]
        parts.append(_fit(chunk, config, None if config.shared_init else _init(len(chunk), gen)))
    params = {k: torch.cat([p[k] for p in parts]).detach() for k in parts[0]}
    return InrZoo(config, params, images, labels, _psnr(params, targets), _splits(len(images), config))


def make_sharded_inr_zoo(config: InrZooConfig, folder: str | os.PathLike, shard_size: int = 256,
                         rank: int | None = None, world: int | None = None, progress: bool = True) -> list[int]:
    """Make (or finish) the zoo of ``config`` as a sharded folder (:func:`~gradmetanet.zoos.make_sharded_zoo`), this
    process's share of the shards under ``torchrun``. Each INR starts from its own seed ``(config.seed, index)``, so
    the zoo is the same for any number of processes and shards; it is not the cached zoo of the same ``config``
    (whose initialisations come from one stream, kept so that earlier results stay reproducible)."""
    images, labels = _images(config)
    targets = images.reshape(len(images), -1).float() / 255.0

    def shard(start: int, stop: int) -> dict[str, torch.Tensor]:
        params = {k: v.detach() for k, v in _fit(targets[start:stop], config, _own_inits(config, start, stop)).items()}
        return {f"params/{k}": v for k, v in params.items()} | {
            "images": images[start:stop].clone(), "labels": labels[start:stop].clone(),
            "psnr": _psnr(params, targets[start:stop])}

    return make_sharded_zoo(folder, "inr_zoo", config, len(images), shard_size, shard,
                            lambda: {f"split/{k}": v for k, v in _splits(len(images), config).items()}, rank, world,
                            depends={"fit": FITTER, "init": "per-index seeds"}, progress=progress)


def load_sharded_inr_zoo(folder: str | os.PathLike) -> InrZoo:
    """The INR zoo of a sharded folder made by :func:`make_sharded_inr_zoo`, every shard verified."""
    zoo, fields = complete_sharded_zoo(folder, "inr_zoo", "gradmetanet zoo make inr")
    t = zoo.tensors()
    params = {k[len("params/"):]: v for k, v in t.items() if k.startswith("params/")}
    return InrZoo(InrZooConfig(**fields), params, t["images"], t["labels"], t["psnr"],
                  {s: t[f"split/{s}"] for s in ("train", "val", "test")})


def load_or_generate_inr_zoo(config: InrZooConfig, cache_dir: str | os.PathLike | None,
                             progress: bool = True) -> InrZoo:
    """The zoo of ``config`` from the verified cache in ``cache_dir`` (:func:`~gradmetanet.zoos.cached_zoo`), else
    fitted and cached; ``cache_dir=None`` keeps nothing."""
    def to_tensors(zoo: InrZoo) -> dict[str, torch.Tensor]:
        return {f"params/{k}": v for k, v in zoo.params.items()} | {
            "images": zoo.images, "labels": zoo.labels, "psnr": zoo.psnr} | {
            f"split/{s}": v for s, v in zoo.splits.items()}

    def from_tensors(t: dict[str, torch.Tensor]) -> InrZoo:
        return InrZoo(config, {k[len("params/"):]: v for k, v in t.items() if k.startswith("params/")},
                      t["images"], t["labels"], t["psnr"], {s: t[f"split/{s}"] for s in ("train", "val", "test")})

    def summary(zoo: InrZoo) -> dict:
        return {"inrs": len(zoo), "splits": {s: len(v) for s, v in zoo.splits.items()},
                "psnr_db": {"mean": zoo.psnr.mean().item(), "min": zoo.psnr.min().item()},
                "widths": INR_WIDTHS, "omega_0": OMEGA_0, "output_offset": OUTPUT_OFFSET}
    return cached_zoo("inr_zoo", config, lambda: generate_inr_zoo(config, progress), to_tensors, from_tensors,
                      cache_dir, summary, depends={"fit": FITTER})
