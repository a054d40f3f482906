"""Proofs for third parties: a record's inclusion in a signed checkpoint, and the consistency of
two checkpoints (the later tree extends the earlier one), as RFC 9162 hashes in JSON."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phigate.audit.merkle import MerkleTree, leaf_hash
from phigate.audit.note import Checkpoint, NoteError, parse_checkpoint, parse_note
from phigate.audit.trail import CHECKPOINT_FILE, LineError, iter_lines, list_segments, parse_line
from phigate.errors import PhigateError

__all__ = ["ProofError", "ProofMismatch", "consistency_proof", "inclusion_proof"]


class ProofError(PhigateError):
    """The proof cannot be made from what was asked (usage or input problem)."""


class ProofMismatch(PhigateError):
    """The trail does not match the checkpoint: no honest proof exists."""


@dataclass
class _Leaves:
    hashes: list[bytes]
    record: bytes | None  # the line of the record asked for, if any
    last_note: str | None  # the newest checkpoint record's note


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode()


def _read_leaves(trail_dir: Path, limit: int | None, want: int | None) -> _Leaves:
    """Leaf hashes of the trail's first ``limit`` records (all if None), the line of record
    ``want`` and the newest checkpoint note seen."""
    segments = list_segments(trail_dir)
    if not segments:
        raise ProofError(f"{trail_dir} holds no segment-*.jsonl files: not an audit trail")
    out = _Leaves([], None, None)
    for seg in segments:
        for line in iter_lines(seg):
            if limit is not None and len(out.hashes) >= limit:
                return out
            if not line.complete:
                break
            if len(out.hashes) == want:
                out.record = line.data
            # Only checkpoint records are parsed: the rest just need hashing.
            if b'"event":"checkpoint"' in line.data:
                try:
                    _, rec, _ = parse_line(line.data)
                    if rec["event"] == "checkpoint" and isinstance(rec.get("note"), str):
                        out.last_note = rec["note"]
                except LineError:
                    pass
            out.hashes.append(leaf_hash(line.data))
    return out


def _checkpoint(text: str, label: str) -> Checkpoint:
    try:
        return parse_checkpoint(parse_note(text).body)
    except NoteError as exc:
        raise ProofError(f"{label}: {exc}") from None


def _latest_note(trail_dir: Path) -> str | None:
    own = trail_dir / CHECKPOINT_FILE
    return own.read_text() if own.is_file() else None


def inclusion_proof(
    trail_dir: Path, seq: int, checkpoint_text: str | None = None
) -> dict[str, Any]:
    """The proof that record ``seq`` is in the checkpoint (default: the trail's latest)."""
    note = checkpoint_text if checkpoint_text is not None else _latest_note(trail_dir)
    limit = _checkpoint(note, "checkpoint").size if note is not None else None
    leaves = _read_leaves(trail_dir, limit, seq)
    if note is None:
        note = leaves.last_note
        if note is None:
            raise ProofError(f"{trail_dir} has no signed checkpoint yet to prove against")
    cp = _checkpoint(note, "checkpoint")
    if seq >= cp.size:
        raise ProofError(
            f"record {seq} is not covered by the checkpoint (size {cp.size}: records "
            f"0..{cp.size - 1}); wait for the next checkpoint or pass a newer one"
        )
    if len(leaves.hashes) < cp.size:
        raise ProofMismatch(
            f"the checkpoint covers {cp.size} records but the trail holds only "
            f"{len(leaves.hashes)}: the trail was truncated (run `phigate audit verify`)"
        )
    tree = MerkleTree(leaves.hashes[: cp.size])
    if tree.root() != cp.root:
        raise ProofMismatch(
            "the trail's records do not hash to the checkpoint's root: the trail was altered "
            "(run `phigate audit verify` to find where)"
        )
    assert leaves.record is not None
    _, _, line_seq = parse_line(leaves.record)
    if line_seq != seq:
        raise ProofMismatch(f"the record at position {seq} says seq {line_seq}: run verify")
    return {
        "origin": cp.origin,
        "tree_size": cp.size,
        "leaf_index": seq,
        "leaf_hash": _b64(leaf_hash(leaves.record)),
        "root_hash": _b64(cp.root),
        "inclusion_path": [_b64(h) for h in tree.inclusion_path(seq, cp.size)],
        "record": leaves.record.decode(),
        "checkpoint": note,
    }


def consistency_proof(trail_dir: Path, old_text: str, new_text: str) -> dict[str, Any]:
    """The proof that checkpoint ``new`` extends checkpoint ``old`` (same origin)."""
    old, new = _checkpoint(old_text, "first checkpoint"), _checkpoint(new_text, "second checkpoint")
    if old.origin != new.origin:
        raise ProofError(
            f"the checkpoints are for different trails ({old.origin!r}, {new.origin!r})"
        )
    if old.size > new.size:
        raise ProofError(
            f"the first checkpoint (size {old.size}) is newer than the second (size {new.size}); "
            "give the older one first"
        )
    leaves = _read_leaves(trail_dir, new.size, None)
    if len(leaves.hashes) < new.size:
        raise ProofMismatch(
            f"the second checkpoint covers {new.size} records but the trail holds only "
            f"{len(leaves.hashes)}: the trail was truncated"
        )
    tree = MerkleTree(leaves.hashes)
    for label, cp in (("first", old), ("second", new)):
        if tree.root(cp.size) != cp.root:
            raise ProofMismatch(
                f"the trail's first {cp.size} records do not hash to the {label} checkpoint's "
                "root: the trail was altered or the checkpoint is not from this trail"
            )
    return {
        "first": old.size,
        "second": new.size,
        "first_root": _b64(old.root),
        "second_root": _b64(new.root),
        "consistency_path": [_b64(h) for h in tree.consistency_path(old.size, new.size)],
    }
