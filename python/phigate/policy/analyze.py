"""Turn SQL text into fact sheets with the real PostgreSQL parser (libpg_query via pglast).

``analyze(sql, schema=...)`` parses with ``pglast.parser.parse_sql_json`` and walks the
resulting dicts (building pglast's Python node objects costs ~15x more). Every statement yields
one ``Facts``: its kind, every relation it touches and how, every column and in which clause,
every function it calls, and the flags rules need. Nothing here knows about roles: rules.py
judges the facts.

Fail closed: a parse error yields one Facts whose ``fail`` is a 42601 FailClosed; a node type
the walker does not know anywhere in a statement fails that statement ("phigate cannot analyze
<NodeType> yet"). The walker lets through only node types listed in this module.

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
from typing import Any

import orjson
from pglast import parser as _pg_parser

from phigate.config import RESERVED_SCHEMA
from phigate.policy.functions import (
    DEFAULT_FUNCTIONS,
    NAME_ARGUMENT_FUNCTIONS,
    WRITING_FUNCTIONS,
)
from phigate.policy.pg_names import (
    unqualified_function_schema,
    unqualified_relation,
)

__all__ = [
    "ColumnUse",
    "Facts",
    "FailClosed",
    "analyze",
]

Rel = tuple[str, str]

_REG_TYPES = frozenset({
    "regclass", "regproc", "regprocedure", "regoper", "regoperator", "regtype", "regrole",
    "regnamespace", "regconfig", "regdictionary", "regcollation",
})  # fmt: skip
_SAFE_NEAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_NEAR = re.compile(r' at or near "(.*)"$', re.S)


class FailClosed:
    """Why a statement could not be analyzed; it is refused with this SQLSTATE and message."""

    __slots__ = ("message", "sqlstate")

    def __init__(self, sqlstate: str, message: str) -> None:
        self.sqlstate = sqlstate
        self.message = message

    def __repr__(self) -> str:
        return f"FailClosed({self.sqlstate!r}, {self.message!r})"


class ColumnUse:
    """One column reference. ``candidates`` are the base relations it may belong to (one when
    it is qualified or only one relation is in scope: then ``exact``); ``column`` is "*" for
    SELECT *, rel.*, whole-row references, NATURAL joins and INSERT/COPY without a column list.
    ``write`` is the operation for columns that are written (SET, INSERT/COPY FROM column
    lists), None for columns that are read."""

    __slots__ = ("candidates", "clause", "column", "exact", "write")

    def __init__(
        self, candidates: tuple[Rel, ...], column: str, clause: str, exact: bool, write: str | None
    ) -> None:
        self.candidates = candidates
        self.column = column
        self.clause = clause
        self.exact = exact
        self.write = write

    def __repr__(self) -> str:
        rels = ",".join(f"{s}.{n}" for s, n in self.candidates)
        w = f" write={self.write}" if self.write else ""
        return (
            f"ColumnUse({rels}:{self.column} in {self.clause}{' exact' if self.exact else ''}{w})"
        )


class Facts:
    """The fact sheet of one statement."""

    __slots__ = (
        "cascade", "columns", "copy_direction", "copy_query", "copy_target", "ctes",
        "data_modifying_ctes", "discard", "explain_analyze", "explain_verbose", "fail",
        "functions", "has_limit",
        "has_where", "index", "inner_kind", "kind", "literal_sensitive", "locking", "node",
        "operators", "params", "reg_casts", "relations", "reserved_schema", "set_configs",
        "set_local",
        "set_name", "set_operations", "set_values", "subqueries", "transaction", "writes",
    )  # fmt: skip

    def __init__(self, index: int = 0) -> None:
        self.index = index  # position in a multi-statement string
        self.kind = "unknown"
        self.node = ""  # the parse node type, e.g. "SelectStmt"
        self.inner_kind: str | None = None  # EXPLAIN / PREPARE / DECLARE / COPY (query)
        #: (schema, name, op): op is select, insert, update, delete, merge, copy_to, copy_from,
        #: truncate or ddl; LOCK and maintenance statements record "select".
        self.relations: list[tuple[str, str, str]] = []
        self.columns: list[ColumnUse] = []
        #: (schema as written or None, name, schema it resolves to)
        self.functions: list[tuple[str | None, str, str]] = []
        self.operators: list[str] = []  # schemas of explicitly qualified operators
        self.set_configs: list[str | None] = []  # set_config() setting names (None: not literal)
        self.writes = False
        self.has_where = False
        self.has_limit = False
        self.set_operations = False
        self.subqueries = 0
        self.locking = False
        self.ctes: list[str] = []
        self.data_modifying_ctes = False
        self.set_name: str | None = None  # SET/RESET/SHOW setting (lower-cased); "all"
        self.set_values: tuple[str, ...] = ()
        self.set_local = False
        self.transaction: str | None = None  # TransactionStmt kind, e.g. "TRANS_STMT_BEGIN"
        self.copy_direction: str | None = None  # "to" | "from"
        self.copy_target: str | None = None  # "stdio" | "program" | "file"
        self.copy_query = False
        self.explain_analyze = False
        self.explain_verbose = False
        self.discard: str | None = None
        self.cascade = False
        self.reg_casts = 0
        self.params = False
        self.literal_sensitive = False
        #: A DDL statement names schema phigate or an object in it (relations and functions
        #: anywhere are in ``relations`` / ``functions``).
        self.reserved_schema = False
        self.fail: FailClosed | None = None

    def __repr__(self) -> str:
        if self.fail is not None:
            return f"Facts(#{self.index} {self.fail!r})"
        return (
            f"Facts(#{self.index} {self.kind} rel={self.relations} cols={self.columns} "
            f"fn={self.functions} writes={self.writes})"
        )


class _Unsupported(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


def _cannot(node_type: str) -> _Unsupported:
    return _Unsupported(f"phigate cannot analyze {node_type} yet")


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


# --- scopes ---------------------------------------------------------------------------------

# An item of a FROM list: (refname, members). members are the base relations behind it (one
# for a table, several for an aliased join, none for a subquery, CTE or function).
_Item = tuple[str | None, tuple[Rel, ...]]


class _Scope:
    __slots__ = ("ctes", "items", "opaque", "outputs", "parent")

    def __init__(self, parent: _Scope | None, *, opaque: bool = False) -> None:
        self.parent = parent
        self.items: list[_Item] = []
        self.ctes: set[str] | None = None
        self.outputs: frozenset[str] | set[str] = frozenset()
        self.opaque = opaque

    def has_cte(self, name: str) -> bool:
        s: _Scope | None = self
        while s is not None:
            if s.ctes is not None and name in s.ctes:
                return True
            s = s.parent
        return False

    def find(self, refname: str) -> _Item | None:
        s: _Scope | None = self
        while s is not None:
            for item in s.items:
                if item[0] == refname:
                    return item
            if s.opaque:
                return None
            s = s.parent
        return None

    def candidates(self) -> tuple[tuple[Rel, ...], bool]:
        """Every base relation an unqualified column might come from, and whether a subquery,
        CTE or function in scope might provide it instead."""
        rels: dict[Rel, None] = {}
        derived = False
        s: _Scope | None = self
        while s is not None:
            for _, members in s.items:
                if members:
                    for m in members:
                        rels[m] = None
                else:
                    derived = True
            if s.opaque:
                break
            s = s.parent
        return tuple(rels), derived


def _one(node: dict[str, Any]) -> tuple[str, Any]:
    for item in node.items():
        return item
    raise _cannot("an empty node")


def _sval(node: dict[str, Any]) -> str:
    return node["String"]["sval"]  # type: ignore[no-any-return]


def _str_const(node: Any) -> bool:
    """A string literal, possibly under casts (what a literal_sensitive decision looks at)."""
    while isinstance(node, dict):
        c = node.get("A_Const")
        if c is not None:
            return "sval" in c or "bsval" in c
        tc = node.get("TypeCast")
        if tc is None:
            return False
        node = tc.get("arg")
    return False


def _const_text(node: Any) -> str | None:
    """The text of a constant (string, number, boolean) or None."""
    while isinstance(node, dict):
        c = node.get("A_Const")
        if c is not None:
            for key in ("sval", "ival", "fval", "boolval", "bsval"):
                if key in c:
                    v = c[key]
                    inner = v.get(key) if isinstance(v, dict) else v
                    if key == "ival" and inner is None:
                        inner = 0  # libpg_query omits zero
                    if key == "boolval" and inner is None:
                        inner = False
                    return str(inner).lower() if isinstance(inner, bool) else str(inner)
            return None
        tc = node.get("TypeCast")
        if tc is None:
            return None
        node = tc.get("arg")
    return None


# --- the walker -----------------------------------------------------------------------------


class _Walker:
    __slots__ = ("f", "generic_op", "read_op", "schema")

    def __init__(self, facts: Facts, schema: str) -> None:
        self.f = facts
        self.schema = schema  # the one schema of the upstream session's search_path
        self.read_op = "select"
        self.generic_op = "ddl"

    # statements ---------------------------------------------------------------------------

    def statement(self, node: dict[str, Any], *, top: bool) -> str:
        ntype, body = _one(node)
        handler = _STATEMENTS.get(ntype)
        if handler is None:
            if ntype in _DDL:
                handler = _Walker.ddl
            elif ntype in _ADMIN:
                handler = _Walker.admin
            else:
                raise _cannot(ntype)
        kind: str = handler(self, body, top, ntype)
        if top:
            self.f.node = ntype
            self.f.kind = kind
        return kind

    def inner(self, node: dict[str, Any]) -> None:
        """The statement inside EXPLAIN / PREPARE / DECLARE CURSOR / CREATE TABLE AS."""
        kind = self.statement(node, top=False)
        f = self.f
        f.inner_kind = kind if f.inner_kind is None else f.inner_kind

    def select_stmt(self, body: dict[str, Any], top: bool, _t: str = "SelectStmt") -> str:
        self.select(body, None, top=top)
        return "ddl" if body.get("intoClause") else "select"

    def select(self, body: dict[str, Any], parent: _Scope | None, *, top: bool = False) -> None:
        f = self.f
        scope = _Scope(parent)
        wc = body.get("withClause")
        if wc is not None:
            self.with_clause(wc, scope)
        if body.get("op", "SETOP_NONE") != "SETOP_NONE":
            f.set_operations = True
            for side in (body["larg"], body["rarg"]):
                self.select(side.get("SelectStmt", side), scope)
            # ORDER BY / LIMIT of a set operation name output columns, not relations.
            out = _Scope(scope, opaque=True)
            for sb in body.get("sortClause", ()):
                self.expr(sb, out, "order")
            self._limit(body, out, top)
            self._locking(body, scope)
            return
        for item in body.get("fromClause", ()):
            self.from_item(item, scope)
        outputs: set[str] = set()
        for rt in body.get("targetList", ()):
            r = rt["ResTarget"]
            val = r.get("val")
            name = r.get("name")
            if name is not None:
                outputs.add(name)
            elif val is not None and "ColumnRef" in val:
                last = val["ColumnRef"]["fields"][-1]
                if "String" in last:
                    outputs.add(last["String"]["sval"])
            if val is not None:
                self.expr(val, scope, "target")
        scope.outputs = outputs
        where = body.get("whereClause")
        if where is not None:
            if top:
                f.has_where = True
            self.expr(where, scope, "where")
        for g in body.get("groupClause", ()):
            self.expr(g, scope, "group")
        for d in body.get("distinctClause", ()):
            if d:  # DISTINCT without ON is a list holding one empty node
                self.expr(d, scope, "group")
        having = body.get("havingClause")
        if having is not None:
            self.expr(having, scope, "having")
        for w in body.get("windowClause", ()):
            self.expr(w, scope, "window")
        for vl in body.get("valuesLists", ()):
            self.expr(vl, scope, "values")
        for sb in body.get("sortClause", ()):
            self.expr(sb, scope, "order")
        self._limit(body, scope, top)
        self._locking(body, scope)
        into = body.get("intoClause")
        if into is not None:
            rel = self.resolve(into["rel"], scope, cte=False)
            if rel is not None:
                f.relations.append((rel[0], rel[1], "ddl"))
            f.writes = True

    def _limit(self, body: dict[str, Any], scope: _Scope, top: bool) -> None:
        for key in ("limitCount", "limitOffset"):
            node = body.get(key)
            if node is not None:
                if top and key == "limitCount":
                    self.f.has_limit = True
                self.expr(node, scope, "limit")

    def _locking(self, body: dict[str, Any], scope: _Scope) -> None:
        clauses = body.get("lockingClause")
        if not clauses:
            return
        f = self.f
        f.locking = True
        for lc in clauses:
            lc = lc["LockingClause"]
            named = lc.get("lockedRels")
            if named:
                for rv in named:
                    rv = rv.get("RangeVar", rv)
                    item = scope.find(rv["relname"])
                    for s, n in item[1] if item is not None else ():
                        f.relations.append((s, n, "update"))
            else:
                for _, members in scope.items:
                    for s, n in members:
                        f.relations.append((s, n, "update"))

    def with_clause(self, wc: dict[str, Any], scope: _Scope) -> None:
        f = self.f
        scope.ctes = set()
        ctes = wc.get("ctes", ())
        recursive = bool(wc.get("recursive"))
        if recursive:
            for cte in ctes:
                scope.ctes.add(cte["CommonTableExpr"]["ctename"])
        for cte in ctes:
            c = cte["CommonTableExpr"]
            name = c["ctename"]
            f.ctes.append(name)
            qtype, q = _one(c["ctequery"])
            if qtype == "SelectStmt":
                self.select(q, scope)
            elif qtype in _DML:
                f.data_modifying_ctes = True
                _DML[qtype](self, q, scope, False)
            else:
                raise _cannot(qtype)
            for key, ntype in (
                ("search_clause", "CTESearchClause"),
                ("cycle_clause", "CTECycleClause"),
            ):
                if c.get(key):
                    self.generic(ntype, c[key], scope, "target")
            scope.ctes.add(name)

    def resolve(self, rv: dict[str, Any], scope: _Scope | None, *, cte: bool) -> Rel | None:
        """A RangeVar's relation as the server resolves it, or None for a CTE reference."""
        if rv.get("catalogname"):
            raise _Unsupported("phigate does not accept three-part (database.schema.table) names")
        name: str = rv["relname"]
        schema: str | None = rv.get("schemaname")
        if schema is None:
            if cte and scope is not None and scope.has_cte(name):
                return None
            rel = unqualified_relation(name, self.schema)
            # CREATE TEMP TABLE x: pg_temp.x (a pg_catalog name stays pg_catalog's: stricter).
            if rel[0] != "pg_catalog" and rv.get("relpersistence") == "t":
                return ("pg_temp", name)
            return rel
        return (schema, name)

    def from_item(self, node: dict[str, Any], scope: _Scope) -> None:
        ntype, b = _one(node)
        f = self.f
        if ntype == "RangeVar":
            rel = self.resolve(b, scope, cte=True)
            alias = b.get("alias")
            refname = alias["aliasname"] if alias else b["relname"]
            if rel is None:
                scope.items.append((refname, ()))
            else:
                f.relations.append((rel[0], rel[1], self.read_op))
                scope.items.append((refname, (rel,)))
        elif ntype == "JoinExpr":
            start = len(scope.items)
            self.from_item(b["larg"], scope)
            mid = len(scope.items)
            self.from_item(b["rarg"], scope)
            left = tuple(m for _, ms in scope.items[start:mid] for m in ms)
            right = tuple(m for _, ms in scope.items[mid:] for m in ms)
            both = tuple(dict.fromkeys(left + right))
            if b.get("isNatural"):
                for rel in both:
                    f.columns.append(ColumnUse((rel,), "*", "join", True, None))
            for u in b.get("usingClause", ()):
                col = _sval(u)
                for side in (left, right):
                    if side:
                        f.columns.append(ColumnUse(side, col, "join", len(side) == 1, None))
            quals = b.get("quals")
            if quals is not None:
                self.expr(quals, scope, "join")
            alias = b.get("alias")
            if alias:
                scope.items.append((alias["aliasname"], both))
            jalias = b.get("join_using_alias")
            if jalias:
                scope.items.append((jalias["aliasname"], both))
        elif ntype == "RangeSubselect":
            f.subqueries += 1
            sub = b["subquery"]
            self.select(sub["SelectStmt"], scope)
            alias = b.get("alias")
            scope.items.append((alias["aliasname"] if alias else None, ()))
        elif ntype == "RangeFunction":
            for fl in b.get("functions", ()):
                self.expr(fl, scope, "from")
            for cd in b.get("coldeflist", ()):
                self.expr(cd, scope, "from")
            alias = b.get("alias")
            scope.items.append((alias["aliasname"] if alias else None, ()))
        elif ntype in ("RangeTableFunc", "JsonTable"):
            self.generic(ntype, b, scope, "from")
            alias = b.get("alias")
            scope.items.append((alias["aliasname"] if alias else None, ()))
        elif ntype == "RangeTableSample":
            self.from_item(b["relation"], scope)
            for key in ("args", "repeatable"):
                v = b.get(key)
                if v is not None:
                    self.expr(v, scope, "from")
        else:
            raise _cannot(ntype)

    # DML ----------------------------------------------------------------------------------

    def _target(self, b: dict[str, Any], scope: _Scope, op: str) -> Rel:
        rel = self.resolve(b["relation"], scope, cte=False)
        assert rel is not None
        self.f.relations.append((rel[0], rel[1], op))
        self.f.writes = True
        return rel

    def _returning(self, b: dict[str, Any], scope: _Scope, rel: Rel) -> None:
        rc = b.get("returningClause")
        exprs = b.get("returningList")
        if rc is not None:
            exprs = rc.get("exprs")
            for opt in rc.get("options", ()):
                o = opt["ReturningOption"]
                scope.items.append((o.get("value"), (rel,)))
        if exprs:
            # RETURNING old.* / new.* (PostgreSQL 18) name the target row; * is the target's.
            aliases = _Scope(scope.parent)
            aliases.items = [("old", (rel,)), ("new", (rel,))]
            ret = _Scope(aliases)
            ret.items = list(scope.items)
            for rt in exprs:
                self.expr(rt["ResTarget"]["val"], ret, "returning")

    def insert(self, b: dict[str, Any], parent: _Scope | None, top: bool, _t: str = "") -> str:
        f = self.f
        scope = _Scope(parent)
        wc = b.get("withClause")
        if wc is not None:
            self.with_clause(wc, scope)
        rel = self._target(b, scope, "insert")
        sel = b.get("selectStmt")
        cols = b.get("cols")
        if cols:
            for c in cols:
                f.columns.append(
                    ColumnUse((rel,), c["ResTarget"]["name"], "insert", True, "insert")
                )
        elif sel is not None:
            f.columns.append(ColumnUse((rel,), "*", "insert", True, "insert"))
        if sel is not None:
            self.select(sel["SelectStmt"], scope)
        alias = b["relation"].get("alias")
        tscope = _Scope(scope)
        tscope.items.append((alias["aliasname"] if alias else rel[1], (rel,)))
        oc = b.get("onConflictClause")
        if oc is not None:
            cscope = _Scope(tscope)
            cscope.items.append(("excluded", (rel,)))
            infer = oc.get("infer")
            if infer is not None:
                self.generic("InferClause", infer, cscope, "on_conflict")
            if oc.get("action") == "ONCONFLICT_UPDATE":
                f.relations.append((rel[0], rel[1], "update"))
                for rt in oc.get("targetList", ()):
                    r = rt["ResTarget"]
                    f.columns.append(ColumnUse((rel,), r["name"], "set", True, "update"))
                    self.expr(r["val"], cscope, "set")
                w = oc.get("whereClause")
                if w is not None:
                    self.expr(w, cscope, "where")
        self._returning(b, tscope, rel)
        return "insert"

    def update(self, b: dict[str, Any], parent: _Scope | None, top: bool, _t: str = "") -> str:
        f = self.f
        scope = _Scope(parent)
        wc = b.get("withClause")
        if wc is not None:
            self.with_clause(wc, scope)
        rel = self._target(b, scope, "update")
        alias = b["relation"].get("alias")
        scope.items.append((alias["aliasname"] if alias else rel[1], (rel,)))
        for item in b.get("fromClause", ()):
            self.from_item(item, scope)
        for rt in b.get("targetList", ()):
            r = rt["ResTarget"]
            f.columns.append(ColumnUse((rel,), r["name"], "set", True, "update"))
            for ind in r.get("indirection", ()):
                self.expr(ind, scope, "set")
            self.expr(r["val"], scope, "set")
        self._where(b, scope, top)
        self._returning(b, scope, rel)
        return "update"

    def _where(self, b: dict[str, Any], scope: _Scope, top: bool) -> None:
        w = b.get("whereClause")
        if w is not None:
            if top:
                self.f.has_where = True
            self.expr(w, scope, "where")

    def delete(self, b: dict[str, Any], parent: _Scope | None, top: bool, _t: str = "") -> str:
        scope = _Scope(parent)
        wc = b.get("withClause")
        if wc is not None:
            self.with_clause(wc, scope)
        rel = self._target(b, scope, "delete")
        alias = b["relation"].get("alias")
        scope.items.append((alias["aliasname"] if alias else rel[1], (rel,)))
        for item in b.get("usingClause", ()):
            self.from_item(item, scope)
        self._where(b, scope, top)
        self._returning(b, scope, rel)
        return "delete"

    def merge(self, b: dict[str, Any], parent: _Scope | None, top: bool, _t: str = "") -> str:
        f = self.f
        scope = _Scope(parent)
        wc = b.get("withClause")
        if wc is not None:
            self.with_clause(wc, scope)
        rel = self._target(b, scope, "merge")
        alias = b["relation"].get("alias")
        scope.items.append((alias["aliasname"] if alias else rel[1], (rel,)))
        self.from_item(b["sourceRelation"], scope)
        self.expr(b["joinCondition"], scope, "join")
        for wn in b.get("mergeWhenClauses", ()):
            w = wn["MergeWhenClause"]
            cmd = w.get("commandType")
            cond = w.get("condition")
            if cond is not None:
                self.expr(cond, scope, "where")
            targets = w.get("targetList", ())
            if cmd == "CMD_UPDATE":
                for rt in targets:
                    r = rt["ResTarget"]
                    f.columns.append(ColumnUse((rel,), r["name"], "set", True, "merge"))
                    self.expr(r["val"], scope, "set")
            elif cmd == "CMD_INSERT":
                if targets:
                    for rt in targets:
                        f.columns.append(
                            ColumnUse((rel,), rt["ResTarget"]["name"], "insert", True, "merge")
                        )
                else:
                    f.columns.append(ColumnUse((rel,), "*", "insert", True, "merge"))
                for v in w.get("values", ()):
                    self.expr(v, scope, "values")
            elif cmd not in ("CMD_DELETE", "CMD_NOTHING"):
                raise _cannot(f"MERGE {cmd}")
        self._returning(b, scope, rel)
        return "merge"

    def copy(self, b: dict[str, Any], top: bool, _t: str) -> str:
        f = self.f
        is_from = bool(b.get("is_from"))
        op = "copy_from" if is_from else "copy_to"
        f.copy_direction = "from" if is_from else "to"
        if b.get("is_program"):
            f.copy_target = "program"
        elif b.get("filename") is not None:
            f.copy_target = "file"
        else:
            f.copy_target = "stdio"
        rv = b.get("relation")
        if rv is not None:
            rel = self.resolve(rv, None, cte=False)
            assert rel is not None
            f.relations.append((rel[0], rel[1], op))
            attlist = b.get("attlist")
            cols = [_sval(a) for a in attlist] if attlist else ["*"]
            for c in cols:
                f.columns.append(ColumnUse((rel,), c, "copy", True, op if is_from else None))
            if is_from:
                f.writes = True
            w = b.get("whereClause")
            if w is not None:
                scope = _Scope(None)
                scope.items.append((rel[1], (rel,)))
                self.expr(w, scope, "where")
        else:
            f.copy_query = True
            saved, self.read_op = self.read_op, "copy_to"
            try:
                self.inner(b["query"])
            finally:
                self.read_op = saved
        return op

    # utility statements -------------------------------------------------------------------

    def variable_set(self, b: dict[str, Any], top: bool, _t: str) -> str:
        f = self.f
        f.literal_sensitive = True
        vkind = b.get("kind")
        name = (b.get("name") or "").lower()
        f.set_local = bool(b.get("is_local"))
        if vkind == "VAR_RESET_ALL":
            f.set_name = "all"
            return "reset"
        f.set_name = name
        values = []
        for a in b.get("args", ()):
            if "DefElem" in a:  # SET TRANSACTION / SESSION CHARACTERISTICS options
                d = a["DefElem"]
                values.append(f"{d['defname']}={_const_text(d.get('arg')) or ''}")
            else:
                text = _const_text(a)
                if text is None:
                    raise _cannot("a SET value that is not a constant")
                values.append(text)
        f.set_values = tuple(values)
        if name == "role":
            return "set_role"
        if name == "session_authorization":
            return "set_session_authorization"
        if vkind == "VAR_RESET":
            return "reset"
        if vkind == "VAR_SET_MULTI" and name in ("transaction", "transaction snapshot"):
            return "transaction"
        return "set"

    def variable_show(self, b: dict[str, Any], top: bool, _t: str) -> str:
        self.f.set_name = (b.get("name") or "").lower()
        return "show"

    def transaction(self, b: dict[str, Any], top: bool, _t: str) -> str:
        self.f.transaction = b.get("kind")
        return "transaction"

    def explain(self, b: dict[str, Any], top: bool, _t: str) -> str:
        f = self.f
        for opt in b.get("options", ()):
            d = opt["DefElem"]
            if d.get("defname") == "verbose":
                arg_node = d.get("arg") or {}
                off = "Boolean" in arg_node and not arg_node["Boolean"].get("boolval")
                f.explain_verbose = not off
            if d.get("defname") == "analyze":
                arg = _const_text(d.get("arg")) if d.get("arg") else "true"
                if "Boolean" in (d.get("arg") or {}):
                    arg = "true" if d["arg"]["Boolean"].get("boolval") else "false"
                elif "String" in (d.get("arg") or {}):
                    arg = d["arg"]["String"]["sval"].lower()
                f.explain_analyze = arg in ("true", "on", "1", "yes")
        self.inner(b["query"])
        return "explain"

    def prepare(self, b: dict[str, Any], top: bool, _t: str) -> str:
        self.inner(b["query"])
        return "prepare"

    def execute(self, b: dict[str, Any], top: bool, _t: str) -> str:
        for p in b.get("params", ()):
            self.expr(p, _Scope(None), "values")
        return "execute"

    def declare(self, b: dict[str, Any], top: bool, _t: str) -> str:
        self.inner(b["query"])
        return "declare_cursor"

    def create_table_as(self, b: dict[str, Any], top: bool, _t: str) -> str:
        f = self.f
        into = b["into"]["IntoClause"] if "IntoClause" in b["into"] else b["into"]
        rel = self.resolve(into["rel"], None, cte=False)
        assert rel is not None
        f.relations.append((rel[0], rel[1], "ddl"))
        f.writes = True
        self.inner(b["query"])
        return "ddl"

    def lock(self, b: dict[str, Any], top: bool, _t: str) -> str:
        for rv in b.get("relations", ()):
            rel = self.resolve(rv["RangeVar"], None, cte=False)
            assert rel is not None
            self.f.relations.append((rel[0], rel[1], "select"))
        return "lock"

    def truncate(self, b: dict[str, Any], top: bool, _t: str) -> str:
        f = self.f
        f.writes = True
        for rv in b.get("relations", ()):
            rel = self.resolve(rv["RangeVar"], None, cte=False)
            assert rel is not None
            f.relations.append((rel[0], rel[1], "truncate"))
        f.cascade = b.get("behavior") == "DROP_CASCADE"
        return "truncate"

    def maintenance(self, b: dict[str, Any], top: bool, ntype: str) -> str:
        f = self.f
        if ntype == "VacuumStmt":
            for vr in b.get("rels", ()):
                rv = vr["VacuumRelation"].get("relation")
                if rv is not None:
                    rel = self.resolve(rv, None, cte=False)
                    assert rel is not None
                    f.relations.append((rel[0], rel[1], "select"))
        elif b.get("relation") is not None:  # CLUSTER, REINDEX TABLE/INDEX
            rel = self.resolve(b["relation"], None, cte=False)
            assert rel is not None
            f.relations.append((rel[0], rel[1], "select"))
        return "maintenance"

    def call(self, b: dict[str, Any], top: bool, _t: str) -> str:
        self.expr({"FuncCall": b["funccall"]}, _Scope(None), "call")
        return "call"

    def simple(self, b: dict[str, Any], top: bool, ntype: str) -> str:
        f = self.f
        if ntype == "DiscardStmt":
            f.discard = b.get("target")
        return _SIMPLE[ntype]

    def ddl(self, b: dict[str, Any], top: bool, ntype: str) -> str:
        f = self.f
        f.writes = True
        saved, self.generic_op = self.generic_op, "ddl"
        try:
            if ntype == "DropStmt" and b.get("removeType") in _RELATION_OBJECTS:
                for obj in b.get("objects", ()):
                    names = [_sval(s) for s in obj["List"]["items"]]
                    rv = {"relname": names[-1]}
                    if len(names) == 2:
                        rv["schemaname"] = names[0]
                    elif len(names) > 2:
                        rv["catalogname"] = names[0]
                    rel = self.resolve(rv, None, cte=False)
                    assert rel is not None
                    f.relations.append((rel[0], rel[1], "ddl"))
                f.cascade = b.get("behavior") == "DROP_CASCADE"
            else:
                self.generic(ntype, b, _Scope(None), "ddl")
            f.reserved_schema = _names_reserved_schema(b)
        finally:
            self.generic_op = saved
        return "ddl"

    def admin(self, b: dict[str, Any], top: bool, ntype: str) -> str:
        return "admin"

    # expressions --------------------------------------------------------------------------

    def expr(self, node: Any, scope: _Scope, clause: str) -> None:
        if type(node) is list:
            for item in node:
                if item:
                    self.expr(item, scope, clause)
            return
        for ntype, body in node.items():
            handler = _EXPRESSIONS.get(ntype)
            if handler is not None:
                handler(self, body, scope, clause)
            elif ntype in _TRANSPARENT:
                self.generic(ntype, body, scope, clause)
            else:
                raise _cannot(ntype)

    def generic(self, ntype: str, body: dict[str, Any], scope: _Scope, clause: str) -> None:
        """Walk every child of a node whose own meaning needs no checking."""
        structs = _STRUCT_FIELDS.get(ntype)
        for key, value in body.items():
            tv = type(value)
            if tv is dict:
                st = structs.get(key) if structs is not None else None
                if st is not None:
                    self.typed(st, value, scope, clause)
                else:
                    self.expr(value, scope, clause)
            elif tv is list:
                for item in value:
                    if type(item) is dict and item:
                        self.expr(item, scope, clause)

    def typed(self, ntype: str, body: dict[str, Any], scope: _Scope, clause: str) -> None:
        """A child stored without its type wrapper (a RangeVar*, TypeName*, ... field)."""
        handler = _EXPRESSIONS.get(ntype)
        if handler is not None:
            handler(self, body, scope, clause)
        elif ntype in _TRANSPARENT:
            self.generic(ntype, body, scope, clause)
        elif ntype == "SelectStmt":
            self.select(body, scope)
        else:
            raise _cannot(ntype)

    def column_ref(self, b: dict[str, Any], scope: _Scope, clause: str) -> None:
        f = self.f
        fields = b["fields"]
        n = len(fields)
        last = fields[-1]
        star = "A_Star" in last
        if n == 1:
            if star:  # SELECT * expands the FROM items of its own query level
                for _, members in scope.items:
                    for rel in members:
                        f.columns.append(ColumnUse((rel,), "*", clause, True, None))
                return
            name = last["String"]["sval"]
            if clause == "order" and name in scope.outputs:
                return
            item = scope.find(name)
            if item is not None:  # maybe a whole-row reference: SELECT p FROM patients p
                for rel in item[1]:
                    f.columns.append(ColumnUse((rel,), "*", clause, True, None))
            self._unqualified(name, scope, clause)
            return
        names = [x["String"]["sval"] if "String" in x else "*" for x in fields]
        col = names[-1]
        item = None
        if n >= 3:
            item = self._find_rel(names[-3], names[-2], scope)
            if item is not None:
                self._qualified(item, col, clause)
                return
        # A.B: column B of relation A, else field B of composite column A (A.B.C likewise).
        item = scope.find(names[0])
        if item is not None:
            self._qualified(item, names[1] if n >= 3 else col, clause)
            return
        if names[0] != "*":
            self._unqualified(names[0], scope, clause)

    def _find_rel(self, schema: str, table: str, scope: _Scope) -> _Item | None:
        item = scope.find(table)
        if item is not None and len(item[1]) == 1 and item[1][0] == (schema, table):
            return item
        return None

    def _qualified(self, item: _Item, col: str, clause: str) -> None:
        members = item[1]
        if members:
            self.f.columns.append(ColumnUse(members, col, clause, len(members) == 1, None))

    def _unqualified(self, name: str, scope: _Scope, clause: str) -> None:
        cands, derived = scope.candidates()
        if cands:
            exact = len(cands) == 1 and not derived
            self.f.columns.append(ColumnUse(cands, name, clause, exact, None))

    def func_call(self, b: dict[str, Any], scope: _Scope, clause: str) -> None:
        f = self.f
        names = [_sval(s) for s in b["funcname"]]
        if len(names) == 1:
            name = names[0]
            written = None
            resolved = unqualified_function_schema(name, self.schema)
        elif len(names) == 2:
            written, name = names
            resolved = written
        else:
            raise _Unsupported("phigate does not accept three-part function names")
        f.functions.append((written, name, resolved))
        if name in WRITING_FUNCTIONS:
            f.writes = True
        args = b.get("args", ())
        if (
            args
            and (
                name in NAME_ARGUMENT_FUNCTIONS
                or resolved != "pg_catalog"
                or name not in DEFAULT_FUNCTIONS
            )
            and any(_str_const(a) for a in args)
        ):
            f.literal_sensitive = True
        if name == "set_config" and resolved == "pg_catalog":
            first = args[0] if args else None
            f.set_configs.append(
                _const_text(first).lower() if _str_const(first) else None  # type: ignore[union-attr]
            )
        for a in args:
            self.expr(a, scope, clause)
        for key in ("agg_order", "agg_filter"):
            v = b.get(key)
            if v is not None:
                self.expr(v, scope, clause)
        over = b.get("over")
        if over is not None:
            self.generic("WindowDef", over, scope, "window")

    def type_cast(self, b: dict[str, Any], scope: _Scope, clause: str) -> None:
        tn = b["typeName"]
        names = tn.get("names", ())
        if names and "String" in names[-1] and names[-1]["String"]["sval"] in _REG_TYPES:
            self.f.reg_casts += 1
            if _str_const(b.get("arg")):
                self.f.literal_sensitive = True
        arg = b.get("arg")
        if arg is not None:
            self.expr(arg, scope, clause)
        for tm in tn.get("typmods", ()):
            self.expr(tm, scope, clause)

    def a_expr(self, b: dict[str, Any], scope: _Scope, clause: str) -> None:
        name = b.get("name")
        if name and len(name) > 1:
            schema = _sval(name[0])
            if schema != "pg_catalog":
                self.f.operators.append(schema)
        for key in ("lexpr", "rexpr"):
            v = b.get(key)
            if v is not None:
                self.expr(v, scope, clause)

    def sublink(self, b: dict[str, Any], scope: _Scope, clause: str) -> None:
        self.f.subqueries += 1
        te = b.get("testexpr")
        if te is not None:
            self.expr(te, scope, clause)
        for op in b.get("operName", ()):
            self.expr(op, scope, clause)
        if len(b.get("operName", ())) > 1 and _sval(b["operName"][0]) != "pg_catalog":
            self.f.operators.append(_sval(b["operName"][0]))
        self.select(b["subselect"]["SelectStmt"], scope)

    def subselect(self, b: dict[str, Any], scope: _Scope, clause: str) -> None:
        self.f.subqueries += 1
        self.select(b, scope)

    def param(self, b: dict[str, Any], scope: _Scope, clause: str) -> None:
        self.f.params = True

    def range_var(self, b: dict[str, Any], scope: _Scope, clause: str) -> None:
        # Only reached inside DDL (generic walk): the relation the DDL names or references.
        rel = self.resolve(b, None, cte=False)
        assert rel is not None
        self.f.relations.append((rel[0], rel[1], self.generic_op))

    def sort_by(self, b: dict[str, Any], scope: _Scope, clause: str) -> None:
        node = b.get("node")
        if node is not None:
            self.expr(node, scope, clause)
        use = b.get("useOp")
        if use and len(use) > 1 and _sval(use[0]) != "pg_catalog":
            self.f.operators.append(_sval(use[0]))


