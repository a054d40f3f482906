"""Durations in the config: "90s", "15m", "2h", "7d" or a number of seconds."""

from __future__ import annotations

import re

from phigate.config.table import _kind, _Table

__all__ = ["duration_seconds", "format_duration", "parse_duration"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration_seconds(text: str) -> float | None:
    """'900', '90s', '15m', '2h', '1d' in seconds; None if ``text`` is not such a duration."""
    m = _DURATION.fullmatch(text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def parse_duration(t: _Table, key: str, default: str, lo: float, hi: float) -> float:
    """``t[key]`` in seconds, between ``lo`` and ``hi``; a ConfigError names the key."""
    value = t.data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        t.fail(key, f'must be a duration like "15m" or "7d", not {_kind(value)}')
    if isinstance(value, str):
        parsed = duration_seconds(value)
        if parsed is None:
            t.fail(key, f'{value!r} is not a duration; write e.g. "90s", "15m", "2h" or "7d"')
        seconds = parsed
    else:
        seconds = float(value)
    if not lo <= seconds <= hi:
        bounds = f"{format_duration(lo)} and {format_duration(hi)}"
        t.fail(key, f"must be between {bounds}, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as the config writes them: "15m", "7d", "90s"."""
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"
