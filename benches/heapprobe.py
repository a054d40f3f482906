"""`phigate serve` with glibc heap probes, for benches/hostile_rss.py only: SIGUSR1 appends the
allocator's own accounting (mallinfo2, malloc_info per arena) and VmRSS to a JSON-lines file;
SIGUSR2 calls malloc_trim(0) first. Usage: heapprobe.py OUT.jsonl CONFIG.toml"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mallinfo2.restype = Mallinfo2
_libc.malloc_trim.argtypes = [ctypes.c_size_t]
_libc.malloc_trim.restype = ctypes.c_int
_libc.fopen.restype = ctypes.c_void_p
_libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
_libc.fclose.argtypes = [ctypes.c_void_p]
_libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]

_HEAP = re.compile(r'<heap nr="(\d+)">(.*?)</heap>', re.S)
_SYSTEM = re.compile(r'<system type="current" size="(\d+)"/>')
_TOTAL = re.compile(r'<total type="(fast|rest)" count="\d+" size="(\d+)"/>')


def _arenas() -> list[dict[str, int]]:
    """Per arena: bytes it holds from the system, and bytes of it that are free."""
    fd, path = tempfile.mkstemp(prefix="phigate-malloc-info-")
    os.close(fd)
    try:
        fp = _libc.fopen(path.encode(), b"w")
        _libc.malloc_info(0, fp)
        _libc.fclose(fp)
        xml = Path(path).read_text()
    finally:
        os.unlink(path)
    out = []
    for _nr, body in _HEAP.findall(xml):
        system = _SYSTEM.search(body)
        free = sum(int(size) for _, size in _TOTAL.findall(body))
        out.append({"system": int(system.group(1)) if system else 0, "free": free})
    return out


def _rss_by_mapping() -> dict[str, int]:
    """Resident kB by kind of mapping: the main arena's brk heap, anonymous mappings (the other
    arenas' heaps, big malloc chunks, Python's object arenas, thread stacks) and files."""
    out = {"brk_heap_kb": 0, "anon_kb": 0, "file_kb": 0}
    kind = "anon_kb"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            parts = line.split()
            name = parts[5] if len(parts) > 5 else ""
            kind = ("brk_heap_kb" if name == "[heap]"
                    else "file_kb" if name.startswith("/") else "anon_kb")
        elif first == "Rss:":
            out[kind] += int(line.split()[1])
    return out


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _probe(out: Path, trim: bool) -> None:
    rss_before = _rss_kb()
    released = _libc.malloc_trim(0) if trim else None
    mi = _libc.mallinfo2()
    line = {
        "ts": time.time(),
        "trim": trim,
        "trim_released": released,
        "rss_before_trim_kb": rss_before if trim else None,
        "rss_kb": _rss_kb(),
        # in use: small chunks handed out + mmapped big ones; held free: in arenas, not returned
        "heap_in_use": mi.uordblks + mi.hblkhd,
        "heap_free_held": mi.fordblks,
        "heap_from_system": mi.arena + mi.hblkhd,
        "mmapped": mi.hblkhd,
        "arenas": _arenas(),
        **_rss_by_mapping(),
        "python_blocks": sys.getallocatedblocks(),
        "threads": len(os.listdir("/proc/self/task")),
    }
    with open(out, "a") as f:
        f.write(json.dumps(line) + "\n")


def main() -> int:
    out, config = Path(sys.argv[1]), sys.argv[2]

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        _probe(out, trim=signum == signal.SIGUSR2)

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGUSR2, on_signal)
    from phigate.cli import main as cli_main

    return int(cli_main(["serve", "--config", config]))


if __name__ == "__main__":
    sys.exit(main())
