"""The one result store of every experiment: a run folder that knows whose it is, resumable cells, provenance.

A run folder holds ``run.json`` (which experiment and configuration write there), ``cells.json`` (finished
table cells), ``results.json``, ``table.md`` and plots. Opening a folder is checked before any compute: it must
be writable, and a folder that belongs to another experiment or another configuration is refused unless the
caller asks to overwrite (``--overwrite``). Cells are never deleted: each is stored with the settings it
depends on and the package version that computed it, and is reused only when both match, so a rerun with
other settings computes new cells *beside* the old ones.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from ..atomic import atomic_write_text
from ..distributed import is_main_process
from ..provenance import package_version, provenance

__all__ = ["RunFolder", "RunFolderError", "CellStore", "require_finite", "settings_of", "write_results", "RUNTIME_FIELDS"]

_RUN = "run.json"
_CELLS = "cells.json"
_CELLS_LAYOUT = "gradmetanet.cells/2"
#: config fields that change how a run executes, not what it computes
RUNTIME_FIELDS = ("device", "cache_dir")


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (another experiment's, another configuration's, not writable)."""


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def settings_of(config: Any, ignore: tuple[str, ...] = ()) -> dict:
    """The settings of a config dataclass that decide what a run computes (as JSON reads them back)."""
    return {k: v for k, v in _as_json(asdict(config)).items() if k not in RUNTIME_FIELDS + ignore}


def write_results(path: str | os.PathLike, results: dict, device: str = "cpu") -> None:
    """``results`` as JSON at ``path`` (atomically), with the provenance of the run that wrote it."""
    atomic_write_text(path, json.dumps(results | {"provenance": provenance(device)}, indent=2))


def require_finite(what: str, value: float) -> float:
    """``value``, or a ``FloatingPointError`` naming ``what`` when it is NaN or infinite (a run stops there)."""
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value}: the run stops here rather than report it. Check the inputs it "
                                 "was computed from (a damaged cache, a diverged model)")
    return value


class RunFolder:
    """The output folder of one run of ``experiment`` with ``settings`` (see the module docstring).

    Raises :class:`RunFolderError` at once when the folder cannot be written, or belongs to another experiment
    or configuration and ``overwrite`` is false. ``overwrite`` replaces the owner, ``results.json`` and the table;
    finished cells of every configuration stay in ``cells.json``.
    """

    def __init__(self, folder: str | os.PathLike, experiment: str, settings: dict, overwrite: bool = False) -> None:
        self.path = Path(folder)
        self.experiment = experiment
        self.settings = _as_json(settings)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(f"cannot create the output folder {os.fspath(self.path)!r}: {err}") from err
        probe = self.path / f".write-probe-{os.getpid()}"    # one per process: torchrun's ranks probe at once
        try:
            atomic_write_text(probe, "")
            probe.unlink()
        except OSError as err:
            raise RunFolderError(f"the output folder {os.fspath(self.path)!r} is not writable ({err}); choose "
                                 "another --out") from err
        owner = self._owner()
        if owner is not None and not overwrite:
            if owner.get("experiment") != experiment:
                raise RunFolderError(
                    f"{os.fspath(self.path)!r} holds the results of {owner.get('experiment') or 'another run'!r}, "
                    f"not of {experiment!r}: choose another --out, or pass --overwrite to replace its table "
                    "(finished cells are kept)")
            if owner.get("settings") != self.settings:
                changed = sorted(k for k in set(owner.get("settings", {})) | set(self.settings)
                                 if owner.get("settings", {}).get(k) != self.settings.get(k))
                raise RunFolderError(
                    f"{os.fspath(self.path)!r} holds a {experiment!r} run with other settings (changed: "
                    f"{', '.join(changed)}): choose another --out, or pass --overwrite to write this run's table "
                    "there (finished cells of both settings are kept, and reused where their settings match)")
        self.cells_path = self.path / _CELLS
        if not is_main_process():      # under torchrun rank 0 writes; the others read its cells, write elsewhere
            self.path = Path(tempfile.mkdtemp(prefix="gradmetanet-rank-"))
            return
        atomic_write_text(self.path / _RUN, json.dumps({"experiment": experiment, "settings": self.settings,
                                                          "package_version": package_version()}, indent=2))

    def _owner(self) -> dict | None:
        """Who wrote the folder: its ``run.json``; for folders written before it existed, what ``results.json``
        or ``cells.json`` say (an unreadable or unknown one counts as another experiment's)."""
        run = self.path / _RUN
        if run.exists():
            try:
                return json.loads(run.read_text())
            except (ValueError, OSError):
                return {}
        if any((self.path / name).exists() for name in ("results.json", "table.md", _CELLS)):
            try:
                earlier = json.loads((self.path / "results.json").read_text())
            except (ValueError, OSError):
                earlier = {}
            return {"experiment": earlier.get("experiment"), "settings": earlier.get("config")}
        return None

    def write_json(self, name: str, data: dict, device: str = "cpu") -> None:
        """``name`` (``results.json``) with the run's provenance added."""
        write_results(self.path / name, data, device)

    def cells(self) -> "CellStore":
        return CellStore(self.cells_path, self.experiment, persist=is_main_process())


