"""Verify OIDC access tokens (JWTs) against a cached JWKS and turn them into session identities."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.exceptions import InvalidSignatureError, PyJWTError

from phigate.config import OidcConfig
from phigate.errors import IdentityError

__all__ = ["Identity", "OidcVerifier", "JwksCache", "NoOidcVerifier"]

log = logging.getLogger(__name__)

_MAX_TOKEN_BYTES = 16 * 1024  # real access tokens are a few kB; anything larger is an attack
_MAX_JWKS_BYTES = 1024 * 1024
_FETCH_TIMEOUT = 10.0
_SAFE_ALG = re.compile(r"[A-Za-z0-9]{1,16}")
# Which token algorithms a key type can verify. An RSA key never verifies HS256 or none: the
# classic algorithm-confusion attack signs HS256 with the public RSA key as the HMAC secret.
_EC_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
_MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class Identity:
    """Who a session belongs to; ``identity_class`` keys the decision cache."""

    subject: str
    groups: tuple[str, ...]
    expires_at: float | None  # unix seconds after which the credential is refused (None: never)
    source: str = "oidc"  # "oidc" or "apikey"
    # What the audit record names of the credential: a token's jti and issuer, an API key's id
    # and name (never the token or key).
    jti: str | None = None
    issuer: str | None = None
    key_id: str | None = None
    key_name: str | None = None

    def credential(self) -> dict[str, str | None]:
        """The credential as the session_start record names it."""
        if self.source == "apikey":
            return {"kind": "api_key", "key_id": self.key_id, "name": self.key_name}
        return {"kind": "token", "jti": self.jti, "iss": self.issuer}

    @property
    def identity_class(self) -> str:
        # Decisions depend only on the set of groups (they map to roles), so identities with the
        # same groups share cached decisions. Canonical JSON cannot collide for different sets,
        # whatever characters group names contain.
        return json.dumps(sorted(set(self.groups)), separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class _Key:
    kid: str | None
    algorithms: frozenset[str]
    key: Any  # a cryptography public key object


class JwksCache:
    """The issuer's signing keys, from a file or URL, with TTL and rate-limited refresh."""

    def __init__(
        self,
        oidc: OidcConfig,
        *,
        clock: Callable[[], float] = time.time,
        fetch: Callable[[str], bytes] | None = None,
    ) -> None:
        self._oidc = oidc
        self._clock = clock
        self._fetch = fetch or _fetch_url
        self._keys: list[_Key] | None = None
        self._loaded_at = -math.inf
        self._last_attempt = -math.inf
        self._inflight: asyncio.Task[None] | None = None

    @property
    def loaded(self) -> bool:
        return self._keys is not None

    def fresh(self) -> bool:
        return (
            self._keys is not None and self._clock() - self._loaded_at < self._oidc.jwks_cache_ttl
        )

    def may_refresh(self) -> bool:
        """Unknown kids trigger a refresh at most once per jwks_min_refresh_interval.

        True also while a refresh is running, so that concurrent callers wait for it.
        """
        if self._inflight is not None and not self._inflight.done():
            return True
        return self._clock() - self._last_attempt >= self._oidc.jwks_min_refresh_interval

    def candidates(self, kid: str | None, alg: str) -> list[_Key]:
        """Cached keys that may verify a token with this kid and alg (empty if none)."""
        keys = self._keys or []
        if kid is not None:
            return [k for k in keys if k.kid == kid and alg in k.algorithms]
        # No kid in the token: only unambiguous when exactly one key fits the algorithm.
        fitting = [k for k in keys if alg in k.algorithms]
        return fitting if len(fitting) == 1 else []

    async def refresh(self) -> None:
        """Reload the key set; concurrent callers share one load. Old keys survive a failure."""
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(self._refresh())
            self._inflight = task
        await asyncio.shield(task)

    async def _refresh(self) -> None:
        self._last_attempt = self._clock()
        oidc = self._oidc
        try:
            if oidc.jwks_file is not None:
                raw = oidc.jwks_file.read_bytes()  # a local file: cheap enough for the loop
            else:
                assert oidc.jwks_url is not None
                raw = await asyncio.to_thread(self._fetch, oidc.jwks_url)
            keys = _parse_jwks(raw, set(oidc.algorithms))
        except Exception as exc:  # noqa: BLE001  # any failure keeps the previous keys
            where = str(oidc.jwks_file or oidc.jwks_url)
            log.warning("could not load JWKS from %s: %s", where, _describe(exc))
            return
        self._keys = keys
        self._loaded_at = self._clock()
        log.info("loaded %d signing key(s) for issuer %s", len(keys), oidc.issuer)


