"""Verifying a trail directory: segment order, canonical lines, the prev chain, every checkpoint's
tree and signature (across key rotations), checkpoints kept elsewhere, and the unsigned tail."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from phigate.audit.keys import AuditKeyError, VerifierKey, parse_verifier
from phigate.audit.merkle import CompactRange, leaf_hash
from phigate.audit.note import Checkpoint, NoteError, parse_checkpoint, parse_note, verify_note
from phigate.audit.trail import (
    CHECKPOINT_FILE,
    ZERO_HASH,
    Line,
    LineError,
    Segment,
    iter_lines,
    list_segments,
    parse_line,
)
from phigate.errors import PhigateError

__all__ = ["ExternalCheckpoint", "TrailReport", "VerifyFailure", "trail_origin", "verify_trail"]

TAIL_SLACK = 5.0  # seconds the writer may be late with a checkpoint before a tail is suspicious


class VerifyFailure(PhigateError):
    """The trail is not what its writer wrote; the message names where and what."""


@dataclass(frozen=True)
class ExternalCheckpoint:
    label: str  # where it came from, for messages
    text: str


@dataclass
class TrailReport:
    trail_dir: Path
    origin: str
    records: int = 0
    segments: int = 0
    checkpoints: int = 0
    rotations: int = 0
    external: int = 0
    unsigned_tail: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _where(line: Line, seq: int | str) -> str:
    return f"{line.segment.name} line {line.number} (seq {seq})"


def trail_origin(trail_dir: Path) -> str | None:
    """The trail's origin: from its checkpoint file, else its first record (audit_open)."""
    cp = trail_dir / CHECKPOINT_FILE
    if cp.is_file():
        try:
            return parse_checkpoint(parse_note(cp.read_text()).body).origin
        except (NoteError, UnicodeDecodeError):
            pass
    segments = list_segments(trail_dir)
    if segments:
        with segments[0].path.open("rb") as f:
            first = f.readline()
        try:
            _, rec, _ = parse_line(first.rstrip(b"\n"))
        except LineError:
            return None
        origin = rec.get("origin")
        return origin if isinstance(origin, str) else None
    return None


class _Lines:
    """The trail's lines across segments with one line of lookahead, which the diagnosis of a
    broken chain needs (was this record edited, or the one before it?)."""

    def __init__(self, segments: Sequence[Segment]) -> None:
        self._it = self._all(segments)
        self._next: Line | None = next(self._it, None)

    @staticmethod
    def _all(segments: Sequence[Segment]) -> Iterator[Line]:
        for seg in segments:
            yield from iter_lines(seg)

    def __iter__(self) -> Iterator[Line]:
        while self._next is not None:
            line, self._next = self._next, next(self._it, None)
            yield line

    def peek(self) -> tuple[str, int] | None:
        """(prev, seq) of the next complete line, if it parses."""
        if self._next is None or not self._next.complete:
            return None
        try:
            prev, _, seq = parse_line(self._next.data)
        except LineError:
            return None
        return prev, seq


