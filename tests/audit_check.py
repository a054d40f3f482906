"""A minimal audit trail checker for the tests (the full one is `phigate audit verify`):
segments in order, every line canonical, seq contiguous, prev chained, every checkpoint's
size, root and signatures against the tree recomputed with hashlib."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phigate.audit.keys import VerifierKey, parse_verifier


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1, by its recursive definition."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return _node(mth(leaves[:k]), mth(leaves[k:]))


@dataclass
class Checked:
    records: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    segments: list[Path] = field(default_factory=list)
    signers: list[list[str]] = field(default_factory=list)  # key names+hashes per checkpoint


def note_signatures(note: str) -> list[tuple[str, int, bytes]]:
    _, sigs = note.split("\n\n", 1)
    out = []
    for line in sigs.splitlines():
        assert line.startswith("\u2014 "), line
        name, blob = line[2:].split(" ")
        raw = base64.b64decode(blob)
        out.append((name, int.from_bytes(raw[:4], "big"), raw[4:]))
    return out


def check_trail(trail_dir: Path, pubkeys: list[str | Path], origin: str) -> Checked:
    keys: list[VerifierKey] = [
        parse_verifier(Path(k).read_text() if isinstance(k, Path) else k) for k in pubkeys
    ]
    out = Checked()
    leaves: list[bytes] = []
    prev = "0" * 64
    out.segments = sorted(trail_dir.glob("segment-*.jsonl"))
    assert out.segments, f"no segments in {trail_dir}"
    for seg in out.segments:
        assert int(seg.name[len("segment-") : -len(".jsonl")]) == len(leaves), seg.name
        data = seg.read_bytes()
        assert data.endswith(b"\n"), f"{seg.name} does not end with a newline"
        for n, raw in enumerate(data[:-1].split(b"\n"), 1):
            where = f"{seg.name}:{n}"
            line = raw.decode()
            obj = json.loads(line)
            canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            assert canonical == line, f"{where} is not canonical"
            assert list(obj) == ["prev", "rec", "seq"], where
            assert obj["seq"] == len(leaves), f"{where}: seq {obj['seq']} != {len(leaves)}"
            assert obj["prev"] == prev, f"{where}: broken chain"
            rec = obj["rec"]
            assert isinstance(rec["ts"], str) and rec["ts"].endswith("Z"), where
            if rec["event"] == "checkpoint":
                root = mth(leaves)
                assert rec["size"] == len(leaves), where
                assert rec["root"] == base64.b64encode(root).decode(), f"{where}: wrong root"
                body = f"{origin}\n{len(leaves)}\n{rec['root']}\n"
                assert rec["note"].startswith(body + "\n"), where
                names = []
                for name, key_hash, sig in note_signatures(rec["note"]):
                    key = next((k for k in keys if (k.name, k.hash) == (name, key_hash)), None)
                    assert key is not None, f"{where}: signed by an unknown key {key_hash:08x}"
                    assert key.verify(body.encode(), sig), f"{where}: bad signature"
                    names.append(f"{name}+{key_hash:08x}")
                out.checkpoints.append(rec)
                out.signers.append(names)
            leaf = hashlib.sha256(b"\x00" + raw).digest()
            prev = leaf.hex()
            leaves.append(leaf)
            out.records.append(rec)
    # The product's verifier must agree with this independent check on every trail a test
    # wrote (chain, tree, signatures, tail, the `checkpoint` file).
    from phigate.audit.verify import verify_trail

    verify_trail(trail_dir, origin, keys, checkpoint_interval=3600)
    return out
