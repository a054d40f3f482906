"""Layer 1's rule for free-text columns while the identifier dictionary is on: such a column is
read as a whole or not at all (``free_text_use`` finds the first other use in a statement).

The gateway learns the patients' names, addresses, cities ... from the classified identifier
columns and tags them in every text value leaving for a masked identity (the data plane's
identifier dictionary). The database cannot: the rewrite masks a ``free_text`` column in SQL
with the content detectors only, so the names stay in what the database computes on, and any
computation on the column lets it search them for the client. ``WHERE body ILIKE '%olga
harris%'`` finds the patient although the result only shows [NAME]; so do ``substr(body, 1,
3)``, a regexp that spaces the letters out, ``ORDER BY body``, ``GROUP BY``, ``DISTINCT``, a
whole-row ``row_to_json(n)::text ILIKE``, the column renamed in a sub-query, ``ORDER BY 2``,
set operations, CTEs, window functions ...

So a free-text column masked for the identity may only be an output column of the top-level
plain SELECT (``body``, ``n.body``, ``body AS x``, ``*``, ``n.*``), of ``COPY (SELECT ...) TO``
or of ``COPY notes TO`` (EXPLAIN, PREPARE and DECLARE CURSOR of such a SELECT likewise). Two
uses that reveal nothing of a name are allowed anywhere: ``body IS [NOT] NULL`` and
``count(body)`` (not ``count(DISTINCT body)``).

Fail closed, by name: a column reference any of whose names is that of a free-text column of a
relation the statement reads (or the name a column alias list gives it, or an output alias of
it) counts as a use wherever it might resolve; so does any whole-row reference of such a
relation (``n``, ``notes``, ``row_to_json(n)``, ``n.*`` outside the top-level select list), a
``*`` in the select list of another query level that reads the relation, a NATURAL join over
it, a USING list naming the column and a column alias list on a join over it, and an ORDER BY,
GROUP BY or DISTINCT ON position that is, or may be, the column.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from phigate.masking.catalog_protocols import CatalogLike, ColumnLike, RelationLike
from phigate.masking.range_vars import is_range_var, protected_relation, reference_name
from phigate.policy.parse_nodes import child_nodes, column_ref_names

__all__ = ["FreeTextUse", "free_text_columns", "free_text_use", "refusal"]


@dataclass(frozen=True, slots=True)
class FreeTextUse:
    """``column`` ("schema.table.column") is used in ``clause`` (words: "WHERE", "ORDER BY
    (by position)", "a sub-query in FROM", ...)."""

    column: str
    clause: str


def free_text_columns(rel: RelationLike, clear_kinds: frozenset[str]) -> list[ColumnLike]:
    """The columns of ``rel`` masked with ``free_text`` for an identity seeing ``clear_kinds``."""
    return [
        c for c in rel.columns
        if c.rule is not None and c.rule.mask == "free_text" and c.rule.kind not in clear_kinds
    ]  # fmt: skip


def free_text_use(
    doc: Mapping[str, Any], catalog: CatalogLike, clear_kinds: frozenset[str], *, schema: str
) -> FreeTextUse | None:
    """The first use of a free-text column masked for ``clear_kinds`` that is not reading it
    whole, in the parsed statements ``doc`` (pglast JSON); None when there is none."""
    names = _Names(catalog, clear_kinds, schema)
    names.collect(doc.get("stmts", ()))
    if not names.columns:
        return None
    scan = _Scan(names)
    try:
        for raw in doc.get("stmts", ()):
            scan.statement(raw["stmt"])
    except _Found as found:
        return found.use
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
        # A tree shape the scan did not expect: it cannot tell how the column is used.
        return FreeTextUse(next(iter(names.columns.values())), "a statement phigate cannot check")
    return None


def refusal(use: FreeTextUse, roles: Iterable[str]) -> tuple[str, str]:
    """The refusal's message and hint: they name the column and the clause, never a value."""
    names = [json.dumps(r, ensure_ascii=False) for r in roles]
    who = ("role " if len(names) == 1 else "roles ") + ", ".join(names) if names else "this role"
    message = (
        f"{use.column} is free text whose identifiers phigate masks in the gateway; {who} may "
        "read it as a whole column but not search, sort, group or compute on it, as this "
        f"statement does in {use.clause}, since the database would see the names "
        "(rule: masking)"
    )
    hint = (
        "Select the column and filter the rows in your program, filter on other columns "
        "(an id, a date, a key such as patient_id), or ask for a role that sees free_text in "
        "clear."
    )
    return message, hint


class _Found(Exception):  # noqa: N818 - not an error: the scan stops at the first use
    def __init__(self, use: FreeTextUse) -> None:
        super().__init__(use.column)
        self.use = use


class _Names:
    """What counts as a free-text column or a whole row of its relation, by name."""

    def __init__(self, catalog: CatalogLike, clear_kinds: frozenset[str], schema: str) -> None:
        self.catalog = catalog
        self.clear_kinds = clear_kinds
        self.schema = schema
        #: column name (also column-list and output aliases) -> "schema.table.column"
        self.columns: dict[str, str] = {}
        #: name of a relation with free-text columns as the statement may write it (alias,
        #: table name, aliased join over it) -> one of its free-text columns
        self.wholes: dict[str, str] = {}

    def free(self, rv: Mapping[str, Any]) -> str | None:
        """A free-text column of the relation ``rv`` names, else None."""
        found = protected_relation(rv, self.catalog, self.schema)
        if found is None:
            return None
        schema, name, rel = found
        cols = free_text_columns(rel, self.clear_kinds)
        return f"{schema}.{name}.{cols[0].name}" if cols else None

    def collect(self, value: Any) -> bool:
        """Learn the names below ``value``; True if a relation with free text is there."""
        if type(value) is list:
            return any([self.collect(v) for v in value])  # all of them, not the first only
        if type(value) is not dict:
            return False
        if is_range_var(value):
            return self._range_var(value)
        join = value.get("JoinExpr")
        if len(value) == 1 and type(join) is dict:
            free = any([self.collect(v) for v in join.values()])
            if free:
                column = self._join_column(join)
                for key in ("alias", "join_using_alias"):
                    alias = join.get(key)
                    if alias:
                        self.wholes[alias["aliasname"]] = column
            return free
        return any([self.collect(v) for v in value.values()])

    def _range_var(self, rv: Mapping[str, Any]) -> bool:
        found = protected_relation(rv, self.catalog, self.schema)
        if found is None:
            return False
        schema, name, rel = found
        cols = free_text_columns(rel, self.clear_kinds)
        if not cols:
            return False
        for c in cols:
            self.columns[c.name] = f"{schema}.{name}.{c.name}"
        first = f"{schema}.{name}.{cols[0].name}"
        self.wholes[rv["relname"]] = first
        self.wholes[reference_name(rv)] = first
        alias = rv.get("alias") or {}
        for given, col in zip(alias.get("colnames", ()), rel.columns, strict=False):
            if col in cols:  # `notes n(i, p, txt)`: txt is the column under another name
                self.columns[given["String"]["sval"]] = f"{schema}.{name}.{col.name}"
        return True

    def _join_column(self, join: Mapping[str, Any]) -> str:
        for item in _from_range_vars([{"JoinExpr": join}]):
            column = self.free(item)
            if column is not None:
                return column
        return next(iter(self.columns.values()))  # free text deeper inside (a sub-query)


def _from_range_vars(items: Any) -> list[Mapping[str, Any]]:
    """The RangeVars a FROM list reads at its own query level (through joins and
    TABLESAMPLE; sub-queries and functions are levels of their own)."""
    out: list[Mapping[str, Any]] = []
    for item in items or ():
        if not isinstance(item, dict) or len(item) != 1:
            continue
        ((ntype, body),) = item.items()
        if ntype == "RangeVar":
            out.append(body)
        elif ntype == "JoinExpr":
            out += _from_range_vars([body.get("larg"), body.get("rarg")])
        elif ntype == "RangeTableSample":
            out += _from_range_vars([body.get("relation")])
    return out


# Clause labels of the top-level statement's parts.
_CLAUSES = {
    "targetList": "the select list", "fromClause": "FROM", "whereClause": "WHERE",
    "groupClause": "GROUP BY", "havingClause": "HAVING", "windowClause": "WINDOW",
    "sortClause": "ORDER BY", "distinctClause": "DISTINCT ON", "limitCount": "LIMIT",
    "limitOffset": "OFFSET", "valuesLists": "VALUES", "withClause": "WITH",
    "lockingClause": "FOR UPDATE/SHARE", "returningList": "RETURNING",
    "returningClause": "RETURNING", "usingClause": "USING", "onConflictClause": "ON CONFLICT",
    "selectStmt": "INSERT ... SELECT", "joinCondition": "MERGE ... ON",
    "mergeWhenClauses": "MERGE ... WHEN", "sourceRelation": "MERGE ... USING",
}  # fmt: skip
_EXPRESSION = "an expression in the select list"
_TOP_LABELS = frozenset(_CLAUSES.values()) | {"SET", "JOIN ... ON", "JOIN ... USING", _EXPRESSION}
_SET_OPERATION = "a set operation (UNION, INTERSECT, EXCEPT)"
_NESTED = {
    "WITH": "a CTE (WITH)", "INSERT ... SELECT": "INSERT ... SELECT",
    _EXPRESSION: "a sub-query in the select list",
}  # fmt: skip
_INNER_QUERY = ("ExplainStmt", "PrepareStmt", "DeclareCursorStmt")
_DML = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_DML_LABELS = {"InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE",
               "MergeStmt": "MERGE"}  # fmt: skip

# Functions and casts that carry whole values into a top-level output unchanged (JSON escapes
# only quotes, backslashes and control characters), so the data plane still sees every word.
_WHOLE_WRAPPERS = frozenset({
    "to_json", "to_jsonb", "json_build_object", "jsonb_build_object", "json_build_array",
    "jsonb_build_array", "row_to_json", "json_agg", "jsonb_agg", "json_object_agg",
    "jsonb_object_agg",
})  # fmt: skip
_WHOLE_CASTS = frozenset({"text", "varchar", "json", "jsonb"})

# What a top-level select list entry gives: ("column" | "star" | "expr", the free-text column
# it is or may expand to, or None).
_Output = tuple[str, str | None]


def _inside(clause: str) -> str:
    """The label for a query nested in ``clause``."""
    if clause not in _TOP_LABELS and clause not in _DML_LABELS.values():
        return clause  # already inside a nested query
    return _NESTED.get(clause) or f"a sub-query in {clause}"


class _Scan:
    def __init__(self, names: _Names) -> None:
        self.n = names

    @staticmethod
    def use(column: str, clause: str) -> NoReturn:
        raise _Found(FreeTextUse(column, clause))

    # statements -------------------------------------------------------------------------------

    def statement(self, node: Mapping[str, Any]) -> None:
        ((ntype, body),) = node.items()
        if ntype == "SelectStmt":
            self.top_select(body)
        elif ntype == "CopyStmt":
            # COPY notes [(body)] TO reads the column whole; COPY (query) TO, its query's outputs.
            if body.get("query") is not None:
                self.statement(body["query"])
            rest = {k: v for k, v in body.items() if k not in ("query", "relation", "attlist")}
            self.walk(rest, "COPY", None)
        elif ntype in _INNER_QUERY:
            self.statement(body["query"])
            self.walk({k: v for k, v in body.items() if k != "query"}, "this statement", None)
        elif ntype in _DML:
            self.dml(ntype, body, _DML_LABELS[ntype])
        else:
            self.walk(body, "this statement", None)

    def top_select(self, b: Mapping[str, Any]) -> None:
        if b.get("op", "SETOP_NONE") != "SETOP_NONE":
            for side in ("larg", "rarg"):
                arm = b[side]
                self.query(arm.get("SelectStmt", arm), _SET_OPERATION)
            for key, value in b.items():
                if key not in ("larg", "rarg", "op"):
                    self.walk(value, _CLAUSES.get(key, "this statement"), None)
            return
        star = self.level_star(b.get("fromClause"))
        outputs: list[_Output] = []
        for rt in b.get("targetList", ()):
            r = rt["ResTarget"]
            out = self.plain_output(r.get("val"), star)
            val = r.get("val")
            wrapped = isinstance(val, dict) and ("FuncCall" in val or "TypeCast" in val)
            if out is None and wrapped and self.whole_value_output(val):
                out = ("expr", None)  # JSON or text of whole values: the data plane scans it
            if out is None:
                val = r.get("val")
                whole = isinstance(val, dict) and "ColumnRef" in val  # `n`, `notes`
                self.walk(val, "the select list" if whole else _EXPRESSION, star)
                out = ("expr", None)
            elif out[0] == "column" and out[1] is not None and r.get("name"):
                # `body AS x ... ORDER BY x` sorts by the column: the alias is its name too.
                self.n.columns[r["name"]] = out[1]
            outputs.append(out)
        distinct = b.get("distinctClause")
        if distinct is not None:
            if not any(distinct):  # plain DISTINCT: compares every output column
                free = [c for _, c in outputs if c is not None]
                if free:
                    self.use(free[0], "DISTINCT")
            else:
                for d in distinct:
                    self.key(d, outputs, "DISTINCT ON", star)
        for g in b.get("groupClause", ()):
            self.key(g, outputs, "GROUP BY", star)
        for s in b.get("sortClause", ()):
            sort = s["SortBy"]
            self.key(sort.get("node"), outputs, "ORDER BY", star)
            self.walk({k: v for k, v in sort.items() if k != "node"}, "ORDER BY", star)
        done = {"targetList", "distinctClause", "groupClause", "sortClause", "op"}
        for key, value in b.items():
            if key not in done:
                self.walk(value, _CLAUSES.get(key, "this statement"), star)

    def whole_value_output(self, val: Any) -> bool:
        """A top-level select list entry that only wraps whole values in JSON or casts them to
        text (``json_build_object('note', body)``, ``row_to_json(n)``, ``body::json``): every
        character of the column reaches the data plane, which tags the identifiers in the
        output, in the order they were written. Aggregates that order or filter are not."""
        if not isinstance(val, dict) or len(val) != 1:
            return False
        ((ntype, b),) = val.items()
        if ntype == "A_Const":
            return True
        if ntype == "ColumnRef":
            # A column or a whole row (`n`, `n.*`); a bare `*` is not a value.
            fields = b["fields"]
            return all("String" in f for f in fields[:-1]) and (
                "String" in fields[-1] or len(fields) > 1)
        if ntype == "TypeCast":
            names = [n.get("String", {}).get("sval") for n in b["typeName"].get("names", ())]
            t = b["typeName"]
            # No typmod: `body::varchar(3)` would cut the text, and names with it.
            return (
                bool(names) and names[-1] in _WHOLE_CASTS and not t.get("arrayBounds")
                and not t.get("typmods") and self.whole_value_output(b.get("arg"))
            )  # fmt: skip
        if ntype == "FuncCall":
            names = [n.get("String", {}).get("sval") for n in b.get("funcname", ())]
            if names[:-1] not in ([], ["pg_catalog"]) or names[-1] not in _WHOLE_WRAPPERS:
                return False
            if any(b.get(k) for k in ("agg_order", "agg_filter", "over", "agg_distinct",
                                      "agg_star", "agg_within_group", "func_variadic")):
                return False
            return all(self.whole_value_output(a) for a in b.get("args") or ())
        return False

    def plain_output(self, val: Any, star: str | None) -> _Output | None:
        """A top-level select list entry that reads columns whole (``body``, ``n.body``,
        ``*``, ``n.*``), with the free-text column it is or may expand to; else None."""
        ref = val.get("ColumnRef") if isinstance(val, dict) and len(val) == 1 else None
        if ref is None:
            return None
        fields = ref["fields"]
        if not all("String" in f or "A_Star" in f for f in fields):
            return None
        names = [f["String"]["sval"] for f in fields if "String" in f]
        if "A_Star" in fields[-1]:
            if len(fields) == 1:
                return ("star", star)
            return ("star", self.n.wholes.get(names[-1])) if names else None
        if names[-1] in self.n.wholes or any(x in self.n.columns for x in names[:-1]):
            return None  # a whole row (`n`, `public.notes`) or a field of the column
        return ("column", self.n.columns.get(names[-1]))

    def key(self, node: Any, outputs: list[_Output], clause: str, star: str | None) -> None:
        """An ORDER BY / GROUP BY / DISTINCT ON item: an expression, or a select list position
        (also inside GROUPING SETS, ROLLUP and CUBE)."""
        if not isinstance(node, dict):
            return
        grouping = node.get("GroupingSet")
        if grouping is not None:
            for item in grouping.get("content", ()):
                self.key(item, outputs, clause, star)
            return
        const = node.get("A_Const")
        if const is not None and "ival" in const:
            self.position(int(const["ival"].get("ival", 0)), outputs, f"{clause} (by position)")
            return
        self.walk(node, clause, star)

    def position(self, k: int, outputs: list[_Output], clause: str) -> None:
        free = [c for _, c in outputs if c is not None]
        if not free:
            return
        if any(kind == "star" for kind, _ in outputs[: max(k - 1, 0)]):
            # A * before it expands to columns phigate does not count (unprotected tables):
            # which column the position names is not known.
            self.use(free[0], clause)
        column = outputs[k - 1][1] if 1 <= k <= len(outputs) else None
        if column is not None:
            self.use(column, clause)

    def query(self, b: Mapping[str, Any], clause: str) -> None:
        """A query below the top level: every use of the column in it counts."""
        label = _inside(clause)
        if b.get("op", "SETOP_NONE") != "SETOP_NONE":
            for side in ("larg", "rarg"):
                arm = b[side]
                self.query(arm.get("SelectStmt", arm), label)
            self.walk({k: v for k, v in b.items() if k not in ("larg", "rarg")}, label, None)
            return
        self.walk(b, label, self.level_star(b.get("fromClause")))

    def dml(self, ntype: str, b: Mapping[str, Any], clause: str) -> None:
        items: list[Any] = [{"RangeVar": b["relation"]}] if b.get("relation") else []
        for key in ("fromClause", "usingClause"):
            items += b.get(key) or []
        if b.get("sourceRelation"):
            items.append(b["sourceRelation"])
        star = self.level_star(items)
        top = clause in _DML_LABELS.values()
        for key, value in b.items():
            if key == "targetList":
                label = "SET" if ntype == "UpdateStmt" else clause
            else:
                label = _CLAUSES.get(key, clause)
            if key == "selectStmt" and isinstance(value, dict):
                sel = value.get("SelectStmt", value)
                self.query(sel, "INSERT ... SELECT" if top else clause)
                continue
            self.walk(value, label if top else clause, star)

    def level_star(self, from_items: Any) -> str | None:
        """The free-text column a bare ``*`` of the query level with these FROM items may
        expand to, else None."""
        for rv in _from_range_vars(from_items):
            column = self.n.free(rv)
            if column is not None:
                return column
        return None

    # expressions ------------------------------------------------------------------------------

    def walk(self, value: Any, clause: str, star: str | None) -> None:
        for key, body in child_nodes(value):
            self.node(key, body, clause, star)

    def node(self, ntype: str, b: dict[str, Any], clause: str, star: str | None) -> None:
        if ntype == "ColumnRef":
            self.column_ref(b, clause, star)
        elif ntype == "SelectStmt":
            self.query(b, clause)
        elif ntype in _DML:  # a data-modifying CTE
            self.dml(ntype, b, _inside(clause))
        elif ntype == "NullTest" and self.bare_column(b.get("arg")):
            return  # `body IS [NOT] NULL` tells nothing of a name
        elif ntype == "FuncCall" and self.count_of_column(b):
            self.walk({k: v for k, v in b.items() if k != "args"}, clause, star)
        elif ntype == "JoinExpr":
            self.join(b, clause, star)
        else:
            if ntype == "A_Indirection":  # (x).body: a field named like the column
                for ind in b.get("indirection", ()):
                    name = ind.get("String", {}).get("sval") if isinstance(ind, dict) else None
                    if name in self.n.columns:
                        self.use(self.n.columns[name], clause)
            for item in b.values():
                self.walk(item, clause, star)

    def column_ref(self, b: Mapping[str, Any], clause: str, star: str | None) -> None:
        fields = b["fields"]
        names = [f["String"]["sval"] for f in fields if "String" in f]
        for name in names:
            if name in self.n.columns:
                self.use(self.n.columns[name], clause)
        if "A_Star" in fields[-1]:
            if len(fields) == 1:
                if star is not None:
                    self.use(star, f"{clause} (a * that includes it)")
            elif names and names[-1] in self.n.wholes:
                self.use(self.n.wholes[names[-1]], f"{clause} (a whole-row reference)")
        elif names and names[-1] in self.n.wholes:
            self.use(self.n.wholes[names[-1]], f"{clause} (a whole-row reference)")

    def bare_column(self, node: Any) -> bool:
        """A reference to one column (not a whole row, not a *)."""
        names = column_ref_names(node)
        return names is not None and names[-1] not in self.n.wholes

    def count_of_column(self, b: Mapping[str, Any]) -> bool:
        names = [f.get("String", {}).get("sval") for f in b.get("funcname", ())]
        args = b.get("args") or []
        return (
            names in (["count"], ["pg_catalog", "count"])
            and len(args) == 1
            and not b.get("agg_distinct")
            and self.bare_column(args[0])
        )

    def join(self, b: Mapping[str, Any], clause: str, star: str | None) -> None:
        free = self.level_star([{"JoinExpr": b}])
        if free is not None:
            if b.get("isNatural"):
                self.use(free, "NATURAL JOIN")  # compares every column of the same name
            alias = b.get("alias")
            if alias and alias.get("colnames"):
                self.use(free, "a column alias list of a join")
        for u in b.get("usingClause", ()):
            name = u.get("String", {}).get("sval")
            if name in self.n.columns:
                self.use(self.n.columns[name], "JOIN ... USING")
        on = "JOIN ... ON" if clause == "FROM" else clause
        for key, value in b.items():
            self.walk(value, on if key == "quals" else clause, star)
