"""The statement walker's utility statements: COPY, SET/SHOW, transactions, EXPLAIN, PREPARE,
cursors, LOCK, TRUNCATE, maintenance, CALL, DDL and server administration."""

from __future__ import annotations

from typing import Any

from phigate.config import RESERVED_SCHEMA
from phigate.policy.facts import ColumnUse
from phigate.policy.parse_nodes import _cannot, _const_text, _sval
from phigate.policy.scope import _Scope
from phigate.policy.walker_base import _WalkerBase


def _explain_flag_on(arg: dict[str, Any] | None) -> bool:
    """Whether an EXPLAIN boolean option (ANALYZE, VERBOSE) is on. PostgreSQL takes no value,
    true/false, on/off (any case) or 0/1; anything this cannot read as off counts as on, so an
    unusual spelling is refused rather than run (fail closed)."""
    if not arg:
        return True
    if "Boolean" in arg:
        return bool(arg["Boolean"].get("boolval"))
    if "Integer" in arg:
        return int(arg["Integer"].get("ival", 0)) != 0  # libpg_query omits zero
    if "String" in arg:
        return str(arg["String"].get("sval", "")).lower() not in ("false", "off")
    return True


class _UtilityWalker(_WalkerBase):
    __slots__ = ()

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
            if not is_from:
                f.bulk_reads.append((rel[0], rel[1], op))  # COPY table TO has no WHERE
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
            # Any occurrence that may turn the option on counts (PostgreSQL keeps the last).
            if d.get("defname") == "verbose":
                f.explain_verbose = f.explain_verbose or _explain_flag_on(d.get("arg"))
            if d.get("defname") == "analyze":
                f.explain_analyze = f.explain_analyze or _explain_flag_on(d.get("arg"))
        # Not even EXPLAIN ANALYZE sends the rows it reads to the client.
        hidden, self.hidden = self.hidden, True
        self.inner(b["query"])
        self.hidden = hidden
        return "explain"

    def prepare(self, b: dict[str, Any], top: bool, _t: str) -> str:
        self.inner(b["query"])
        return "prepare"

    def execute(self, b: dict[str, Any], top: bool, _t: str) -> str:
        for p in b.get("params", ()):
            self.expr(p, _Scope(None), "values")
        return "execute"

    def declare(self, b: dict[str, Any], top: bool, _t: str) -> str:
        self.f.cursor, self.f.cursor_op = b.get("portalname"), "declare"
        self.inner(b["query"])
        return "declare_cursor"

    def fetch(self, b: dict[str, Any], top: bool, _t: str) -> str:
        self.f.cursor = b.get("portalname")
        self.f.cursor_op = "move" if b.get("ismove") else "fetch"
        return "fetch"

    def close(self, b: dict[str, Any], top: bool, _t: str) -> str:
        name = b.get("portalname")
        self.f.cursor, self.f.cursor_op = name, "close" if name is not None else "close_all"
        return "close_cursor"

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
        # A view's query reads nothing when the view is created (CREATE TABLE AS does: it is
        # create_table_as, not this).
        hidden, self.hidden = self.hidden, True
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
            self.hidden = hidden
        return "ddl"

    def admin(self, b: dict[str, Any], top: bool, ntype: str) -> str:
        return "admin"


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


_UTILITY_STATEMENTS: dict[str, Any] = {
    "CopyStmt": _UtilityWalker.copy,
    "VariableSetStmt": _UtilityWalker.variable_set,
    "VariableShowStmt": _UtilityWalker.variable_show,
    "TransactionStmt": _UtilityWalker.transaction,
    "ExplainStmt": _UtilityWalker.explain,
    "PrepareStmt": _UtilityWalker.prepare,
    "ExecuteStmt": _UtilityWalker.execute,
    "DeclareCursorStmt": _UtilityWalker.declare,
    "FetchStmt": _UtilityWalker.fetch,
    "ClosePortalStmt": _UtilityWalker.close,
    "CreateTableAsStmt": _UtilityWalker.create_table_as,
    "LockStmt": _UtilityWalker.lock,
    "TruncateStmt": _UtilityWalker.truncate,
    "VacuumStmt": _UtilityWalker.maintenance,
    "ClusterStmt": _UtilityWalker.maintenance,
    "ReindexStmt": _UtilityWalker.maintenance,
    "CallStmt": _UtilityWalker.call,
    **dict.fromkeys(_SIMPLE, _UtilityWalker.simple),
}
