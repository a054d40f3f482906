"""The 01M02 notice: a statement of a masked identity compares a masked column with a constant
that cannot be a masked value (``comparison_notices``).

``WHERE last_name = 'Harris'`` on a pseudonymized column still runs -- on the masked values,
which the rewrite computes at the source -- and finds nothing, since every value is ``psn_``
and 16 hex digits. The agent is told so, once per column per statement, in the decision's
``notices`` (the data plane sends each as a NoticeResponse). The message names the column and
its mask, never the constant.

Checked: ``=``, ``<>``, ``IS [NOT] DISTINCT FROM``, ``[NOT] IN (...)``, ``= ANY (ARRAY[...])``,
``[NOT] LIKE`` / ``ILIKE`` / ``~~`` / ``~~*``, regular expressions (``~``, ``~*``, ``!~``,
``!~*``) simple enough to read (masked_values.regex_pattern), and ``[NOT] BETWEEN
[SYMMETRIC]``, between a bare column reference (either side of ``=``/``<>``; the left side of
the others) and constants (a typed constant such as ``DATE '1980-03-04'`` included). Parameters
(``$1``) are not checked: their values arrive after the decision. A column reference is
resolved like the server does with the FROM items of its query level and the levels around it
(qualified by alias or table name, or unqualified and found in one protected relation); one
that may belong to a sub-query, a function or an unprotected table is left alone.

A decision carrying such a notice depends on the constant's value, so the engine caches it for
the exact text only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from phigate.masking.catalog_protocols import CatalogLike, ColumnLike, RelationLike
from phigate.masking.mask_sql import _mask_spec
from phigate.masking.masked_values import (
    Constant,
    MaskedValues,
    Pattern,
    like_pattern,
    masked_values,
    regex_pattern,
)
from phigate.masking.range_vars import protected_relation, reference_name
from phigate.policy.parse_nodes import child_nodes, column_ref_names

__all__ = ["MASKED_COMPARISON", "MaskedComparison", "comparison_notices", "masked_comparisons"]

#: SQLSTATE-style code of the notice (class 01: warning; M: phigate's masking).
MASKED_COMPARISON = "01M02"

_EQUALITY = frozenset({"=", "<>"})
_LIKE = {"~~": False, "!~~": False, "~~*": True, "!~~*": True}  # operator -> case-insensitive
_REGEX = {"~": False, "!~": False, "~*": True, "!~*": True}
_BETWEEN = frozenset({
    "AEXPR_BETWEEN", "AEXPR_NOT_BETWEEN", "AEXPR_BETWEEN_SYM", "AEXPR_NOT_BETWEEN_SYM",
})  # fmt: skip
_DML = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})


@dataclass(frozen=True, slots=True)
class MaskedComparison:
    """``column`` ("schema.table.column", masked with ``mask``) is compared with a constant
    none of its masked values can equal or match."""

    column: str
    mask: str


def comparison_notices(
    doc: Mapping[str, Any], catalog: CatalogLike, clear_kinds: frozenset[str], *, schema: str
) -> list[dict[str, Any]]:
    """The decision's ``notices`` entries for ``doc`` (pglast JSON), one per column."""
    return [_notice(c) for c in masked_comparisons(doc, catalog, clear_kinds, schema=schema)]


def masked_comparisons(
    doc: Mapping[str, Any], catalog: CatalogLike, clear_kinds: frozenset[str], *, schema: str
) -> list[MaskedComparison]:
    """Every masked column compared with a constant no masked value meets, each once, in the
    order the statement shows them."""
    finder = _Finder(catalog, clear_kinds, schema)
    try:
        for raw in doc.get("stmts", ()):
            finder.walk(raw["stmt"], None)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
        pass  # a tree shape the finder did not expect: tell what was found so far
    return list(dict.fromkeys(finder.found))


def _notice(c: MaskedComparison) -> dict[str, Any]:
    message = (
        f"phigate: {c.column} is masked ({c.mask}) for this session, so comparing it with a "
        "clear value matches masked values only (usually no row; with <>, NOT LIKE or NOT IN, "
        "usually every row)"
    )
    return {"key": None, "code": MASKED_COMPARISON, "message": message, "hint": _hint(c.mask)}


def _hint(mask: str) -> str:
    name, _, arg = mask.partition(":")
    if name == "pseudonym":
        how = "Compare with a pseudonym (psn_...) from an earlier result"
    elif name == "partial":
        how = (
            f"Masked values show only their last {arg} characters (e.g. ***-**-6789): compare "
            "with such a value or its end (LIKE '%6789')"
        )
    elif name == "year":
        how = "Masked dates are January 1 of their year: compare the year"
    elif name == "email_domain":
        how = "Masked values keep only the domain (***@example.org): compare the domain"
    elif name == "zip3":
        how = "Masked values keep the first 3 digits of the ZIP code: compare with e.g. '021**'"
    else:  # redact, null: every value looks the same
        how = "Every value of this column is shown the same way, so no comparison tells rows apart"
    return (
        f"{how}, or look the row up by a column you see in clear (e.g. id); "
        "SHOW phigate.masking lists masked columns."
    )


