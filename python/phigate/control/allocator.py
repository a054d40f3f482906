"""Tune glibc's malloc for a long-running gateway: memory taken by bursts goes back to the system.

Why: glibc raises its mmap threshold (up to 32 MiB) and its trim threshold (to twice that) each
time a block it had mmap()ed is freed. Once the gateway has buffered one large message (a client
may announce one up to `max_statement_bytes` before sending it), blocks of that size come from
the I/O threads' arenas instead, and an arena returns memory only when more than the raised trim
threshold is free at its top. Hostile traffic therefore ratchets RSS up and it never comes down:
+45 MB over 60,000 hostile connections while the heap in use stayed at 11 MB (benches/
hostile_rss.py). Fixed thresholds turn that adjustment off. They sit above glibc's 128 KiB
defaults so the relay's buffers (up to several hundred KiB during bulk reads) stay in the arenas
and are reused without a syscall or page fault; only larger blocks are mmap()ed and returned
when freed, and an arena gives back what exceeds 2 MiB at its top.

Called once by `phigate serve` before the data plane starts its threads. A no-op on other C
libraries, and when the operator set malloc options through the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ["tune_malloc"]

log = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1024 * 1024  # larger blocks are mmap()ed, and unmapped when freed
TRIM_THRESHOLD = 2 * 1024 * 1024  # free memory above this at an arena's top is given back
# Environment variables through which an operator sets these (glibc reads them at start).
_OPERATOR_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                      "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")  # fmt: skip


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds; True if they were set."""
    chosen = [name for name in _OPERATOR_SETTINGS if name in os.environ]
    if chosen:
        log.info("malloc settings come from the environment (%s); not tuning", ", ".join(chosen))
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  # only glibc has it: musl's mallopt differs
    except (OSError, AttributeError):
        log.debug("not glibc: malloc left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
              and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)  # fmt: skip
    if ok:
        log.info("glibc malloc: mmap threshold fixed at %d KiB, trim threshold at %d KiB",
                 MMAP_THRESHOLD // 1024, TRIM_THRESHOLD // 1024)  # fmt: skip
    else:
        log.warning("mallopt refused the trim/mmap thresholds; memory freed after bursts may "
                    "stay with the process")  # fmt: skip
    return ok
