"""Zoos on disk in shards: a folder that any number of processes fill, and that training reads shard by shard.

Layout (``gradmetanet.zoo-sharded/1``)::

    FOLDER/manifest.json           zoo kind, config, depends, package version, networks, shard size
    FOLDER/common.safetensors      what all networks share (splits), with common.json: its size and SHA-256
    FOLDER/shard-00000.safetensors networks [0, shard_size): every tensor with a leading network axis
    FOLDER/shard-00000.json        the shard's network range, size in bytes and SHA-256

A shard counts as written once its ``.json`` exists and matches its bytes: writes are atomic (temporary file,
fsync, rename), the ``.json`` last, so an interrupted process leaves either a whole shard or none. Generation
resumes at the shards that are missing; process ``rank`` of ``world`` makes shards ``rank, rank + world, ...``
(``torchrun`` sets ``RANK`` and ``WORLD_SIZE``; no process group is needed). Every network must depend on its
index alone (as :func:`~gradmetanet.zoos.classifier.network_recipe` does), so the zoo is the same for any
number of processes. Reading verifies each shard's checksum the first time it is opened and names a damaged
or missing shard; only the shards asked for are read.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..atomic import atomic_replace, atomic_write_text
from ..core.spec import NetworkSpec
from ..features.neurons import GradientBatch
from ..features.weightspace import WeightSpaceFeatures
from ..provenance import package_version
from .cache import _as_json, file_digest

__all__ = ["ShardedZoo", "ShardedWeights", "make_sharded_zoo", "ZooDamaged", "LAYOUT"]

LAYOUT = "gradmetanet.zoo-sharded/1"
_MANIFEST = "manifest.json"
_COMMON = "common"


class ZooDamaged(ValueError):
    """A shard (or the common file, or the manifest) of a sharded zoo is missing or does not match its checksum."""


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _write_checked(folder: Path, stem: str, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    """``stem.safetensors`` then ``stem.json`` (its size, SHA-256 and ``extra``), each atomically."""
    path = folder / f"{stem}.safetensors"
    with atomic_replace(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    record = {"bytes": path.stat().st_size, "sha256": file_digest(path), **extra}
    atomic_write_text(folder / f"{stem}.json", json.dumps(record, indent=2))


def _problem(folder: Path, stem: str) -> str | None:
    """What is wrong with ``stem`` (``None`` when its bytes match its record)."""
    path, record_path = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    if not record_path.exists():
        return f"{stem} was never finished (no {stem}.json)"
    if not path.exists():
        return f"{stem}.safetensors is missing"
    record = json.loads(record_path.read_text())
    if path.stat().st_size != record["bytes"]:
        return f"{stem}.safetensors has {path.stat().st_size} bytes, its record says {record['bytes']}"
    if file_digest(path) != record["sha256"]:
        return f"{stem}.safetensors does not match its SHA-256 (its bytes were changed)"
    return None


def make_sharded_zoo(folder: str | os.PathLike, kind: str, config: Any, networks: int, shard_size: int,
                     generate: Callable[[int, int], dict[str, torch.Tensor]],
                     common: Callable[[], dict[str, torch.Tensor]], rank: int | None = None, world: int | None = None,
                     depends: dict[str, str] | None = None, progress: bool = True) -> list[int]:
    """Make (or finish) the sharded zoo in ``folder``; returns the shards this call wrote.

    ``generate(start, stop)`` trains networks ``start .. stop - 1`` (tensors with a leading network axis);
    ``common()`` what they share. ``rank`` / ``world`` default to ``$RANK`` / ``$WORLD_SIZE`` (one process).
    A folder holding another zoo (kind, config, size, shard size or ``depends``) is refused.
    """
    folder = Path(folder)
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    if shard_size < 1 or networks < 1 or not 0 <= rank < world:
        raise ValueError(f"need networks >= 1, shard_size >= 1 and 0 <= rank < world; got {networks}, {shard_size}, "
                         f"rank {rank} of {world}")
    manifest = {"layout": LAYOUT, "zoo": kind, "config": _as_json(asdict(config)), "depends": depends or {},
                "networks": networks, "shard_size": shard_size, "shards": -(-networks // shard_size)}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _MANIFEST
    if path.exists():
        found = json.loads(path.read_text())
        differs = [k for k in manifest if found.get(k) != manifest[k]]
        if differs:
            raise ValueError(f"{folder} holds another zoo (differing: {', '.join(differs)}); choose another folder")
    else:
        atomic_write_text(path, json.dumps(manifest | {"package_version": package_version()}, indent=2))
    if rank == 0 and _problem(folder, _COMMON) is not None:
        _write_checked(folder, _COMMON, common(), {})
    mine = [k for k in range(manifest["shards"]) if k % world == rank and _problem(folder, _shard_name(k))]
    for k in tqdm(mine, desc=f"{kind} shards (rank {rank}/{world})", unit="shard", disable=not progress):
        start, stop = k * shard_size, min((k + 1) * shard_size, networks)
        _write_checked(folder, _shard_name(k), generate(start, stop), {"networks": [start, stop]})
    return mine


class ShardedZoo:
    """A sharded zoo folder, read lazily (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        path = self.folder / _MANIFEST
        if not path.exists():
            raise ZooDamaged(f"{self.folder} has no {_MANIFEST}: not a sharded zoo, or one never started")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("layout") != LAYOUT:
            raise ZooDamaged(f"{self.folder} is of layout {self.manifest.get('layout')!r}, not {LAYOUT!r}")
        self._verified: set[str] = set()

    def __len__(self) -> int:
        return int(self.manifest["networks"])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    def missing(self) -> list[int]:
        """Shards not (completely) written yet."""
        return [k for k in range(self.manifest["shards"])
                if not (self.folder / f"{_shard_name(k)}.json").exists()]

    def verify(self) -> list[str]:
        """Every problem of the folder (reads every byte); empty when the zoo is whole and intact."""
        stems = [_COMMON] + [_shard_name(k) for k in range(self.manifest["shards"])]
        return [p for p in (_problem(self.folder, s) for s in stems) if p is not None]

    def _checked(self, stem: str) -> Path:
        """The file of ``stem``, its checksum verified the first time this reader opens it (streamed: the check
        holds one block of the file in memory, not the file)."""
        if stem not in self._verified:
            problem = _problem(self.folder, stem)
            if problem is not None:
                raise ZooDamaged(f"zoo {self.folder}: {problem}; remake it with `gradmetanet zoo make` (it resumes)")
            self._verified.add(stem)
        return self.folder / f"{stem}.safetensors"

    def _load(self, stem: str) -> dict[str, torch.Tensor]:
        return load_file(self._checked(stem))

    def common(self) -> dict[str, torch.Tensor]:
        return self._load(_COMMON)

    def shard(self, k: int) -> dict[str, torch.Tensor]:
        """Shard ``k``: every tensor ``[networks in the shard, ...]``."""
        return self._load(_shard_name(k))

    def networks(self, indices: torch.Tensor | list[int], names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Networks ``indices`` (in that order) of the tensors ``names`` (default all), reading from each shard that
        holds some of them only the range of rows between the first and the last asked for (memory-mapped), so
        a batch costs at most a shard's bytes of memory, whatever the zoo's size."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"network indices must lie in [0, {len(self)})")
        shards = indices // self.shard_size
        out: dict[str, torch.Tensor] = {}
        for k in shards.unique().tolist():
            at = (shards == k).nonzero().squeeze(1)
            rows = indices[at] - k * self.shard_size
            first, last = int(rows.min()), int(rows.max())
            with safe_open(self._checked(_shard_name(k)), framework="pt") as f:
                for name in names or list(f.keys()):
                    block = f.get_slice(name)[first:last + 1]
                    if name not in out:
                        out[name] = block.new_empty(len(indices), *block.shape[1:])
                    out[name][at] = block[rows - first]
        return out

    def column(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of every network (``[networks, ...]``; a per-network number such as ``accuracy``),
        read shard by shard without the other tensors."""
        return self.networks(torch.arange(len(self)), [name])[name]

    def weights(self, spec: NetworkSpec, prefix: str = "params/",
                scale: Mapping[str, torch.Tensor] | None = None) -> "ShardedWeights":
        """The networks' parameters (tensors ``prefix + name`` for every parameter of ``spec``) as inputs a
        metanetwork trains on batch by batch (:func:`gradmetanet.metanets.fit` reads them lazily)."""
        return ShardedWeights(self, spec, prefix, scale)

    def gradients(self, spec: NetworkSpec, name: str = "features") -> "ShardedGradients":
        """The networks' gradient sets (tensor ``name``, ``[networks, b, neurons, f]``) as inputs a GradMetaNet trains
        on batch by batch."""
        return ShardedGradients(self, spec, name)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The whole zoo in memory: every shard concatenated, and the common tensors."""
        parts = [self.shard(k) for k in range(self.manifest["shards"])]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} | self.common()


def complete_sharded_zoo(folder: str | os.PathLike, kind: str, make_command: str) -> tuple[ShardedZoo, dict]:
    """The sharded zoo of ``kind`` in ``folder`` with every shard made (else an error naming the missing ones and
    ``make_command``, which finishes it), and its config's fields (JSON lists back as tuples)."""
    zoo = ShardedZoo(folder)
    if zoo.manifest["zoo"] != kind:
        raise ValueError(f"{folder} holds a {zoo.manifest['zoo']}, not a {kind}")
    if zoo.missing():
        raise ZooDamaged(f"{folder}: {len(zoo.missing())} of {zoo.manifest['shards']} shards are not made yet; "
                         f"finish it with `{make_command}` (it resumes)")
    return zoo, {k: tuple(v) if isinstance(v, list) else v for k, v in zoo.manifest["config"].items()}


class ShardedWeights:
    """A sharded zoo's weights as :class:`~gradmetanet.metanets.LazyInputs`: ``select(idx)`` reads networks
    ``idx`` from their shards (at most a shard's bytes at a time) as
    :class:`~gradmetanet.features.WeightSpaceFeatures` ``[len(idx), *shape, 1]``, each tensor divided by
    ``scale[name]`` when given (a per-tensor root mean square over the training networks: :meth:`tensor_rms`)."""

    def __init__(self, zoo: ShardedZoo, spec: NetworkSpec, prefix: str = "params/",
                 scale: Mapping[str, torch.Tensor] | None = None) -> None:
        self.zoo, self.spec, self.prefix, self.scale = zoo, spec, prefix, dict(scale or {})
        self.names = list(spec.param_shapes())

    def __len__(self) -> int:
        return len(self.zoo)

    def select(self, index: torch.Tensor) -> WeightSpaceFeatures:
        read = self.zoo.networks(index, [self.prefix + n for n in self.names])
        return WeightSpaceFeatures(self.spec, {n: (read[self.prefix + n] / self.scale.get(n, 1.0)).unsqueeze(-1)
                                               for n in self.names})

    def tensor_rms(self, index: torch.Tensor, chunk: int = 256) -> dict[str, torch.Tensor]:
        """Each tensor's root mean square over networks ``index``, read ``chunk`` networks at a time."""
        total = {n: torch.zeros((), dtype=torch.float64) for n in self.names}
        count = {n: 0 for n in self.names}
        for part in torch.as_tensor(index).split(chunk):
            read = self.zoo.networks(part, [self.prefix + n for n in self.names])
            for n in self.names:
                total[n] += read[self.prefix + n].double().square().sum()
                count[n] += read[self.prefix + n].numel()
        return {n: (total[n] / count[n]).sqrt().float() for n in self.names}


class ShardedGradients:
    """A sharded zoo's gradient sets as :class:`~gradmetanet.metanets.LazyInputs`: ``select(idx)`` reads networks
    ``idx`` from their shards (at most a shard's bytes at a time) as a
    :class:`~gradmetanet.GradientBatch` ``[len(idx), b, neurons, f]`` of ``spec``."""

    def __init__(self, zoo: ShardedZoo, spec: NetworkSpec, name: str = "features") -> None:
        self.zoo, self.spec, self.name = zoo, spec, name

    def __len__(self) -> int:
        return len(self.zoo)

    def select(self, index: torch.Tensor) -> GradientBatch:
        return GradientBatch(self.spec, self.zoo.networks(index, [self.name])[self.name])
