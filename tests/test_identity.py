"""OIDC token verification: what an agent is told for each kind of bad token, and key rotation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from phigate.config import OidcConfig
from phigate.dev.tokens import DevIssuer
from phigate.errors import IdentityError
from phigate.identity.oidc import Identity, OidcVerifier

T0 = 1_750_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def issuer(tmp_path: Path) -> DevIssuer:
    dev = DevIssuer(tmp_path / "keys")
    dev.ensure_keys()
    return dev


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def oidc(issuer: DevIssuer) -> OidcConfig:
    return OidcConfig(
        issuer="phigate-dev",
        audience="phigate",
        jwks_file=issuer.jwks_path,
        jwks_url=None,
        groups_claim="groups",
        algorithms=("RS256", "ES256", "EdDSA"),
        leeway=30,
        jwks_cache_ttl=3600,
        jwks_min_refresh_interval=30,
    )


@pytest.fixture
def verifier(oidc: OidcConfig, clock: Clock) -> OidcVerifier:
    v = OidcVerifier(oidc, clock=clock)
    assert asyncio.run(v.prime())
    return v


@pytest.fixture(autouse=True)
def no_tokens_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    # Every token in these tests starts with the base64 of '{"' or is obvious garbage.
    assert "eyJ" not in caplog.text


def refused(verifier: OidcVerifier, token: str, sqlstate: str = "28P01") -> str:
    with pytest.raises(IdentityError) as info:
        asyncio.run(verifier.verify(token))
    err = info.value
    assert err.sqlstate == sqlstate
    assert token not in err.message or not token
    assert "/" not in err.message.replace("https://", "")  # no local paths
    return err.message


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, object], claims: dict[str, object]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


def good_claims() -> dict[str, object]:
    return {"iss": "phigate-dev", "aud": "phigate", "sub": "agent-7", "exp": T0 + 600}


def test_valid_token(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint("agent-7", ["readers", "analysts"], now=T0)
    identity = asyncio.run(verifier.verify(token))
    # expires_at is when the gateway stops accepting it: exp plus the 30 s clock-skew leeway
    assert identity == Identity(
        "agent-7", ("readers", "analysts"), T0 + 900 + 30, "oidc",
        jti=identity.jti, issuer="phigate-dev",
    )  # fmt: skip
    # What the session record names: the token's id and issuer, never the token.
    assert identity.credential() == {"kind": "token", "jti": identity.jti, "iss": "phigate-dev"}
    assert verifier.verify_cached(token) == identity  # no I/O needed once keys are cached


def test_identity_class_is_stable_across_group_order() -> None:
    a = Identity("a", ("x", "y", "x"), None)
    b = Identity("b", ("y", "x"), 1.0)
    assert a.identity_class == b.identity_class
    assert a.identity_class != Identity("c", ("x", "y,z"), None).identity_class
    assert Identity("d", (), None).identity_class != Identity("e", ("",), None).identity_class


def test_expired_says_how_long_ago(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint("agent-7", [], ttl_seconds=900, now=T0 - 3600)
    assert refused(verifier, token) == "token expired 45m00s ago"


def test_expiry_within_leeway_is_accepted(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint("agent-7", [], ttl_seconds=900, now=T0 - 910)
    assert asyncio.run(verifier.verify(token)).subject == "agent-7"


def test_not_yet_valid(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint("agent-7", [], now=T0 + 600)
    message = refused(verifier, token)
    assert "not valid yet" in message and "10m00s" in message


def test_wrong_issuer(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint("agent-7", [], now=T0, issuer="https://evil.example/")
    message = refused(verifier, token)
    assert "issuer is wrong" in message
    assert "evil" not in message  # claim values from the token are not echoed


def test_wrong_audience(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint("agent-7", [], now=T0, audience="billing")
    message = refused(verifier, token)
    assert "audience is wrong" in message and "'phigate'" in message


def test_audience_list_containing_ours(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint("agent-7", [], now=T0, claims={"aud": ["other", "phigate"]})
    assert asyncio.run(verifier.verify(token)).subject == "agent-7"


def test_alg_none_is_refused(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    token = unsigned({"alg": "none", "typ": "JWT", "kid": issuer.kid}, good_claims()) + "."
    message = refused(verifier, token)
    assert "algorithm 'none' is not allowed" in message


def test_hs256_signed_with_the_public_key_is_refused(
    issuer: DevIssuer, verifier: OidcVerifier
) -> None:
    # The classic confusion attack: the RSA public key (which anyone can fetch) used as the
    # HMAC secret, hoping the verifier feeds its "key" to whatever alg the header names.
    jwk = json.loads(issuer.jwks_path.read_text())["keys"][0]
    public_pem = jwt.PyJWK(jwk).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": issuer.kid}, good_claims())
    sig = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(sig)}"
    message = refused(verifier, token)
    assert "algorithm 'HS256' is not allowed" in message


def test_allowed_alg_that_does_not_fit_the_key_is_refused(
    issuer: DevIssuer, oidc: OidcConfig, clock: Clock
) -> None:
    # ES256 is allowed, but the key with this kid is RSA: it must never verify anything but RS*.
    v = OidcVerifier(replace(oidc, algorithms=("RS256", "ES256")), clock=clock)
    token = unsigned({"alg": "ES256", "kid": issuer.kid}, good_claims()) + "." + b64(b"x" * 64)
    assert "unknown kid" in refused(v, token)


def test_tampered_payload_fails_the_signature(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    header, _, sig = issuer.mint("agent-7", ["readers"], now=T0).split(".")
    claims = {**good_claims(), "groups": ["admins"]}
    forged = f"{header}.{b64(json.dumps(claims).encode())}.{sig}"
    assert refused(verifier, forged) == "token signature is invalid"


@pytest.mark.parametrize(
    "garbage",
    ["not-a-jwt", "a.b.c", "x" * 20000, "eyJhbGciOiJSUzI1NiJ9.e30", "...", "Bearer x.y.z"],
)
def test_garbage_is_malformed(verifier: OidcVerifier, garbage: str) -> None:
    assert "malformed token" in refused(verifier, garbage)


def test_empty_password_is_no_identity(verifier: OidcVerifier) -> None:
    assert "no token presented" in refused(verifier, "", sqlstate="28000")


def test_token_without_exp_is_refused(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint("agent-7", [], now=T0, claims={"exp": None})
    assert "no exp claim" in refused(verifier, token)


def test_token_without_subject_is_no_identity(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint("", [], now=T0)
    assert "subject" in refused(verifier, token, sqlstate="28000")


def test_unknown_kid_then_rotated_jwks_is_accepted_after_refresh(
    issuer: DevIssuer, verifier: OidcVerifier, clock: Clock
) -> None:
    old_token = issuer.mint("agent-7", ["readers"], now=T0)
    issuer.rotate()  # rewrites jwks.json with the new key and the previous one
    new_token = issuer.mint("agent-8", ["readers"], now=T0)

    # The verifier loaded the JWKS at T0; a refresh on unknown kid is rate-limited (30 s).
    assert "unknown kid" in refused(verifier, new_token)
    clock.now += 31
    assert verifier.verify_cached(new_token) is None  # needs a refresh: take the slow path
    assert asyncio.run(verifier.verify(new_token)).subject == "agent-8"
    assert verifier.verify_cached(new_token) is not None  # now cached
    assert asyncio.run(verifier.verify(old_token)).subject == "agent-7"  # old key kept


def test_made_up_kids_do_not_trigger_a_refresh_each(
    issuer: DevIssuer, verifier: OidcVerifier, clock: Clock
) -> None:
    loads = 0
    original = verifier.jwks._refresh

    async def counting() -> None:
        nonlocal loads
        loads += 1
        await original()

    verifier.jwks._refresh = counting  # type: ignore[method-assign]
    clock.now += 60
    for i in range(5):
        token = unsigned({"alg": "RS256", "kid": f"bogus-{i}"}, good_claims()) + ".c2ln"
        assert "unknown kid" in refused(verifier, token)
    assert loads == 1


@pytest.mark.parametrize(
    ("claim_name", "claims", "expected"),
    [
        (
            "realm_access.roles",
            {"realm_access": {"roles": ["nurse", "ehr-read"]}},
            ("nurse", "ehr-read"),
        ),
        ("https://example.com/groups", {"https://example.com/groups": ["a"]}, ("a",)),
        ("groups", {"groups": "solo"}, ("solo",)),
        ("realm_access.roles", {}, ()),
    ],
)
def test_groups_claim_paths(
    issuer: DevIssuer,
    oidc: OidcConfig,
    clock: Clock,
    claim_name: str,
    claims: dict[str, object],
    expected: tuple[str, ...],
) -> None:
    v = OidcVerifier(replace(oidc, groups_claim=claim_name), clock=clock)
    token = issuer.mint("agent-7", [], now=T0, claims={"groups": None, **claims})
    assert asyncio.run(v.verify(token)).groups == expected


def test_groups_claim_of_wrong_shape_is_refused(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint("agent-7", [], now=T0, claims={"groups": {"a": 1}})
    assert "list of group names" in refused(verifier, token, sqlstate="28000")


def test_jwks_from_url_is_cached_and_refreshed_after_ttl(
    issuer: DevIssuer, oidc: OidcConfig, clock: Clock
) -> None:
    fetched: list[str] = []
    down = False

    def fetch(url: str) -> bytes:
        fetched.append(url)
        if down:
            raise OSError("connection refused")
        return issuer.jwks_path.read_bytes()

    url_cfg = replace(oidc, jwks_file=None, jwks_url="https://idp.example/jwks", jwks_cache_ttl=60)
    v = OidcVerifier(url_cfg, clock=clock, fetch=fetch)
    token = issuer.mint("agent-7", [], now=T0, ttl_seconds=3600)
    assert v.verify_cached(token) is None  # nothing loaded yet
    assert asyncio.run(v.verify(token)).subject == "agent-7"
    assert asyncio.run(v.verify(token)).subject == "agent-7"
    assert fetched == ["https://idp.example/jwks"]
    clock.now += 61
    down = True  # the IdP is unreachable: the stale keys keep working
    assert asyncio.run(v.verify(token)).subject == "agent-7"
    assert len(fetched) == 2
    assert asyncio.run(v.verify(token)).subject == "agent-7"
    assert len(fetched) == 2  # and the failed refresh is not retried on every login


def test_unreachable_idp_without_keys_is_no_identity(
    issuer: DevIssuer, oidc: OidcConfig, clock: Clock
) -> None:
    def fetch(url: str) -> bytes:
        raise OSError("connection refused")

    v = OidcVerifier(
        replace(oidc, jwks_file=None, jwks_url="https://idp.example/jwks"), clock=clock, fetch=fetch
    )
    message = refused(v, issuer.mint("agent-7", [], now=T0), sqlstate="28000")
    assert "signing keys" in message


def test_real_clock_default(issuer: DevIssuer, oidc: OidcConfig) -> None:
    v = OidcVerifier(oidc)
    identity = asyncio.run(v.verify(issuer.mint("agent-7", ["g"])))
    assert identity.expires_at is not None and identity.expires_at > time.time()
