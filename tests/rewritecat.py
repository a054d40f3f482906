"""A tiny in-memory catalog for the masking rewrite tests (phigate.masking.rewrite.CatalogLike)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TEXT, INT8, INT4, DATE, TSTZ, NUMERIC = 25, 20, 23, 1082, 1184, 1700
_TYPE_NAMES = {
    TEXT: "text",
    INT8: "bigint",
    INT4: "integer",
    DATE: "date",
    TSTZ: "timestamp with time zone",
    NUMERIC: "numeric",
}


@dataclass(frozen=True)
class Rule:
    kind: str
    mask: str


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    type_name: str
    rule: Rule | None = None


@dataclass(frozen=True)
class Relation:
    columns: tuple[Column, ...]
    refuse_reason: str | None = None


@dataclass
class MemCatalog:
    relations: dict[tuple[str, str], Relation] = field(default_factory=dict)

    def relation(self, schema: str, name: str) -> Relation | None:
        return self.relations.get((schema, name))

    def add(
        self,
        schema: str,
        name: str,
        columns: list[tuple[str, int]] | list[tuple[str, int, str]],
        rules: Mapping[str, tuple[str, str]] | None = None,
    ) -> MemCatalog:
        rules = rules or {}
        cols = []
        for c in columns:
            cname, oid = c[0], c[1]
            tname = c[2] if len(c) > 2 else _TYPE_NAMES[oid]
            r = rules.get(cname)
            cols.append(Column(cname, oid, tname, Rule(*r) if r else None))
        self.relations[(schema, name)] = Relation(tuple(cols))
        return self


#: The masks the tests use for the EHR schema (column -> (kind, mask)).
EHR_RULES: dict[str, dict[str, tuple[str, str]]] = {
    "patients": {
        "mrn": ("mrn", "pseudonym"),
        "first_name": ("name", "redact"),
        "last_name": ("name", "partial:2"),
        "ssn": ("ssn", "partial:4"),
        "date_of_birth": ("dob", "year"),
        "address": ("address", "null"),
        "phone": ("phone", "redact"),
        "email": ("email", "email_domain"),
    },
    "notes": {"body": ("free_text", "free_text")},
}


def catalog_from_db(conn: Any, rules: Mapping[str, Mapping[str, tuple[str, str]]]) -> MemCatalog:
    """Build a MemCatalog for every table of schema public from information about the real
    database (pg_attribute, so types come with their typmods), with ``rules`` per table."""
    cat = MemCatalog()
    rows = conn.execute(
        """
        SELECT c.relname, a.attname, a.atttypid::int, format_type(a.atttypid, a.atttypmod)
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN information_schema.columns ic
            ON ic.table_schema = n.nspname AND ic.table_name = c.relname
           AND ic.column_name = a.attname
         WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY c.relname, a.attnum
        """
    ).fetchall()
    tables: dict[str, list[tuple[str, int, str]]] = {}
    for rel, col, oid, tname in rows:
        tables.setdefault(rel, []).append((col, oid, tname))
    for rel, cols in tables.items():
        cat.add("public", rel, cols, rules.get(rel))
    return cat
