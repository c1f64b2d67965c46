"""The public INRs of the weight-space benchmark (DWSNets' MNIST and FashionMNIST INRs, which DWSNet, GMN, ScaleGMN
and GradMetaNet report on), read into the INR zoo's layout, whole or as a sharded zoo folder.

The files are a tree of PyTorch state dicts, one per INR:
``<root>/<dataset>_png_<training|testing>_<label>_<index>/checkpoints/model_final.pth``. The split and the label
come from the folder two levels above the file (``..._<label>_<index>``; "train" in its path marks the training
split). Each state dict holds the SIREN 2-32-32-1's three weights and three biases in layer order; their names
differ between releases, so they are matched by order and checked by shape (a file of another architecture is
refused, naming it). The SIRENs are the INR zoo's own (:mod:`gradmetanet.zoos.inr`: sine ``omega_0 = 30``, +0.5 on
the output, the same grid), so every experiment that reads the INR zoo reads these.

Splits follow the benchmark: the testing files are the test split, and ``val_size`` training INRs (by default a
twelfth, the benchmark's 5,000 of 60,000; drawn with ``seed``) the validation split. The original images are not in the files: ``images`` holds
each INR's rendering quantised to 0..255, and ``psnr`` is NaN (no reference), so image-editing experiments need
the original images (MNIST IDX files) to be meaningful; classification needs the labels only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import vmap

from .inr import INR_WIDTHS, InrZoo, load_sharded_inr_zoo, render
from .shards import ShardedZoo, complete_sharded_zoo, make_sharded_zoo

__all__ = ["PublicInrSource", "find_public_inrs", "load_inr_folder", "load_public_inr_zoo", "public_inrs_to_shards",
           "read_inr_state"]

_NAMES = tuple(f"{2 * i}.{kind}" for i in range(len(INR_WIDTHS) - 1) for kind in ("weight", "bias"))
_SHAPES = {n: ((INR_WIDTHS[int(n[0]) // 2 + 1], INR_WIDTHS[int(n[0]) // 2]) if n.endswith("weight")
               else (INR_WIDTHS[int(n[0]) // 2 + 1],)) for n in _NAMES}
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class PublicInrSource:
    """Which public INRs to read: the tree under ``directory``; ``val_size`` training INRs held out for validation
    (drawn with ``seed``; default a twelfth of them, the benchmark's 5,000 of 60,000); ``limit``: only the first
    ``limit`` INRs of the training and of the test files (in the sorted order of their paths), for smaller runs."""

    directory: str
    val_size: int | None = None
    seed: int = 0
    limit: int | None = None


def find_public_inrs(source: PublicInrSource) -> list[tuple[Path, int, bool]]:
    """``(path, label, is_training)`` of every INR file under ``source.directory``, training files first, each
    group sorted by path (so the order does not depend on the file system)."""
    root = Path(source.directory)
    files = sorted(root.glob("*_png_*/**/*.pth"))
    if not files:
        raise FileNotFoundError(f"no INR files under {root}: expected <dataset>_png_<training|testing>_<label>_<index>"
                                "/checkpoints/model_final.pth (the DWSNets MNIST/FashionMNIST INR archive, unpacked)")
    found = []
    for path in files:
        folder = path.parent.parent.name
        fields = folder.split("_")
        try:
            label = int(fields[-2])
        except (IndexError, ValueError):
            raise ValueError(f"{path}: its folder {folder!r} does not end in _<label>_<index>") from None
        found.append((path, label, "train" in path.relative_to(root).as_posix()))
    training = [f for f in found if f[2]][:source.limit]
    testing = [f for f in found if not f[2]][:source.limit]
    return training + testing


def read_inr_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One INR's parameters ``{"0.weight": [32, 2], ..., "4.bias": [1]}`` from its state dict (weights and biases
    taken in file order; a file whose tensors are not the SIREN 2-32-32-1's is refused, naming what it holds)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    weights = [v for k, v in state.items() if "weight" in k]
    biases = [v for k, v in state.items() if "bias" in k]
    tensors = [t for pair in zip(weights, biases) for t in pair]
    shapes = [tuple(t.shape) for t in tensors]
    if len(weights) != len(biases) or shapes != [_SHAPES[n] for n in _NAMES]:
        raise ValueError(f"{path} holds {[(k, tuple(v.shape)) for k, v in state.items()]}, not the SIREN "
                         f"{'-'.join(map(str, INR_WIDTHS))} of the INR benchmark ({list(_SHAPES.values())})")
    return {n: t.float() for n, t in zip(_NAMES, tensors)}


def _split_codes(files: list[tuple[Path, int, bool]], source: PublicInrSource) -> torch.Tensor:
    """``[M]``: 0 train, 1 validation, 2 test for every file."""
    codes = torch.tensor([0 if training else 2 for _, _, training in files])
    training = (codes == 0).nonzero().squeeze(1)
    val_size = max(1, len(training) // 12) if source.val_size is None else source.val_size
    if not 0 < val_size < len(training):
        raise ValueError(f"val_size {val_size} must leave training INRs and validation INRs of the "
                         f"{len(training)} training files")
    held = torch.randperm(len(training), generator=torch.Generator().manual_seed(source.seed))[:val_size]
    codes[training[held]] = 1
    return codes


def _read(files: list[tuple[Path, int, bool]]) -> dict[str, torch.Tensor]:
    """``params/<name> [m, *shape]``, ``labels [m]``, ``images [m, 28, 28]`` (renderings, uint8) of ``files``."""
    states = [read_inr_state(path) for path, _, _ in files]
    params = {n: torch.stack([s[n] for s in states]) for n in _NAMES}
    with torch.no_grad():
        side = math.isqrt(render(states[0]).numel())
        images = (vmap(render)(params).clamp(0, 1) * 255).round().to(torch.uint8).reshape(len(files), side, side)
    return {f"params/{n}": v for n, v in params.items()} | {
        "labels": torch.tensor([label for _, label, _ in files]), "images": images}


def public_inrs_to_shards(source: PublicInrSource, folder: str | os.PathLike, shard_size: int = 1000,
                          rank: int | None = None, world: int | None = None, progress: bool = True) -> list[int]:
    """The public INRs as a sharded zoo folder (resumable; shared among ``torchrun``'s processes), one shard's
    files in memory at a time: ``params/<name>``, ``labels``, ``images`` (renderings) and ``split`` (0 train,
    1 validation, 2 test) per INR."""
    files = find_public_inrs(source)
    codes = _split_codes(files, source)

    def shard(start: int, stop: int) -> dict[str, torch.Tensor]:
        return _read(files[start:stop]) | {"split": codes[start:stop].clone()}

    return make_sharded_zoo(folder, "public_inrs", source, len(files), shard_size, shard,
                            lambda: {"inrs": torch.tensor(len(files))}, rank, world, progress=progress)


def load_public_inr_zoo(path: str | os.PathLike, val_size: int | None = None, seed: int = 0, limit: int | None = None
                        ) -> InrZoo:
    """The public INRs as an :class:`~gradmetanet.zoos.InrZoo`, from the unpacked archive ``path`` or from a sharded
    folder made of it by :func:`public_inrs_to_shards` (``gradmetanet zoo make public-inrs``; every shard verified,
    the split it was made with kept). ``psnr`` is NaN: the files hold no reference images."""
    source = PublicInrSource(str(path), val_size, seed, limit)
    if (Path(path) / "manifest.json").exists():
        sharded, fields = complete_sharded_zoo(path, "public_inrs", "gradmetanet zoo make public-inrs")
        tensors, source = sharded.tensors(), PublicInrSource(**fields)
    else:
        files = find_public_inrs(source)
        tensors = _read(files) | {"split": _split_codes(files, source)}
    splits = {s: (tensors["split"] == c).nonzero().squeeze(1) for s, c in _SPLIT_CODES.items()}
    labels = tensors["labels"]
    return InrZoo(source, {n: tensors[f"params/{n}"] for n in _NAMES}, tensors["images"], labels,
                  torch.full((len(labels),), math.nan), splits)


def load_inr_folder(path: str | os.PathLike, limit: int | None = None) -> InrZoo:
    """An INR zoo from a folder: a sharded INR zoo made here (``gradmetanet zoo make inr``), the public INRs'
    archive or a sharded folder made of it (``gradmetanet zoo make public-inrs``). ``limit`` (the archive only):
    the first ``limit`` training and test INRs."""
    manifest = Path(path) / "manifest.json"
    if manifest.exists() and ShardedZoo(path).manifest["zoo"] == "inr_zoo":
        return load_sharded_inr_zoo(path)
    return load_public_inr_zoo(path, limit=limit)