def _ignore(w: _Walker, b: Any, scope: _Scope, clause: str) -> None:
    pass


_EXPRESSIONS: dict[str, Any] = {
    "ColumnRef": _Walker.column_ref,
    "FuncCall": _Walker.func_call,
    "TypeCast": _Walker.type_cast,
    "A_Expr": _Walker.a_expr,
    "SubLink": _Walker.sublink,
    "SelectStmt": _Walker.subselect,
    "ParamRef": _Walker.param,
    "RangeVar": _Walker.range_var,
    "SortBy": _Walker.sort_by,
    "A_Const": _ignore,
    "String": _ignore,
    "Integer": _ignore,
    "Float": _ignore,
    "Boolean": _ignore,
    "BitString": _ignore,
    "A_Star": _ignore,
    "SQLValueFunction": _ignore,
    "SetToDefault": _ignore,
    "CurrentOfExpr": _ignore,
    "MergeSupportFunc": _ignore,
    "TypeName": _ignore,  # type names hold no expressions besides typmods, walked by TypeCast
    "Alias": _ignore,
    "RoleSpec": _ignore,
    "JsonFormat": _ignore,
}

# Expression and clause nodes whose children are walked without further meaning.
_TRANSPARENT = frozenset({
    "BoolExpr", "NullTest", "BooleanTest", "CaseExpr", "CaseWhen", "CoalesceExpr",
    "MinMaxExpr", "RowExpr", "A_ArrayExpr", "A_Indirection", "A_Indices", "CollateClause",
    "GroupingFunc", "GroupingSet", "MultiAssignRef", "NamedArgExpr", "XmlExpr", "XmlSerialize",
    "List", "ResTarget", "WindowDef", "RangeTableFuncCol", "RangeTableFunc", "JsonTable",
    "JsonTableColumn", "JsonTablePathSpec", "JsonValueExpr", "JsonOutput", "JsonReturning",
    "JsonKeyValue", "JsonObjectConstructor", "JsonArrayConstructor",
    "JsonArrayQueryConstructor", "JsonAggConstructor", "JsonObjectAgg", "JsonArrayAgg",
    "JsonParseExpr", "JsonScalarExpr", "JsonSerializeExpr", "JsonIsPredicate", "JsonFuncExpr",
    "JsonArgument", "JsonBehavior", "InferClause", "IndexElem", "CTESearchClause",
    "CTECycleClause",
    # Structure inside DDL (walked for the relations, functions and queries in it).
    "ColumnDef", "Constraint", "DefElem", "ObjectWithArgs", "AccessPriv", "PartitionSpec",
    "PartitionElem", "PartitionBoundSpec", "PartitionRangeDatum", "PartitionCmd",
    "AlterTableCmd", "ATAlterConstraint", "ReplicaIdentityStmt", "TableLikeClause",
    "TriggerTransition", "FunctionParameter", "StatsElem", "CreateOpClassItem", "IntoClause",
    "PublicationObjSpec", "PublicationTable", "VacuumRelation",
    *(  # the DDL statements themselves, walked from Walker.ddl
        "CreateStmt", "CreateForeignTableStmt", "AlterTableStmt", "IndexStmt", "ViewStmt",
        "CreateFunctionStmt", "AlterFunctionStmt", "CreateSchemaStmt", "CreateSeqStmt",
        "AlterSeqStmt", "RefreshMatViewStmt", "RenameStmt", "CommentStmt", "CreateTrigStmt",
        "CreateDomainStmt", "AlterDomainStmt", "CompositeTypeStmt", "CreateEnumStmt",
        "AlterEnumStmt", "CreateRangeStmt", "DefineStmt", "AlterOwnerStmt",
        "AlterObjectSchemaStmt", "AlterObjectDependsStmt", "CreatePolicyStmt",
        "AlterPolicyStmt", "CreateStatsStmt", "AlterStatsStmt", "CreateCastStmt",
        "CreateOpClassStmt", "CreateOpFamilyStmt", "AlterOpFamilyStmt", "AlterOperatorStmt",
        "AlterTypeStmt", "CreateTransformStmt", "CreateAmStmt", "AlterCollationStmt",
        "AlterTSDictionaryStmt", "AlterTSConfigurationStmt", "DropStmt",
        "AlterTableMoveAllStmt", "CreateConversionStmt", "AlterDefaultPrivilegesStmt",
    ),
})  # fmt: skip

