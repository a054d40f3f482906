"""Plain reads that layer 2 alone masks exactly, so the rewrite can leave them as written.

Computing masks in SQL costs the database far more than masking rows in the data plane (on a
20,000-row read: a pseudonym ~0.1 s, partial ~15 ms of backend CPU, against ~0.3 ms in
Rust), and a bulk read is exactly where that shows. DESIGN §5 says why the rewrite exists:
expressions, casts, set operations, whole-row references, views and predicates lose column
origin or act as oracles. A statement with none of those -- one SELECT from protected tables,
whose output is plain column references and whose filter never touches a masked column -- has
nothing for them to act on: every output column carries its table OID and attnum in the
RowDescription, and the data plane masks classified ones by that origin with the same mask
functions the rewrite would have computed.

The check is deliberately narrow and fails toward the rewrite: anything it does not recognise
makes the statement ineligible. The answer lists the OIDs the statement may read; the data
plane redacts any column from another relation (a table dropped and recreated since the
catalog was read has a new OID, so stale rules can never let a clear value through).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from phigate.masking.classification import CatalogSnapshot, RelationInfo
from phigate.policy.pg_names import unqualified_relation

__all__ = ["copy_columns", "passthrough_oids"]

_TABLE_KINDS = frozenset({"r", "p", "f"})  # not views: the rewrite maps those
_TEXT_TYPES = frozenset({25, 1043})  # text, varchar (bpchar pads: left to the rewrite)
_DATE_TYPES = frozenset({1082, 1114})  # date, timestamp (timestamptz depends on TimeZone)
# Masks the data plane computes exactly like the rewrite, per kind of column type.
_TEXT_MASKS = frozenset({"partial", "email_domain", "pseudonym", "zip3", "redact", "null"})
_DATE_MASKS = frozenset({"year", "redact", "null"})
# SelectStmt parts that change what rows mean or carry values the data plane cannot see.
_FORBIDDEN = (
    "withClause", "intoClause", "valuesLists", "distinctClause", "groupClause", "groupDistinct",
    "havingClause", "windowClause", "sortClause", "lockingClause", "larg", "rarg",
)  # fmt: skip


def passthrough_oids(
    doc: Mapping[str, Any], catalog: CatalogSnapshot, clear_kinds: frozenset[str], *, schema: str
) -> list[int] | None:
    """The OIDs of the protected tables a plain read reads, when layer 2 alone masks it
    exactly; None when the statement needs the rewrite. Unqualified names resolve as in a
    session whose search_path is ``schema``."""
    select = _only_statement(doc, "SelectStmt")
    items = _plain_select(select, catalog, clear_kinds, schema) if select is not None else None
    return None if items is None else sorted({rel.oid for _, rel in items})


def copy_columns(
    doc: Mapping[str, Any], catalog: CatalogSnapshot, clear_kinds: frozenset[str], *, schema: str
) -> list[tuple[int, int, int]] | None:
    """For ``COPY (plain read) TO STDOUT`` in text format: (table OID, attnum, type OID) of
    every output column in order, which COPY's own messages do not carry; None otherwise."""
    copy = _only_statement(doc, "CopyStmt")
    if copy is None or copy.get("is_from") or copy.get("relation") or copy.get("filename"):
        return None
    if copy.get("is_program") or copy.get("options") or copy.get("attlist"):
        return None  # options may change the format (CSV quoting, delimiters) the data plane parses
    select = (copy.get("query") or {}).get("SelectStmt")
    if not isinstance(select, dict):
        return None
    items = _plain_select(select, catalog, clear_kinds, schema)
    if items is None:
        return None
    out: list[tuple[int, int, int]] = []
    for target in select.get("targetList") or ():
        cols = _expand(target["ResTarget"]["val"]["ColumnRef"]["fields"], items)
        if cols is None:
            return None
        out += cols
    return out


def _only_statement(doc: Mapping[str, Any], node: str) -> dict[str, Any] | None:
    stmts = doc.get("stmts")
    if not isinstance(stmts, list) or len(stmts) != 1:
        return None
    body = stmts[0].get("stmt", {}).get(node)
    return body if isinstance(body, dict) else None


def _plain_select(
    select: dict[str, Any], catalog: CatalogSnapshot, clear_kinds: frozenset[str], schema: str
) -> list[tuple[str, RelationInfo]] | None:
    """The FROM items (reference name, table) of a plain read; None if it is not one."""
    if select.get("op", "SETOP_NONE") != "SETOP_NONE":
        return None
    if any(select.get(k) for k in _FORBIDDEN):
        return None
    items = _from_tables(select.get("fromClause"), catalog, schema)
    if items is None:
        return None
    rels = dict(items)
    for _, rel in items:
        rels.setdefault(rel.name, rel)
    masked: set[str] = set()
    for rel in rels.values():
        rel_masked = _masked_names(rel, clear_kinds)
        if rel_masked is None:
            return None
        masked |= rel_masked
    tables = set(rels)
    if not all(_plain_output(t, tables) for t in select.get("targetList") or ()):
        return None
    # Filters and limits may use unmasked columns only, and no whole row of a table: names of
    # masked columns (of any table here) and of the tables themselves disqualify.
    forbidden = masked | tables
    for part in ("whereClause", "limitCount", "limitOffset"):
        if not _clean_filter(select.get(part), forbidden):
            return None
    return items


