"""Agent authentication through real drivers: every refusal is a FATAL with the right SQLSTATE and a
message the user can act on, and neither the client, the logs nor the events ever see the token.

psycopg reports no SQLSTATE for a failed connection attempt (exc.sqlstate is None), so the code is
checked through asyncpg, which does; the message is checked through both.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness import asyncpg_connect, conninfo, psycopg_connect
from phigate.dev.tokens import DevIssuer

pytestmark = pytest.mark.integration


# --- helpers -------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_for(issuer: str, audience: str = "phigate", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": issuer,
        "sub": "agent-crafted",
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "groups": ["clinicians"],
        **extra,
    }


def craft(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A JWT built by hand: sign(signing_input) -> signature bytes, or no signature at all."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    sig = b"" if sign is None else sign(signing_input.encode())
    return f"{signing_input}.{b64url(sig)}"


def secret_parts(tok: str) -> list[str]:
    """Pieces of a token that must never be echoed (payload and signature; a prefix too)."""
    parts = [p for p in tok.split(".")[1:] if len(p) >= 8]
    return [tok, tok[:40], *parts] if tok else []


def assert_no_token(text: str, tok: str) -> None:
    for piece in secret_parts(tok):
        assert piece not in text, "the token (or part of it) was echoed"


def refused_asyncpg(gw: Any, tok: str, user: str = "agent-1") -> asyncpg.PostgresError:
    async def attempt() -> asyncpg.PostgresError:
        try:
            conn = await asyncpg_connect(gw, tok, user=user)
        except asyncpg.PostgresError as exc:
            return exc
        await conn.close()
        raise AssertionError("the gateway accepted the token")

    return asyncio.run(attempt())


def refused_psycopg(gw: Any, tok: str, user: str = "agent-1") -> str:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(conninfo(gw, user), password=tok).close()
    return str(info.value)


def _without_times(text: str) -> str:
    return re.sub(r"\b(?:\d+h)?(?:\d+m)?\d+s\b", "<time>", text)


def check_refusal(gw: Any, tok: str, sqlstate: str, *phrases: str) -> str:
    """Both drivers are refused with a FATAL carrying `sqlstate` and all `phrases`; returns the
    server's message."""
    exc = refused_asyncpg(gw, tok)
    message = exc.args[0] if exc.args else str(exc)
    assert exc.sqlstate == sqlstate, f"sqlstate {exc.sqlstate}, message {message!r}"
    assert getattr(exc, "severity", "FATAL") == "FATAL"
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert_no_token(message + str(getattr(exc, "detail", "")) + str(getattr(exc, "hint", "")), tok)
    text = refused_psycopg(gw, tok)
    # The second driver connects a moment later: a message that counts time ("issued 9m59s in
    # the future") may have moved on by a second.
    assert "FATAL:" in text and _without_times(message) in _without_times(text), text
    assert_no_token(text, tok)
    return message


def accepted(gw: Any, tok: str, user: str = "agent-1") -> None:
    with psycopg_connect(gw, tok, user=user) as conn:
        assert conn.execute("select 40 + 2").fetchone() == (42,)


# --- the cases -----------------------------------------------------------------------------------


def test_valid_token(gateway, token):
    accepted(gateway, token())
    accepted(gateway, token(sub="agent-2", groups=("billing", "research"), ttl_seconds=60))

    async def via_asyncpg() -> None:
        conn = await asyncpg_connect(gateway, token())
        try:
            assert await conn.fetchval("select 1") == 1
        finally:
            await conn.close()

    asyncio.run(via_asyncpg())


def test_valid_token_within_clock_leeway(gateway, token):
    # Expired 5 s ago, issued 10 s in the future: both within the default 30 s leeway.
    accepted(gateway, token(ttl_seconds=-5))
    accepted(gateway, token(now=time.time() + 10))


def test_expired_token(gateway, token):
    message = check_refusal(gateway, token(ttl_seconds=-3600), "28P01", "expired")
    assert "1h" in message  # how long ago, so the user knows it is not a clock skew


def test_not_yet_valid_token(gateway, token):
    tok = token(nbf=int(time.time()) + 600, ttl_seconds=3600)
    check_refusal(gateway, tok, "28P01", "not valid yet", "clock")


def test_token_issued_in_the_future(gateway, token):
    # iat in the future and no nbf claim (a null nbf is ignored as absent).
    check_refusal(
        gateway, token(now=time.time() + 600, nbf=None), "28P01", "in the future", "clock"
    )


