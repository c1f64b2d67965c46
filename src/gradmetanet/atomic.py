"""Atomic file writes: write a uniquely named temporary file beside the target, fsync it, rename it over."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_write_text", "atomic_replace"]


@contextmanager
def atomic_replace(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed over ``path``.

    The name is unique (two writers never share a temporary file), the file sits in the same
    directory (so the rename is atomic), and a reader sees either the old or the new file, never half.
    A failed write removes the temporary file. The file gets the mode a plain ``open(path, "w")`` would give
    (``0666`` less the umask; a replaced file keeps its own), not ``mkstemp``'s private ``0600``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process's umask (read by setting it, then restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (see :func:`atomic_replace`)."""
    with atomic_replace(path) as tmp:
        tmp.write_text(text)
