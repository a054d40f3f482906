"""`phigate audit verify` as an auditor runs it: an intact trail passes with its numbers, and each
kind of tampering fails with exit code 1 and a message naming the first bad record."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from audit_writer import TrailWriter, standard_trail
from phigate.audit.keys import SignerKey, generate_signer
from phigate.cli import main

ORIGIN = "phigate.test/gw1"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["audit", *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def signer() -> SignerKey:
    return generate_signer(ORIGIN)


@pytest.fixture
def pub(tmp_path: Path, signer: SignerKey) -> Path:
    p = tmp_path / "audit.pub"
    p.write_text(signer.verifier.text + "\n")
    return p


@pytest.fixture
def trail(tmp_path: Path, signer: SignerKey) -> Path:
    # 45 records: seq 0 audit_open; per session 6 records + a checkpoint (seq 7, 14, ...);
    # segments start at seq 0, 15 and 29.
    standard_trail(tmp_path / "trail", signer)
    return tmp_path / "trail"


def seg(trail: Path, first: int) -> Path:
    return trail / f"segment-{first:012d}.jsonl"


def edit_lines(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    lines = path.read_bytes().split(b"\n")[:-1]
    path.write_bytes(b"".join(line + b"\n" for line in change(lines)))


def test_an_intact_trail_verifies_with_its_numbers(capsys, trail, pub):
    code, out = run(capsys, "verify", "--log", str(trail), "--pubkey", str(pub))
    assert code == 0, out
    assert "45 records in 3 segments, 7 checkpoints" in out
    assert "1 checkpoint files match: OK" in out and "records/s" in out


def test_an_edited_byte_names_the_edited_record(capsys, trail, pub):
    s0 = seg(trail, 0)
    s0.write_bytes(s0.read_bytes().replace(b'"subject":"agent-1"', b'"subject":"agent-9"'))
    code, out = run(capsys, "verify", "--log", str(trail), "--pubkey", str(pub))
    assert code == 1
    assert "segment-000000000000.jsonl line 9 (seq 8): record bytes do not match the chain" in out
    assert "the record was edited" in out


def test_a_removed_record_is_named(capsys, trail, pub):
    edit_lines(seg(trail, 0), lambda lines: lines[:10] + lines[11:])
    code, out = run(capsys, "verify", "--log", str(trail), "--pubkey", str(pub))
    assert code == 1
    assert "line 11 (seq 11): seq 10 is missing before it: records were removed" in out


def test_a_duplicated_record_is_named(capsys, trail, pub):
    edit_lines(seg(trail, 0), lambda lines: lines[:11] + [lines[10]] + lines[11:])
    code, out = run(capsys, "verify", "--log", str(trail), "--pubkey", str(pub))
    assert code == 1
    assert "line 12 (seq 10): it repeats the record before it: the record was duplicated" in out


def test_reordered_records_are_named(capsys, trail, pub):
    edit_lines(seg(trail, 0), lambda lines: lines[:10] + [lines[11], lines[10]] + lines[12:])
    code, out = run(capsys, "verify", "--log", str(trail), "--pubkey", str(pub))
    assert code == 1
    assert "line 11 (seq 11): seq 10 was expected; it comes next: the records were reordered" in out


def test_a_truncated_tail_fails_against_a_checkpoint_kept_elsewhere(capsys, trail, pub, tmp_path):
    kept = tmp_path / "worm-checkpoint"
    shutil.copy(trail / "checkpoint", kept)  # size 44
    (trail / "checkpoint").unlink()  # the intruder removes the local copy too
    edit_lines(seg(trail, 29), lambda lines: lines[:-3])  # drop seq 42..44
    code, out = run(capsys, "verify", "--log", str(trail), "--pubkey", str(pub))
    assert code == 0, out  # without the kept checkpoint nothing shows it: why it must be kept
    code, out = run(capsys, "verify", "--log", str(trail), "--pubkey", str(pub),
                    "--checkpoint", str(kept))  # fmt: skip
    assert code == 1
    assert "after segment-000000000029.jsonl line 13 (seq 41)" in out
    assert "covers 44 records but the trail holds only 42: seq 42..43 are missing" in out
    assert "truncated" in out


def test_a_checkpoint_with_a_bad_signature_is_named(capsys, tmp_path, signer, pub):
    w = TrailWriter(tmp_path / "t", signer)
    w.open()
    w.session("s-0", "agent-0")
    w.checkpoint()
    w.session("s-1", "agent-1")
    w.checkpoint(spoil_signature=True)  # seq 14
    code, out = run(capsys, "verify", "--log", str(w.dir), "--pubkey", str(pub))
    assert code == 1
    assert (
        "segment-000000000000.jsonl line 15 (seq 14): the checkpoint's signature is not valid"
        in out
    )
    assert (
        f"the signature by key {signer.verifier.name}+{signer.verifier.hash:08x} does not verify"
        in out
    )


def test_a_checkpoint_with_a_wrong_root_is_named(capsys, tmp_path, signer, pub):
    w = TrailWriter(tmp_path / "t", signer)
    w.open()
    w.session("s-0", "agent-0")
    w.checkpoint(root=b"\x07" * 32)  # seq 7, validly signed but not the tree's root
    code, out = run(capsys, "verify", "--log", str(w.dir), "--pubkey", str(pub))
    assert code == 1
    assert "line 8 (seq 7): the checkpoint's root" in out
    assert "is not the root of records 0..6" in out


def test_an_unsigned_stale_tail_fails_and_a_fresh_one_is_noted(capsys, tmp_path, signer, pub):
    w = TrailWriter(tmp_path / "t", signer)
    w.open()
    w.session("s-0", "agent-0")
    w.checkpoint()  # seq 7
    w.append({"event": "session_start", "session": "s-1", "subject": "agent-1"})  # seq 8
    code, out = run(capsys, "verify", "--log", str(w.dir), "--pubkey", str(pub))
    assert code == 0 and "the last 1 records are not signed by a checkpoint yet" in out
    w.append({"event": "session_end", "session": "s-1"}, tick=30.0)  # 30 s on, no checkpoint
    code, out = run(capsys, "verify", "--log", str(w.dir), "--pubkey", str(pub))
    assert code == 1
    assert "line 9 (seq 8): unsigned tail: this record and the 1 after it" in out
    code, out = run(capsys, "verify", "--log", str(w.dir), "--pubkey", str(pub),
                    "--checkpoint-interval", "60")  # fmt: skip
    assert code == 0, out


def test_a_non_canonical_line_is_named(capsys, trail, pub):
    s0 = seg(trail, 0)
    s0.write_bytes(s0.read_bytes().replace(b'"subject":"agent-1"', b'"subject": "agent-1"'))
    code, out = run(capsys, "verify", "--log", str(trail), "--pubkey", str(pub))
    assert code == 1
    assert "line 9 (seq 8 expected): it is not in canonical form" in out


def test_a_float_is_not_canonical(capsys, trail, pub):
    s0 = seg(trail, 0)
    s0.write_bytes(s0.read_bytes().replace(b'"rows":1,', b'"rows":1.0,', 1))
    code, out = run(capsys, "verify", "--log", str(trail), "--pubkey", str(pub))
    assert code == 1
    assert "line 4 (seq 3 expected): it holds the number 1.0, but records hold integers only" in out


def test_a_missing_segment_is_named(capsys, trail, pub):
    seg(trail, 15).unlink()
    code, out = run(capsys, "verify", "--log", str(trail), "--pubkey", str(pub))
    assert code == 1
    assert ("segment-000000000029.jsonl: the previous segment ends at seq 14; the segment "
            "file(s) holding seq 15..28 are missing") in out  # fmt: skip


def test_a_missing_first_segment_is_named(capsys, trail, pub):
    seg(trail, 0).unlink()
    code, out = run(capsys, "verify", "--log", str(trail), "--pubkey", str(pub))
    assert code == 1
    assert "segment-000000000015.jsonl: the trail starts at seq 15" in out


def rotated_trail(tmp_path: Path, old: SignerKey, new: SignerKey) -> TrailWriter:
    w = TrailWriter(tmp_path / "t", old)
    w.open()
    w.session("s-0", "agent-0")
    w.checkpoint()  # seq 7, old key
    w.rotate_key(new)  # seq 8
    w.session("s-1", "agent-1")
    w.checkpoint()  # seq 15: old and new key
    w.session("s-2", "agent-2")
    w.checkpoint()  # seq 22: new key only
    return w


def test_verify_passes_across_a_key_rotation_with_the_old_key(capsys, tmp_path, signer, pub):
    rotated_trail(tmp_path, signer, generate_signer(ORIGIN))
    code, out = run(capsys, "verify", "--log", str(tmp_path / "t"), "--pubkey", str(pub))
    assert code == 0, out
    assert "3 checkpoints, 1 key rotations" in out


def test_a_checkpoint_signed_only_by_an_unannounced_key_fails(capsys, tmp_path, signer, pub):
    w = TrailWriter(tmp_path / "t", signer)
    w.open()
    w.session("s-0", "agent-0")
    w.checkpoint()
    intruder = generate_signer(ORIGIN)
    w.signer = intruder  # no audit_key_rotated record
    w.session("s-1", "agent-1")
    w.checkpoint()  # seq 14
    code, out = run(capsys, "verify", "--log", str(w.dir), "--pubkey", str(pub))
    assert code == 1
    assert "line 15 (seq 14): the checkpoint's signature is not valid: no trusted key" in out
    assert f"{ORIGIN}+{intruder.verifier.hash:08x}" in out


def test_a_rotation_needs_a_checkpoint_signed_by_both_keys(capsys, tmp_path, signer, pub):
    w = TrailWriter(tmp_path / "t", signer)
    w.open()
    w.checkpoint()  # seq 1
    new = generate_signer(ORIGIN)
    w.rotate_key(new)  # seq 2
    w.checkpoint(signers=[new])  # seq 3: the old key did not sign
    code, out = run(capsys, "verify", "--log", str(w.dir), "--pubkey", str(pub))
    assert code == 1
    assert (
        "line 4 (seq 3): the first checkpoint after the key rotation at seq 2 must be signed" in out
    )


def test_a_rotation_from_an_untrusted_key_fails(capsys, tmp_path, signer, pub):
    w = TrailWriter(tmp_path / "t", signer)
    w.open()
    w.checkpoint()
    w.signer = generate_signer(ORIGIN)  # an intruder's key announces a rotation to another one
    w.rotate_key(generate_signer(ORIGIN))  # seq 2
    code, out = run(capsys, "verify", "--log", str(w.dir), "--pubkey", str(pub))
    assert code == 1
    assert "line 3 (seq 2): the key rotation is from" in out and "not a trusted key" in out


def test_several_gateways_each_checked_with_its_own_key(capsys, tmp_path):
    a, b = generate_signer("gw.test/a"), generate_signer("gw.test/b")
    for s in (a, b):
        standard_trail(tmp_path / s.name.replace("/", "-"), s, sessions=2)
        (tmp_path / f"{s.name.replace('/', '-')}.pub").write_text(s.verifier.text)
    logs = ["--log", str(tmp_path / "gw.test-a"), "--log", str(tmp_path / "gw.test-b")]
    keys = [
        "--pubkey",
        str(tmp_path / "gw.test-a.pub"),
        "--pubkey",
        str(tmp_path / "gw.test-b.pub"),
    ]
    code, out = run(capsys, "verify", *logs, *keys)
    assert code == 0, out
    assert "verified 2 trail(s)" in out
    code, out = run(capsys, "verify", *logs, *keys[:2])
    assert code == 2 and "no --pubkey is named 'gw.test/b'" in out
    s0 = tmp_path / "gw.test-b" / "segment-000000000000.jsonl"
    s0.write_bytes(s0.read_bytes().replace(b"agent-1", b"agent-7"))
    code, out = run(capsys, "verify", *logs, *keys)
    assert (
        code == 1 and f"FAILED {tmp_path / 'gw.test-b'}: segment-000000000000.jsonl line 9" in out
    )


def test_usage_errors_exit_2(capsys, trail, pub, tmp_path):
    code, out = run(capsys, "verify", "--log", str(trail))
    assert code == 2 and "--pubkey" in out
    code, out = run(capsys, "verify", "--log", str(tmp_path / "nope"), "--pubkey", str(pub))
    assert code == 2 and "is not a directory" in out
    code, out = run(capsys, "verify", "--log", str(trail), "--pubkey", str(trail / "checkpoint"))
    assert code == 2 and "not a public audit key" in out
