"""What the masking rewrite needs from the PHI catalog (masking/classification.py), as typing
protocols."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class ColumnRuleLike(Protocol):
    """A classified column's rule: PHI ``kind`` and ``mask`` ("redact", "null", "partial:N" --
    or "partial" with ``keep`` = N --, "year", "email_domain", "pseudonym", "free_text")."""

    @property
    def kind(self) -> str: ...

    @property
    def mask(self) -> str: ...


class ColumnLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def type_oid(self) -> int: ...

    @property
    def type_name(self) -> str: ...  # format_type(atttypid, atttypmod): valid in a CAST

    @property
    def rule(self) -> ColumnRuleLike | None: ...


class RelationLike(Protocol):
    @property
    def columns(self) -> Sequence[ColumnLike]: ...  # in attnum order, dropped columns left out


class CatalogLike(Protocol):
    def relation(self, schema: str, name: str) -> RelationLike | None: ...
