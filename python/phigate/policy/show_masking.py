"""``SHOW phigate.masking``: the columns the session's identity sees masked, from the gateway's
configuration and the target's catalog, as rows (relation, column_name, kind, mask).

The control plane answers it with a rewrite to a constant statement (a VALUES list the server
returns without reading any table), so the answer keeps its place among pipelined results.
No other setting in the phigate namespace exists; SHOW of one is refused like PostgreSQL
refuses an unknown parameter (rules.py).
"""

from __future__ import annotations

from typing import Any

from phigate.config import RoleSet
from phigate.masking.classification import CatalogSnapshot
from phigate.policy.facts import Facts
from phigate.policy.sql_names import sql_relation

__all__ = [
    "NAMESPACE", "SETTING", "is_show_masking", "masking_rows", "show_answer", "show_statement",
]  # fmt: skip

#: The one setting phigate answers (folded like PostgreSQL folds setting names).
SETTING = "phigate.masking"
#: Settings named ``phigate.<anything else>`` are refused.
NAMESPACE = "phigate."
COLUMNS = ("relation", "column_name", "kind", "mask")

Row = tuple[str, str, str, str]


def is_show_masking(f: Facts) -> bool:
    return f.kind == "show" and f.set_name == SETTING


def masking_rows(catalog: CatalogSnapshot, roleset: RoleSet) -> list[Row]:
    """(relation, column_name, kind, mask) of every column the identity sees masked, in
    relations one of its roles may read (only the columns a role limits it to), sorted.
    ``relation`` is spelled as SQL would (``public."Patients"``), ``column_name`` as stored."""
    clear = roleset.clear_kinds
    rows = []
    for rel in catalog.relations.values():
        if rel.refuse:  # refused whole: nothing of it is shown, masked or not
            continue
        visible = _visible_columns(roleset, rel.schema, rel.name)
        if visible is not None and not visible:
            continue
        relation = sql_relation((rel.schema, rel.name))
        for col in rel.masked_columns(clear):
            assert col.rule is not None  # masked_columns() only yields classified columns
            if visible is None or col.name in visible:
                rows.append((relation, col.name, col.rule.kind, col.rule.mask_spec))
    return sorted(rows)


def _visible_columns(roleset: RoleSet, schema: str, name: str) -> frozenset[str] | None:
    """Columns of the relation the identity may use at all: None for every column, empty when
    no role covers the relation."""
    cols: frozenset[str] = frozenset()
    for role in roleset.roles:
        if not role.covers(schema, name):
            continue
        limit = role.columns.get((schema, name))
        if limit is None:
            return None
        cols |= limit
    return cols


def show_statement(rows: list[Row]) -> str:
    """A constant statement returning ``rows`` with the columns of SHOW phigate.masking (all
    text; no row at all when ``rows`` is empty)."""
    names = ", ".join(COLUMNS)
    if not rows:
        nulls = ", ".join(["CAST(NULL AS pg_catalog.text)"] * len(COLUMNS))
        values, where = f"({nulls})", " WHERE false"
    else:
        values = ", ".join("(" + ", ".join(_literal(v) for v in row) + ")" for row in rows)
        where = ""
    # Every value is a literal quoted by _literal(): nothing from a client is in the text.
    return f"SELECT * FROM (VALUES {values}) AS phigate_masking({names}){where}"  # noqa: S608


def _literal(text: str) -> str:
    """A text literal meaning ``text`` whatever standard_conforming_strings says."""
    if "\\" in text:
        return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + text.replace("'", "''") + "'"


def show_answer(rows: list[Row], normalized: str | None) -> dict[str, Any]:
    """The decision: run the constant statement. It reads nothing protected, and its rows
    depend only on the identity class, which decisions are cached under."""
    return {"action": "allow", "cache": "exact", "normalized": normalized,
            "rewrite": show_statement(rows), "protected": False}  # fmt: skip
