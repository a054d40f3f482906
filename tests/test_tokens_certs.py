"""The development token issuer, the development certificates, and their CLI commands."""

from __future__ import annotations

import json
import socket
import ssl
import stat
import threading
from pathlib import Path

import jwt
import pytest

from phigate.cli import main as cli_main
from phigate.dev.certs import make_dev_cert
from phigate.dev.tokens import DevIssuer


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def verify_with_jwks(token: str, jwks_path: Path) -> dict[str, object]:
    kid = jwt.get_unverified_header(token)["kid"]
    keys = {k["kid"]: k for k in json.loads(jwks_path.read_text())["keys"]}
    key = jwt.PyJWK(keys[kid]).key
    return jwt.decode(token, key, algorithms=["RS256"], audience="phigate", issuer="phigate-dev")


def test_ensure_keys_creates_private_key_0600_and_jwks(tmp_path: Path) -> None:
    dev = DevIssuer(tmp_path / "dev")
    dev.ensure_keys()
    private = list((tmp_path / "dev").glob("*.pem"))
    assert len(private) == 1 and mode(private[0]) == 0o600
    assert dev.jwks_path == tmp_path / "dev" / "jwks.json"
    jwks = json.loads(dev.jwks_path.read_text())
    (key,) = jwks["keys"]
    assert key["kty"] == "RSA" and key["kid"] == dev.kid and key["alg"] == "RS256"
    assert "d" not in key  # public only
    assert jwt.PyJWK(key).key.key_size == 2048
    assert dev.issuer == "phigate-dev"


def test_keys_persist_across_instances(tmp_path: Path) -> None:
    first = DevIssuer(tmp_path)
    token = first.mint("agent-1", ["readers"])
    second = DevIssuer(tmp_path)
    second.ensure_keys()
    assert second.kid == first.kid
    assert verify_with_jwks(token, second.jwks_path)["sub"] == "agent-1"


def test_mint_claims(tmp_path: Path) -> None:
    dev = DevIssuer(tmp_path)
    token = dev.mint("agent-1", ["readers", "billing"], ttl_seconds=60)
    claims = verify_with_jwks(token, dev.jwks_path)
    assert claims["sub"] == "agent-1"
    assert claims["groups"] == ["readers", "billing"]
    assert claims["exp"] == claims["iat"] + 60  # type: ignore[operator]
    assert jwt.get_unverified_header(token)["alg"] == "RS256"


def test_rotation_keeps_previous_key_and_retires_older(tmp_path: Path) -> None:
    dev = DevIssuer(tmp_path)
    old_token = dev.mint("agent-1", [])
    old_kid = dev.kid
    new_kid = dev.rotate()
    assert new_kid == dev.kid != old_kid
    kids = [k["kid"] for k in json.loads(dev.jwks_path.read_text())["keys"]]
    assert kids == [new_kid, old_kid]
    new_token = dev.mint("agent-2", [])
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert verify_with_jwks(old_token, dev.jwks_path)["sub"] == "agent-1"
    assert verify_with_jwks(new_token, dev.jwks_path)["sub"] == "agent-2"
    newest = dev.rotate()
    kids = [k["kid"] for k in json.loads(dev.jwks_path.read_text())["keys"]]
    assert kids == [newest, new_kid]
    assert len(list(tmp_path.glob("*.pem"))) == 2


def test_dev_cert_serves_tls_that_a_verifying_client_accepts(tmp_path: Path) -> None:
    made = make_dev_cert(tmp_path / "tls", hostnames=("localhost", "127.0.0.1", "gw.test"))
    assert mode(made.key) == 0o600
    assert made.ca_cert.read_text().startswith("-----BEGIN CERTIFICATE-----")

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(made.cert, made.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"hello")

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(made.ca_cert))
    # Hostname verification against the IP SAN, the way sslmode=verify-full does it.
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.recv(5) == b"hello"
    thread.join(5)
    listener.close()


def test_dev_cert_does_not_cover_other_names(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    made = make_dev_cert(tmp_path, hostnames=("localhost",))
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(made.cert.read_bytes())
    builder = PolicyBuilder().store(Store([ca]))
    builder.build_server_verifier(x509.DNSName("localhost")).verify(cert, [])
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("evil.test")).verify(cert, [])


def test_cli_token_mint_and_jwks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_dir = tmp_path / "dev"
    assert cli_main(["token", "mint", "--sub", "agent-1", "--groups", "a, b", "--ttl", "15m",
                     "--key-dir", str(key_dir)]) == 0  # fmt: skip
    token = capsys.readouterr().out.strip()
    claims = verify_with_jwks(token, key_dir / "jwks.json")
    assert claims["groups"] == ["a", "b"]
    assert claims["exp"] == claims["iat"] + 900  # type: ignore[operator]
    assert cli_main(["token", "jwks", "--key-dir", str(key_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["keys"][0]["kty"] == "RSA"


def test_cli_bad_ttl_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(["token", "mint", "--sub", "a", "--ttl", "soon", "--key-dir", str(tmp_path)])
    assert info.value.code == 2


def test_cli_cert_dev(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["cert", "dev", "--out", str(tmp_path), "--host", "gw.test"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "server.crt") in out
    assert (tmp_path / "server.key").is_file()
