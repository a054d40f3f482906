"""The statement walker's expressions: column references, function calls, casts, operators,
sublinks, and the generic walk of nodes whose children carry the meaning."""

from __future__ import annotations

from typing import Any

from phigate.policy.facts import ColumnUse
from phigate.policy.functions import (
    DEFAULT_FUNCTIONS,
    NAME_ARGUMENT_FUNCTIONS,
    WRITING_FUNCTIONS,
)
from phigate.policy.parse_nodes import _cannot, _const_text, _str_const, _sval, _Unsupported
from phigate.policy.pg_names import unqualified_function_schema
from phigate.policy.scope import _Item, _Scope
from phigate.policy.walker_base import _WalkerBase

_REG_TYPES = frozenset({
    "regclass", "regproc", "regprocedure", "regoper", "regoperator", "regtype", "regrole",
    "regnamespace", "regconfig", "regdictionary", "regcollation",
})  # fmt: skip


class _ExpressionWalker(_WalkerBase):
    __slots__ = ()

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
        self._sub_level(b["subselect"]["SelectStmt"], scope, clause)

    def subselect(self, b: dict[str, Any], scope: _Scope, clause: str) -> None:
        self.f.subqueries += 1
        self._sub_level(b, scope, clause)

    def _sub_level(self, b: dict[str, Any], scope: _Scope, clause: str) -> None:
        """A subquery in an expression. In a filter (WHERE, HAVING, JOIN ON) its rows only
        decide which rows pass, so none reach the client; anywhere else (select list, SET,
        ORDER BY, ...) it is a query level of its own, narrowed only by itself: an outer WHERE
        does not narrow `(SELECT string_agg(ssn, ',') FROM patients)`. Under EXPLAIN or DDL
        (`hidden`) no level's rows reach the client."""
        outer = self.narrowed
        self.narrowed = clause in _FILTER_CLAUSES
        self.select(b, scope)
        self.narrowed = outer

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


_FILTER_CLAUSES = frozenset({"where", "having", "join"})


def _ignore(w: _ExpressionWalker, b: Any, scope: _Scope, clause: str) -> None:
    pass


_EXPRESSIONS: dict[str, Any] = {
    "ColumnRef": _ExpressionWalker.column_ref,
    "FuncCall": _ExpressionWalker.func_call,
    "TypeCast": _ExpressionWalker.type_cast,
    "A_Expr": _ExpressionWalker.a_expr,
    "SubLink": _ExpressionWalker.sublink,
    "SelectStmt": _ExpressionWalker.subselect,
    "ParamRef": _ExpressionWalker.param,
    "RangeVar": _ExpressionWalker.range_var,
    "SortBy": _ExpressionWalker.sort_by,
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
    *(  # the DDL statements themselves, walked from _UtilityWalker.ddl
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