class OidcVerifier:
    """Verifies access tokens for one issuer/audience; errors carry a client-safe message."""

    def __init__(
        self,
        oidc: OidcConfig,
        *,
        clock: Callable[[], float] = time.time,
        fetch: Callable[[str], bytes] | None = None,
    ) -> None:
        self.config = oidc
        self._clock = clock
        self.jwks = JwksCache(oidc, clock=clock, fetch=fetch)

    async def prime(self) -> bool:
        """Load the key set now (at startup or reload); False if no keys could be loaded."""
        await self.jwks.refresh()
        return self.jwks.loaded

    def verify_cached(self, token: str) -> Identity | None:
        """Verify without I/O; None means the keys must be (re)loaded first: call verify()."""
        kid, alg = self._header(token)
        if not self.jwks.loaded:
            return None
        keys = self.jwks.candidates(kid, alg)
        if (not keys or not self.jwks.fresh()) and self.jwks.may_refresh():
            return None
        if not keys:
            raise _unknown_key()
        return self._check(token, alg, keys)

    async def verify(self, token: str) -> Identity:
        """Verify a token, (re)loading the key set when it is stale or lacks the token's kid."""
        kid, alg = self._header(token)
        stale = not self.jwks.fresh() or not self.jwks.candidates(kid, alg)
        # Rate-limited: a flood of tokens with made-up kids must not hammer the IdP, and an
        # unreachable IdP must not stall every login; stale keys keep working meanwhile.
        if stale and self.jwks.may_refresh():
            await self.jwks.refresh()
        if not self.jwks.loaded:
            raise IdentityError(
                "28000",
                "the gateway cannot load the identity provider's signing keys; try later",
                "jwks_unavailable",
            )
        keys = self.jwks.candidates(kid, alg)
        if not keys:
            raise _unknown_key()
        return self._check(token, alg, keys)

    # -- steps -------------------------------------------------------------------------------

    def _header(self, token: str) -> tuple[str | None, str]:
        """Structural checks and the algorithm allow-list, before any key is looked at."""
        if not token:
            raise IdentityError(
                "28000",
                "no token presented: send an OIDC access token as the password",
                "malformed",
            )
        if len(token) > _MAX_TOKEN_BYTES or token.count(".") != 2:
            raise _malformed()
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise _malformed() from None
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
            raise _malformed()
        if alg not in self.config.algorithms:
            shown = f" {alg!r}" if _SAFE_ALG.fullmatch(alg) else ""
            allowed = ", ".join(self.config.algorithms)
            raise IdentityError(
                "28P01",
                f"token algorithm{shown} is not allowed (allowed: {allowed})",
                "unsupported_algorithm",
            )
        return kid, alg

    def _check(self, token: str, alg: str, keys: list[_Key]) -> Identity:
        claims: dict[str, Any] | None = None
        for key in keys:
            try:
                # Signature only; claims are checked below with our clock and clear messages.
                raw = jwt.PyJWS().decode_complete(token, key=key.key, algorithms=[alg])
            except InvalidSignatureError:
                continue
            except PyJWTError:
                raise _malformed() from None
            try:
                claims = json.loads(raw["payload"])
            except ValueError:
                raise _malformed() from None
            break
        if claims is None:
            raise IdentityError("28P01", "token signature is invalid", "bad_signature")
        if not isinstance(claims, dict):
            raise _malformed()
        return self._claims(claims)

    def _claims(self, claims: Mapping[str, Any]) -> Identity:
        oidc, now, leeway = self.config, self._clock(), self.config.leeway
        if claims.get("iss") != oidc.issuer:
            raise IdentityError(
                "28P01",
                f"token issuer is wrong: this gateway accepts tokens from {oidc.issuer}",
                "wrong_issuer",
            )
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if oidc.audience not in auds:
            raise IdentityError(
                "28P01",
                f"token audience is wrong: it must include {oidc.audience!r}",
                "wrong_audience",
            )
        exp = _number(claims, "exp", required=True)
        if exp is not None and now > exp + leeway:
            raise IdentityError("28P01", f"token expired {_duration(now - exp)} ago", "expired")
        nbf = _number(claims, "nbf", required=False)
        if nbf is not None and now + leeway < nbf:
            raise IdentityError(
                "28P01",
                f"token is not valid yet (valid in {_duration(nbf - now)}); check the clocks",
                "not_yet_valid",
            )
        iat = _number(claims, "iat", required=False)
        if iat is not None and now + leeway < iat:
            raise IdentityError(
                "28P01",
                f"token was issued {_duration(iat - now)} in the future; check the clocks",
                "not_yet_valid",
            )
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 255:
            raise IdentityError("28000", "token has no usable subject (sub claim)", "missing_claim")
        # The moment this gateway stops accepting the token: exp plus the clock-skew leeway, so
        # a session is never closed for expiry while a new login with the same token would
        # still succeed (a token accepted within the leeway must survive its first statement).
        expires_at = exp + leeway if exp is not None else None
        jti = claims.get("jti")
        return Identity(
            subject=sub,
            groups=self._groups(claims),
            expires_at=expires_at,
            jti=jti if isinstance(jti, str) and len(jti) <= 255 else None,
            issuer=oidc.issuer,
        )

    def _groups(self, claims: Mapping[str, Any]) -> tuple[str, ...]:
        name = self.config.groups_claim
        # A claim whose own name contains dots (e.g. "https://example.com/groups") wins over
        # the dotted-path reading of it.
        value: Any = claims.get(name)
        if name not in claims:
            value = claims
            for part in name.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(g, str) for g in value):
            return tuple(value)
        raise IdentityError(
            "28000", f"token claim {name!r} must be a list of group names", "malformed"
        )


