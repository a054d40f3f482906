"""Layer 1 of PHI masking: splice masking subqueries in place of protected relations.

``rewrite(sql, catalog, clear_kinds, masks, schema=...)`` replaces every reference to a
protected relation (one with a classified column whose kind the identity does not see in clear) by

    (SELECT "id", <mask of ssn> AS "ssn", ... FROM "public"."patients") alias

keeping every column, its name, order and type, and the reference's alias (the table name when
there was none, so ``patients.ssn`` still resolves). Predicates, joins, grouping, functions,
casts, error messages and COPY then only ever see masked values: inference through WHERE or an
error message stops at the source.

The subquery is spliced at the RangeVar's location in the original text; the statement is never
deparsed, so literals, parameters ($1), comments and formatting elsewhere stay byte-identical.
The span of a reference is found by re-lexing from its location: schema-qualified and quoted
names, ``ONLY name`` / ``ONLY (name)``, the ``name *`` inheritance suffix and the ``TABLE name``
shorthand (turned into ``SELECT * FROM (...) name``).

Fail closed: a protected relation referenced anywhere the walker does not know how to mask
(a RangeVar in an unexpected place, TABLESAMPLE, row locking, functions that run SQL from a
string, writes that would copy masked values, the clear target row of UPDATE/DELETE/INSERT
... ON CONFLICT in WHERE/SET/RETURNING, creating objects from protected relations, DO blocks
and function bodies) refuses the whole string with a reason that names relations, columns and
clauses -- never a literal value from the statement.

The caller (policy/engine.py) decides when an identity is masked and passes the catalog
snapshot, the kinds it sees in clear, the target's pinned schema and ``masks``: the detector
patterns as SQL, built once per configuration by ``mask_sql``, and whether the target's pseudonym
functions are ready. Each mask yields what layer 2 (the Rust data plane) yields for the same
value; see mask_sql.py.

Pseudonyms are computed by calling ``phigate.pseudonym`` / ``phigate.pseudonym_int``, which
`phigate db install` puts in the database with the key (pseudonym_db.py): no key material is
ever part of a rewritten statement, so server logs, activity views and plans cannot show it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pglast import parser as _pg_parser

from phigate.masking.catalog_protocols import (
    CatalogLike,
    ColumnLike,
    ColumnRuleLike,
    RelationLike,
)
from phigate.masking.mask_sql import DetectorConfigLike, MaskSQL, _ident, mask_expression, mask_sql
from phigate.masking.pg_regex import postgres_regex
from phigate.masking.refusal import _Refuse
from phigate.masking.relation_plans import _cached_plan, _Plan
from phigate.policy.functions import never_reason
from phigate.policy.pg_names import unqualified_relation

# The rewrite's interface, mask building included, is importable from here.
__all__ = [
    "CatalogLike",
    "ColumnLike",
    "ColumnRuleLike",
    "DetectorConfigLike",
    "MaskSQL",
    "RelationLike",
    "RewriteResult",
    "mask_expression",
    "mask_sql",
    "postgres_regex",
    "rewrite",
]


@dataclass(frozen=True, slots=True)
class RewriteResult:
    """``sql`` is the statement to send (the original string object when nothing changed);
    ``masked_columns`` are "schema.table.column" of every masked column the statement can
    reach; ``refuse`` is why the statement must be refused instead (then ``sql`` is the
    original and must not be sent), with ``sqlstate`` and, when the remedy is not the
    client's, a ``hint``."""

    sql: str
    changed: bool
    masked_columns: list[str] = field(default_factory=list)
    refuse: str | None = None
    sqlstate: str = "42501"
    hint: str | None = None


class _Scope:
    __slots__ = ("ctes", "parent")

    def __init__(self, parent: _Scope | None) -> None:
        self.parent = parent
        self.ctes: set[str] = set()

    def has_cte(self, name: str) -> bool:
        s: _Scope | None = self
        while s is not None:
            if name in s.ctes:
                return True
            s = s.parent
        return False


