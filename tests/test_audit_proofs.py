"""`phigate audit prove` and `consistency` checked by an independent RFC 9162 verifier written
here from the RFC's algorithms (§2.1.3.2, §2.1.4.2), not from phigate's own Merkle code."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit_writer import TrailWriter
from phigate.audit.keys import generate_signer
from phigate.cli import main


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def rfc_inclusion_ok(index: int, size: int, leaf: bytes, path: list[bytes], root: bytes) -> bool:
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            r = sha(b"\x01" + p + r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn, sn = fn // 2, sn // 2
        else:
            r = sha(b"\x01" + r + p)
        fn, sn = fn // 2, sn // 2
    return sn == 0 and r == root


def rfc_consistency_ok(first: int, second: int, h1: bytes, h2: bytes, path: list[bytes]) -> bool:
    if first == second:
        return path == [] and h1 == h2
    if not path:
        return False
    if first & (first - 1) == 0:
        path = [h1, *path]
    fn, sn = first - 1, second - 1
    while fn % 2 == 1:
        fn, sn = fn // 2, sn // 2
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr, sr = sha(b"\x01" + c + fr), sha(b"\x01" + c + sr)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn, sn = fn // 2, sn // 2
        else:
            sr = sha(b"\x01" + sr + c)
        fn, sn = fn // 2, sn // 2
    return fr == h1 and sr == h2 and sn == 0


def b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


class Trail:
    """A trail of plain records with a signed checkpoint note file for every size."""

    def __init__(self, root: Path, records: int) -> None:
        self.signer = generate_signer("phigate.test/proofs")
        self.w = TrailWriter(root / "trail", self.signer)
        self.notes = root / "notes"
        self.notes.mkdir()
        for i in range(records):
            self.w.append({"event": "statement", "session": f"s-{i % 5}", "n": i})
            note = self.w.note(self.w.seq, self.w.root(), [self.signer])
            (self.notes / str(self.w.seq)).write_text(note)

    def note(self, size: int) -> Path:
        return self.notes / str(size)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:  # type: ignore[type-arg]
    code = main(["audit", *argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)  # type: ignore[no-any-return]


def check_inclusion(proof: dict, trail: Trail, seq: int, size: int) -> None:  # type: ignore[type-arg]
    line = trail.w.lines[seq]
    assert proof["record"].encode() == line
    assert proof["leaf_index"] == seq and proof["tree_size"] == size
    assert proof["origin"] == "phigate.test/proofs"
    leaf = sha(b"\x00" + proof["record"].encode())
    assert b64(proof["leaf_hash"]) == leaf
    # The root the proof leads to is the one the signed note carries, under a valid signature.
    body, sigs = proof["checkpoint"].split("\n\n")
    origin, size_line, root_line = body.split("\n")
    assert (origin, int(size_line), root_line) == (proof["origin"], size, proof["root_hash"])
    sig = b64(sigs.strip().split(" ")[2])
    pub = Ed25519PublicKey.from_public_bytes(trail.signer.verifier.public)
    pub.verify(sig[4:], (body + "\n").encode())
    path = [b64(p) for p in proof["inclusion_path"]]
    assert rfc_inclusion_ok(seq, size, leaf, path, b64(proof["root_hash"]))
    assert not rfc_inclusion_ok(seq, size, sha(b"\x00" + b"other"), path, b64(proof["root_hash"]))


def test_inclusion_proofs_for_every_leaf_of_trees_of_1_to_70(capsys, tmp_path):
    trail = Trail(tmp_path, 70)
    log = str(trail.w.dir)
    for size in range(1, 71):
        for seq in range(size):
            proof = run_json(capsys, "prove", "--log", log, "--seq", str(seq),
                             "--checkpoint", str(trail.note(size)))  # fmt: skip
            check_inclusion(proof, trail, seq, size)


def test_consistency_proofs_for_every_pair_of_sizes_up_to_70(capsys, tmp_path):
    trail = Trail(tmp_path, 70)
    log = str(trail.w.dir)
    for second in range(1, 71):
        for first in range(1, second + 1):
            p = run_json(capsys, "consistency", "--log", log, str(trail.note(first)),
                         str(trail.note(second)))  # fmt: skip
            assert (p["first"], p["second"]) == (first, second)
            h1, h2 = b64(p["first_root"]), b64(p["second_root"])
            path = [b64(c) for c in p["consistency_path"]]
            assert rfc_consistency_ok(first, second, h1, h2, path), (first, second)
            if first < second:
                assert not rfc_consistency_ok(first, second, sha(b"x"), h2, path)


def test_proofs_in_larger_random_trees(capsys, tmp_path):
    rng = random.Random(9162)
    trail = Trail(tmp_path, 3000)
    log = str(trail.w.dir)
    for _ in range(25):
        size = rng.randint(71, 3000)
        seq = rng.randrange(size)
        proof = run_json(capsys, "prove", "--log", log, "--seq", str(seq),
                         "--checkpoint", str(trail.note(size)))  # fmt: skip
        check_inclusion(proof, trail, seq, size)
        first = rng.randint(1, size)
        p = run_json(capsys, "consistency", "--log", log, str(trail.note(first)),
                     str(trail.note(size)))  # fmt: skip
        path = [b64(c) for c in p["consistency_path"]]
        assert rfc_consistency_ok(first, size, b64(p["first_root"]), b64(p["second_root"]), path)


def test_prove_defaults_to_the_latest_checkpoint_and_refuses_uncovered_records(capsys, tmp_path):
    w = TrailWriter(tmp_path / "t")
    w.open()
    w.session("s-0", "agent-0")
    w.checkpoint()  # seq 7 covers 0..6
    w.append({"event": "session_start", "session": "s-1", "subject": "agent-1"})
    proof = run_json(capsys, "prove", "--log", str(w.dir), "--seq", "3")
    assert proof["tree_size"] == 7 and proof["checkpoint"] == (w.dir / "checkpoint").read_text()
    assert main(["audit", "prove", "--log", str(w.dir), "--seq", "8"]) == 2
    assert "record 8 is not covered by the checkpoint (size 7" in capsys.readouterr().err


def test_prove_fails_on_an_altered_trail(capsys, tmp_path):
    w = TrailWriter(tmp_path / "t")
    w.open()
    w.session("s-0", "agent-0")
    w.checkpoint()
    s0 = w.dir / "segment-000000000000.jsonl"
    s0.write_bytes(s0.read_bytes().replace(b"agent-0", b"agent-5"))
    assert main(["audit", "prove", "--log", str(w.dir), "--seq", "0"]) == 1
    assert "do not hash to the checkpoint's root" in capsys.readouterr().err
