"""The statement walker's queries and DML: SELECT, WITH, FROM items, INSERT, UPDATE, DELETE
and MERGE."""

from __future__ import annotations

from typing import Any

from phigate.policy.facts import ColumnUse, Rel
from phigate.policy.narrowing import has_limit, narrows
from phigate.policy.parse_nodes import _cannot, _one, _sval, _Unsupported
from phigate.policy.pg_names import unqualified_relation
from phigate.policy.scope import _Scope
from phigate.policy.walker_base import _WalkerBase


class _QueryWalker(_WalkerBase):
    __slots__ = ()

    def select_stmt(self, body: dict[str, Any], top: bool, _t: str = "SelectStmt") -> str:
        self.select(body, None, top=top)
        return "ddl" if body.get("intoClause") else "select"

    def select(self, body: dict[str, Any], parent: _Scope | None, *, top: bool = False) -> None:
        f = self.f
        scope = _Scope(parent)
        # Bulk reads: a CTE is narrowed only by what encloses this query (it may be read from
        # anywhere in it); the arms of a set operation by its LIMIT too; the FROM items of a
        # plain level by its own WHERE, LIMIT or one-row aggregates (narrowing.py).
        outer = self.narrowed
        wc = body.get("withClause")
        if wc is not None:
            self.with_clause(wc, scope)
        if body.get("op", "SETOP_NONE") != "SETOP_NONE":
            f.set_operations = True
            self.narrowed = outer or has_limit(body)
            for side in (body["larg"], body["rarg"]):
                self.select(side.get("SelectStmt", side), scope)
            self.narrowed = outer
            # ORDER BY / LIMIT of a set operation name output columns, not relations.
            out = _Scope(scope, opaque=True)
            for sb in body.get("sortClause", ()):
                self.expr(sb, out, "order")
            self._limit(body, out, top)
            self._locking(body, scope)
            return
        self.narrowed = narrows(body, self.schema, inherited=outer)
        for item in body.get("fromClause", ()):
            self.from_item(item, scope)
        self.narrowed = outer
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
                if not (self.narrowed or self.hidden) and self.read_op in ("select", "copy_to"):
                    f.bulk_reads.append((rel[0], rel[1], self.read_op))
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
        self._from_items(b, "fromClause", scope)
        for rt in b.get("targetList", ()):
            r = rt["ResTarget"]
            f.columns.append(ColumnUse((rel,), r["name"], "set", True, "update"))
            for ind in r.get("indirection", ()):
                self.expr(ind, scope, "set")
            self.expr(r["val"], scope, "set")
        self._where(b, scope, top)
        self._returning(b, scope, rel)
        return "update"

    def _from_items(self, b: dict[str, Any], key: str, scope: _Scope) -> None:
        """UPDATE ... FROM / DELETE ... USING: read rows the statement's WHERE narrows."""
        outer = self.narrowed
        self.narrowed = outer or b.get("whereClause") is not None
        for item in b.get(key, ()):
            self.from_item(item, scope)
        self.narrowed = outer

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
        self._from_items(b, "usingClause", scope)
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


def _dml_stmt(method: Any, kind: str) -> Any:
    def handler(w: _QueryWalker, b: dict[str, Any], top: bool, _t: str) -> str:
        method(w, b, None, top)
        return kind

    return handler


_DML: dict[str, Any] = {
    "InsertStmt": _QueryWalker.insert,
    "UpdateStmt": _QueryWalker.update,
    "DeleteStmt": _QueryWalker.delete,
    "MergeStmt": _QueryWalker.merge,
}

_QUERY_STATEMENTS: dict[str, Any] = {
    "SelectStmt": _QueryWalker.select_stmt,
    "InsertStmt": _dml_stmt(_QueryWalker.insert, "insert"),
    "UpdateStmt": _dml_stmt(_QueryWalker.update, "update"),
    "DeleteStmt": _dml_stmt(_QueryWalker.delete, "delete"),
    "MergeStmt": _dml_stmt(_QueryWalker.merge, "merge"),
}