class _Verifier:
    def __init__(
        self,
        trail_dir: Path,
        origin: str,
        keys: Sequence[VerifierKey],
        external: Sequence[ExternalCheckpoint],
        checkpoint_interval: float,
    ) -> None:
        self.report = TrailReport(trail_dir, origin)
        self.trusted = list(keys)
        self.pending_key: tuple[VerifierKey, VerifierKey, int] | None = None  # old, new, seq
        self.interval = checkpoint_interval
        self.tree = CompactRange()
        self.external: dict[int, list[tuple[ExternalCheckpoint, Checkpoint]]] = {}
        for ext in external:
            try:
                cp = parse_checkpoint(parse_note(ext.text).body)
            except NoteError as exc:
                raise VerifyFailure(f"checkpoint {ext.label}: {exc}") from exc
            if cp.origin != origin:
                raise VerifyFailure(
                    f"checkpoint {ext.label} is for origin {cp.origin!r}, this trail is {origin!r}"
                )
            self.external.setdefault(cp.size, []).append((ext, cp))

    def run(self, segments: Sequence[Segment]) -> TrailReport:
        started = time.perf_counter()
        expected, prev_hash, prev_line = 0, ZERO_HASH, None
        tail_first: tuple[Line, int, str] | None = None
        newest_ts = ""
        seg_index = -1
        lines = _Lines(segments)
        for line in lines:
            if seg_index < 0 or line.segment is not segments[seg_index]:
                seg_index = self._enter_segment(segments, seg_index, line.segment, expected)
            if not line.complete:
                self.report.notes.append(
                    f"{line.segment.name} ends with {len(line.data)} bytes of an unfinished line "
                    "(being written, or cut short by a crash); it is not a record"
                )
                continue
            try:
                prev, rec, seq = parse_line(line.data)
            except LineError as exc:
                raise VerifyFailure(f"{_where(line, f'{expected} expected')}: {exc}") from None
            if seq != expected:
                self._wrong_seq(line, seq, expected, prev_line, lines)
            if prev != prev_hash:
                self._broken_chain(line, seq, prev, prev_hash, prev_line, lines)
            if rec["event"] == "checkpoint":
                self._checkpoint(line, seq, rec)
                tail_first = None
            elif rec["event"] == "audit_key_rotated":
                self._rotation(line, seq, rec)
            elif rec["event"] == "audit_open" and rec.get("origin") != self.report.origin:
                raise VerifyFailure(
                    f"{_where(line, seq)}: the trail's origin changes to {rec.get('origin')!r} "
                    f"(it is {self.report.origin!r}): records of another trail were mixed in"
                )
            # After the record's own checks: a copy of a checkpoint the log holds is reported
            # where the log holds it.
            self._check_external(expected)
            if rec["event"] != "checkpoint" and tail_first is None:
                tail_first = (line, seq, rec["ts"])
            newest_ts = max(newest_ts, rec["ts"])
            h = leaf_hash(line.data)
            self.tree.append(h)
            prev_hash, prev_line, expected = h.hex(), line, expected + 1
        for seg in segments[seg_index + 1 :]:
            seg_index = self._enter_segment(segments, seg_index, seg, expected)
        self._finish(expected, prev_line, tail_first, newest_ts)
        self.report.records = expected
        self.report.segments = len(segments)
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _enter_segment(
        self, segments: Sequence[Segment], index: int, seg: Segment, expected: int
    ) -> int:
        new_index = segments.index(seg)
        for empty in segments[index + 1 : new_index]:
            raise VerifyFailure(f"{empty.name} is empty, but later segments hold records")
        if seg.first_seq != expected:
            if expected == 0:
                raise VerifyFailure(
                    f"{seg.name}: the trail starts at seq {seg.first_seq}; the segment file(s) "
                    f"holding seq 0..{seg.first_seq - 1} are missing"
                )
            if seg.first_seq > expected:
                raise VerifyFailure(
                    f"{seg.name}: the previous segment ends at seq {expected - 1}; the segment "
                    f"file(s) holding seq {expected}..{seg.first_seq - 1} are missing"
                )
            raise VerifyFailure(
                f"{seg.name}: its name says it starts at seq {seg.first_seq}, but the previous "
                f"segment already holds records up to seq {expected - 1}"
            )
        return new_index

    def _wrong_seq(
        self, line: Line, seq: int, expected: int, prev_line: Line | None, lines: _Lines
    ) -> None:
        here = _where(line, seq)
        if seq < expected:
            if prev_line is not None and line.data == prev_line.data:
                what = "it repeats the record before it: the record was duplicated"
            else:
                what = f"seq {expected} was expected: a record was duplicated or moved here"
            raise VerifyFailure(f"{here}: {what}")
        following = lines.peek()
        if following is not None and following[1] == expected:
            raise VerifyFailure(
                f"{here}: seq {expected} was expected; it comes next: the records were reordered"
            )
        missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected}..{seq - 1}"
        raise VerifyFailure(f"{here}: {missing} is missing before it: records were removed")

    def _broken_chain(
        self, line: Line, seq: int, prev: str, prev_hash: str,
        prev_line: Line | None, lines: _Lines,
    ) -> None:  # fmt: skip
        if prev_line is None:
            raise VerifyFailure(
                f"{_where(line, seq)}: the first record's prev is not 64 zeros: the trail's "
                "start was removed or the record was edited"
            )
        following = lines.peek()
        mine = leaf_hash(line.data).hex()
        if following is None or following[0] == mine:
            # The records after this one chain to it: the one before it changed.
            raise VerifyFailure(
                f"{_where(prev_line, seq - 1)}: record bytes do not match the chain: the next "
                f"record's prev is {prev[:16]}…, this record hashes to {prev_hash[:16]}…; "
                "the record was edited"
            )
        raise VerifyFailure(
            f"{_where(line, seq)}: its prev {prev[:16]}… does not match the record before it "
            f"({prev_hash[:16]}…) and the next record does not chain to it: the record was edited"
        )

    def _checkpoint(self, line: Line, seq: int, rec: dict[str, Any]) -> None:
        here = _where(line, seq)
        size, root_b64 = rec.get("size"), rec.get("root")
        if size != seq:
            raise VerifyFailure(
                f"{here}: the checkpoint says it covers {size} records, but it is record {seq} "
                "(a checkpoint covers every record before it)"
            )
        root = base64.b64encode(self.tree.root()).decode()
        if root_b64 != root:
            raise VerifyFailure(
                f"{here}: the checkpoint's root {root_b64} is not the root of records "
                f"0..{seq - 1} ({root}): the checkpoint or the records before it were altered"
            )
        if rec.get("range") != [h.hex() for h in self.tree.hashes]:
            raise VerifyFailure(
                f"{here}: the checkpoint's range (the tree state a restart continues from) does "
                "not match the records before it"
            )
        note = rec.get("note")
        checkpoint, signed = self._verify_signed(here, note if isinstance(note, str) else "")
        if (checkpoint.origin, checkpoint.size, checkpoint.root) != (
            self.report.origin, seq, self.tree.root()
        ):  # fmt: skip
            raise VerifyFailure(
                f"{here}: the signed note is for {checkpoint.origin!r} size {checkpoint.size}, "
                f"not this trail's {self.report.origin!r} size {seq} and root {root}"
            )
        if self.pending_key is not None:
            old, new, at = self.pending_key
            if old not in signed or new not in signed:
                raise VerifyFailure(
                    f"{here}: the first checkpoint after the key rotation at seq {at} must be "
                    f"signed by both the old key {old.name}+{old.hash:08x} and the new key "
                    f"{new.name}+{new.hash:08x}"
                )
            self.trusted = [k for k in self.trusted if k != old] + [new]
            self.pending_key = None
            self.report.rotations += 1
        self.report.checkpoints += 1

    def _verify_signed(self, here: str, text: str) -> tuple[Checkpoint, list[VerifierKey]]:
        keys = list(self.trusted)
        if self.pending_key is not None:
            keys.append(self.pending_key[1])
        try:
            return verify_note(text, keys)
        except NoteError as exc:
            raise VerifyFailure(
                f"{here}: the checkpoint's signature is not valid: {exc}; the checkpoint was "
                "forged, altered, or signed by a key that was never announced"
            ) from None

    def _rotation(self, line: Line, seq: int, rec: dict[str, Any]) -> None:
        here = _where(line, seq)
        try:
            old = parse_verifier(str(rec.get("old_key", "")))
            new = parse_verifier(str(rec.get("new_key", "")))
        except AuditKeyError as exc:
            raise VerifyFailure(f"{here}: the key rotation record's key: {exc}") from None
        if old not in self.trusted:
            raise VerifyFailure(
                f"{here}: the key rotation is from {old.name}+{old.hash:08x}, which is not a "
                "trusted key at this point of the trail: a forged rotation"
            )
        self.pending_key = (old, new, seq)

    def _check_external(self, size: int) -> None:
        for ext, cp in self.external.pop(size, []):
            if cp.root != self.tree.root():
                raise VerifyFailure(
                    f"checkpoint {ext.label} (size {size}) has a root that is not the root of "
                    f"records 0..{size - 1}: the trail was rewritten after that checkpoint was "
                    "signed"
                )
            self._verify_signed(f"checkpoint {ext.label} (size {size})", ext.text)
            self.report.external += 1

    def _finish(
        self, total: int, last: Line | None, tail_first: tuple[Line, int, str] | None,
        newest_ts: str,
    ) -> None:  # fmt: skip
        self._check_external(total)
        if self.external:
            size = max(self.external)
            ext, _ = self.external[size][0]
            where = f"after {_where(last, total - 1)}" if last else "the trail is empty"
            raise VerifyFailure(
                f"{where}: checkpoint {ext.label} covers {size} records but the trail holds "
                f"only {total}: seq {total}..{size - 1} are missing; the trail was truncated"
            )
        if tail_first is None:
            return
        line, seq, first_ts = tail_first
        self.report.unsigned_tail = total - seq
        span = _seconds(newest_ts) - _seconds(first_ts)
        if span > self.interval + TAIL_SLACK:
            raise VerifyFailure(
                f"{_where(line, seq)}: unsigned tail: this record and the {total - seq - 1} "
                f"after it are covered by no checkpoint, though the trail goes on for "
                f"{span:.0f} s after it (checkpoints are due every {self.interval:g} s); "
                "records were appended without the signing key, or a checkpoint was removed"
            )


def _seconds(ts: str) -> float:
    try:
        return datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return 0.0


def verify_trail(
    trail_dir: Path,
    origin: str,
    keys: Sequence[VerifierKey],
    external: Sequence[ExternalCheckpoint] = (),
    checkpoint_interval: float = 1.0,
) -> TrailReport:
    """Check one trail against ``keys`` (the keys trusted for its origin) and checkpoints kept
    elsewhere (the trail's own ``checkpoint`` file is added here); raises VerifyFailure at the
    first problem."""
    own = trail_dir / CHECKPOINT_FILE
    checkpoints = list(external)
    if own.is_file():
        checkpoints.insert(0, ExternalCheckpoint(str(own), own.read_text()))
    v = _Verifier(trail_dir, origin, keys, checkpoints, checkpoint_interval)
    return v.run(list_segments(trail_dir))