# --- name scopes -------------------------------------------------------------------------------

# A FROM item: (schema, name, relation) when it is a protected relation, else None (its
# columns are not known here: an unprotected table, a sub-query, a function, a CTE).
_Item = tuple[str, str, RelationLike] | None


class _Level:
    """The FROM items of one query level."""

    __slots__ = ("ctes", "items", "parent", "unknown")

    def __init__(self, parent: _Level | None) -> None:
        self.parent = parent
        self.items: dict[str, _Item] = {}
        self.unknown = False  # an item whose columns are not known
        self.ctes: set[str] = set()

    def levels(self) -> Iterator[_Level]:
        level: _Level | None = self
        while level is not None:
            yield level
            level = level.parent

    def has_cte(self, name: str) -> bool:
        return any(name in level.ctes for level in self.levels())


class _Finder:
    def __init__(self, catalog: CatalogLike, clear_kinds: frozenset[str], schema: str) -> None:
        self.catalog = catalog
        self.clear_kinds = clear_kinds
        self.schema = schema
        self.found: list[MaskedComparison] = []

    # walking ----------------------------------------------------------------------------------

    def walk(self, value: Any, level: _Level | None) -> None:
        for key, body in child_nodes(value):
            if key == "SelectStmt":
                self.select(body, level)
            elif key in _DML:
                self.dml(body, level)
            else:
                if key == "A_Expr" and level is not None:
                    self.comparison(body, level)
                self.walk(body, level)

    def select(self, b: Mapping[str, Any], parent: _Level | None) -> None:
        level = _Level(parent)
        self.with_clause(b.get("withClause"), level)
        if b.get("op", "SETOP_NONE") != "SETOP_NONE":
            for side in ("larg", "rarg"):
                arm = b[side]
                self.select(arm.get("SelectStmt", arm), level)
            rest = {k: v for k, v in b.items() if k not in ("larg", "rarg", "withClause")}
            self.walk(rest, level)
            return
        for item in b.get("fromClause", ()):
            self.from_item(item, level)
        self.walk({k: v for k, v in b.items() if k not in ("fromClause", "withClause")}, level)

    def dml(self, b: Mapping[str, Any], parent: _Level | None) -> None:
        level = _Level(parent)
        self.with_clause(b.get("withClause"), level)
        if b.get("relation"):
            self.from_item({"RangeVar": b["relation"]}, level)
        for key in ("fromClause", "usingClause"):
            for item in b.get(key) or ():
                self.from_item(item, level)
        if b.get("sourceRelation"):
            self.from_item(b["sourceRelation"], level)
        skip = ("relation", "fromClause", "usingClause", "sourceRelation", "withClause")
        self.walk({k: v for k, v in b.items() if k not in skip}, level)

    def with_clause(self, wc: Mapping[str, Any] | None, level: _Level) -> None:
        if not wc:
            return
        ctes = [c["CommonTableExpr"] for c in wc.get("ctes", ())]
        level.ctes.update(c["ctename"] for c in ctes)
        for c in ctes:
            self.walk(c.get("ctequery"), level)

    def from_item(self, node: Mapping[str, Any], level: _Level) -> None:
        ((ntype, b),) = node.items()
        if ntype == "RangeVar":
            name = reference_name(b)
            if not b.get("schemaname") and level.has_cte(b["relname"]):
                item: _Item = None
            else:
                item = protected_relation(b, self.catalog, self.schema)
            level.items[name] = item
            level.unknown |= item is None
        elif ntype == "JoinExpr":
            self.from_item(b["larg"], level)
            self.from_item(b["rarg"], level)
            self.walk(b.get("quals"), level)
            for key in ("alias", "join_using_alias"):
                if b.get(key):  # the join's columns are its members': nothing new unqualified
                    level.items[b[key]["aliasname"]] = None
        elif ntype == "RangeTableSample":
            self.from_item(b["relation"], level)
            self.walk({k: v for k, v in b.items() if k != "relation"}, level)
        else:  # RangeSubselect, RangeFunction, RangeTableFunc, JsonTable
            self.walk(b, level)
            alias = b.get("alias")
            if alias:
                level.items[alias["aliasname"]] = None
            level.unknown = True

    # comparisons ------------------------------------------------------------------------------

    def comparison(self, b: Mapping[str, Any], level: _Level) -> None:
        kind = b.get("kind")
        names = b.get("name") or [{}]
        op = names[-1].get("String", {}).get("sval", "")
        left, right = b.get("lexpr"), b.get("rexpr")
        if kind in ("AEXPR_OP", "AEXPR_DISTINCT", "AEXPR_NOT_DISTINCT") and op in _EQUALITY:
            for col_side, const_side in ((left, right), (right, left)):
                self.check(col_side, level, [const_side], lambda v, c: v.could_equal(c))
        elif kind in ("AEXPR_IN", "AEXPR_OP_ANY", "AEXPR_OP_ALL") and op in _EQUALITY:
            items = _list_items(right, array=kind != "AEXPR_IN")
            if items is not None:
                self.check(left, level, items, lambda v, c: v.could_equal(c))
        elif op in _LIKE and kind in ("AEXPR_OP", "AEXPR_LIKE", "AEXPR_ILIKE"):
            ci = _LIKE[op]
            self.check(left, level, [right], lambda v, c: _matches(v, like_pattern, c, ci))
        elif op in _REGEX and kind == "AEXPR_OP":
            ci = _REGEX[op]
            self.check(left, level, [right], lambda v, c: _matches(v, regex_pattern, c, ci))
        elif kind in _BETWEEN:
            bounds = _list_items(right, array=False)
            if bounds is not None and len(bounds) == 2:
                self.between(left, level, bounds, symmetric=kind.endswith("_SYM"))

    def check(
        self,
        column_node: Any,
        level: _Level,
        const_nodes: list[Any],
        test: Callable[[MaskedValues, Constant], bool],
    ) -> None:
        """Record the column when one of the constants cannot meet any of its masked values."""
        target = self.masked_column(column_node, level)
        if target is None:
            return
        values, found = target
        for node in const_nodes:
            const = _constant(node)
            if const is not None and not test(values, const):
                self.found.append(found)
                return

    def between(
        self, column_node: Any, level: _Level, bounds: list[Any], *, symmetric: bool
    ) -> None:
        target = self.masked_column(column_node, level)
        consts = [_constant(n) for n in bounds]
        if target is None or consts[0] is None or consts[1] is None:
            return
        values, found = target
        low, high = consts[0], consts[1]
        could = values.could_be_between(low, high)
        if symmetric:
            could = could or values.could_be_between(high, low)
        if not could:
            self.found.append(found)

    def masked_column(
        self, node: Any, level: _Level
    ) -> tuple[MaskedValues, MaskedComparison] | None:
        names = column_ref_names(node)
        if names is None:
            return None
        resolved = self.resolve(names, level)
        if resolved is None:
            return None
        schema, name, col = resolved
        rule = col.rule
        if rule is None or rule.kind in self.clear_kinds:
            return None
        spec = _mask_spec(rule)
        return masked_values(col, spec), MaskedComparison(f"{schema}.{name}.{col.name}", spec)

    def resolve(self, names: list[str], level: _Level) -> tuple[str, str, ColumnLike] | None:
        """The protected column a reference names, as the server resolves it; None when it
        may be anything else."""
        if len(names) == 1:
            for lvl in level.levels():
                hits = [
                    (item[0], item[1], col)
                    for item in lvl.items.values() if item is not None
                    for col in item[2].columns if col.name == names[0]
                ]  # fmt: skip
                if hits:
                    return hits[0] if len(hits) == 1 else None
                if lvl.unknown:
                    return None  # an item whose columns phigate does not know may have it
            return None
        if len(names) not in (2, 3):
            return None
        qualifier, column = names[-2], names[-1]
        for lvl in level.levels():
            if qualifier in lvl.items:
                item = lvl.items[qualifier]
                if item is None or (len(names) == 3 and names[0] != item[0]):
                    return None
                col = next((c for c in item[2].columns if c.name == column), None)
                return None if col is None else (item[0], item[1], col)
        return None


