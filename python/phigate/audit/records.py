"""Record bodies the control plane appends to the audit trail: the `ts` format every record
carries (RFC 3339 UTC with microseconds, a string: the trail's canonical JSON has no floats),
durations as integer microseconds, file hashes, and the canonical JSON the trail holds
(docs/audit.md)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from phigate.audit.trail import canonical, read_bodies

__all__ = [
    "audit_section", "canonical", "duration_us", "file_sha256", "now_ts", "read_records", "ts",
]


def ts(unix_seconds: float) -> str:
    """``unix_seconds`` as a record timestamp: "2026-12-06T15:35:34.123456Z"."""
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_ts() -> str:
    """The current time as a record's ``ts``: RFC 3339 UTC with microseconds, e.g.
    ``2026-12-06T15:35:34.123456Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def duration_us(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000))


def file_sha256(path: Path) -> str | None:
    """Hex SHA-256 of a file's bytes; None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def read_records(trail_dir: Path) -> list[dict[str, Any]]:
    """The ``rec`` bodies of every complete line in ``trail_dir``'s segments, in seq order.
    No checks at all (a torn last line is skipped): `phigate audit verify` checks a trail."""
    return [rec for _, rec in read_bodies(trail_dir, lenient=True)]

def audit_section(
    trail_dir: Path, key_dir: Path, *, name: str, **settings: Any
) -> dict[str, Any]:
    """An [audit] config section for ``trail_dir`` with keys in ``key_dir``, generating the
    keys (`phigate audit keygen`'s files, key ``name``) if they are not there yet. For the demo
    and tests; production keys are made once with `phigate audit keygen`."""
    from phigate.audit.keys import write_keys

    if not (key_dir / "audit.key").exists():
        write_keys(key_dir, name)
    trail_dir.mkdir(parents=True, exist_ok=True)
    return {
        "dir": str(trail_dir),
        "signing_key": str(key_dir / "audit.key"),
        "hmac_key": str(key_dir / "audit-hmac.key"),
        **settings,
    }