class NoOidcVerifier:
    """Stands in for OidcVerifier on a gateway configured for API keys only."""

    async def prime(self) -> bool:
        return True

    def verify_cached(self, token: str) -> Identity | None:
        raise _no_oidc()

    async def verify(self, token: str) -> Identity:
        raise _no_oidc()


def _no_oidc() -> IdentityError:
    return IdentityError(
        "28P01",
        "this gateway accepts API keys only: send your phk_... key as the password",
        "not_enabled",
    )


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise IdentityError(
                "28P01", f"token has no {name} claim; tokens must expire", "missing_claim"
            )
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise IdentityError("28P01", f"token claim {name} is not a number", "malformed")
    return float(value)


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _malformed() -> IdentityError:
    return IdentityError(
        "28P01", "malformed token: the password must be a JWT access token", "malformed"
    )


def _unknown_key() -> IdentityError:
    return IdentityError(
        "28P01",
        "token is signed with a key the identity provider does not publish (unknown kid)",
        "unknown_key",
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _fetch_url(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=_FETCH_TIMEOUT) as resp:  # noqa: S310
        data: bytes = resp.read(_MAX_JWKS_BYTES + 1)
    if len(data) > _MAX_JWKS_BYTES:
        raise ValueError("JWKS document is larger than 1 MiB")
    return data


def _parse_jwks(raw: bytes, allowed: set[str]) -> list[_Key]:
    doc = json.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('not a JWKS document (no "keys" list)')
    keys: list[_Key] = []
    for jwk in doc["keys"]:
        key = _parse_jwk(jwk, allowed)
        if key is not None:
            keys.append(key)
    if not keys:
        raise ValueError("the JWKS holds no usable signing key for the allowed algorithms")
    return keys


def _parse_jwk(jwk: Any, allowed: set[str]) -> _Key | None:
    """One JWK, or None if it is not a usable signature key (logged, never fatal for the rest)."""
    if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
        return None
    kty, kid = jwk.get("kty"), jwk.get("kid")
    if kty == "RSA":
        algs = set(_RSA_ALGS)
    elif kty == "EC" and jwk.get("crv") in _EC_CURVES:
        algs = {_EC_CURVES[jwk["crv"]]}
    elif kty == "OKP" and jwk.get("crv") in _OKP_CURVES:
        algs = {"EdDSA"}
    else:
        return None  # "oct" (shared secrets) and unknown types never verify agent tokens
    if isinstance(jwk.get("alg"), str):
        algs &= {jwk["alg"]}  # a key that names its algorithm verifies only that one
    algs &= allowed
    if not algs or (kid is not None and not isinstance(kid, str)):
        return None
    try:
        key = jwt.PyJWK(jwk, algorithm=sorted(algs)[0]).key
    except PyJWTError as exc:
        log.warning("skipping JWKS key %r: %s", kid, _describe(exc))
        return None
    if kty == "RSA" and key.key_size < _MIN_RSA_BITS:
        log.warning("skipping JWKS key %r: RSA key shorter than %d bits", kid, _MIN_RSA_BITS)
        return None
    return _Key(kid=kid, algorithms=frozenset(algs), key=key)