def test_wrong_issuer(gateway, token, dev_issuer):
    message = check_refusal(gateway, token(issuer="https://evil.example.com"), "28P01", "issuer")
    assert dev_issuer.issuer in message  # says which issuer is accepted
    assert "evil.example.com" not in message


def test_wrong_audience(gateway, token):
    message = check_refusal(gateway, token(audience="some-other-api"), "28P01", "audience")
    assert "'phigate'" in message  # says which audience is required


def test_alg_none(gateway, dev_issuer):
    tok = craft({"alg": "none", "typ": "JWT", "kid": dev_issuer.kid}, claims_for(dev_issuer.issuer))
    message = check_refusal(gateway, tok, "28P01", "algorithm", "not allowed")
    assert "RS256" in message  # names what is allowed


def test_alg_none_variants(gateway, dev_issuer):
    claims = claims_for(dev_issuer.issuer)
    for alg in ("None", "NONE", "nOnE"):
        tok = craft({"alg": alg, "typ": "JWT"}, claims)
        check_refusal(gateway, tok, "28P01", "not allowed")


def test_hs256_signed_with_the_public_key(gateway, dev_issuer):
    """Algorithm confusion: HMAC keyed with the RSA public key (PEM and JWK forms)."""
    key_pem = (dev_issuer.key_dir / f"key-{dev_issuer.kid}.pem").read_bytes()
    private = serialization.load_pem_private_key(key_pem, password=None)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwks = dev_issuer.jwks_path.read_bytes()
    claims = claims_for(dev_issuer.issuer)
    for secret in (public_pem, public_pem.strip(), jwks):
        tok = craft(
            {"alg": "HS256", "typ": "JWT", "kid": dev_issuer.kid},
            claims,
            lambda data, s=secret: hmac.new(s, data, hashlib.sha256).digest(),
        )
        check_refusal(gateway, tok, "28P01", "HS256", "not allowed")


def test_forged_signature(gateway, token, dev_issuer):
    # A real token whose payload was edited: the signature no longer matches.
    head, payload, sig = token().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["groups"] = ["admins"]
    forged = f"{head}.{b64url(json.dumps(claims).encode())}.{sig}"
    check_refusal(gateway, forged, "28P01", "signature")
    # Signed by a key the issuer never published, but claiming its kid.
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tok = jwt.encode(
        claims_for(dev_issuer.issuer), stranger, algorithm="RS256", headers={"kid": dev_issuer.kid}
    )
    check_refusal(gateway, tok, "28P01", "signature")


@pytest.mark.parametrize(
    "garbage",
    [
        "not-a-token",
        "a.b.c",
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0",  # two parts only
        "...",
        "x" * 5000,
        "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
        "\u00e9\u00e8.\u00e0.\u00fc",
    ],
    ids=["word", "dots", "two-parts", "empty-parts", "long", "bearer-prefix", "non-ascii"],
)
def test_garbage_token(gateway, garbage):
    check_refusal(gateway, garbage, "28P01", "malformed token", "JWT")


def test_oversized_token(gateway):
    huge = "eyJhbGciOiJSUzI1NiJ9." + "A" * 40_000 + ".c2ln"
    exc = refused_asyncpg(gateway, huge)
    assert exc.sqlstate in ("28P01", "08P01")
    assert_no_token(str(exc), huge)


def test_empty_password(gateway):
    exc = refused_asyncpg(gateway, "")
    assert exc.sqlstate in ("28P01", "28000")
    assert "token" in str(exc) and "password" in str(exc)
    # libpq refuses to send an empty password itself; the user still learns what is missing.
    text = refused_psycopg(gateway, "")
    assert "no password supplied" in text or "token" in text


def test_token_without_subject_or_expiry(gateway, dev_issuer):
    key = serialization.load_pem_private_key(
        (dev_issuer.key_dir / f"key-{dev_issuer.kid}.pem").read_bytes(), password=None
    )
    no_exp = claims_for(dev_issuer.issuer)
    del no_exp["exp"]
    tok = jwt.encode(no_exp, key, algorithm="RS256", headers={"kid": dev_issuer.kid})
    check_refusal(gateway, tok, "28P01", "exp", "must expire")
    no_sub = claims_for(dev_issuer.issuer)
    del no_sub["sub"]
    tok = jwt.encode(no_sub, key, algorithm="RS256", headers={"kid": dev_issuer.kid})
    check_refusal(gateway, tok, "28000", "subject")


# --- key rotation --------------------------------------------------------------------------------


