"""The exception the masking rewrite raises to refuse a statement, with its SQLSTATE and hint."""

from __future__ import annotations


class _Refuse(Exception):
    def __init__(self, reason: str, sqlstate: str = "42501", hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sqlstate = sqlstate
        self.hint = hint
