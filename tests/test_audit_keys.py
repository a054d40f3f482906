"""`phigate audit keygen` and `phigate audit hash` as an operator and an investigator use them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import stat

from phigate.audit.keys import parse_hmac_key, parse_signer, parse_verifier
from phigate.cli import main


def test_keygen_writes_three_keys_with_safe_modes(capsys, tmp_path):
    out = tmp_path / "keys"
    assert main(["audit", "keygen", "--out", str(out), "--name", "gw.test/one"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "audit.key") in printed and str(out / "audit.pub") in printed
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"audit.key": 0o600, "audit.pub": 0o644, "audit-hmac.key": 0o600}
    signer = parse_signer((out / "audit.key").read_text())
    assert signer.name == "gw.test/one"
    assert parse_verifier((out / "audit.pub").read_text()) == signer.verifier
    assert len(parse_hmac_key((out / "audit-hmac.key").read_text())) == 32


def test_keygen_refuses_to_overwrite(capsys, tmp_path):
    out = tmp_path / "keys"
    assert main(["audit", "keygen", "--out", str(out), "--name", "gw.test/one"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["audit", "keygen", "--out", str(out), "--name", "gw.test/one"]) == 2
    assert "exists; move it away first" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_keygen_default_name_is_phigate_and_the_host(capsys, tmp_path):
    assert main(["audit", "keygen", "--out", str(tmp_path / "k")]) == 0
    assert parse_signer((tmp_path / "k" / "audit.key").read_text()).name.startswith("phigate/")


def test_hash_prints_the_keyed_hash_records_hold(capsys, tmp_path):
    key = bytes(range(32))
    f = tmp_path / "hmac.key"
    f.write_text(base64.b64encode(key).decode() + "\n")
    assert main(["audit", "hash", "MRN-0001", "--hmac-key", str(f)]) == 0
    expected = "h:" + hmac.new(key, b"MRN-0001", hashlib.sha256).hexdigest()[:32]
    assert capsys.readouterr().out.strip() == expected


def test_hash_with_a_wrong_key_file_is_a_usage_error(capsys, tmp_path):
    f = tmp_path / "not-a-key"
    f.write_text("hello\n")
    assert main(["audit", "hash", "x", "--hmac-key", str(f)]) == 2
    assert "not an audit HMAC key" in capsys.readouterr().err
