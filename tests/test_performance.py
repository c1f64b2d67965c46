"""gradmetanet.performance: freed CPU memory is kept for reuse (so large tensors are not page-faulted anew)."""

import platform
import subprocess
import sys

import pytest

_PROBE = """
import sys, torch
from gradmetanet.performance import release_freed_memory, retain_freed_memory
if sys.argv[1] in ("retain", "retain-release"):
    assert retain_freed_memory()
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
before = rss()
x = torch.ones(32 * 2 ** 20)        # 128 MiB, above glibc's largest mmap threshold
del x
if sys.argv[1] == "retain-release":
    assert release_freed_memory()
print(rss() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="retain_freed_memory acts on glibc only")
def test_retain_freed_memory_keeps_a_freed_tensor_resident():
    """By default a freed 128 MiB tensor goes back to the system (and the next one is faulted in page by page);
    after retain_freed_memory() it stays in the process for the next allocation, until release_freed_memory()."""
    kept = {mode: int(subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True,
                                     text=True).stdout) for mode in ("default", "retain", "retain-release")}
    assert kept["default"] < 16 * 2 ** 20
    assert kept["retain"] > 100 * 2 ** 20
    assert kept["retain-release"] < 16 * 2 ** 20, "release_freed_memory hands the kept memory back"


def test_retain_freed_memory_elsewhere_changes_nothing(monkeypatch):
    from gradmetanet import performance
    monkeypatch.setattr(performance.platform, "libc_ver", lambda: ("", ""))
    assert performance.retain_freed_memory() is False
    assert performance.release_freed_memory() is False
