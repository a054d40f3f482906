"""Static API keys for simple deployments: create, list, revoke, and verify them at login.

A key looks like ``phk_<id>_<secret>``: ``id`` is 12 hex digits that name the key (it appears in
``phigate apikey list`` and in refusal messages; it is not secret), ``secret`` is 32 bytes from
:mod:`secrets` in lowercase base32 (52 characters, double-click selectable). The key is shown once,
when it is created; the store keeps only a per-key salt and a MAC of the secret, plus the name,
groups, created/expiry times, the revoked flag and when the key was last used.

The store is one JSON file (mode 0600) written atomically (temp file + fsync + rename) under an
advisory lock (``<store>.lock``), so the CLI and a running gateway can both update it: the CLI to
create and revoke keys, the gateway to record ``last_used`` (at most once a minute per key). The
gateway re-reads the file when it changes (checked at most once a second), so a revoke applies to
the next connection without a restart.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from phigate.errors import IdentityError, PhigateError
from phigate.identity.oidc import Identity, _duration

__all__ = [
    "KEY_PREFIX",
    "ApiKey",
    "ApiKeyStore",
    "ApiKeyVerifier",
    "StoreError",
    "DEFAULT_STORE",
    "looks_like_api_key",
]

log = logging.getLogger(__name__)

KEY_PREFIX = "phk_"
DEFAULT_STORE = Path("phigate-apikeys.json")
STORE_VERSION = 1
KDF = "hmac-sha256"

_ID_BYTES = 6  # 12 hex digits: 2^48 ids, collisions are checked at creation anyway
_SECRET_BYTES = 32  # 256 bits
_SALT_BYTES = 16
_SECRET_CHARS = 52  # base32 of 32 bytes, without padding
_KEY_RE = re.compile(r"phk_([0-9a-f]{12})_([a-z2-7]{52})")
_ID_RE = re.compile(r"[0-9a-f]{12}")
# Names become the session's subject (events, policy messages): keep them printable and short.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,62}")
_GROUP_RE = re.compile(r"[^\x00-\x1f\x7f,]{1,255}")
_MAX_GROUPS = 64
_MAX_TTL = 10 * 366 * 86400
_MAX_STORE_BYTES = 16 * 1024 * 1024
_LOCK_TIMEOUT = 10.0

RELOAD_INTERVAL = 1.0  # s between checks of the store file's identity (inode, mtime, size)
LAST_USED_INTERVAL = 60.0  # s: a key's last_used on disk is at most this stale
_FLUSH_RETRY = 60.0  # s between attempts when the store cannot be written


class StoreError(PhigateError):
    """The store file cannot be read, parsed, locked or written (message names the file)."""


@dataclass(frozen=True)
class ApiKey:
    """One stored key. ``salt`` and ``digest`` are the only trace of the secret."""

    id: str
    name: str
    groups: tuple[str, ...]
    salt: bytes
    digest: bytes
    created: int  # unix seconds
    expires: int
    revoked: bool = False
    revoked_at: int | None = None
    last_used: int | None = None

    def state(self, now: float) -> str:
        if self.revoked:
            return "revoked"
        return "expired" if now >= self.expires else "active"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "groups": list(self.groups),
            "kdf": KDF,
            "salt": self.salt.hex(),
            "hash": self.digest.hex(),
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
            "revoked_at": self.revoked_at,
            "last_used": self.last_used,
        }


def looks_like_api_key(password: str) -> bool:
    """True when a password is meant as an API key (it is then never tried as an OIDC token)."""
    return password.startswith(KEY_PREFIX)


def hash_secret(salt: bytes, key_id: str, secret: str) -> bytes:
    """The stored form of a key's secret.

    Why HMAC-SHA256 and not a slow password hash (scrypt, argon2): slow KDFs exist to make
    guessing *low-entropy* human passwords expensive after a store leaks. These secrets are 256
    uniformly random bits from the OS CSPRNG; a brute force needs ~2^255 MAC evaluations whatever
    the cost of one, so a slow KDF would add no security, only latency to every connection (the
    gateway authenticates each one; scrypt at safe parameters costs tens of ms and MBs per login,
    and invites a CPU-exhaustion attack with made-up keys). The per-key random salt (the HMAC key)
    still means equal secrets never give equal hashes and nothing can be precomputed; binding the
    key id into the message ties each hash to its record, so records cannot be swapped.
    """
    return hmac.new(salt, f"{key_id}:{secret}".encode("ascii"), hashlib.sha256).digest()


def _new_secret() -> str:
    return base64.b32encode(secrets.token_bytes(_SECRET_BYTES)).decode("ascii").rstrip("=").lower()


# --- the file --------------------------------------------------------------------------------


def _parse_store(raw: bytes, path: Path) -> dict[str, ApiKey]:
    def bad(why: str) -> StoreError:
        return StoreError(f"API key store {path}: {why}")

    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("version") != STORE_VERSION:
        raise bad(f'not a phigate API key store (expected {{"version": {STORE_VERSION}, ...}})')
    items = doc.get("keys")
    if not isinstance(items, list):
        raise bad('"keys" must be a list')
    keys: dict[str, ApiKey] = {}
    for n, item in enumerate(items):
        try:
            key = _parse_key(item)
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"key #{n + 1} is malformed ({exc})") from None
        if key.id in keys:
            raise bad(f"key id {key.id} appears twice")
        keys[key.id] = key
    return keys


def _parse_key(item: Any) -> ApiKey:
    if not isinstance(item, dict):
        raise TypeError("not an object")

    def integer(name: str, *, optional: bool = False) -> int | None:
        value = item.get(name)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer")
        return value

    key_id, name, groups = item["id"], item["name"], item["groups"]
    if not isinstance(key_id, str) or not _ID_RE.fullmatch(key_id):
        raise ValueError("id must be 12 hex digits")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError("bad name")
    if not isinstance(groups, list) or not all(
        isinstance(g, str) and _GROUP_RE.fullmatch(g) for g in groups
    ):
        raise ValueError("groups must be a list of group names")
    if item.get("kdf") != KDF:
        raise ValueError(f"kdf must be {KDF!r}")
    salt, digest = bytes.fromhex(item["salt"]), bytes.fromhex(item["hash"])
    if len(salt) < _SALT_BYTES or len(digest) != hashlib.sha256().digest_size:
        raise ValueError("salt or hash has the wrong length")
    revoked = item.get("revoked", False)
    if not isinstance(revoked, bool):
        raise TypeError("revoked must be true or false")
    created, expires = integer("created"), integer("expires")
    assert created is not None and expires is not None
    return ApiKey(
        id=key_id,
        name=name,
        groups=tuple(groups),
        salt=salt,
        digest=digest,
        created=created,
        expires=expires,
        revoked=revoked,
        revoked_at=integer("revoked_at", optional=True),
        last_used=integer("last_used", optional=True),
    )


def read_store(path: Path) -> dict[str, ApiKey]:
    """The keys in the store; a missing file is an empty store."""
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_STORE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StoreError(f"cannot read API key store {path}: {exc.strerror}") from None
    if len(raw) > _MAX_STORE_BYTES:
        raise StoreError(f"API key store {path} is larger than {_MAX_STORE_BYTES} bytes")
    return _parse_store(raw, path)


def write_store(path: Path, keys: Mapping[str, ApiKey]) -> None:
    """Replace the store atomically: a reader sees the old file or the new one, never a mix.

    The new file is mode 0600; when root rewrites a store another user owns (the gateway's
    service user), ownership is kept so the gateway can still read it.
    """
    doc = {"version": STORE_VERSION, "keys": [k.to_json() for k in keys.values()]}
    data = (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    directory = path.parent if str(path.parent) else Path(".")
    try:
        owner = path.stat()
    except FileNotFoundError:
        owner = None
    except OSError as exc:
        raise StoreError(f"cannot write API key store {path}: {exc.strerror}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise StoreError(f"cannot write API key store {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # mkstemp already uses 0600; be explicit
            if owner is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StoreError(f"cannot write API key store {path}: {exc.strerror}") from None
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def _locked(path: Path, *, wait: bool) -> Iterator[bool]:
    """Hold ``<store>.lock`` exclusively. With wait=False, yields False instead of waiting."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot lock API key store {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise StoreError(f"cannot lock API key store {path}: {exc.strerror}") from None
                if not wait:
                    yield False
                    return
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"API key store {path} is locked by another process (waited "
                        f"{_LOCK_TIMEOUT:g}s)"
                    ) from None
                time.sleep(0.02)
        yield True
    finally:
        os.close(fd)  # releases the lock


