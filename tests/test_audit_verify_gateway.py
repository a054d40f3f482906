"""`phigate audit verify`, `prove` and `search` on trails a real gateway wrote (not the test
writer's): a trail from driver sessions with allowed, refused and failing statements verifies;
one edited byte, a removed line or a truncated tail against a kept checkpoint fails and names
the record; an inclusion proof of a real record checks out against the signed checkpoint with
an independent RFC 9162 computation."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import psycopg_connect, session_audit_keys
from phigate.cli import main

pytestmark = pytest.mark.integration


def cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue() + err.getvalue()


@pytest.fixture
def trail(gateway_factory: Any, token: Any) -> Path:
    """A stopped gateway's trail: a session with an allowed, a refused and a failing statement."""
    gw = gateway_factory()
    with psycopg_connect(gw, token(sub="verify-agent")) as conn:
        conn.execute("select %s::int + 1", (41,)).fetchone()
        with pytest.raises(psycopg.Error):
            conn.execute("select * from pg_catalog.pg_authid")
        conn.rollback()
        with pytest.raises(psycopg.Error):
            conn.execute("select 1 / 0")
    gw.stop()
    return Path(gw.audit_dir)


def verify(trail: Path, *extra: str) -> tuple[int, str]:
    return cli("audit", "verify", "--log", str(trail), "--pubkey",
               str(session_audit_keys() / "audit.pub"), *extra)  # fmt: skip


def segment_lines(trail: Path) -> tuple[Path, list[bytes]]:
    (segment,) = sorted(trail.glob("segment-*.jsonl"))
    return segment, segment.read_bytes().splitlines(keepends=True)


def test_a_gateway_trail_verifies(trail: Path) -> None:
    code, out = verify(trail)
    assert code == 0, out
    assert "records" in out
    code, out = cli("audit", "search", "--log", str(trail), "--event", "statement", "--json")
    assert code == 0, out
    decisions = {json.loads(line)["rec"]["decision"] for line in out.splitlines() if line.strip()}
    assert decisions == {"allow", "deny"}


def test_an_edited_byte_fails_and_names_the_record(trail: Path) -> None:
    segment, lines = segment_lines(trail)
    n = next(i for i, line in enumerate(lines) if b'"decision":"deny"' in line)
    lines[n] = lines[n].replace(b'"decision":"deny"', b'"decision":"allw"')  # same length
    segment.write_bytes(b"".join(lines))
    code, out = verify(trail)
    assert code == 1
    assert f"line {n + 1}" in out and f"seq {n}" in out, out


def test_a_removed_record_fails(trail: Path) -> None:
    segment, lines = segment_lines(trail)
    n = len(lines) // 2
    del lines[n]
    segment.write_bytes(b"".join(lines))
    code, out = verify(trail)
    assert code == 1 and f"line {n + 1}" in out, out


def test_a_truncated_tail_fails_against_a_kept_checkpoint(trail: Path, tmp_path: Path) -> None:
    kept = tmp_path / "kept-checkpoint"
    kept.write_text((trail / "checkpoint").read_text())
    segment, lines = segment_lines(trail)
    # Cut the last records and the trail's own checkpoint file, as an intruder would.
    segment.write_bytes(b"".join(lines[: len(lines) - 3]))
    (trail / "checkpoint").unlink()
    code, out = verify(trail, "--checkpoint", str(kept))
    assert code == 1 and "kept-checkpoint" in out, out


def _root_from_path(index: int, size: int, leaf: bytes, path: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.3.2, written out here and not taken from the product."""
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise AssertionError("path too long")
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    assert sn == 0
    return r


def test_an_inclusion_proof_of_a_real_record_checks_out(trail: Path) -> None:
    _, lines = segment_lines(trail)
    n = next(i for i, line in enumerate(lines) if b'"event":"statement"' in line)
    code, out = cli("audit", "prove", "--log", str(trail), "--seq", str(n))
    assert code == 0, out
    proof = json.loads(out)
    record = lines[n].rstrip(b"\n")
    assert proof["record"].encode() == record
    leaf = hashlib.sha256(b"\x00" + record).digest()
    path = [base64.b64decode(p) for p in proof["inclusion_path"]]
    root = _root_from_path(proof["leaf_index"], proof["tree_size"], leaf, path)
    assert base64.b64encode(root).decode() == proof["root_hash"]
    # The root is the one the signed checkpoint names.
    assert proof["checkpoint"].splitlines()[2] == proof["root_hash"]
