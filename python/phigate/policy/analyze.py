"""Turn SQL text into fact sheets with the real PostgreSQL parser (libpg_query via pglast).

``analyze(sql, schema=...)`` parses with ``pglast.parser.parse_sql_json`` and walks the
resulting dicts (building pglast's Python node objects costs ~15x more). Every statement yields
one ``Facts``: its kind, every relation it touches and how, every column and in which clause,
every function it calls, and the flags rules need. Nothing here knows about roles: rules.py
judges the facts.

Fail closed: a parse error yields one Facts whose ``fail`` is a 42601 FailClosed; a node type
the walker does not know anywhere in a statement fails that statement ("phigate cannot analyze
<NodeType> yet"). The walker (walker.py, walk_queries.py, walk_utility.py,
walk_expressions.py) lets through only node types listed in its modules.

Name resolution follows the server with the search_path phigate pins upstream: ``schema`` is
the target's one schema (`params.search_path`, default public). Unqualified relation and
function names resolve to pg_catalog first when such an object exists there (pg_catalog is
implicitly searched first), else to ``schema``. A CTE name shadows relations of that name
inside its scope (never for INSERT/UPDATE/DELETE/MERGE/COPY targets, which the server resolves
as tables). Identifiers arrive from the parser already folded (unquoted lower-cased, quoted
kept, U&"..." decoded), and config names are folded the same way.
"""

from __future__ import annotations

import re

import orjson
from pglast import parser as _pg_parser

from phigate.policy.facts import ColumnUse, Facts, FailClosed
from phigate.policy.parse_nodes import _Unsupported
from phigate.policy.walker import _Walker

__all__ = [
    "ColumnUse",
    "Facts",
    "FailClosed",
    "analyze",
]

_SAFE_NEAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_NEAR = re.compile(r' at or near "(.*)"$', re.S)


def analyze(sql: str, *, schema: str) -> list[Facts]:
    """Fact sheets for every statement in ``sql`` (empty for an empty or comment-only string),
    resolving unqualified names as a session whose search_path is ``schema`` does."""
    try:
        doc = orjson.loads(_pg_parser.parse_sql_json(sql))
    except _pg_parser.ParseError as exc:
        facts = Facts()
        facts.kind = "invalid"
        facts.fail = FailClosed("42601", _parse_message(exc))
        return [facts]
    out = []
    for i, raw in enumerate(doc.get("stmts", ())):
        facts = Facts(i)
        try:
            _Walker(facts, schema).statement(raw["stmt"], top=True)
        except _Unsupported as exc:
            facts.fail = FailClosed("42501", exc.message)
        except (KeyError, TypeError, AttributeError, IndexError, StopIteration):
            # A tree shape the walker did not expect is something it does not understand.
            facts.fail = FailClosed("42501", "phigate cannot analyze this statement yet")
        out.append(facts)
    return out


def _parse_message(exc: Exception) -> str:
    message = str(exc.args[0]) if exc.args else "syntax error"
    pos = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
    # "at or near" may quote a literal (an unterminated string holding PHI): keep it only when
    # it is a plain word such as a keyword or identifier.
    m = _NEAR.search(message)
    if m is not None and not _SAFE_NEAR.fullmatch(m.group(1)):
        message = message[: m.start()]
    if pos is not None and pos >= 0:
        message += f" at character {pos + 1}"
    return message