class _Token:
    __slots__ = ("end", "name", "start")

    def __init__(self, start: int, end: int, name: str) -> None:
        self.start = start  # byte offsets into the UTF-8 text; end exclusive
        self.end = end
        self.name = name


# A FROM item of one query level that was masked: (refname, plan).
_Level = list[tuple[str, _Plan]]

_NO_ROWS_BACK = frozenset({
    "LockStmt", "TruncateStmt", "VacuumStmt", "ClusterStmt", "ReindexStmt", "TransactionStmt",
    "VariableSetStmt", "VariableShowStmt", "DeallocateStmt", "DiscardStmt", "FetchStmt",
    "ClosePortalStmt", "ListenStmt", "UnlistenStmt", "ConstraintsSetStmt", "CheckPointStmt",
})  # fmt: skip
_OPAQUE_SQL = frozenset({"DoStmt", "CreateFunctionStmt", "CreateTrigStmt", "RuleStmt"})
# Statements whose expressions are rewritten like any query's (EXECUTE parameters, CALL
# arguments, NOTIFY): nothing in them creates an object.
_WALK_ONLY = frozenset({"ExecuteStmt", "CallStmt", "NotifyStmt"})


class _Rewriter:
    def __init__(self, sql: str, catalog: CatalogLike, clear: frozenset[str],
                 masks: MaskSQL | None, schema: str) -> None:  # fmt: skip
        self.sql = sql
        self.schema = schema  # the one schema of the upstream session's search_path
        self.raw = sql.encode("utf-8")
        self.catalog = catalog
        self.clear = clear
        self.masks = masks
        self.splices: list[tuple[int, int, str]] = []
        self.masked: dict[str, None] = {}
        self.refs = 0  # protected references masked so far
        self.plans: dict[tuple[str, str], _Plan | None] = {}
        self._tokens: list[_Token] | None = None
        self._by_start: dict[int, int] = {}

    # relations --------------------------------------------------------------------------------

    def plan(self, schema: str, name: str) -> _Plan | None:
        key = (schema, name)
        if key not in self.plans:
            rel = self.catalog.relation(schema, name)
            # A view over classified columns whose mapping the catalog could not work out.
            reason = getattr(rel, "refuse_reason", None)
            if isinstance(reason, str) and reason:
                raise _Refuse(f"{schema}.{name} cannot be masked: {reason}")
            self.plans[key] = (
                None if rel is None else _cached_plan(rel, schema, name, self.clear, self.masks)
            )
        return self.plans[key]

    def resolve(self, rv: dict[str, Any], scope: _Scope | None) -> tuple[str, str] | None:
        """(schema, name) as the server resolves it with the pinned search_path (``schema``),
        or None for a CTE reference."""
        if rv.get("catalogname"):
            raise _Refuse("three-part (database.schema.table) names are not accepted")
        name: str = rv["relname"]
        schema: str | None = rv.get("schemaname")
        if schema is not None:
            return (schema, name)
        if scope is not None and scope.has_cte(name):
            return None
        rel = unqualified_relation(name, self.schema)
        if rel[0] != "pg_catalog" and rv.get("relpersistence") == "t":
            return ("pg_temp", name)
        return rel

    def protected(self, rv: dict[str, Any], scope: _Scope | None) -> _Plan | None:
        rel = self.resolve(rv, scope)
        return None if rel is None else self.plan(*rel)

    def _use(self, plan: _Plan) -> None:
        self.refs += 1
        for c in plan.masked:
            self.masked[f"{plan.schema}.{plan.name}.{c}"] = None

    # lexing -----------------------------------------------------------------------------------

    def tokens(self) -> list[_Token]:
        if self._tokens is None:
            sql = self.sql
            if sql.isascii():
                offsets: list[int] | None = None
            else:  # pglast's scanner reports character offsets; locations are bytes
                offsets = [0]
                for ch in sql:
                    offsets.append(offsets[-1] + len(ch.encode("utf-8")))
            toks = []
            for t in _pg_parser.scan(sql):
                s, e = t.start, t.end + 1
                if offsets is not None:
                    s, e = offsets[s], offsets[e]
                toks.append(_Token(s, e, t.name))
            self._tokens = toks
            self._by_start = {t.start: i for i, t in enumerate(toks)}
        return self._tokens

    def _tok(self, i: int) -> str | None:
        toks = self.tokens()
        return toks[i].name if 0 <= i < len(toks) else None

    def span(self, rv: dict[str, Any]) -> tuple[int, int, int, int]:
        """(start, end, first token index, last token index) of a RangeVar's text, with ONLY,
        ONLY (...) and the inheritance star; start/end are byte offsets."""
        toks = self.tokens()
        i = self._by_start.get(rv.get("location", -1))
        if i is None:
            raise _Refuse("phigate cannot locate a protected relation reference in the text")
        parts = 1 + bool(rv.get("schemaname")) + bool(rv.get("catalogname"))
        j = i
        for _ in range(parts - 1):
            if self._tok(j + 1) != "ASCII_46":
                raise _Refuse("phigate cannot locate a protected relation reference in the text")
            j += 2
        first = i
        if self._tok(i - 1) == "ONLY":
            first = i - 1
        elif self._tok(i - 1) == "ASCII_40" and self._tok(i - 2) == "ONLY":
            if self._tok(j + 1) != "ASCII_41":
                raise _Refuse("phigate cannot locate a protected relation reference in the text")
            first, j = i - 2, j + 1
        if self._tok(j + 1) == "ASCII_42":
            j += 1
        return toks[first].start, toks[j].end, first, j

    def splice(self, start: int, end: int, text: str) -> None:
        self.splices.append((start, end, text))

    def result(self) -> str:
        out = []
        pos = 0
        for start, end, text in sorted(self.splices):
            if start < pos:  # two references whose spans overlap: the walker is confused
                raise _Refuse("phigate cannot rewrite this statement")
            out.append(self.raw[pos:start])
            out.append(text.encode("utf-8"))
            pos = end
        out.append(self.raw[pos:])
        return b"".join(out).decode("utf-8")

    # statements -------------------------------------------------------------------------------

    def statement(self, node: dict[str, Any], scope: _Scope | None) -> None:
        ntype, body = _one(node)
        handler = _STATEMENTS.get(ntype)
        if handler is not None:
            handler(self, body, scope)
        elif ntype in _OPAQUE_SQL:
            raise _Refuse(
                "function bodies, triggers, rules and DO blocks run SQL the masking rewrite "
                "cannot see"
            )
        elif ntype in _NO_ROWS_BACK:
            return
        elif ntype in _WALK_ONLY:
            self.walk(body, scope)
        else:
            # DDL and anything else: a protected relation anywhere in it is refused (creating
            # objects from protected relations, indexes/constraints on them, ...).
            before = self.refs
            self.walk(body, _Scope(scope))
            if self.refs != before:
                raise _Refuse(
                    "creating or changing objects from protected relations is not allowed "
                    "for masked identities"
                )

    def select_stmt(self, b: dict[str, Any], scope: _Scope | None) -> None:
        before = self.refs
        self.select(b, scope)
        if b.get("intoClause") is not None and self.refs != before:
            raise _Refuse(
                "SELECT INTO from protected relations is not allowed for masked identities"
            )

    def with_clause(self, wc: dict[str, Any] | None, scope: _Scope | None) -> _Scope:
        s = _Scope(scope)
        if wc is None:
            return s
        ctes = [c["CommonTableExpr"] for c in wc.get("ctes", ())]
        if wc.get("recursive"):
            s.ctes.update(c["ctename"] for c in ctes)
        for c in ctes:
            self.statement(c["ctequery"], s)
            s.ctes.add(c["ctename"])
        return s

    def select(self, b: dict[str, Any], parent: _Scope | None) -> None:
        scope = self.with_clause(b.get("withClause"), parent)
        if b.get("op", "SETOP_NONE") != "SETOP_NONE":
            for side in ("larg", "rarg"):
                arm = b[side]
                self.select(arm.get("SelectStmt", arm), scope)
            for key in ("sortClause", "limitCount", "limitOffset"):
                if key in b:
                    self.walk(b[key], scope)
            return
        level: _Level = []
        for item in b.get("fromClause", ()):
            self.from_item(item, scope, level)
        for key, value in b.items():
            if key not in ("withClause", "fromClause", "intoClause", "lockingClause"):
                self.walk(value, scope)
        locking = b.get("lockingClause")
        if locking and level:
            masked_refs = {r for r, _ in level}
            for lc in locking:
                named = lc["LockingClause"].get("lockedRels")
                names = {rv.get("RangeVar", rv)["relname"] for rv in named} if named else None
                if names is None or names & masked_refs:
                    raise _Refuse(
                        "row-locking clauses (FOR UPDATE/SHARE) on protected relations are not "
                        "allowed for masked identities"
                    )

    def from_item(self, node: dict[str, Any], scope: _Scope, level: _Level) -> None:
        ntype, b = _one(node)
        if ntype == "RangeVar":
            self.from_range_var(b, scope, level)
        elif ntype == "JoinExpr":
            self.from_item(b["larg"], scope, level)
            self.from_item(b["rarg"], scope, level)
            if b.get("quals") is not None:
                self.walk(b["quals"], scope)
        elif ntype == "RangeTableSample":
            rel = b["relation"]
            if "RangeVar" in rel and self.protected(rel["RangeVar"], scope) is not None:
                raise _Refuse("TABLESAMPLE on protected relations is not supported for masking")
            self.from_item(rel, scope, level)
            for key in ("args", "repeatable"):
                if key in b:
                    self.walk(b[key], scope)
        else:  # RangeSubselect, RangeFunction, RangeTableFunc, JsonTable
            self.walk(b, scope)

    def from_range_var(self, rv: dict[str, Any], scope: _Scope, level: _Level) -> None:
        plan = self.protected(rv, scope)
        if plan is None:
            return
        start, end, first, _last = self.span(rv)
        alias = rv.get("alias")
        refname = alias["aliasname"] if alias else rv["relname"]
        only = not rv.get("inh", False)
        sub = plan.subquery(only)
        if self._tok(first - 1) == "TABLE":  # TABLE name: the shorthand for SELECT * FROM name
            start = self.tokens()[first - 1].start
            text = f"SELECT * FROM {sub} AS {_ident(refname)}"  # noqa: S608
        elif alias:
            text = sub  # the alias (and its column list) follows in the original text
        else:
            text = f"{sub} AS {_ident(refname)}"
        self.splice(start, end, text)
        self._use(plan)
        level.append((refname, plan))

    # writes -----------------------------------------------------------------------------------

    def _target(self, b: dict[str, Any]) -> tuple[_Plan | None, str]:
        rv = b["relation"]
        rel = self.resolve(rv, None)
        assert rel is not None
        alias = rv.get("alias")
        return self.plan(*rel), (alias["aliasname"] if alias else rv["relname"])

    @staticmethod
    def _returning(b: dict[str, Any]) -> list[Any]:
        rc = b.get("returningClause")
        if rc is not None:
            return list(rc.get("exprs", ()))
        return list(b.get("returningList", ()))

    def _check_target(self, what: str, exprs: Any, plan: _Plan, refnames: set[str]) -> None:
        if _mentions(exprs, frozenset(plan.masked), refnames):
            raise _Refuse(
                f"{what} reads masked columns of {plan.schema}.{plan.name}, the target of the "
                "write, which cannot be masked there; remove them or use a role that sees them"
            )

    def _no_new_refs(self, before: int, what: str) -> None:
        if self.refs != before:
            raise _Refuse(
                f"{what} reads protected relations: the masked values would be written as if "
                "they were data"
            )

    def insert(self, b: dict[str, Any], parent: _Scope | None) -> None:
        scope = self.with_clause(b.get("withClause"), parent)
        plan, refname = self._target(b)
        sel = b.get("selectStmt")
        if sel is not None:
            before = self.refs
            self.statement(sel, scope)
            self._no_new_refs(before, "INSERT ... SELECT")
        oc = b.get("onConflictClause")
        if oc is not None:
            if plan is not None:
                exprs = [rt["ResTarget"]["val"] for rt in oc.get("targetList", ())]
                if oc.get("whereClause") is not None:
                    exprs.append(oc["whereClause"])
                self._check_target("ON CONFLICT DO UPDATE", exprs, plan, {refname})
            before = self.refs
            self.walk(oc, scope)
            self._no_new_refs(before, "ON CONFLICT DO UPDATE")
        ret = self._returning(b)
        if plan is not None and ret:
            self._check_target("RETURNING", ret, plan, {refname, "old", "new"})
        self.walk(ret, scope)

    def update(self, b: dict[str, Any], parent: _Scope | None) -> None:
        scope = self.with_clause(b.get("withClause"), parent)
        plan, refname = self._target(b)
        level: _Level = []
        for item in b.get("fromClause", ()):
            self.from_item(item, scope, level)
        sets = [rt["ResTarget"] for rt in b.get("targetList", ())]
        set_exprs = [r.get("val") for r in sets] + [r.get("indirection") for r in sets]
        if plan is not None:
            self._check_target("SET", set_exprs, plan, {refname})
            if b.get("whereClause") is not None:
                self._check_target("WHERE", b["whereClause"], plan, {refname})
            ret = self._returning(b)
            if ret:
                self._check_target("RETURNING", ret, plan, {refname, "old", "new"})
        for ref, p in level:
            if _mentions(set_exprs, frozenset(p.masked), {ref}):
                raise _Refuse(
                    f"SET copies masked columns of {p.schema}.{p.name}: the masked values "
                    "would be written as if they were data"
                )
        before = self.refs
        self.walk(set_exprs, scope)
        self._no_new_refs(before, "SET")
        for key in ("whereClause", "returningClause", "returningList"):
            if key in b:
                self.walk(b[key], scope)

    def delete(self, b: dict[str, Any], parent: _Scope | None) -> None:
        scope = self.with_clause(b.get("withClause"), parent)
        plan, refname = self._target(b)
        level: _Level = []
        for item in b.get("usingClause", ()):
            self.from_item(item, scope, level)
        if plan is not None:
            if b.get("whereClause") is not None:
                self._check_target("WHERE", b["whereClause"], plan, {refname})
            ret = self._returning(b)
            if ret:
                self._check_target("RETURNING", ret, plan, {refname, "old", "new"})
        for key in ("whereClause", "returningClause", "returningList"):
            if key in b:
                self.walk(b[key], scope)

    def merge(self, b: dict[str, Any], parent: _Scope | None) -> None:
        scope = self.with_clause(b.get("withClause"), parent)
        plan, _ = self._target(b)
        if plan is not None:
            raise _Refuse(
                f"MERGE into {plan.schema}.{plan.name} reads its masked columns in clear; "
                "not allowed for masked identities"
            )
        before = self.refs
        self.from_item(b["sourceRelation"], scope, [])
        for key in ("joinCondition", "mergeWhenClauses", "returningClause", "returningList"):
            if key in b:
                self.walk(b[key], scope)
        self._no_new_refs(before, "MERGE")

    # utility statements -----------------------------------------------------------------------

    def copy(self, b: dict[str, Any], scope: _Scope | None) -> None:
        rv = b.get("relation")
        if rv is None:
            self.statement(b["query"], scope)
            return
        if b.get("is_from"):
            return  # writes rows the client sends; nothing of the table flows back
        plan = self.protected(rv, None)
        if plan is None:
            return
        start, end, first, last = self.span(rv)
        if self._tok(first - 1) == "BINARY" or any(
            t.name == "DELIMITERS" for t in self.tokens()[last:]
        ):
            # Old COPY syntax has no query form; the options say the same in the new syntax.
            raise _Refuse(
                "old COPY syntax (BINARY, USING DELIMITERS) is not supported on protected "
                "relations; use WITH (FORMAT ..., DELIMITER ...)"
            )
        attlist = b.get("attlist")
        if attlist:
            j = last + 1
            if self._tok(j) != "ASCII_40":
                raise _Refuse("phigate cannot locate the COPY column list")
            depth = 0
            toks = self.tokens()
            while j < len(toks):
                if toks[j].name == "ASCII_40":
                    depth += 1
                elif toks[j].name == "ASCII_41":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            else:
                raise _Refuse("phigate cannot locate the COPY column list")
            end = toks[j].end
            cols = ", ".join(_ident(a["String"]["sval"]) for a in attlist)
        else:
            cols = "*"
        only = not rv.get("inh", False)
        self.splice(
            start,
            end,
            f"(SELECT {cols} FROM {plan.subquery(only)} AS {_ident(rv['relname'])})",  # noqa: S608
        )
        self._use(plan)

    def inner(self, b: dict[str, Any], scope: _Scope | None) -> None:
        # EXPLAIN, PREPARE, DECLARE CURSOR. A plan shows the masking subqueries, which hold
        # no key material (pseudonyms are function calls); ANALYZE and VERBOSE are refused by
        # the engine.
        self.statement(b["query"], scope)

    def create_as(self, b: dict[str, Any], scope: _Scope | None) -> None:
        before = self.refs
        self.statement(b["query"], scope)
        if self.refs != before:
            raise _Refuse(
                "creating tables, views or materialized views from protected relations is "
                "not allowed for masked identities"
            )

    # expressions ------------------------------------------------------------------------------

    def walk(self, value: Any, scope: _Scope | None) -> None:
        """Every node below ``value``: queries are rewritten, a protected RangeVar in a place
        the rewrite does not know is refused."""
        tv = type(value)
        if tv is list:
            for item in value:
                self.walk(item, scope)
            return
        if tv is not dict:
            return
        if len(value) == 1:
            ((key, body),) = value.items()
            if key[:1].isupper() and type(body) is dict:
                self.node(key, body, scope)
                return
        if "relname" in value and "relpersistence" in value:  # a RangeVar stored unwrapped
            self.stray_range_var(value, scope)
            return
        for item in value.values():
            self.walk(item, scope)

    def node(self, ntype: str, body: dict[str, Any], scope: _Scope | None) -> None:
        if ntype == "SelectStmt":
            self.select(body, scope)
        elif ntype == "RangeVar":
            self.stray_range_var(body, scope)
        elif ntype in _STATEMENTS or ntype in _OPAQUE_SQL:
            self.statement({ntype: body}, scope)
        else:
            if ntype == "FuncCall":
                names = body.get("funcname", ())
                last = names[-1] if names else {}
                name = last.get("String", {}).get("sval", "")
                why = never_reason(name)
                if why is not None:
                    raise _Refuse(f"function {name} is not allowed for masked identities: {why}")
            for item in body.values():
                self.walk(item, scope)

    def stray_range_var(self, rv: dict[str, Any], scope: _Scope | None) -> None:
        plan = self.protected(rv, scope)
        if plan is not None:
            raise _Refuse(f"{plan.schema}.{plan.name} is referenced where phigate cannot mask it")


