"""The helper every section validates with: typed access to one TOML table, errors naming
the file and key."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from phigate.errors import ConfigError

_MISSING: Any = object()

@dataclass(frozen=True)
class _Ctx:
    file: str
    base_dir: Path

class _Table:
    """One TOML table under validation; unknown keys are rejected up front (typos fail loudly)."""

    def __init__(
        self, data: Any, prefix: str, ctx: _Ctx, allowed: set[str] | frozenset[str] | None
    ) -> None:
        self.prefix = prefix
        self.ctx = ctx
        if not isinstance(data, Mapping):
            self.fail("", f"must be a table, not {_kind(data)}")
        self.data: Mapping[str, Any] = data
        if allowed is not None:
            for key in data:
                if key not in allowed:
                    near = difflib.get_close_matches(key, sorted(allowed), n=1)
                    hint = f" (did you mean {near[0]!r}?)" if near else ""
                    self.fail(key, f"unknown key{hint}")

    def key(self, key: str) -> str:
        if not key:
            return self.prefix
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(self.key(key), self.ctx.file, message)

    def table(
        self, key: str, *, required: bool, allowed: set[str] | frozenset[str] | None
    ) -> _Table:
        if key not in self.data:
            if required:
                self.fail(key, "is required")
            return _Table({}, self.key(key), self.ctx, allowed)
        return _Table(self.data[key], self.key(key), self.ctx, allowed)

    def string(self, key: str, default: Any = _MISSING) -> str:
        value = self.data.get(key, default)
        if value is _MISSING:
            self.fail(key, "is required")
        if not isinstance(value, str):
            self.fail(key, f"must be a string, not {_kind(value)}")
        if not value or "\x00" in value:
            self.fail(key, "must be a non-empty string without NUL characters")
        return value

    def opt_string(self, key: str) -> str | None:
        return self.string(key) if key in self.data else None

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {_kind(value)}")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.data.get(key, default)
        # bool is an int subclass in Python; `port = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, not {_kind(value)}")
        if not lo <= value <= hi:
            self.fail(key, f"must be between {lo} and {hi}, got {value}")
        return value

    def seconds(self, key: str, default: float, lo: float, hi: float, *, lo_open: bool) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"must be a number of seconds, not {_kind(value)}")
        bad_lo = value <= lo if lo_open else value < lo
        if bad_lo or value > hi or value != value:  # value != value catches NaN
            bound = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
            self.fail(key, f"must be {bound} and at most {hi:g} seconds, got {value}")
        return float(value)

    def string_list(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.data.get(key, list(default))
        if not isinstance(value, list):
            self.fail(key, f"must be a list of strings, not {_kind(value)}")
        for item in value:
            if not isinstance(item, str) or not item:
                self.fail(key, "must be a list of non-empty strings")
        return tuple(value)

    def path(self, key: str, *, what: str) -> Path | None:
        """A file that must exist now; relative paths resolve against the config's directory."""
        if key not in self.data:
            return None
        p = Path(self.string(key)).expanduser()
        if not p.is_absolute():
            p = self.ctx.base_dir / p
        if not p.is_file():
            self.fail(key, f"{what} {str(p)!r} does not exist or is not a regular file")
        if not os.access(p, os.R_OK):
            self.fail(key, f"{what} {str(p)!r} is not readable by this user")
        return p

def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return names.get(type(value), type(value).__name__)

