"""glibc malloc tuning for `phigate serve`: memory of a large buffer goes back to the system once
it is freed, even after glibc has seen a large block freed before (which raises its thresholds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import phigate

PYTHON_DIR = str(Path(phigate.__file__).resolve().parent.parent)
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only",
)

# Frees an 8 MiB block (mmap()ed: glibc then raises its mmap threshold to 8 MiB and its trim
# threshold to 16 MiB), then allocates, touches and frees another one, and prints how much of
# it is still resident. Run in a fresh interpreter: thresholds are process-wide.
SCRIPT = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[2])
from phigate.control.allocator import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tuned" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
size = 8 << 20
p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
before = rss_kb()
p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
print(tuned, rss_kb() - before)
"""


def retained_kb(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, PYTHON_DIR],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**clean, **env},
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_large_buffers_go_back_to_the_system() -> None:
    tuned, kept = retained_kb("tuned")
    assert tuned == "True"
    assert kept < 1024, f"{kept} kB of a freed 8 MiB block stayed resident"


def test_without_tuning_glibc_keeps_them() -> None:
    # The behaviour the tuning exists for (if glibc stops doing this, the tuning can go).
    _, kept = retained_kb("plain")
    assert kept > 6 * 1024


def test_malloc_settings_from_the_environment_win() -> None:
    # An operator's own malloc settings are left alone (this one does not touch thresholds).
    tuned, kept = retained_kb("tuned", GLIBC_TUNABLES="glibc.malloc.arena_max=8")
    assert tuned == "False" and kept > 6 * 1024