@pytest.fixture
def own_issuer(tmp_path: Path) -> DevIssuer:
    """An issuer of our own: rotating the session's issuer would disturb other tests' gateways."""
    issuer = DevIssuer(tmp_path / "own-keys", issuer="phigate-rotation-test")
    issuer.ensure_keys()
    return issuer


def gateway_for(factory: Any, issuer: DevIssuer, **oidc: Any) -> Any:
    return factory(
        identity={"oidc": {"issuer": issuer.issuer, "jwks_file": str(issuer.jwks_path), **oidc}}
    )


def mint(issuer: DevIssuer, **kw: Any) -> str:
    return issuer.mint("agent-rot", ["clinicians"], **kw)


def test_unknown_kid_then_rotation(gateway_factory, own_issuer):
    gw = gateway_for(gateway_factory, own_issuer, jwks_min_refresh_interval=0)
    old_token = mint(own_issuer)
    accepted(gw, old_token, user="agent-rot")

    # A key the issuer has not published (yet): refused, and the message says why.
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tok = jwt.encode(
        claims_for(own_issuer.issuer),
        stranger,
        algorithm="RS256",
        headers={"kid": "kid-nobody-published"},
    )
    check_refusal(gw, tok, "28P01", "unknown kid")

    # Rotation: the JWKS file now lists a new signing key (and keeps the old one).
    new_kid = own_issuer.rotate()
    new_token = mint(own_issuer)
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    accepted(gw, new_token, user="agent-rot")  # the verifier re-read the JWKS on the unknown kid
    accepted(gw, old_token, user="agent-rot")  # the previous key still verifies

    # A second rotation retires the first key: tokens it signed stop working.
    own_issuer.rotate()
    accepted(gw, mint(own_issuer), user="agent-rot")
    check_refusal(gw, old_token, "28P01", "unknown kid")


def test_rotation_respects_refresh_rate_limit(gateway_factory, own_issuer):
    interval = 3.0
    t_start = time.monotonic()
    gw = gateway_for(gateway_factory, own_issuer, jwks_min_refresh_interval=interval)
    own_issuer.rotate()
    new_token = mint(own_issuer)
    if time.monotonic() - t_start < interval - 0.5:
        # The JWKS was loaded at start-up moments ago: no re-read yet, a clear refusal.
        check_refusal(gw, new_token, "28P01", "unknown kid")
    time.sleep(max(0.0, interval - (time.monotonic() - t_start)) + 0.2)
    accepted(gw, new_token, user="agent-rot")


# --- several gateways ----------------------------------------------------------------------------


def test_token_for_another_gateway_is_refused(gateway, gateway_factory, token):
    other = gateway_factory(identity={"oidc": {"audience": "phigate-billing"}})
    billing_token = token(audience="phigate-billing")
    accepted(other, billing_token)
    check_refusal(gateway, billing_token, "28P01", "audience", "'phigate'")
    check_refusal(other, token(), "28P01", "audience", "'phigate-billing'")
    # A token for both audiences works on both.
    both = token(aud=["phigate", "phigate-billing"])
    accepted(gateway, both)
    accepted(other, both)


# --- what is recorded ----------------------------------------------------------------------------


@pytest.fixture
def captured_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


def test_auth_failures_recorded_without_the_token(gateway_factory, token, captured_logs):
    gw = gateway_factory()
    bad = {
        "expired": token(ttl_seconds=-3600),
        "audience": token(audience="elsewhere"),
        "garbage": "garbage-" + "s3cr3t" * 10,
    }
    for tok in bad.values():
        refused_psycopg(gw, tok, user="agent-audit")
    good = token(sub="agent-audit")
    accepted(gw, good, user="agent-audit")
    gw.stop()

    raw = gw.trail_text()
    events = gw.events()
    failures = [e for e in events if e.get("event") == "auth_failure"]
    assert len(failures) == len(bad)
    assert all(e["sqlstate"] == "28P01" for e in failures)
    # The user name a client typed is logged as a keyed hash: one value per name in this run.
    assert {e["user"] for e in failures} == {failures[0]["user"]}
    assert failures[0]["user"].startswith("h:")
    assert all(e.get("peer", "").startswith("127.0.0.1:") for e in failures)
    starts = [e for e in events if e.get("event") == "session_start"]
    assert len(starts) == 1 and starts[0]["subject"] == "agent-audit"
    logs = "\n".join(r.getMessage() for r in captured_logs.records)
    for tok in [*bad.values(), good]:
        assert_no_token(raw, tok)
        assert_no_token(logs, tok)
