"""A statement as the events log and the gateway log may hold it: keywords, operators, catalog
names and $n placeholders only, never a comment, a literal or a label the client made up."""

from __future__ import annotations

from collections.abc import Iterable

from pglast import parser as _pg_parser

from phigate.masking.classification import CatalogSnapshot
from phigate.policy.facts import Facts
from phigate.policy.pg_names import PG_CATALOG_FUNCTIONS, PG_CATALOG_RELATIONS

__all__ = ["NAME", "catalog_names", "redact_sql", "unparsable"]

NAME = "<name>"  # stands for an identifier that names no catalog object (alias, label, typo)

_LITERALS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "FCONST", "ICONST"})
_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})
# Operator and punctuation tokens of the PostgreSQL lexer: their text is fixed or made of
# operator characters only (+ - * / < > = ~ ! @ # % ^ & | ` ?), so it cannot carry a name.
_OPERATORS = frozenset({
    "Op", "TYPECAST", "DOT_DOT", "COLON_EQUALS", "EQUALS_GREATER", "LESS_EQUALS",
    "GREATER_EQUALS", "NOT_EQUALS", "PARAM",
})  # fmt: skip
# Type names the lexer reads as plain identifiers (the others are keywords) and the schemas
# every database has: catalog names whatever the statement resolves to.
_BUILTIN_NAMES = frozenset(
    """
    pg_catalog information_schema public bool bytea char name int2 int4 int8 float4 float8 text
    varchar bpchar json jsonb uuid date timestamptz timetz regclass regproc regtype oid xml inet
    cidr macaddr tsvector tsquery int4range int8range numrange daterange tstzrange
    """.split()  # noqa: SIM905
)
_NO_SPACE_BEFORE = frozenset({",", ")", ";", ".", "]", "::"})
_NO_SPACE_AFTER = frozenset({"(", ".", "[", "::"})


def unparsable(sql: str) -> str:
    """The fixed stand-in for text the PostgreSQL lexer rejects: its size, none of its text."""
    return f"<unparsable statement, {len(sql.encode('utf-8', 'surrogatepass'))} bytes>"


def catalog_names(facts: Iterable[Facts], catalog: CatalogSnapshot | None = None) -> frozenset[str]:
    """Names of the relations, columns, functions, schemas and settings the analyzer resolved
    for a statement: the identifiers of it that may be logged as written.

    The analyzer knows names as written, not whether they exist; where ``catalog`` (the
    target's PHI catalog) lists every column of the relations a column may belong to, a
    column none of them has is left out, so a made-up name there is not logged."""
    names: set[str] = set()
    for f in facts:
        for schema, name, _ in f.relations:
            names.update((schema, name))
        for use in f.columns:
            for schema, name in use.candidates:
                names.update((schema, name))
            if use.column != "*" and _may_exist(use.column, use.candidates, catalog):
                names.add(use.column)
        for written, name, resolved in f.functions:
            names.update((name, resolved))
            if written is not None:
                names.add(written)
        if f.set_name is not None:
            names.add(f.set_name)  # SET/SHOW/RESET: a server setting's name
    return frozenset(names)


def redact_sql(sql: str, names: frozenset[str] = frozenset()) -> str:
    """``sql`` with comments dropped, every literal replaced by a placeholder $n (numbered after
    the statement's own parameters, as pglast's normalize numbers them) and every identifier
    that is not in ``names`` (or a pg_catalog or built-in type name) replaced by NAME.

    Works on the real PostgreSQL lexer's tokens (libpg_query's scanner), so whatever the
    server would read as a string, a comment or a quoted identifier is recognized as such.
    An identifier written after AS is a label the client chose, so it is replaced even when it
    repeats a name the analyzer saw as a column (ORDER BY refers to it like to a column);
    pg_catalog and built-in type names are kept wherever they appear (CAST(x AS int4))."""
    try:
        tokens = _pg_parser.scan(sql)
    except Exception:  # noqa: BLE001  # any lexer failure: log nothing of the text
        return unparsable(sql)
    labels: set[str] = set()
    prev = ""
    params = 0
    for tok in tokens:
        if tok.name == "PARAM":
            params = max(params, int(sql[tok.start + 1 : tok.end + 1]))
        if tok.name in ("IDENT", "UIDENT") and prev == "AS":
            labels.add(_ident_value(sql[tok.start : tok.end + 1]))
        if tok.name not in _COMMENTS:
            prev = tok.name
    out: list[str] = []
    for tok in tokens:
        name = tok.name
        text = sql[tok.start : tok.end + 1]
        if name in _COMMENTS:
            continue
        if name in _LITERALS:
            params += 1
            piece = f"${params}"
        elif name == "IDENT":
            value = _ident_value(text)
            known = (
                value in _BUILTIN_NAMES
                or value in PG_CATALOG_FUNCTIONS
                or value in PG_CATALOG_RELATIONS
                or (value in names and value not in labels)
            )
            piece = text if known and _plain(text) else NAME
        elif tok.kind != "NO_KEYWORD":
            piece = text  # a keyword: its spelling is fixed by the grammar
        elif name in _OPERATORS or (name.startswith("ASCII_") and len(text) == 1):
            piece = text
        else:
            piece = NAME  # a token kind this module does not know: show nothing of it
        if out and piece not in _NO_SPACE_BEFORE and out[-1] not in _NO_SPACE_AFTER:
            out.append(" ")
        out.append(piece)
    return "".join(out)


def _may_exist(
    column: str, candidates: Iterable[tuple[str, str]], catalog: CatalogSnapshot | None
) -> bool:
    """False only when every candidate relation is in ``catalog`` and none has ``column``."""
    if catalog is None:
        return True
    for schema, name in candidates:
        rel = catalog.relation(schema, name)
        if rel is None or rel.column(column) is not None:
            return True
    return False


def _ident_value(text: str) -> str:
    """What an IDENT token names: a quoted one as written, an unquoted one folded to lower
    case as the server folds it."""
    if text.startswith('"'):
        return text[1:-1].replace('""', '"')
    return text.lower()


def _plain(text: str) -> bool:
    """A quoted identifier is written as is only when it holds nothing but name characters, so
    that a kept name cannot smuggle spaces or punctuation into the log line."""
    body = text[1:-1] if text.startswith('"') else text
    return all(c.isalnum() or c in "_$" for c in body)
