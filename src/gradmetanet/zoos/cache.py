"""The zoo cache: ``{cache_dir}/{name}_{config key}/`` holds ``zoo.safetensors`` and ``manifest.json``.

The manifest records the zoo's config, the package version that wrote it, anything else the zoo depends on
(``depends``: a corpus version), a summary for people (sizes, accuracies) and the SHA-256 and size of the
tensor file. A read verifies all of it: a file whose bytes were changed (header intact or not), a manifest
of another config or of an earlier layout, a missing file, is named and rebuilt, never read as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_replace, atomic_write_text
from ..distributed import is_distributed, is_main_process
from ..provenance import package_version

__all__ = ["cached_zoo", "verify_zoo_folder", "file_digest", "default_cache_dir", "list_zoos"]

Zoo = TypeVar("Zoo")
_TENSORS = "zoo.safetensors"
_MANIFEST = "manifest.json"
_LAYOUT = "gradmetanet.zoo/1"


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _as_json(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists), so configs compare with what a manifest holds."""
    return json.loads(json.dumps(value))


def verify_zoo_folder(folder: str | os.PathLike, config: Any = None, depends: dict[str, str] | None = None
                      ) -> str | None:
    """What is wrong with the cached zoo in ``folder`` (``None`` when it is intact and, if given, of ``config``
    and ``depends``)."""
    folder = Path(folder)
    manifest_path, tensors = folder / _MANIFEST, folder / _TENSORS
    if not manifest_path.exists():
        return "it has no manifest.json (an interrupted write or an earlier layout)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, OSError) as err:
        return f"its manifest.json is unreadable ({err})"
    if manifest.get("layout") != _LAYOUT:
        return f"its manifest is of layout {manifest.get('layout')!r}, not {_LAYOUT!r} (no checksums)"
    if config is not None and manifest.get("config") != _as_json(asdict(config)):
        return "its manifest holds another configuration"
    if manifest.get("depends", {}) != (depends or {}):
        return f"it was made from {manifest.get('depends')}, not {depends or {}}"
    expected = manifest.get("files", {}).get(_TENSORS, {})
    if not tensors.exists():
        return f"{_TENSORS} is missing"
    if tensors.stat().st_size != expected.get("bytes"):
        return f"{_TENSORS} has {tensors.stat().st_size} bytes, the manifest says {expected.get('bytes')}"
    if file_digest(tensors) != expected.get("sha256"):
        return f"{_TENSORS} does not match its SHA-256 in the manifest (its bytes were changed)"
    return None


def default_cache_dir() -> Path:
    """Where zoos are cached unless a config says otherwise: ``$GRADMETANET_CACHE``, else ``~/.cache/gradmetanet``."""
    return Path(os.environ.get("GRADMETANET_CACHE", str(Path.home() / ".cache" / "gradmetanet")))


def list_zoos(cache_dir: str | os.PathLike) -> list[dict]:
    """Every zoo folder under ``cache_dir``, each as ``{"folder", "zoo", "bytes", "package_version", "summary",
    "problem"}`` (``problem`` is ``None`` for an intact zoo; checksums are verified, so this reads every file)."""
    rows = []
    for folder in sorted(p for p in Path(cache_dir).iterdir() if p.is_dir()) if Path(cache_dir).is_dir() else []:
        try:
            manifest = json.loads((folder / _MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = {}
        rows.append({"folder": str(folder), "zoo": manifest.get("zoo", "?"),
                     "bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
                     "package_version": manifest.get("package_version", "?"), "summary": manifest.get("summary", {}),
                     "problem": verify_zoo_folder(folder)})
    return rows


def cached_zoo(name: str, config: Any, generate: Callable[[], Zoo], to_tensors: Callable[[Zoo], dict[str, torch.Tensor]],
               from_tensors: Callable[[dict[str, torch.Tensor]], Zoo], cache_dir: str | os.PathLike | None,
               summary: Callable[[Zoo], dict] | None = None, depends: dict[str, str] | None = None) -> Zoo:
    """The zoo of ``config`` (a dataclass with ``key()``) from ``cache_dir/{name}_{key}/`` when it is there and
    verified, else ``generate()``, written atomically with its manifest (``cache_dir=None`` keeps nothing).

    A damaged or stale cache is named on stderr and rebuilt. ``depends`` holds what else the zoo was made from
    (a corpus version): a cache made from something else is rebuilt.
    """
    if cache_dir is None:
        return generate()
    if is_distributed() and not is_main_process():
        dist.barrier()                             # under torchrun rank 0 builds or verifies the cache first
        return _cached_zoo(name, config, generate, to_tensors, from_tensors, cache_dir, summary, depends)
    zoo = _cached_zoo(name, config, generate, to_tensors, from_tensors, cache_dir, summary, depends)
    if is_distributed():
        dist.barrier()
    return zoo


def _cached_zoo(name: str, config: Any, generate: Callable[[], Zoo], to_tensors: Callable[[Zoo], dict[str, torch.Tensor]],
                from_tensors: Callable[[dict[str, torch.Tensor]], Zoo], cache_dir: str | os.PathLike,
                summary: Callable[[Zoo], dict] | None, depends: dict[str, str] | None) -> Zoo:
    folder = Path(cache_dir) / f"{name}_{config.key()}"
    problem = verify_zoo_folder(folder, config, depends)
    if problem is None:
        try:
            return from_tensors(load_file(folder / _TENSORS))
        except (SafetensorError, KeyError, OSError, ValueError) as err:
            problem = f"it is unreadable ({err})"
    if folder.exists():
        print(f"gradmetanet: the cached zoo {folder} is not usable: {problem}; rebuilding it", file=sys.stderr)
    zoo = generate()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in to_tensors(zoo).items()}
    with atomic_replace(folder / _TENSORS) as tmp:
        save_file(tensors, tmp, metadata={"config": json.dumps(asdict(config))})
    manifest = {"layout": _LAYOUT, "zoo": name, "package_version": package_version(), "config": _as_json(asdict(config)),
                "depends": depends or {}, "summary": summary(zoo) if summary is not None else {},
                "files": {_TENSORS: {"bytes": (folder / _TENSORS).stat().st_size,
                                     "sha256": file_digest(folder / _TENSORS)}}}
    atomic_write_text(folder / _MANIFEST, json.dumps(manifest, indent=2))
    return zoo