# DDL: changes the schema; needs operations = ["ddl"] (plus the relations it names).
_DDL = frozenset({
    "CreateStmt", "CreateForeignTableStmt", "AlterTableStmt", "IndexStmt", "ViewStmt",
    "CreateFunctionStmt", "AlterFunctionStmt", "CreateSchemaStmt", "CreateSeqStmt",
    "AlterSeqStmt", "RefreshMatViewStmt", "RenameStmt", "CommentStmt", "CreateTrigStmt",
    "CreateDomainStmt", "AlterDomainStmt", "CompositeTypeStmt", "CreateEnumStmt",
    "AlterEnumStmt", "CreateRangeStmt", "DefineStmt", "AlterOwnerStmt", "AlterObjectSchemaStmt",
    "AlterObjectDependsStmt", "CreatePolicyStmt", "AlterPolicyStmt", "CreateStatsStmt",
    "AlterStatsStmt", "CreateCastStmt", "CreateOpClassStmt", "CreateOpFamilyStmt",
    "AlterOpFamilyStmt", "AlterOperatorStmt", "AlterTypeStmt", "CreateTransformStmt",
    "CreateAmStmt", "AlterCollationStmt", "AlterTSDictionaryStmt", "AlterTSConfigurationStmt",
    "DropStmt", "AlterTableMoveAllStmt", "CreateConversionStmt",
    "AlterDefaultPrivilegesStmt",
})  # fmt: skip