def _one(node: dict[str, Any]) -> tuple[str, Any]:
    for item in node.items():
        return item
    raise _Refuse("phigate cannot rewrite an empty node")


def _column_refs(value: Any, nested: bool, out: list[tuple[list[str], bool]]) -> None:
    """Every ColumnRef below ``value`` as (fields, inside a nested query)."""
    tv = type(value)
    if tv is list:
        for item in value:
            _column_refs(item, nested, out)
    elif tv is dict:
        cr = value.get("ColumnRef")
        if cr is not None and len(value) == 1:
            fields = [f["String"]["sval"] if "String" in f else "*" for f in cr["fields"]]
            out.append((fields, nested))
            return
        inner = nested or "SelectStmt" in value
        for item in value.values():
            _column_refs(item, inner, out)


def _mentions(value: Any, masked: frozenset[str], refnames: set[str]) -> bool:
    """Might an expression read a masked column (or the whole row) of the relation known in
    this scope as one of ``refnames``? Conservative: an unqualified name equal to a masked
    column counts even when a nested query might resolve it elsewhere."""
    refs: list[tuple[list[str], bool]] = []
    _column_refs(value, False, refs)
    for fields, nested in refs:
        if len(fields) == 1:
            name = fields[0]
            if name == "*":
                if not nested:  # SELECT * of a nested query expands that query's FROM
                    return True
            elif name in masked or name in refnames:
                return True
            continue
        qualifier, col = fields[-2], fields[-1]
        if qualifier in refnames and (col in masked or col == "*"):
            return True
        if fields[0] in masked and fields[0] not in refnames:  # a field of a masked column
            return True
    return False


