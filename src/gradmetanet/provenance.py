"""Where a result came from: package version, commit, torch, device, threads, machine load."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

__all__ = ["package_version", "provenance"]


def package_version() -> str:
    """The installed gradmetanet version (``pyproject.toml``'s, read from the package metadata)."""
    try:
        return metadata.version("gradmetanet")
    except metadata.PackageNotFoundError:            # pragma: no cover (a source tree that was never installed)
        return "unknown"


def _commit() -> dict[str, object]:
    """The git commit of the source tree the package runs from, and whether it had uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return {"commit": head, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def provenance(device: str = "cpu") -> dict[str, object]:
    """What a ``results.json`` records about the run that wrote it. ``load_average_1min`` above the threads in
    use means other work shared the machine (timings are then not those of an idle machine)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"package_version": package_version(), **_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": device,
            "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available()
            else None, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_1min": load, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
