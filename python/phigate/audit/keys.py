"""Audit trail keys: Ed25519 signer/verifier keys in the C2SP signed-note text form, and the
audit HMAC key that keys every hash a record holds in place of a value."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from phigate.errors import PhigateError

__all__ = [
    "HMAC_KEY_BYTES",
    "AuditKeyError",
    "SignerKey",
    "VerifierKey",
    "generate_hmac_key",
    "generate_signer",
    "parse_hmac_key",
    "parse_signer",
    "parse_verifier",
    "resolve_credential",
    "write_keys",
]

ALG_ED25519 = 0x01  # the signed-note algorithm byte for Ed25519
HMAC_KEY_BYTES = 32
_PRIVATE_PREFIX = "PRIVATE+KEY+"


class AuditKeyError(PhigateError):
    """A key file that is not a key of the expected kind; the message says what to do."""


def key_hash(name: str, public: bytes) -> int:
    """The 32-bit key hash signatures carry: SHA-256(name ‖ "\\n" ‖ 0x01 ‖ public key)[:4]."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public).digest()
    return int.from_bytes(digest[:4], "big")


def _check_name(name: str) -> None:
    # signed-note names: non-empty, no spaces or '+', printable (they sit in the signature line).
    if not name or "+" in name or any(c.isspace() or not c.isprintable() for c in name):
        raise AuditKeyError(f"{name!r} cannot name a key: use printable text without spaces or '+'")


@dataclass(frozen=True)
class VerifierKey:
    """A public key as `<name>+<hash hex>+<base64(0x01 ‖ key)>`."""

    name: str
    hash: int
    public: bytes

    @property
    def text(self) -> str:
        blob = base64.b64encode(bytes([ALG_ED25519]) + self.public).decode()
        return f"{self.name}+{self.hash:08x}+{blob}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except Exception:  # noqa: BLE001 - InvalidSignature or a malformed signature: not valid
            return False
        return True


@dataclass(frozen=True)
class SignerKey:
    """A private key as `PRIVATE+KEY+<name>+<hash hex>+<base64(0x01 ‖ seed)>`."""

    name: str
    seed: bytes

    @property
    def verifier(self) -> VerifierKey:
        public = Ed25519PrivateKey.from_private_bytes(self.seed).public_key().public_bytes_raw()
        return VerifierKey(self.name, key_hash(self.name, public), public)

    @property
    def text(self) -> str:
        blob = base64.b64encode(bytes([ALG_ED25519]) + self.seed).decode()
        return f"{_PRIVATE_PREFIX}{self.name}+{self.verifier.hash:08x}+{blob}"

    def sign(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.seed).sign(message)

    def __repr__(self) -> str:  # never print the seed
        return f"SignerKey(name={self.name!r}, hash={self.verifier.hash:08x})"


def generate_signer(name: str) -> SignerKey:
    _check_name(name)
    return SignerKey(name, secrets.token_bytes(32))


def _split(text: str, what: str) -> tuple[str, int, bytes]:
    parts = text.strip().split("+", 2)  # the base64 part may itself hold "+"
    if len(parts) != 3:
        raise AuditKeyError(
            f"not a {what} (expected NAME+HASH+KEY as `phigate audit keygen` writes)"
        )
    name, hash_hex, blob = parts
    try:
        h = int(hash_hex, 16) if len(hash_hex) == 8 else -1
        raw = base64.b64decode(blob, validate=True)
    except (ValueError, binascii.Error):
        h, raw = -1, b""
    if h < 0 or len(raw) != 33 or raw[0] != ALG_ED25519:
        raise AuditKeyError(f"not a {what}: its hash or Ed25519 key part is malformed")
    _check_name(name)
    return name, h, raw[1:]


def parse_signer(text: str) -> SignerKey:
    """The signer key in ``text``; the embedded hash must match (a truncated copy fails)."""
    if not text.strip().startswith(_PRIVATE_PREFIX):
        raise AuditKeyError(
            "not an audit signing key (it must start with PRIVATE+KEY+; create one with "
            "`phigate audit keygen`)"
        )
    name, h, seed = _split(text.strip()[len(_PRIVATE_PREFIX) :], "signing key")
    key = SignerKey(name, seed)
    if key.verifier.hash != h:
        raise AuditKeyError("the signing key's hash does not match its key: the file is damaged")
    return key


def parse_verifier(text: str) -> VerifierKey:
    """The verifier (public) key in ``text``; its hash must match its name and key."""
    if text.strip().startswith(_PRIVATE_PREFIX):
        raise AuditKeyError("this is a private signing key; pass the public key (audit.pub)")
    name, h, public = _split(text, "public audit key")
    if key_hash(name, public) != h:
        raise AuditKeyError("the public key's hash does not match its name and key")
    return VerifierKey(name, h, public)


def generate_hmac_key() -> bytes:
    return secrets.token_bytes(HMAC_KEY_BYTES)


def parse_hmac_key(text: str) -> bytes:
    """The 32-byte audit HMAC key from its base64 text."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != HMAC_KEY_BYTES:
        raise AuditKeyError(
            f"not an audit HMAC key (expected {HMAC_KEY_BYTES} bytes in base64, as "
            "`phigate audit keygen` writes)"
        )
    return raw


def resolve_credential(value: str, base_dir: Path) -> Path:
    """A key location: ``credential:NAME`` is the systemd credential NAME
    ($CREDENTIALS_DIRECTORY/NAME, from LoadCredential=), anything else a path (relative to
    ``base_dir``)."""
    if value.startswith("credential:"):
        name = value[len("credential:") :]
        if not name or "/" in name or name in (".", ".."):
            raise AuditKeyError(f"{value!r}: credential names are plain file names")
        cdir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not cdir:
            raise AuditKeyError(
                f"{value!r}: CREDENTIALS_DIRECTORY is not set (run under systemd with "
                f"LoadCredential={name}:/path/to/key, or give a file path)"
            )
        return Path(cdir) / name
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def write_keys(out_dir: Path, name: str) -> tuple[Path, Path, Path]:
    """Write audit.key (0600), audit.pub (0644) and audit-hmac.key (0600) into ``out_dir``;
    refuses to replace any existing file (a lost key cannot verify old checkpoints)."""
    signer = generate_signer(name)
    files = (
        (out_dir / "audit.key", signer.text + "\n", 0o600),
        (out_dir / "audit.pub", signer.verifier.text + "\n", 0o644),
        (out_dir / "audit-hmac.key", base64.b64encode(generate_hmac_key()).decode() + "\n", 0o600),
    )
    for path, _, _ in files:
        if path.exists():
            raise AuditKeyError(f"{path} exists; move it away first (keys are never overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, text, mode in files:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, mode)
    return files[0][0], files[1][0], files[2][0]