# Server administration, roles and privileges, extensions, replication: never through the
# gateway, whatever the role (use a DBA connection).
_ADMIN = frozenset({
    "AlterSystemStmt", "LoadStmt", "CreateRoleStmt", "AlterRoleStmt", "DropRoleStmt",
    "GrantRoleStmt", "GrantStmt", "AlterRoleSetStmt", "AlterDatabaseSetStmt", "CreatedbStmt",
    "DropdbStmt", "AlterDatabaseStmt", "AlterDatabaseRefreshCollStmt", "CreateTableSpaceStmt",
    "DropTableSpaceStmt", "AlterTableSpaceOptionsStmt", "CreateSubscriptionStmt",
    "AlterSubscriptionStmt", "DropSubscriptionStmt", "CreateEventTrigStmt", "AlterEventTrigStmt",
    "CreatePLangStmt", "ReassignOwnedStmt", "DropOwnedStmt", "CreateUserMappingStmt",
    "AlterUserMappingStmt", "DropUserMappingStmt", "CreateForeignServerStmt",
    "AlterForeignServerStmt", "CreateFdwStmt", "AlterFdwStmt", "ImportForeignSchemaStmt",
    "CreateExtensionStmt", "AlterExtensionStmt", "AlterExtensionContentsStmt",
    "CreatePublicationStmt", "AlterPublicationStmt", "SecLabelStmt", "CheckPointStmt",
})  # fmt: skip

