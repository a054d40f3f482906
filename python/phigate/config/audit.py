"""The [audit] section: where the audit trail lives, its signing and HMAC keys, durability,
checkpoints and segment rotation."""

from __future__ import annotations

import os
from pathlib import Path

from phigate.audit.keys import AuditKeyError, parse_hmac_key, parse_signer, resolve_credential
from phigate.config.model import AuditConfig, SecretBytes
from phigate.config.table import _Ctx, _Table

_AUDIT_KEYS = frozenset({
    "dir", "origin", "signing_key", "previous_signing_key", "hmac_key", "sync", "sync_window",
    "checkpoint_interval", "checkpoint_every", "checkpoint_copy_dir", "checkpoint_command",
    "segment_max_bytes", "segment_max_age", "max_pending_records", "disclosures_exact_max",
})  # fmt: skip

# batch: fsync every sync_window; write: a statement goes upstream once its record is written
# (handed to the kernel); statement: once it is fsync'd.
SYNC_MODES = ("batch", "write", "statement")
_MAX_KEY_FILE_BYTES = 4096
_KEYGEN_HINT = "create keys with `phigate audit keygen --out DIR`"


def _audit(t: _Table, ctx: _Ctx) -> AuditConfig:
    trail_dir = _directory(t, "dir", ctx)
    signing_file = _key_file(t, "signing_key", ctx, required=True)
    assert signing_file is not None
    signing_text = _read_key(t, "signing_key", signing_file)
    try:
        signer = parse_signer(signing_text)
    except AuditKeyError as exc:
        t.fail("signing_key", f"{str(signing_file)!r}: {exc}")
    # The origin names the trail in every checkpoint; verifiers pick the key by that name.
    origin = t.string("origin", signer.name)
    if origin != signer.name:
        t.fail("origin", f"is {origin!r} but the signing key is named {signer.name!r}; make a key "
               f"for this origin with `phigate audit keygen --name {origin}`")  # fmt: skip

    previous_text: str | None = None
    previous_file = _key_file(t, "previous_signing_key", ctx, required=False)
    if previous_file is not None:
        previous_text = _read_key(t, "previous_signing_key", previous_file)
        try:
            previous = parse_signer(previous_text)
        except AuditKeyError as exc:
            t.fail("previous_signing_key", f"{str(previous_file)!r}: {exc}")
        if previous.name != origin:
            t.fail("previous_signing_key", f"is named {previous.name!r}, not {origin!r}: it did "
                   "not sign this trail")  # fmt: skip

    hmac_file = _key_file(t, "hmac_key", ctx, required=True)
    assert hmac_file is not None
    try:
        hmac_key = parse_hmac_key(_read_key(t, "hmac_key", hmac_file))
    except AuditKeyError as exc:
        t.fail("hmac_key", f"{str(hmac_file)!r}: {exc}")

    sync = t.string("sync", "batch")
    if sync not in SYNC_MODES:
        t.fail("sync", f"must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
    copy_dir = None
    if "checkpoint_copy_dir" in t.data:
        copy_dir = _directory(t, "checkpoint_copy_dir", ctx)
    command = t.string_list("checkpoint_command", ())
    if command and not (Path(command[0]).is_absolute() and os.access(command[0], os.X_OK)):
        t.fail("checkpoint_command", f"{command[0]!r} must be an absolute path to an executable")

    return AuditConfig(
        dir=trail_dir,
        origin=origin,
        signing_key=SecretBytes(signing_text.encode()),
        signing_key_file=signing_file,
        previous_signing_key=(
            SecretBytes(previous_text.encode()) if previous_text is not None else None
        ),
        hmac_key=SecretBytes(hmac_key),
        sync=sync,
        sync_window=t.seconds("sync_window", 0.05, 0, 1, lo_open=True),
        checkpoint_interval=t.seconds("checkpoint_interval", 1.0, 0, 3600, lo_open=True),
        checkpoint_every=t.integer("checkpoint_every", 100_000, 1, 10_000_000),
        checkpoint_copy_dir=copy_dir,
        checkpoint_command=command,
        segment_max_bytes=t.integer("segment_max_bytes", 64 * 1024 * 1024, 64 * 1024, 1 << 40),
        segment_max_age=t.seconds("segment_max_age", 86400.0, 1, 366 * 86400, lo_open=False),
        max_pending_records=t.integer("max_pending_records", 100_000, 0, 100_000_000),
        disclosures_exact_max=t.integer("disclosures_exact_max", 1000, 1, 1_000_000),
    )


def _directory(t: _Table, key: str, ctx: _Ctx) -> Path:
    p = Path(t.string(key)).expanduser()
    p = p if p.is_absolute() else ctx.base_dir / p
    if not p.is_dir():
        t.fail(key, f"directory {str(p)!r} does not exist (create it, owned by the service user)")
    return p


def _key_file(t: _Table, key: str, ctx: _Ctx, *, required: bool) -> Path | None:
    if key not in t.data and not required:
        return None
    if key not in t.data:
        t.fail(key, f"is required; {_KEYGEN_HINT}")
    try:
        return resolve_credential(t.string(key), ctx.base_dir)
    except AuditKeyError as exc:
        t.fail(key, str(exc))


def _read_key(t: _Table, key: str, path: Path) -> str:
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(_MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        t.fail(key, f"{str(path)!r} does not exist; {_KEYGEN_HINT}")
    except OSError as exc:
        t.fail(key, f"cannot read {str(path)!r}: {exc.strerror}")
    if mode & 0o077:
        t.fail(key, f"{str(path)!r} is readable or writable by group or others (mode "
               f"{mode & 0o777:04o}); run chmod 600 on it")  # fmt: skip
    if len(raw) > _MAX_KEY_FILE_BYTES:
        t.fail(key, f"{str(path)!r} is larger than {_MAX_KEY_FILE_BYTES} bytes: not a key file")
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        t.fail(key, f"{str(path)!r} is not a key file (not ASCII text); {_KEYGEN_HINT}")