# --- administration (the CLI) ----------------------------------------------------------------


class ApiKeyStore:
    """Create, list and revoke keys in one store file (used by `phigate apikey`)."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self._clock = clock

    def list(self) -> list[ApiKey]:
        return list(read_store(self.path).values())  # creation order

    def create(self, name: str, groups: Sequence[str], ttl_seconds: float) -> tuple[ApiKey, str]:
        """Store a new key and return it with the full key text (the only time it exists)."""
        if not _NAME_RE.fullmatch(name):
            raise StoreError(
                f"API key name {name!r} is not allowed: use 1-63 of A-Z a-z 0-9 _ . @ + - "
                "(starting with a letter or digit)"
            )
        groups = tuple(dict.fromkeys(groups))  # de-duplicated, order kept
        if not groups:
            raise StoreError("an API key needs at least one group (groups map to roles)")
        if len(groups) > _MAX_GROUPS:
            raise StoreError(f"an API key can have at most {_MAX_GROUPS} groups")
        for g in groups:
            if not _GROUP_RE.fullmatch(g):
                raise StoreError(f"group name {g!r} is not allowed (1-255 characters, no commas)")
        if not 0 < ttl_seconds <= _MAX_TTL:
            raise StoreError("an API key's expiry must be in the future and at most 10 years away")
        if not self.path.parent.is_dir():
            raise StoreError(f"directory {self.path.parent} of the API key store does not exist")
        with _locked(self.path, wait=True):
            keys = read_store(self.path)
            key_id = secrets.token_hex(_ID_BYTES)
            while key_id in keys:
                key_id = secrets.token_hex(_ID_BYTES)
            secret = _new_secret()
            salt = secrets.token_bytes(_SALT_BYTES)
            now = int(self._clock())
            record = ApiKey(
                id=key_id,
                name=name,
                groups=groups,
                salt=salt,
                digest=hash_secret(salt, key_id, secret),
                created=now,
                expires=now + max(1, round(ttl_seconds)),
            )
            keys[key_id] = record
            write_store(self.path, keys)
        return record, f"{KEY_PREFIX}{key_id}_{secret}"

    def revoke(self, ref: str) -> tuple[ApiKey, bool]:
        """Revoke by id (or full key, or name if exactly one unrevoked key has it).

        Returns the key and whether this call revoked it (False: it already was).
        """
        m = _KEY_RE.fullmatch(ref)
        if m is not None:
            ref = m.group(1)  # someone pasted the whole key: revoking it is the right thing
        with _locked(self.path, wait=True):
            keys = read_store(self.path)
            key = keys.get(ref)
            if key is None:
                named = [k for k in keys.values() if k.name == ref]
                live = [k for k in named if not k.revoked]
                if len(live) > 1:
                    ids = ", ".join(k.id for k in live)
                    raise StoreError(
                        f"{len(live)} unrevoked keys are named {ref!r} ({ids}); revoke by id"
                    )
                if not live and not named:
                    raise StoreError(f"no API key with id or name {ref!r} in {self.path}")
                key = live[0] if live else named[-1]
            if key.revoked:
                return key, False
            key = replace(key, revoked=True, revoked_at=int(self._clock()))
            keys[key.id] = key
            write_store(self.path, keys)
        return key, True


# --- verification (the gateway) --------------------------------------------------------------


class ApiKeyVerifier:
    """Turns an API key presented as a password into an Identity, or a client-safe refusal.

    ``verify`` runs on the control loop and does no blocking I/O beyond a ``stat`` of the store
    at most once per ``reload_interval`` (and a re-read of a small file when it changed).
    Recording last use is deferred: ``flush_due()`` says when ``flush()`` (blocking: lock,
    re-read, merge, write) should be run in a worker thread.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        reload_interval: float = RELOAD_INTERVAL,
        last_used_interval: float = LAST_USED_INTERVAL,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._monotonic = monotonic
        self._reload_interval = reload_interval
        self._last_used_interval = last_used_interval
        self._lock = threading.Lock()  # guards the fields below against the flush thread
        self._keys: dict[str, ApiKey] = {}
        self._broken: str | None = None  # why the store could not be loaded (fail closed)
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = -float("inf")
        self._used: dict[str, int] = {}  # key id -> last successful use seen by this process
        self._flushing = False
        self._next_flush_at = -float("inf")
        self._warned_mode = False
        # What the audit records last said of each key: (revoked, expired); None until the
        # first look (keys already there at start are not news).
        self._seen: dict[str, tuple[bool, bool]] | None = None
        self.reload(force=True)

    def changes(self) -> list[dict[str, Any]]:
        """Audit records of what changed in the store since the last call (it is re-read at
        most once per reload interval): keys created, revoked, removed or past their expiry.
        Ids and names only, never secrets."""
        self._maybe_reload()
        now = self._clock()
        with self._lock:
            keys = dict(self._keys)
        seen = self._seen
        self._seen = {k.id: (k.revoked, now >= k.expires) for k in keys.values()}
        if seen is None:
            return []
        out: list[dict[str, Any]] = []

        def record(action: str, key_id: str, name: str | None) -> None:
            out.append({"event": "apikey", "action": action, "key_id": key_id, "name": name})

        for k in keys.values():
            revoked, expired = self._seen[k.id]
            before = seen.get(k.id)
            if before is None:
                record("created", k.id, k.name)
                before = (False, False)
            if revoked and not before[0]:
                record("revoked", k.id, k.name)
            if expired and not before[1] and not revoked:
                record("expired", k.id, k.name)
        for key_id in sorted(seen.keys() - keys.keys()):
            record("removed", key_id, None)
        return out

    # -- loading ------------------------------------------------------------------------------

    def reload(self, *, force: bool = False) -> None:
        """Re-read the store if it changed (or always, with force)."""
        self._checked_at = self._monotonic()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            sig = None
        except OSError as exc:
            self._set_broken(f"cannot stat API key store {self.path}: {exc.strerror}")
            return
        else:
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            if st.st_mode & 0o077 and not self._warned_mode:
                self._warned_mode = True
                log.warning(
                    "API key store %s is readable by other users (mode %o); it should be 0600",
                    self.path,
                    st.st_mode & 0o777,
                )
        if not force and sig == self._signature and self._broken is None:
            return
        try:
            keys = read_store(self.path)
        except StoreError as exc:
            self._set_broken(str(exc))
            return
        with self._lock:
            self._keys = keys
            self._signature = sig
            self._broken = None
        if sig is None:
            log.info("API key store %s does not exist yet: no API key is valid", self.path)
        else:
            log.info("loaded %d API key(s) from %s", len(keys), self.path)

    def _set_broken(self, why: str) -> None:
        with self._lock:
            was = self._broken
            self._broken = why
            self._signature = None
        if was != why:
            log.error("%s; refusing every API key until it is fixed", why)

    def _maybe_reload(self) -> None:
        if self._monotonic() - self._checked_at >= self._reload_interval:
            self.reload()

    # -- verifying ----------------------------------------------------------------------------

    def verify(self, password: str) -> Identity:
        m = _KEY_RE.fullmatch(password)
        if m is None:
            raise IdentityError(
                "28P01",
                "malformed API key: expected phk_<12 hex digits>_<52 base32 characters>",
                "malformed",
            )
        key_id, secret = m.group(1), m.group(2)
        # The id is the public half of the key: the audit record may name it.
        presented: dict[str, str | None] = {"kind": "api_key", "key_id": key_id}
        self._maybe_reload()
        if self._broken is not None:
            raise IdentityError(
                "28000",
                "the gateway cannot read its API key store; tell the gateway operator",
                "internal_error",
                presented,
            )
        key = self._keys.get(key_id)
        # Unknown ids cost the same MAC + comparison as known ones, so timing does not tell
        # which ids exist; the comparison of digests is constant-time.
        salt, digest = (key.salt, key.digest) if key is not None else (_DUMMY_SALT, _DUMMY_DIGEST)
        ok = hmac.compare_digest(hash_secret(salt, key_id, secret), digest)
        if key is None or not ok:
            raise IdentityError(
                "28P01",
                "API key is not recognized (unknown key, or its secret is wrong)",
                "unknown_key" if key is None else "bad_signature",
                presented,
            )
        # Only a caller holding the real secret learns a key's state.
        now = self._clock()
        if key.revoked:
            raise IdentityError(
                "28P01",
                f'API key {key.id} ("{key.name}") has been revoked; ask your gateway '
                "administrator for a new key",
                "revoked_key",
                {**presented, "name": key.name},
            )
        if now >= key.expires:
            raise IdentityError(
                "28P01",
                f'API key {key.id} ("{key.name}") expired {_duration(now - key.expires)} ago; '
                "ask your gateway administrator for a new key",
                "expired",
                {**presented, "name": key.name},
            )
        with self._lock:
            self._used[key.id] = int(now)
        return Identity(
            subject=key.name,
            groups=key.groups,
            expires_at=float(key.expires),
            source="apikey",
            key_id=key.id,
            key_name=key.name,
        )

    # -- recording last use -------------------------------------------------------------------

    def flush_due(self) -> bool:
        """True when some key's last use is newer on disk by the interval and no flush runs."""
        if self._flushing or self._monotonic() < self._next_flush_at:
            return False
        with self._lock:
            for key_id, used in self._used.items():
                key = self._keys.get(key_id)
                if key is not None and used - (key.last_used or 0) >= self._last_used_interval:
                    return True
        return False

    def flush(self) -> bool:
        """Write recorded uses to the store (blocking). False if it could not, for now.

        Under the store lock: re-read the file (so a concurrent revoke is never overwritten),
        raise each key's last_used to what this process saw, write atomically, and adopt the
        result (so the revoke also applies here at once).
        """
        self._flushing = True
        try:
            with _locked(self.path, wait=False) as got:
                if not got:
                    return False  # the CLI holds it; try again on a later use
                keys = read_store(self.path)
                with self._lock:
                    used = dict(self._used)
                changed = False
                for key_id, ts in used.items():
                    key = keys.get(key_id)
                    if key is not None and ts > (key.last_used or 0):
                        keys[key_id] = replace(key, last_used=ts)
                        changed = True
                if changed:
                    write_store(self.path, keys)
                st = os.stat(self.path)
                with self._lock:
                    self._keys = keys
                    self._signature = (st.st_ino, st.st_mtime_ns, st.st_size)
                    self._broken = None
                    # Forget uses that are on disk now, unless a newer one came in meanwhile.
                    for key_id, ts in used.items():
                        if self._used.get(key_id) == ts:
                            del self._used[key_id]
            return True
        except (StoreError, OSError) as exc:
            self._next_flush_at = self._monotonic() + _FLUSH_RETRY
            log.warning("could not record API key use in %s: %s", self.path, exc)
            return False
        finally:
            self._flushing = False

    def mark_flushing(self) -> None:
        """Called before scheduling flush() on a thread, so a burst schedules it only once."""
        self._flushing = True


_DUMMY_SALT = secrets.token_bytes(_SALT_BYTES)
_DUMMY_DIGEST = secrets.token_bytes(32)
