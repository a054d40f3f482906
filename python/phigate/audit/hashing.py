"""Keyed hashes as audit records hold them: "h:" and the first 32 hex digits of
HMAC-SHA256 under the audit HMAC key, the same as the data plane computes (native/src/events.rs)."""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["keyed_hash"]

_HEX_DIGITS = 32


def keyed_hash(key: bytes, data: bytes | str) -> str:
    """``data`` (text as UTF-8) as the trail's records hold it: equal values give equal hashes
    under one key, and nobody without the key can test a guess."""
    raw = data.encode() if isinstance(data, str) else data
    return "h:" + hmac.new(key, raw, hashlib.sha256).hexdigest()[:_HEX_DIGITS]