class CellStore:
    """Finished cells of a run folder, each with the settings it depends on and the code version that computed it.

    :meth:`get` returns a cell only when both match; :meth:`put` adds one (under a file lock, so processes that
    run other models of one configuration can share the folder) and never removes another. A ``cells.json`` of
    an earlier layout is moved aside to ``cells.v1.json`` (kept, not reused: its code version is unknown).
    With ``persist=False`` (the ranks other than 0 under ``torchrun``) finished cells are kept in memory only.
    """

    def __init__(self, path: Path, experiment: str, persist: bool = True) -> None:
        self.path = path
        self.experiment = experiment
        self.version = package_version()
        self.persist = persist
        self._memory: list[dict] = []
        if persist and path.exists() and self._read().get("layout") != _CELLS_LAYOUT:
            aside = path.with_name("cells.v1.json")
            os.replace(path, aside)
            print(f"gradmetanet: {path} has an earlier layout; kept as {aside} (its cells are recomputed)")

    def _read(self) -> dict:
        if not self.path.exists():
            return {"layout": _CELLS_LAYOUT, "experiment": self.experiment, "cells": []}
        return json.loads(self.path.read_text())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _matches(self, entry: dict, key: str, depends: dict) -> bool:
        """Same key and code version, and every setting in ``depends`` as the entry recorded it. An entry may
        record more settings than ``depends`` names: settings its experiment has since declared irrelevant to
        the cell (the list of models or seeds of the run that computed it) do not invalidate it; a setting
        missing from the entry (added since) does."""
        recorded = entry["depends"]
        return (entry["key"] == key and entry["code"] == self.version
                and all(k in recorded and recorded[k] == v for k, v in _as_json(depends).items()))

    def get(self, key: str, depends: dict) -> dict | None:
        """The finished cell ``key`` computed under ``depends`` by this code version, or ``None``."""
        for entry in self._memory + self._read()["cells"]:
            if self._matches(entry, key, depends):
                return entry["value"]
        return None

    def checkpoint(self, key: str, depends: dict) -> Path:
        """Where the fit computing cell ``key`` keeps its state between epochs (``fit_regression(checkpoint=...)``),
        so a run stopped mid-cell resumes mid-cell: one file per key, settings and code version, removed by
        :meth:`put` once the cell is finished."""
        digest = hashlib.sha1(json.dumps([key, _as_json(depends), self.version], sort_keys=True).encode()).hexdigest()
        return self.path.parent / "checkpoints" / f"{digest[:20]}.pt"

    def put(self, key: str, depends: dict, value: dict) -> None:
        """Record a finished cell (replacing only an entry of the same key, settings and code version) and remove
        its fit's checkpoint."""
        entry = {"key": key, "depends": _as_json(depends), "code": self.version, "value": _as_json(value)}
        if not self.persist:
            self._memory.append(entry)
            return
        with self._locked():
            saved = self._read()
            saved["cells"] = [e for e in saved["cells"] if not self._matches(e, key, depends)]
            saved["cells"].append(entry)
            atomic_write_text(self.path, json.dumps(saved, indent=1))
        self.checkpoint(key, depends).unlink(missing_ok=True)