def _constant(node: Any) -> Constant | None:
    """The value of a constant (also under a type cast: DATE '...', '...'::date), else None
    (a NULL, a parameter, an expression)."""
    if not isinstance(node, dict) or len(node) != 1:
        return None
    cast = node.get("TypeCast")
    if cast is not None:
        return _constant(cast.get("arg"))
    const = node.get("A_Const")
    if const is None or const.get("isnull"):
        return None
    if "sval" in const:
        return str(const["sval"].get("sval", ""))
    if "ival" in const:
        return int(const["ival"].get("ival", 0))
    if "fval" in const:
        return Decimal(const["fval"].get("fval", "0"))
    if "boolval" in const:
        return bool(const["boolval"].get("boolval", False))
    return None


def _list_items(node: Any, *, array: bool) -> list[Any] | None:
    """The items of IN's list (or of BETWEEN's bounds), or of ARRAY[...] for ANY/ALL."""
    if not isinstance(node, dict):
        return None
    if array:
        arr = node.get("A_ArrayExpr")
        return list(arr.get("elements", ())) if arr is not None else None
    lst = node.get("List")
    return list(lst.get("items", ())) if lst is not None else None


def _matches(
    values: MaskedValues,
    parse: Callable[[str], Pattern | None],
    const: Constant,
    case_insensitive: bool,
) -> bool:
    """Could the pattern ``const`` (read by ``parse``) match a masked value? A pattern that is
    not text or that phigate does not read could."""
    if not isinstance(const, str):
        return True
    tokens = parse(const)
    return True if tokens is None else values.could_match(tokens, case_insensitive)