_RELATION_OBJECTS = frozenset({
    "OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_INDEX", "OBJECT_SEQUENCE",
    "OBJECT_FOREIGN_TABLE",
})  # fmt: skip

_SIMPLE: dict[str, str] = {
    "DoStmt": "do",
    "DeallocateStmt": "deallocate",
    "ListenStmt": "listen",
    "UnlistenStmt": "unlisten",
    "NotifyStmt": "notify",
    "DiscardStmt": "discard",
    "FetchStmt": "fetch",
    "ClosePortalStmt": "close_cursor",
    "ConstraintsSetStmt": "transaction",
}


_OBJECT_TYPE_KEYS = ("removeType", "objectType", "renameType", "objtype")


def _names_reserved_schema(stmt: dict[str, Any]) -> bool:
    """Does a DDL statement name schema phigate (the gateway's key and functions) or anything
    in it? Qualified names are lists of String nodes (a ColumnRef's ``fields`` are not: a
    table alias may be called phigate); a schema itself is a bare String or a schema field."""
    on_schema = any(stmt.get(k) == "OBJECT_SCHEMA" for k in _OBJECT_TYPE_KEYS)
    stack: list[Any] = [stmt]
    while stack:
        v = stack.pop()
        if type(v) is list:
            stack.extend(v)
            continue
        if type(v) is not dict:
            continue
        for key, x in v.items():
            tx = type(x)
            if tx is str:
                if x == RESERVED_SCHEMA and (
                    key in ("schemaname", "newschema")
                    or (on_schema and key in ("sval", "subname", "newname"))
                ):
                    return True
            elif tx is list:
                if key != "fields" and len(x) >= 2 and _sval_or_none(x[0]) == RESERVED_SCHEMA:
                    return True
                stack.extend(x)
            elif tx is dict:
                stack.append(x)
    return False


