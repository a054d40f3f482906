"""Building blocks of the control plane's audit records: the timestamp every record carries
(RFC 3339 UTC with microseconds, a string: the trail's canonical JSON has no floats) and
durations as integer microseconds."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

__all__ = ["duration_us", "file_sha256", "now_ts", "ts"]


def ts(unix_seconds: float) -> str:
    """``unix_seconds`` as a record timestamp: "2026-12-06T15:35:34.123456Z"."""
    moment = datetime.datetime.fromtimestamp(unix_seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_ts() -> str:
    return ts(datetime.datetime.now(datetime.UTC).timestamp())


def duration_us(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000))


def file_sha256(path: Path) -> str | None:
    """Hex SHA-256 of a file's bytes; None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
