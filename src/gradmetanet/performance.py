"""Process-wide settings that make CPU training of the metanetworks faster.

The metanetworks allocate and free tensors of tens of megabytes at every step (a GradMetaNet layer on 32
sets of 128 examples of 66 neurons at width 64 is 69 MB). glibc serves every allocation above its mmap
threshold (32 MiB at most) with a fresh ``mmap`` and unmaps it on ``free``, so every such tensor is
zero-filled page by page by the kernel on first touch, at every step. On this project's CPU machine that
page-faulting took more than half of a GradMetaNet training step (``benchmarks/metanet_throughput.py``).
:func:`retain_freed_memory` makes glibc serve them from its heap and keep freed memory for reuse, as
PyTorch's CUDA caching allocator does on the GPU: the resident memory then stays at the step's peak.

It is a process-wide choice, so the library never makes it on import; the command line (``gradmetanet run``)
and the benchmarks make it, and a user's script can call it first thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["retain_freed_memory", "release_freed_memory"]

_M_TRIM_THRESHOLD = -1      # mallopt parameters (glibc's malloc.h)
_M_MMAP_MAX = -4
_NEVER_TRIM = 2 ** 31 - 1   # the largest value mallopt takes (an int)


def retain_freed_memory() -> bool:
    """Serve large CPU allocations from the heap and keep freed memory for reuse (glibc only).

    Returns ``True`` when applied, ``False`` where the C library is not glibc (macOS, Windows, musl), where
    it changes nothing. Memory the process frees is then kept for its own later allocations rather than
    returned to the system, so its resident size stays at the peak it reached.
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def release_freed_memory() -> bool:
    """Hand the memory this process has freed back to the system now (glibc's ``malloc_trim``), for example
    before starting a child process whose peak should not add to what :func:`retain_freed_memory` kept.

    Returns ``True`` when applied, ``False`` where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _glibc():
    """The C library when it is glibc on Linux, else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
