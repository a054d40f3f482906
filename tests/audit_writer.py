"""A test-side audit trail writer that follows docs/audit.md's file format exactly (segments,
canonical lines, the prev chain, checkpoint records with their compact range, the checkpoint
file, signed notes, key rotation), standing in for the data plane's writer in fixtures."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from phigate.audit.keys import SignerKey, generate_signer

ZERO = "0" * 64
_SELECT = "select * from patients"
T0 = datetime(2026, 12, 6, 15, 0, 0, tzinfo=UTC)


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def canonical_line(prev: str, rec: dict[str, Any], seq: int) -> bytes:
    obj = {"prev": prev, "rec": rec, "seq": seq}
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def ts(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class TrailWriter:
    """Appends records to ``trail_dir`` like the gateway's writer; the clock is explicit
    (``now`` seconds after T0) so tests control what the unsigned-tail check sees."""

    def __init__(self, trail_dir: Path, signer: SignerKey | None = None) -> None:
        self.dir = trail_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.signer = signer or generate_signer("phigate.test/gw1")
        self.origin = self.signer.name
        self.seq = 0
        self.prev = ZERO
        self.now = 0.0
        self._range: list[tuple[int, bytes]] = []  # (height, root) of the perfect subtrees
        self.segment = self.dir / "segment-000000000000.jsonl"
        self._rotating_from: SignerKey | None = None
        self.lines: list[bytes] = []

    # --- the tree, kept the way a restart restores it: a compact range -------------------
    def _push(self, leaf: bytes) -> None:
        height, h = 0, leaf
        while self._range and self._range[-1][0] == height:
            _, left = self._range.pop()
            h = _sha(b"\x01" + left + h)
            height += 1
        self._range.append((height, h))

    def root(self) -> bytes:
        if not self._range:
            return _sha(b"")
        h = self._range[-1][1]
        for _, left in reversed(self._range[:-1]):
            h = _sha(b"\x01" + left + h)
        return h

    # --- records -------------------------------------------------------------------------
    def append(self, rec: dict[str, Any], *, tick: float = 0.001) -> int:
        self.now += tick
        body = {"ts": ts(self.now), **rec}
        line = canonical_line(self.prev, body, self.seq)
        with self.segment.open("ab") as f:
            f.write(line + b"\n")
        self.lines.append(line)
        leaf = _sha(b"\x00" + line)
        self._push(leaf)
        self.prev = leaf.hex()
        self.seq += 1
        return self.seq - 1

    def note(self, size: int, root: bytes, signers: list[SignerKey]) -> str:
        body = f"{self.origin}\n{size}\n{base64.b64encode(root).decode()}\n"
        sigs = ""
        for s in signers:
            blob = s.verifier.hash.to_bytes(4, "big") + s.sign(body.encode())
            sigs += f"\u2014 {s.name} {base64.b64encode(blob).decode()}\n"
        return body + "\n" + sigs

    def checkpoint(
        self, *, signers: list[SignerKey] | None = None, root: bytes | None = None,
        write_file: bool = True, spoil_signature: bool = False,
    ) -> str:  # fmt: skip
        """A checkpoint record (covering every record before it) and the checkpoint file."""
        if signers is None:
            signers = [self.signer]
            if self._rotating_from is not None:
                signers = [self._rotating_from, self.signer]
                self._rotating_from = None
        size = self.seq
        real_root = self.root()
        note = self.note(size, root or real_root, signers)
        if spoil_signature:  # flip a bit of the last signature byte: same key, invalid signature
            blob = base64.b64decode(note.rstrip("\n").rsplit(" ", 1)[1])
            bad = base64.b64encode(blob[:-1] + bytes([blob[-1] ^ 1])).decode()
            note = note.rstrip("\n").rsplit(" ", 1)[0] + " " + bad + "\n"
        self.append({
            "event": "checkpoint", "size": size,
            "root": base64.b64encode(root or real_root).decode(), "note": note,
            "range": [h.hex() for _, h in self._range],
        })  # fmt: skip
        if write_file:
            (self.dir / "checkpoint").write_text(note)
        return note

    def new_segment(self) -> None:
        self.segment = self.dir / f"segment-{self.seq:012d}.jsonl"

    def open(self) -> None:
        self.append({
            "event": "audit_open", "origin": self.origin, "key": self.signer.verifier.text,
            "recovered": None,
        })  # fmt: skip

    def rotate_key(self, new: SignerKey) -> None:
        self.append({
            "event": "audit_key_rotated", "old_key": self.signer.verifier.text,
            "new_key": new.verifier.text,
        })  # fmt: skip
        self._rotating_from, self.signer = self.signer, new

    def session(self, session: str, subject: str, statements: int = 2) -> None:
        """A session's story: start, statements with results, end."""
        self.append({"event": "session_start", "session": session, "subject": subject,
                     "target": "ehr", "tls": True})  # fmt: skip
        for i in range(statements):
            normalized = f"{_SELECT} where id = ${i + 1}"
            self.append({
                "event": "statement", "session": session, "decision": "allow",
                "relations": ["public.patients"], "normalized": normalized,
                "rule": None, "sqlstate": None,
            })  # fmt: skip
            self.append({"event": "result", "session": session, "rows": i + 1, "bytes": 100,
                         "duration_us": 1500, "error": None})  # fmt: skip
        self.append({"event": "session_end", "session": session, "duration_us": 90000})


def standard_trail(trail_dir: Path, signer: SignerKey | None = None, sessions: int = 6,
                   per_segment: int = 2) -> TrailWriter:  # fmt: skip
    """A small trail: audit_open, ``sessions`` sessions with a checkpoint after each, a new
    segment after every ``per_segment`` checkpoints, and a clean close."""
    w = TrailWriter(trail_dir, signer)
    w.open()
    for i in range(sessions):
        w.session(f"s-{i}", f"agent-{i % 3}")
        w.checkpoint()
        if (i + 1) % per_segment == 0 and i + 1 < sessions:
            w.new_segment()
    w.append({"event": "audit_close"})
    w.checkpoint()
    return w