def _expand(
    fields: list[Any], items: list[tuple[str, RelationInfo]]
) -> list[tuple[int, int, int]] | None:
    """The columns a bare reference in a target list stands for, as the server expands it."""
    names = [f["String"]["sval"] if "String" in f else None for f in fields]
    if names == [None]:  # *: every table's columns, in FROM order
        return [(r.oid, c.attnum, c.type_oid) for _, r in items for c in r.columns]
    if len(names) == 2 and names[1] is None:  # t.*
        rel = next((r for ref, r in items if ref == names[0]), None)
        return None if rel is None else [(rel.oid, c.attnum, c.type_oid) for c in rel.columns]
    if len(names) == 1:
        found = [(r, c) for _, r in items for c in r.columns if c.name == names[0]]
    elif len(names) == 2:
        found = [
            (r, c) for ref, r in items if ref == names[0] for c in r.columns if c.name == names[1]
        ]
    else:
        return None
    if len(found) != 1:
        return None  # ambiguous, unknown, or not something phigate resolves: the rewrite's
    rel, col = found[0]
    return [(rel.oid, col.attnum, col.type_oid)]


def _from_tables(
    items: Any, catalog: CatalogSnapshot, schema: str
) -> list[tuple[str, RelationInfo]] | None:
    """(reference name, protected table) per FROM item, for a FROM list of protected tables."""
    if not isinstance(items, list) or not items:
        return None
    out: list[tuple[str, RelationInfo]] = []
    for item in items:
        rv = item.get("RangeVar") if isinstance(item, dict) else None
        if not isinstance(rv, dict) or rv.get("catalogname"):
            return None
        name = rv.get("relname", "")
        written = rv.get("schemaname")
        rel = catalog.relation(*(written, name) if written else unqualified_relation(name, schema))
        if rel is None or rel.relkind not in _TABLE_KINDS or rel.refuse:
            return None  # unprotected tables have no OID here; views are the rewrite's
        ref = (rv.get("alias") or {}).get("aliasname") or rel.name
        if any(ref == r for r, _ in out):
            return None
        out.append((ref, rel))
    return out


# Per (relation, clear kinds): the names of its masked columns, or None when one of them has a
# mask the data plane computes differently. Relations are immutable within a catalog snapshot;
# an entry keeps its relation alive, so the id cannot be reused while it is cached.
_MASKED_NAMES: dict[tuple[int, frozenset[str]], tuple[RelationInfo, frozenset[str] | None]] = {}


def _masked_names(rel: RelationInfo, clear_kinds: frozenset[str]) -> frozenset[str] | None:
    key = (id(rel), clear_kinds)
    hit = _MASKED_NAMES.get(key)
    if hit is not None and hit[0] is rel:
        return hit[1]
    cols = rel.masked_columns(clear_kinds)
    exact = all(_layer2_exact(c.type_oid, c.rule.mask if c.rule else "") for c in cols)
    names = frozenset(c.name for c in cols) if exact else None
    if len(_MASKED_NAMES) >= 4096:
        _MASKED_NAMES.clear()
    _MASKED_NAMES[key] = (rel, names)
    return names


def _layer2_exact(type_oid: int, mask: str) -> bool:
    if mask == "null":
        return True
    if type_oid in _TEXT_TYPES:
        return mask in _TEXT_MASKS
    return type_oid in _DATE_TYPES and mask in _DATE_MASKS


def _plain_output(target: Any, tables: set[str]) -> bool:
    """A bare column reference (col, t.col, *, t.*): the value as stored, with its origin. A
    whole row ("p") would reach the data plane as one composite it can only redact whole."""
    rt = target.get("ResTarget") if isinstance(target, dict) else None
    val = rt.get("val") if isinstance(rt, dict) else None
    if not isinstance(val, dict) or set(val) != {"ColumnRef"}:
        return False
    fields = val["ColumnRef"].get("fields") or []
    plain = all(isinstance(f, dict) and ("String" in f or "A_Star" in f) for f in fields)
    if not fields or not plain:
        return False
    last = fields[-1].get("String", {}).get("sval")
    return last is None or last not in tables


def _clean_filter(node: Any, names: set[str]) -> bool:
    for kind, body in _nodes(node):
        if kind in ("SubLink", "A_Star", "RangeSubselect", "RangeFunction"):
            return False
        if kind == "ColumnRef":
            # The last name is what is read: a column, or a whole row when it names a table
            # ("p", "public.patients"); leading names only qualify it.
            fields = body.get("fields") or []
            last = fields[-1] if fields else None
            if not isinstance(last, dict) or "String" not in last:
                return False
            if last["String"].get("sval") in names:
                return False
    return True


def _nodes(value: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (node type, body) in a pglast JSON subtree."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, dict) and k[:1].isupper():
                yield k, v
            yield from _nodes(v)
    elif isinstance(value, list):
        for v in value:
            yield from _nodes(v)
