"""Which query levels narrow the rows they read, for the bulk-read approval rule: a WHERE, a
LIMIT, or a target list of one-row aggregates. Shape only -- `WHERE true` narrows nothing yet
counts; the row-estimate rule and max_rows bound what shape cannot."""

from __future__ import annotations

from typing import Any

from phigate.policy.parse_nodes import _sval
from phigate.policy.pg_names import unqualified_function_schema

__all__ = ["collects", "has_limit", "narrows", "summarizes"]

#: Built-in aggregates that return one value per group: a level made of these alone (no GROUP
#: BY) returns one row, however many it reads. min/max and percentiles show one value each.
_SUMMARY_AGGREGATES = frozenset({
    "count", "sum", "avg", "min", "max", "bool_and", "bool_or", "every", "bit_and", "bit_or",
    "bit_xor", "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp", "corr",
    "covar_pop", "covar_samp", "regr_avgx", "regr_avgy", "regr_count", "regr_intercept",
    "regr_r2", "regr_slope", "regr_sxx", "regr_sxy", "regr_syy", "percentile_cont",
    "percentile_disc", "mode",
})  # fmt: skip

#: Built-in aggregates that gather every row they read into one value: a LIMIT above them
#: narrows nothing (`SELECT string_agg(ssn, ',') FROM patients LIMIT 1`).
_COLLECTING_AGGREGATES = frozenset({
    "array_agg", "string_agg", "json_agg", "jsonb_agg", "json_agg_strict", "jsonb_agg_strict",
    "json_object_agg", "jsonb_object_agg", "json_object_agg_strict", "jsonb_object_agg_strict",
    "json_object_agg_unique", "jsonb_object_agg_unique", "json_object_agg_unique_strict",
    "jsonb_object_agg_unique_strict", "xmlagg", "range_agg", "range_intersect_agg",
})  # fmt: skip

_COLLECTING_NODES = frozenset({"JsonArrayAgg", "JsonObjectAgg"})


def has_limit(body: dict[str, Any]) -> bool:
    """LIMIT n / FETCH FIRST n (a parameter counts); LIMIT ALL and LIMIT NULL do not."""
    count = body.get("limitCount")
    if count is None:
        return False
    const = count.get("A_Const") if isinstance(count, dict) else None
    return not (const is not None and const.get("isnull"))


def narrows(body: dict[str, Any], schema: str, *, inherited: bool) -> bool:
    """Whether a SelectStmt level keeps some rows it reads from the client: its own WHERE, or
    -- unless it gathers rows into one value -- an enclosing level's narrowing, its LIMIT or a
    one-row aggregate target list."""
    if body.get("whereClause") is not None:
        return True
    if collects(body, schema):
        return False
    return inherited or has_limit(body) or summarizes(body, schema)


def summarizes(body: dict[str, Any], schema: str) -> bool:
    """A level without GROUP BY whose every output is built from one-row aggregates and
    constants (`SELECT count(*)`, `SELECT sum(x) / count(*)`): one row, whatever it reads."""
    if body.get("groupClause") or not body.get("fromClause"):
        return False
    targets = body.get("targetList") or ()
    return bool(targets) and all(
        _summary_expr(t["ResTarget"].get("val"), schema, in_aggregate=False) for t in targets
    )


def _summary_expr(node: Any, schema: str, *, in_aggregate: bool) -> bool:
    if not isinstance(node, dict) or len(node) != 1:
        return False
    ((ntype, b),) = node.items()
    if ntype == "A_Const":
        return True
    if ntype == "TypeCast":
        return _summary_expr(b.get("arg"), schema, in_aggregate=in_aggregate)
    if ntype == "A_Expr":
        return all(
            _summary_expr(b[k], schema, in_aggregate=in_aggregate)
            for k in ("lexpr", "rexpr")
            if b.get(k) is not None
        )
    if ntype == "FuncCall" and b.get("over") is None:
        name, resolved = _function(b, schema)
        return resolved == "pg_catalog" and name in _SUMMARY_AGGREGATES
    return False


def collects(body: dict[str, Any], schema: str) -> bool:
    """Whether a level's outputs (target list, HAVING, ORDER BY, outside sublinks) call an
    aggregate that gathers rows into one value, or a function outside pg_catalog (it may be
    such an aggregate; the gateway cannot tell without the database)."""
    stack: list[Any] = [body.get(k) for k in ("targetList", "havingClause", "sortClause")]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            for key, x in v.items():
                if key == "SubLink":
                    continue  # its own query level, judged on its own
                if key in _COLLECTING_NODES:
                    return True
                if key == "FuncCall" and isinstance(x, dict):
                    name, resolved = _function(x, schema)
                    if resolved != "pg_catalog" or name in _COLLECTING_AGGREGATES:
                        return True
                if isinstance(x, dict | list):
                    stack.append(x)
    return False


def _function(call: dict[str, Any], schema: str) -> tuple[str, str]:
    names = [_sval(s) for s in call.get("funcname", ())]
    if len(names) == 1:
        return names[0], unqualified_function_schema(names[0], schema)
    return names[-1], names[-2] if len(names) >= 2 else ""
