"""Reading a trail directory: its segment files in order, their lines with where they are, and
each line parsed and checked for the one canonical JSON form the writer produces."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "read_bodies",
    "CHECKPOINT_FILE",
    "ZERO_HASH",
    "Line",
    "LineError",
    "Segment",
    "canonical",
    "iter_lines",
    "list_segments",
    "parse_line",
    "segment_name",
]

CHECKPOINT_FILE = "checkpoint"
ZERO_HASH = "0" * 64
_SEGMENT = re.compile(r"segment-(\d{12})\.jsonl")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_READ_CHUNK = 1 << 20


class LineError(ValueError):
    """A line that is not a record in the trail's form; the message says what is wrong."""


@dataclass(frozen=True)
class Segment:
    path: Path
    first_seq: int  # from the file name

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Line:
    segment: Segment
    number: int  # 1-based line number in the segment
    offset: int  # byte offset of the line in the segment
    data: bytes  # without the "\n"
    complete: bool  # False: the segment's last bytes, not "\n"-terminated (a write cut short)


def segment_name(first_seq: int) -> str:
    return f"segment-{first_seq:012d}.jsonl"


def list_segments(trail_dir: Path) -> list[Segment]:
    """The segment files, by first seq; torn-tail files and everything else are left out."""
    found = []
    for p in trail_dir.iterdir():
        m = _SEGMENT.fullmatch(p.name)
        if m and p.is_file():
            found.append(Segment(p, int(m.group(1))))
    return sorted(found, key=lambda s: s.first_seq)


def iter_lines(segment: Segment, start_offset: int = 0, start_number: int = 1) -> Iterator[Line]:
    """The lines of a segment from ``start_offset`` (which must start a line), read in large
    chunks so a year of records does not cost a system call per line."""
    number, offset = start_number, start_offset
    pending = b""
    with segment.path.open("rb") as f:
        f.seek(start_offset)
        while chunk := f.read(_READ_CHUNK):
            buf = pending + chunk if pending else chunk
            start = 0
            while (end := buf.find(b"\n", start)) >= 0:
                yield Line(segment, number, offset, buf[start:end], True)
                number += 1
                offset += end + 1 - start
                start = end + 1
            pending = buf[start:]
    if pending:
        yield Line(segment, number, offset, pending, False)


def read_bodies(trail_dir: Path, *, lenient: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(seq, record body) of every complete line of a trail, in order, without verifying
    anything (`verify` does that). A line that is not a record raises LineError naming it, or
    with ``lenient`` is skipped; an unfinished last line (a write cut short) is left out."""
    for segment in list_segments(trail_dir):
        for line in iter_lines(segment):
            if not line.complete:
                break
            try:
                obj = orjson.loads(line.data)
                seq, rec = int(obj["seq"]), obj["rec"]
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                if lenient:
                    continue
                raise LineError(
                    f"{segment.name} line {line.number}: not an audit record "
                    "(run phigate audit verify)"
                ) from None
            if isinstance(rec, dict):
                yield seq, rec


def canonical(obj: Any) -> bytes:
    """The one byte form of a value in the trail (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode()


def _reject_constant(name: str) -> Any:
    raise LineError(f"it holds {name}, which JSON does not allow")


def _reject_float(text: str) -> Any:
    raise LineError(f"it holds the number {text}, but records hold integers only")


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False


def _strict_load(data: bytes) -> Any:
    try:
        return json.loads(data.decode(), parse_float=_reject_float, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise LineError("it is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise LineError(f"it is not JSON ({exc.msg} at byte {exc.pos})") from exc


def parse_line(data: bytes) -> tuple[str, dict[str, Any], int]:
    """(prev, rec, seq) of a line, which must be exactly the canonical
    ``{"prev":…,"rec":{…},"seq":N}``; raises LineError saying what is wrong."""
    # Fast path: orjson agrees with the reference form on every record the writer makes; a
    # line it cannot parse or re-forms differently gets the reference check and its message.
    try:
        obj = orjson.loads(data)
        fast = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS) == data and not _has_float(obj)
    except orjson.JSONDecodeError:
        fast = False
    if not fast:
        obj = _strict_load(data)
        try:
            again = canonical(obj)
        except UnicodeEncodeError:  # a lone surrogate escape: no UTF-8 form, so not canonical
            again = b""
        if again != data:
            raise LineError(
                "it is not in canonical form (sorted keys, no spaces, minimal escapes); "
                "the writer never writes that, so the line was rewritten"
            )
    if not isinstance(obj, dict) or sorted(obj) != ["prev", "rec", "seq"]:
        raise LineError('it is not {"prev":…,"rec":{…},"seq":N}')
    prev, rec, seq = obj["prev"], obj["rec"], obj["seq"]
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        raise LineError("its prev is not 64 lowercase hex digits")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise LineError("its seq is not a non-negative integer")
    if not isinstance(rec, dict) or not isinstance(rec.get("event"), str):
        raise LineError("its rec is not an object with an event")
    if not isinstance(rec.get("ts"), str):
        raise LineError("its rec has no ts")
    return prev, rec, seq
