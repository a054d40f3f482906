"""A local development token issuer: RSA keys on disk, a JWKS file, and minted short-lived JWTs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from phigate.files import atomic_write

__all__ = ["DevIssuer"]

_KEEP_KEYS = 2  # after rotation the JWKS holds the new key and the one before it
_KIDS = "kids"  # key ids, newest (the signing key) first


class DevIssuer:
    """Mints RS256 tokens for local development; never use it as a production identity provider.

    Layout of ``key_dir`` (mode 0700): ``key-<kid>.pem`` private keys (0600), ``kids`` listing
    the key ids newest first (the first signs), and ``jwks.json`` with the keys a gateway trusts.
    """

    def __init__(self, key_dir: str | os.PathLike[str], issuer: str = "phigate-dev") -> None:
        self.key_dir = Path(key_dir)
        self.issuer = issuer
        self._kid: str | None = None
        self._key: rsa.RSAPrivateKey | None = None

    @property
    def jwks_path(self) -> Path:
        return self.key_dir / "jwks.json"

    @property
    def kid(self) -> str:
        """The key id new tokens are signed with."""
        return self._load()[0]

    def ensure_keys(self) -> None:
        """Create a key pair and jwks.json unless key_dir already holds them."""
        self._load()

    def rotate(self) -> str:
        """Start signing with a new key; the JWKS keeps the previous key so old tokens verify."""
        self._load()
        kid = self._new_key()
        self._write_jwks()
        return kid

    def mint(
        self,
        sub: str,
        groups: Iterable[str],
        ttl_seconds: float = 900,
        audience: str = "phigate",
        issuer: str | None = None,
        *,
        now: float | None = None,
        claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed JWT for ``sub`` with ``groups``; ``claims`` adds or overrides claims."""
        kid, key = self._load()
        iat = int(time.time() if now is None else now)
        payload: dict[str, Any] = {
            "iss": self.issuer if issuer is None else issuer,
            "sub": sub,
            "aud": audience,
            "iat": iat,
            "nbf": iat,
            "exp": iat + int(ttl_seconds),
            "jti": uuid.uuid4().hex,
            "groups": list(groups),
        }
        payload.update(claims or {})
        return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})

    # -- keys on disk ----------------------------------------------------------------------

    def _load(self) -> tuple[str, rsa.RSAPrivateKey]:
        if self._kid is not None and self._key is not None:
            return self._kid, self._key
        self.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        kids = self._kids()
        if kids:
            self._kid, self._key = kids[0], _read_key(self.key_dir / f"key-{kids[0]}.pem")
        else:
            self._new_key()
        if not self.jwks_path.is_file():
            self._write_jwks()
        assert self._kid is not None and self._key is not None
        return self._kid, self._key

    def _new_key(self) -> str:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kid = _thumbprint(key.public_key())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(self.key_dir / f"key-{kid}.pem", pem)
        kids = [kid, *self._kids()]
        atomic_write(
            self.key_dir / _KIDS, "".join(k + "\n" for k in kids[:_KEEP_KEYS]).encode(), 0o600
        )
        self._kid, self._key = kid, key
        # Keys older than the previous one are retired: tokens they signed have long expired.
        for old in kids[_KEEP_KEYS:]:
            (self.key_dir / f"key-{old}.pem").unlink(missing_ok=True)
        return kid

    def _kids(self) -> list[str]:
        path = self.key_dir / _KIDS
        lines = path.read_text().split() if path.is_file() else []
        return [k for k in lines if (self.key_dir / f"key-{k}.pem").is_file()]

    def _write_jwks(self) -> None:
        keys = []
        for kid in self._kids():
            public = _read_key(self.key_dir / f"key-{kid}.pem").public_key()
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
            jwk.update({"kid": _thumbprint(public), "use": "sig", "alg": "RS256"})
            keys.append(jwk)
        body = json.dumps({"keys": keys}, indent=2).encode() + b"\n"
        atomic_write(self.jwks_path, body, 0o644)


def _read_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} is not an RSA private key")
    return key


def _thumbprint(public: rsa.RSAPublicKey) -> str:
    """RFC 7638 JWK thumbprint: a kid that is stable and derived from the key itself."""
    numbers = public.public_numbers()

    def b64(n: int) -> str:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    canonical = json.dumps(
        {"e": b64(numbers.e), "kty": "RSA", "n": b64(numbers.n)}, separators=(",", ":")
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _write_private(path: Path, data: bytes) -> None:
    # O_EXCL with mode 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
