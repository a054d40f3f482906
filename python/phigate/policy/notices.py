"""Notices the data plane sends a masked identity with a statement's result: the decision's
``notices`` field, and the masked-columns notice (SQLSTATE 01M01) telling an agent which columns
of a relation it reads are masked and how.

A decision's ``notices`` is a list of ``{"key", "code", "message", "hint"}``. The data plane
writes each as a NoticeResponse (severity NOTICE) right before the first message of the
statement's result; a notice with a ``key`` is sent at most once per session (the dedup key),
one with key None every time. Any notice kind uses this field (01M02, a comparison with a masked
column, included).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from phigate.masking.classification import CatalogSnapshot, RelationInfo
from phigate.masking.mask_descriptions import describe_mask
from phigate.policy.facts import Facts
from phigate.policy.show_masking import SETTING
from phigate.policy.sql_names import sql_name, sql_relation

__all__ = [
    "MASKED_COLUMNS",
    "MASKED_COMPARISON",
    "MaskingNotices",
    "masked_columns_message",
    "notice",
]

#: A result carries masked columns of a relation.
MASKED_COLUMNS = "01M01"
#: Reserved: a comparison or search on a masked column (it sees the masked values).
MASKED_COMPARISON = "01M02"

HINT = f"SHOW {SETTING} lists every column masked for you."

# Clauses whose values reach the client: select lists (of any query level: a sub-query's
# output can become the result's), RETURNING and COPY's column list.
_RESULT_CLAUSES = frozenset({"target", "returning", "copy"})
# Statements whose result is not the rows they name: a plan.
_NO_ROWS_KINDS = frozenset({"explain"})
_MAX_MESSAGES = 4096  # (relation, clear kinds) messages remembered per engine
# Characters of column explanations in one message; the data plane cuts any field at 4000
# bytes, so a relation with many masked columns ends its list with a count instead.
_MAX_LISTED = 3000


def notice(code: str, message: str, *, hint: str | None = None, key: str | None = None
           ) -> dict[str, Any]:  # fmt: skip
    """One entry of a decision's ``notices``."""
    return {"key": key, "code": code, "message": message, "hint": hint}


class MaskingNotices:
    """The 01M01 notices of statements; each relation's message is built once per engine (the
    catalog does not change under one)."""

    def __init__(self, *, names_tagged: bool = False) -> None:
        # The identifier dictionary is on: free text has names and places tagged too.
        self.names_tagged = names_tagged
        # (target, relation OID, clear kinds) -> message: OIDs are per database.
        self._messages: dict[tuple[str, int, frozenset[str]], str | None] = {}

    def for_statement(
        self,
        facts: list[Facts],
        catalog: CatalogSnapshot,
        clear_kinds: frozenset[str],
        mode: str,
    ) -> list[dict[str, Any]]:
        """A notice per relation whose masked columns the statement's result can carry, in the
        order the statement names them. ``mode`` "first" keys each by relation, "always" sends
        it with every result, "off" none."""
        if mode == "off":
            return []
        out = []
        for rel in _carried(facts, catalog, clear_kinds):
            message = self._message(catalog.target, rel, clear_kinds)
            if message is not None:
                key = sql_relation((rel.schema, rel.name)) if mode == "first" else None
                out.append(notice(MASKED_COLUMNS, message, hint=HINT, key=key))
        return out

    def _message(self, target: str, rel: RelationInfo, clear_kinds: frozenset[str]) -> str | None:
        k = (target, rel.oid, clear_kinds)
        if k not in self._messages:
            if len(self._messages) >= _MAX_MESSAGES:
                self._messages.clear()
            self._messages[k] = masked_columns_message(
                rel, clear_kinds, names_tagged=self.names_tagged)
        return self._messages[k]


def masked_columns_message(
    rel: RelationInfo, clear_kinds: frozenset[str], *, names_tagged: bool = False
) -> str | None:
    """Every column of ``rel`` masked for ``clear_kinds`` with its mask, in one line; None when
    none is."""
    parts: list[str] = []
    masked = rel.masked_columns(clear_kinds)
    listed = 0
    for col in masked:
        assert col.rule is not None  # masked_columns() only yields classified columns
        words = describe_mask(col, col.rule.mask_spec, col.rule.kind, names_tagged=names_tagged)
        part = f"{sql_name(col.name)} ({words})"
        if parts and listed + len(part) > _MAX_LISTED:
            parts.append(f"and {len(masked) - len(parts)} more (SHOW phigate.masking lists them)")
            break
        parts.append(part)
        listed += len(part) + 2
    if not parts:
        return None
    return (
        f"phigate masked columns of {sql_relation((rel.schema, rel.name))} for this session: "
        f"{', '.join(parts)}. Comparisons and searches on these columns see the masked values."
    )


def _carried(
    facts: Iterable[Facts], catalog: CatalogSnapshot, clear_kinds: frozenset[str]
) -> list[RelationInfo]:
    """Relations with a masked column some statement's result can carry (a column of a result
    clause, or a whole row or ``*`` of the relation), each once."""
    found: dict[int, RelationInfo] = {}
    for f in facts:
        if f.kind in _NO_ROWS_KINDS:
            continue
        for use in f.columns:
            if use.write is not None or use.clause not in _RESULT_CLAUSES:
                continue
            for schema, name in use.candidates:
                rel = catalog.relation(schema, name)
                if rel is None or rel.refuse or rel.oid in found:
                    continue
                if use.column == "*":
                    carried = bool(rel.masked_columns(clear_kinds))
                else:
                    col = rel.column(use.column)
                    carried = col is not None and col.rule is not None and (
                        col.rule.masked_for(clear_kinds))  # fmt: skip
                if carried:
                    found[rel.oid] = rel
    return list(found.values())