def _sval_or_none(node: Any) -> str | None:
    if type(node) is dict:
        s = node.get("String")
        if type(s) is dict:
            v = s.get("sval")
            return v if type(v) is str else None
    return None


def _dml_stmt(method: Any, kind: str) -> Any:
    def handler(w: _Walker, b: dict[str, Any], top: bool, _t: str) -> str:
        method(w, b, None, top)
        return kind

    return handler


_DML: dict[str, Any] = {
    "InsertStmt": _Walker.insert,
    "UpdateStmt": _Walker.update,
    "DeleteStmt": _Walker.delete,
    "MergeStmt": _Walker.merge,
}

_STATEMENTS: dict[str, Any] = {
    "SelectStmt": _Walker.select_stmt,
    "InsertStmt": _dml_stmt(_Walker.insert, "insert"),
    "UpdateStmt": _dml_stmt(_Walker.update, "update"),
    "DeleteStmt": _dml_stmt(_Walker.delete, "delete"),
    "MergeStmt": _dml_stmt(_Walker.merge, "merge"),
    "CopyStmt": _Walker.copy,
    "VariableSetStmt": _Walker.variable_set,
    "VariableShowStmt": _Walker.variable_show,
    "TransactionStmt": _Walker.transaction,
    "ExplainStmt": _Walker.explain,
    "PrepareStmt": _Walker.prepare,
    "ExecuteStmt": _Walker.execute,
    "DeclareCursorStmt": _Walker.declare,
    "CreateTableAsStmt": _Walker.create_table_as,
    "LockStmt": _Walker.lock,
    "TruncateStmt": _Walker.truncate,
    "VacuumStmt": _Walker.maintenance,
    "ClusterStmt": _Walker.maintenance,
    "ReindexStmt": _Walker.maintenance,
    "CallStmt": _Walker.call,
    **dict.fromkeys(_SIMPLE, _Walker.simple),
}


def _struct_fields() -> dict[str, dict[str, str]]:
    """For each node type, its fields that hold a node without a type wrapper in the JSON
    (C fields typed as a specific struct pointer, e.g. RangeVar *relation), from pglast.ast."""
    from pglast import ast

    node_types = {
        n
        for n in dir(ast)
        if isinstance(getattr(ast, n), type) and issubclass(getattr(ast, n), ast.Node)
    }
    out: dict[str, dict[str, str]] = {}
    for name in node_types:
        slots = getattr(getattr(ast, name), "__slots__", None)
        if not isinstance(slots, dict):
            continue
        fields = {}
        for field, info in slots.items():
            c_type = getattr(info, "c_type", "")
            base = c_type.rstrip("*")
            if c_type.endswith("*") and base in node_types and base not in ("Node", "Expr"):
                fields[field] = base
        if fields:
            out[name] = fields
    return out


_STRUCT_FIELDS = _struct_fields()