_STATEMENTS: dict[str, Any] = {
    "SelectStmt": _Rewriter.select_stmt,
    "InsertStmt": _Rewriter.insert,
    "UpdateStmt": _Rewriter.update,
    "DeleteStmt": _Rewriter.delete,
    "MergeStmt": _Rewriter.merge,
    "CopyStmt": _Rewriter.copy,
    "ExplainStmt": _Rewriter.inner,
    "PrepareStmt": _Rewriter.inner,
    "DeclareCursorStmt": _Rewriter.inner,
    "CreateTableAsStmt": _Rewriter.create_as,
    "ViewStmt": _Rewriter.create_as,
}


def rewrite(
    sql: str,
    catalog: CatalogLike,
    clear_kinds: Iterable[str],
    masks: MaskSQL | None,
    *,
    schema: str,
    doc: Mapping[str, Any] | None = None,
) -> RewriteResult:
    """Mask every protected relation ``sql`` reads, for an identity seeing ``clear_kinds``,
    resolving unqualified names as a session whose search_path is ``schema`` does.

    ``masks`` is what ``mask_sql`` built from the `[phi]` detector patterns and the state of
    the target's pseudonym functions; None refuses statements that need a pseudonym in SQL
    and scrubs free text with the default detectors."""
    clear = frozenset(clear_kinds)
    if doc is None:  # the caller may have parsed it already (one parse per decision)
        try:
            doc = orjson.loads(_pg_parser.parse_sql_json(sql))
        except _pg_parser.ParseError:
            return RewriteResult(sql, False, [], "phigate cannot parse this statement")
    rw = _Rewriter(sql, catalog, clear, masks, schema)
    try:
        for raw in doc.get("stmts", ()):
            rw.statement(raw["stmt"], None)
        if not rw.splices:
            return RewriteResult(sql, False, list(rw.masked))
        return RewriteResult(rw.result(), True, list(rw.masked))
    except _Refuse as exc:
        return RewriteResult(sql, False, [], exc.reason, exc.sqlstate, exc.hint)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
        # A tree shape the rewriter did not expect is something it cannot mask.
        return RewriteResult(sql, False, [], "phigate cannot rewrite this statement")
