"""What the command groups share: exit codes, durations, timestamps, target selection."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from phigate.config.durations import duration_seconds
from phigate.errors import PhigateError

if TYPE_CHECKING:
    from phigate.config import Config

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def parse_duration(text: str) -> float:
    """'900', '90s', '15m', '2h', '1d' -> seconds."""
    seconds = duration_seconds(text)
    if seconds is None or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 900, 90s, 15m, 2h or 1d")
    return seconds


def when(ts: float) -> str:
    """A Unix time as ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def target_names(config: Config, path: Path, target: str | None) -> list[str]:
    """The target named by --target (an error naming the known ones if it does not exist), else
    every target, sorted."""
    if target is not None and target not in config.targets:
        known = ", ".join(sorted(config.targets))
        raise PhigateError(f"{path}: no target {target!r} (targets: {known})")
    return [target] if target is not None else sorted(config.targets)
