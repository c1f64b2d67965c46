"""Atomic file writes: write to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write_text", "temporary_path"]


def temporary_path(path: str | os.PathLike) -> Path:
    """Where to write before ``os.replace(tmp, path)``: same directory, so the rename is atomic."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader sees either the old or the new file, never half."""
    tmp = temporary_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)
