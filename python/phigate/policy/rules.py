"""Judge fact sheets against a RoleSet: default deny, every refusal names its rule.

``decide(facts_list, roleset, target)`` returns the first refusal among the statements (one
refusal refuses the whole message), else allow -- carrying ``ask`` when a statement needs a
person's approval by a rule judged per access (operations and classes in `approval`, relations
in `approval_relations`, bulk reads): an access needs approval when *every* role granting it
would ask. The statement-wide rules (patterns, row estimate) are risk.py's.

A RoleSet is the union of roles, judged role by role: an access (operation x relation) is
allowed if *one* role grants both the operation and the relation; a column if a role that
grants the relation (for that kind of use) grants the column. So holding several roles never
grants a pairing no single role grants.

Messages name rules, relations, columns, functions and settings -- never literal values from
the statement, which may hold PHI.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Literal

from phigate.config import (
    NEVER_RELATION_NAMES,
    NEVER_RELATIONS,
    RESERVED_SCHEMA,
    RoleConfig,
    RoleSet,
)
from phigate.policy import show_masking
from phigate.policy.analyze import ColumnUse, Facts
from phigate.policy.functions import (
    CLASS_FUNCTIONS,
    DEFAULT_FUNCTIONS,
    never_reason,
)
from phigate.policy.sql_names import sql_name as _q
from phigate.policy.sql_names import sql_relation as _rel

__all__ = [
    "SAFE_CATALOG_RELATIONS",
    "SETTABLE",
    "Ask",
    "Decision",
    "allow_rule",
    "decide",
    "deny_rule",
    "judge_roles",
]

Action = Literal["allow", "deny"]


@dataclass(frozen=True, slots=True)
class Ask:
    """Why an allowed statement needs a person's approval: the rule (an `approval` entry,
    "relation", "bulk_read", "pattern" or "row_estimate"), the role whose rule it is, and one
    PHI-free line saying so (names of relations, never values)."""

    rule: str
    role: RoleConfig
    reason: str
    row_estimate_over: int | None = None


def ask(rule: str, role: RoleConfig, what: str, row_estimate_over: int | None = None) -> Ask:
    return Ask(rule, role, f'{what} needs approval (rule: {rule} of role "{role.name}")',
               row_estimate_over)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    sqlstate: str | None = None
    message: str | None = None
    hint: str | None = None
    rule: str | None = None
    #: What the audit record names as the rule when more precise than ``rule``.
    audit_rule: str | None = None
    #: An allowed statement that needs approval first (the first rule that asks).
    ask: Ask | None = None


ALLOW = Decision("allow")

#: Catalog relations every role may read: what psycopg, asyncpg and pgjdbc query on their own
#: to learn about types (and pgjdbc's ResultSetMetaData). Reading the rest of pg_catalog and
#: information_schema needs allow = ["catalog"].
SAFE_CATALOG_RELATIONS: frozenset[tuple[str, str]] = frozenset(
    ("pg_catalog", n)
    for n in ("pg_type", "pg_namespace", "pg_range", "pg_enum", "pg_attribute", "pg_class",
              "pg_attrdef")
)  # fmt: skip
_CATALOG_SCHEMAS = frozenset({"pg_catalog", "information_schema"})


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: Settings SET / RESET / set_config() may change (lower-case names; plus enable_*).
SETTABLE: frozenset[str] = _words(
    """
    application_name statement_timeout lock_timeout idle_in_transaction_session_timeout
    idle_session_timeout transaction_timeout timezone datestyle intervalstyle
    extra_float_digits client_encoding bytea_output client_min_messages jit lc_monetary
    lc_numeric lc_time work_mem hash_mem_multiplier temp_buffers random_page_cost
    seq_page_cost cpu_tuple_cost cpu_index_tuple_cost cpu_operator_cost effective_cache_size
    plan_cache_mode max_parallel_workers_per_gather parallel_setup_cost parallel_tuple_cost
    jit_above_cost jit_inline_above_cost jit_optimize_above_cost geqo geqo_threshold
    from_collapse_limit join_collapse_limit array_nulls xmloption xmlbinary
    transaction_isolation default_transaction_isolation transaction_deferrable
    default_transaction_deferrable transaction_read_only synchronous_commit
    cursor_tuple_fraction timezone_abbreviations gin_fuzzy_search_limit
    default_statistics_target constraint_exclusion
"""
)
#: Never changed through the gateway, whatever the role: policy resolves names with the pinned
#: search_path, and the lexer settings change how the gateway's parser must read statements.
_NEVER_SETTINGS: dict[str, str] = {
    "search_path": "the gateway resolves names with the search_path it pins",
    "standard_conforming_strings": "it changes how statements are parsed",
    "backslash_quote": "it changes how statements are parsed",
    "escape_string_warning": "it changes how statements are parsed",
    "default_transaction_read_only": "it would change the read-only default of the session",
    "session_authorization": "sessions run as the identity the gateway chose",
    "session_replication_role": "it disables triggers and rules",
}
_UTF8 = frozenset({"utf8", "unicode"})
_TWO_PHASE = frozenset({
    "TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED",
})  # fmt: skip
# Statement kinds that need an `allow` class; kinds not listed here and not handled below are
# refused (fail closed).
_CLASS_OF_KIND: dict[str, str] = {
    "do": "do",
    "call": "call",
    "prepare": "prepare",
    "execute": "prepare",
    "deallocate": "prepare",
    "listen": "listen",
    "notify": "notify",
    "discard": "discard",
    "lock": "lock",
    "maintenance": "maintenance",
    "explain": "explain",
    "set_role": "set_role",
}
_ALWAYS_KINDS = frozenset({
    "select", "insert", "update", "delete", "merge", "copy_to", "copy_from", "truncate",
    "show", "fetch", "close_cursor", "declare_cursor", "unlisten",
})  # fmt: skip
_KIND_TEXT: dict[str, str] = {
    "do": "DO blocks",
    "call": "CALL",
    "prepare": "SQL-level PREPARE / EXECUTE / DEALLOCATE",
    "listen": "LISTEN",
    "notify": "NOTIFY (and pg_notify)",
    "discard": "DISCARD",
    "lock": "LOCK and advisory locks",
    "maintenance": "VACUUM / ANALYZE / CLUSTER / REINDEX",
    "explain": "EXPLAIN",
    "set_role": "SET ROLE / RESET ROLE",
    "catalog": "reading the system catalog",
    "ddl": "DDL (schema changes)",
}
_OP_TEXT: dict[str, str] = {
    "select": "SELECT",
    "insert": "INSERT",
    "update": "UPDATE",
    "delete": "DELETE",
    "merge": "MERGE",
    "copy_to": "COPY TO",
    "copy_from": "COPY FROM",
    "truncate": "TRUNCATE",
    "ddl": "DDL",
}


def decide(
    facts_list: list[Facts],
    roleset: RoleSet | None,
    target: str | None = None,
    *,
    protected: frozenset[tuple[str, str]] = frozenset(),
) -> Decision:
    """The decision for one message (all of its statements). ``protected``: the relations
    holding classified PHI (for `approval_bulk_reads`)."""
    if roleset is None or not roleset.roles:
        return _deny(
            "no-role",
            "your identity has no role on this gateway",
            "ask your gateway administrator to map one of your groups to a role",
        )
    return judge_roles(_judge(roleset, target, protected), facts_list)


def judge_roles(judge: _Judge, facts_list: list[Facts]) -> Decision:
    approval: Decision | None = None
    for facts in facts_list:
        d = judge.statement(facts)
        if d.action == "deny":
            return d
        if d.ask is not None and approval is None:
            approval = d
    return approval or ALLOW


def _deny(rule: str, message: str, hint: str | None = None, sqlstate: str = "42501") -> Decision:
    return Decision("deny", sqlstate, f"{message} (rule: {rule})", hint, rule)


def _never_relation(text: str, message: str) -> Decision:
    # A fixed list of catalog relations: the audit record may name the one refused.
    d = _deny("catalog", message)
    return Decision(d.action, d.sqlstate, d.message, d.hint, d.rule, f"never relation {text}")


def _reserved(what: str) -> Decision:
    # Whatever the role: the schema holds the pseudonym key (readable by its owner only) and
    # the functions the masking rewrite calls; an agent calling them directly would have an
    # oracle for pseudonyms of values of its choosing.
    return _deny(
        "phigate",
        f"{what} is never accessible through the gateway: schema {RESERVED_SCHEMA} holds the "
        "gateway's own pseudonym key and functions",
    )


_JudgeKey = tuple[str | None, frozenset[tuple[str, str]]]
_judges: weakref.WeakKeyDictionary[RoleSet, dict[_JudgeKey, _Judge]] = (
    weakref.WeakKeyDictionary()
)


def _judge(roleset: RoleSet, target: str | None, protected: frozenset[tuple[str, str]]) -> _Judge:
    per_target = _judges.get(roleset)
    if per_target is None:
        per_target = {}
        _judges[roleset] = per_target
    key = roleset.target if target is None else target
    judge = per_target.get((key, protected))
    if judge is None:
        roles = tuple(r for r in roleset.roles if r.applies_to(key))
        judge = per_target[(key, protected)] = _Judge(roles, protected)
    return judge


class _Judge:
    """The rules for one set of roles, with caches (a RoleSet lives until the next reload)."""

    __slots__ = (
        "_access",
        "_classes",
        "_columns",
        "_functions",
        "bulk_rules",
        "limits_columns",
        "names",
        "protected",
        "roles",
    )

    def __init__(
        self, roles: tuple[RoleConfig, ...], protected: frozenset[tuple[str, str]] = frozenset()
    ) -> None:
        self.roles = roles
        self.names = ", ".join(f'"{r.name}"' for r in roles)
        self.protected = protected  # relations holding classified PHI
        # No role asks for bulk reads: which reads are bulk does not matter (the common case).
        self.bulk_rules = any(r.approval_bulk_reads for r in roles)
        self._access: dict[tuple[str, str, str, bool], Decision] = {}
        self._columns: dict[tuple[str, str, str | None], frozenset[str] | None] = {}
        self._functions: dict[tuple[str, str], Decision] = {}
        self._classes: dict[str, Decision] = {}
        # No role limits columns: column uses cannot be refused, skip them (the common case).
        self.limits_columns = any(r.columns for r in roles)

    # -- helpers ----------------------------------------------------------------------------

    def _whose(self) -> str:
        return f"role {self.names}" if len(self.roles) == 1 else f"roles {self.names}"

    def _ask(self, what: str, field: str | None = None) -> str:
        where = f"the {field} of " if field else ""
        if len(self.roles) == 1:
            return f"ask your gateway administrator to add {what} to {where}role {self.names}"
        return (
            f"ask your gateway administrator to add {what} to {where}one of your roles "
            f"({self.names})"
        )

    def _granted(self, roles: list[RoleConfig], cls: str, what: str) -> Decision:
        """Allowed; needing approval if every granting role asks for ``cls``."""
        for r in roles:
            if cls not in r.approval:
                return ALLOW
        return Decision("allow", ask=ask(roles[0].approval[cls], roles[0], what))

    def _granted_access(
        self, roles: list[RoleConfig], rel: tuple[str, str], op: str, bulk: bool
    ) -> Decision:
        """An access granted by ``roles``: it needs approval if each of them asks, for the
        operation, for the relation, or for reading every row of it (``bulk``)."""
        first: Ask | None = None
        for r in roles:
            a = self._role_asks(r, rel, op, bulk)
            if a is None:
                return ALLOW
            first = first or a
        return Decision("allow", ask=first)

    def _role_asks(self, r: RoleConfig, rel: tuple[str, str], op: str, bulk: bool) -> Ask | None:
        what = f"{_OP_TEXT[op]} on {_rel(rel)}"
        if op in r.approval:
            return ask(r.approval[op], r, what)
        if r.approval_names(*rel):
            return ask("relation", r, what)
        if bulk and r.approval_bulk_reads and (rel in self.protected or r.bulk_read_names(*rel)):
            return ask("bulk_read", r, f"{what} reading every row (no WHERE or LIMIT)")
        return None

    def klass(self, cls: str) -> Decision:
        d = self._classes.get(cls)
        if d is None:
            roles = [r for r in self.roles if cls in r.allow or cls in r.operations]
            text = _KIND_TEXT.get(cls, cls)
            if not roles:
                field = "operations list" if cls == "ddl" else "allow list"
                d = _deny(
                    cls,
                    f"{text} is not allowed for {self._whose()}",
                    self._ask(f'"{cls}"', field),
                )
            else:
                d = self._granted(roles, cls, text)
            self._classes[cls] = d
        return d

    def access(self, schema: str, name: str, op: str, bulk: bool = False) -> Decision:
        """``bulk``: the statement may return every row it reads of the relation."""
        key = (schema, name, op, bulk)
        d = self._access.get(key)
        if d is None:
            d = self._access[key] = self._compute_access(schema, name, op, bulk)
        return d

    def _compute_access(self, schema: str, name: str, op: str, bulk: bool) -> Decision:
        rel = (schema, name)
        text = _rel(rel)
        if schema == RESERVED_SCHEMA:
            return _reserved(f"relation {text}")
        if name in NEVER_RELATION_NAMES:
            # Outside the catalog schemas, the schema is one the client typed: name only.
            return _never_relation(
                text if schema in _CATALOG_SCHEMAS else _q(name),
                f"{text} is never readable through the gateway (it holds other sessions' "
                "statements)",
            )
        if schema in _CATALOG_SCHEMAS:
            if op not in ("select", "copy_to"):
                return _deny("catalog", f"{_OP_TEXT[op]} on {text} is never allowed")
            if rel in NEVER_RELATIONS:
                return _never_relation(
                    text,
                    f"{text} is never readable through the gateway (it holds statements, "
                    "sampled values or credentials)",
                )
            if op == "copy_to" and not any("copy_to" in r.operations for r in self.roles):
                return _deny(
                    "operation",
                    f"COPY TO is not allowed for {self._whose()}",
                    self._ask('"copy_to"', "operations list"),
                )
            if rel in SAFE_CATALOG_RELATIONS or any(r.covers(schema, name) for r in self.roles):
                return ALLOW
            return (
                self.klass("catalog")
                if self.klass("catalog").action != "deny"
                else _deny(
                    "catalog",
                    f"reading {text} is not allowed for {self._whose()}",
                    self._ask('"catalog"', "allow list"),
                )
            )
        covering = [r for r in self.roles if r.covers(schema, name)]
        if not covering:
            return _deny(
                "relation",
                f"relation {text} is not allowed for {self._whose()}",
                self._ask(f"relation {text}"),
            )
        granting = [r for r in covering if op in r.operations]
        if not granting:
            return _deny(
                "operation",
                f"{_OP_TEXT[op]} on {text} is not allowed for {self._whose()}",
                self._ask(f'"{op}"', "operations list"),
            )
        return self._granted_access(granting, rel, op, bulk)

    def allowed_columns(
        self, rel: tuple[str, str], write: str | None, ops: frozenset[str]
    ) -> frozenset[str] | None:
        """Columns of ``rel`` a use may touch; None for all. Written columns: roles granting
        the write operation; read columns: roles granting any operation the statement uses on
        the relation."""
        key = (rel[0], rel[1], write if write is not None else ",".join(sorted(ops)))
        if key in self._columns:
            return self._columns[key]
        if rel[0] in _CATALOG_SCHEMAS:
            cols: frozenset[str] | None = None
        else:
            wanted = {write} if write is not None else ops
            cols = frozenset()
            for r in self.roles:
                if not r.covers(rel[0], rel[1]) or not (wanted & r.operations):
                    continue
                limit = r.columns.get(rel)
                if limit is None:
                    cols = None
                    break
                cols = cols | limit
        self._columns[key] = cols
        return cols

    def function(self, written: str | None, name: str, resolved: str) -> Decision:
        key = (resolved, name)
        d = self._functions.get(key)
        if d is None:
            d = self._functions[key] = self._compute_function(written, name, resolved)
        return d

    def _compute_function(self, written: str | None, name: str, resolved: str) -> Decision:
        text = f"{_q(resolved)}.{_q(name)}"
        if resolved == RESERVED_SCHEMA:
            return _reserved(f"function {text}")
        reason = never_reason(name)
        if reason is not None:
            return _deny(
                "function",
                f"function {text} is never allowed through the gateway: {reason}",
            )
        if resolved == "pg_catalog":
            if name in DEFAULT_FUNCTIONS or name == "set_config":  # set_config: see statement()
                return ALLOW
            if any(("pg_catalog", name) in r.functions for r in self.roles):
                return ALLOW
            cls = CLASS_FUNCTIONS.get(name)
            if cls is not None:
                d = self.klass(cls)
                if d.action == "deny":
                    return _deny(
                        cls,
                        f"function {text} belongs to {_KIND_TEXT.get(cls, cls)}, which is not "
                        f"allowed for {self._whose()}",
                        self._ask(f'"{cls}"', "allow list"),
                    )
                return d
        elif any((resolved, name) in r.functions for r in self.roles):
            return ALLOW
        return _deny(
            "function",
            f"function {text} is not allowed for {self._whose()}",
            self._ask(f"function {text}"),
        )

    def setting(self, name: str, values: tuple[str, ...], what: str) -> Decision:
        reason = _NEVER_SETTINGS.get(name)
        if reason is not None:
            return _deny("setting", f"{what} {name} is never allowed through the gateway: {reason}")
        if name not in SETTABLE and not name.startswith("enable_"):
            return _deny(
                "setting",
                f"{what} {_q(name)} is not allowed through the gateway",
                "settable: " + ", ".join(sorted(SETTABLE)) + ", enable_*",
            )
        if name == "client_encoding" and values:
            enc = values[0].lower().replace("-", "").replace("_", "")
            if enc not in _UTF8 and enc != "default":
                return _deny(
                    "setting",
                    "client_encoding can only be UTF8 through the gateway (other encodings "
                    "change how statements are parsed)",
                )
        return ALLOW

    # -- statements -------------------------------------------------------------------------

    def statement(self, f: Facts) -> Decision:
        if f.fail is not None:
            if f.fail.sqlstate == "42601":  # the parser's own message, as PostgreSQL words it
                return Decision("deny", "42601", f.fail.message, None, "syntax")
            return _deny("analyzer", f.fail.message, "rewrite the statement with simpler SQL")
        if f.reserved_schema:
            return _reserved(f"schema {RESERVED_SCHEMA}")
        approval: Decision | None = None
        kind = f.kind
        d = self.kind(f, kind)
        if d.action == "deny":
            return d
        if d.ask is not None:
            approval = d
        if f.inner_kind is not None and f.inner_kind != kind:
            d = self.kind(f, f.inner_kind)
            if d.action == "deny":
                return d
            if d.ask is not None and approval is None:
                approval = d
        ops_by_rel: dict[tuple[str, str], set[str]] = {}
        bulk = frozenset(f.bulk_reads) if self.bulk_rules else frozenset()
        for schema, name, op in f.relations:
            d = self.access(schema, name, op, (schema, name, op) in bulk)
            if d.action == "deny":
                return d
            if d.ask is not None and approval is None:
                approval = d
            ops_by_rel.setdefault((schema, name), set()).add(op)
        if f.columns and self.limits_columns:
            d = self.columns(f.columns, ops_by_rel)
            if d.action == "deny":
                return d
        for written, name, resolved in f.functions:
            d = self.function(written, name, resolved)
            if d.action == "deny":
                return d
            if d.ask is not None and approval is None:
                approval = d
        for setting in f.set_configs:
            if setting is None:
                return _deny(
                    "setting",
                    "set_config() is only allowed with a literal setting name",
                    "use SET for the settings the gateway allows",
                )
            d = self.setting(setting, (), "set_config() of")
            if d.action == "deny":
                return d
        for schema in f.operators:
            return _deny(
                "operator",
                f"operators from schema {_q(schema)} are not allowed",
                "use the built-in operators",
            )
        return approval or ALLOW

    def kind(self, f: Facts, kind: str) -> Decision:
        if kind == "show":
            name = f.set_name or ""
            if name.startswith(show_masking.NAMESPACE) and name != show_masking.SETTING:
                # PostgreSQL would answer "unrecognized configuration parameter" too; the hint
                # names the one phigate answers.
                return _deny(
                    "setting",
                    f"unrecognized configuration parameter {json.dumps(name, ensure_ascii=False)}",
                    f"SHOW {show_masking.SETTING} lists every column masked for you; phigate "
                    "has no other setting.",
                    sqlstate="42704",
                )
        if kind in _ALWAYS_KINDS:
            if kind in ("copy_to", "copy_from") and f.copy_target in ("program", "file"):
                what = "a program" if f.copy_target == "program" else "a server file"
                return _deny(
                    "copy",
                    f"COPY {f.copy_direction.upper() if f.copy_direction else ''} {what} is "
                    "never allowed through the gateway",
                    "use COPY ... TO STDOUT / FROM STDIN (psql: \\copy)",
                )
            if kind == "truncate" and f.cascade:
                return _deny(
                    "truncate",
                    "TRUNCATE ... CASCADE also empties tables the statement does not name",
                    "name every table to truncate",
                )
            return ALLOW
        cls = _CLASS_OF_KIND.get(kind)
        if cls is not None:
            return self.klass(cls)
        if kind == "ddl":
            return self.klass("ddl")
        if kind == "transaction":
            if f.transaction in _TWO_PHASE:
                return _deny("transaction", "two-phase commit is never allowed through the gateway")
            return ALLOW
        if kind in ("set", "reset"):
            name = f.set_name or ""
            if name == "all":
                return ALLOW  # RESET ALL leaves role and session_authorization alone
            if name == "session characteristics":
                for v in f.set_values:
                    if v.startswith("transaction_read_only="):
                        return self.setting("default_transaction_read_only", (), "SET")
                return ALLOW
            return self.setting(name, f.set_values, "SET" if kind == "set" else "RESET")
        if kind == "set_session_authorization":
            return _deny(
                "setting",
                "SET SESSION AUTHORIZATION is never allowed through the gateway: sessions run "
                "as the identity the gateway chose",
            )
        if kind == "admin":
            return _deny(
                "admin",
                f"{f.node.removesuffix('Stmt')} statements are never allowed through the gateway "
                "(server administration, roles, privileges, extensions)",
                "use a database administrator's connection",
            )
        return _deny("analyzer", f"phigate cannot judge {kind} statements yet")

    def columns(
        self, uses: list[ColumnUse], ops_by_rel: dict[tuple[str, str], set[str]]
    ) -> Decision:
        for use in uses:
            col = use.column
            bad: list[tuple[str, str]] = []
            for rel in use.candidates:
                ops = frozenset(ops_by_rel.get(rel, ()))
                allowed = self.allowed_columns(rel, use.write, ops)
                if allowed is None:
                    continue
                if col == "*" or col not in allowed:
                    bad.append(rel)
            if not bad:
                continue
            rel = bad[0]
            text = _rel(rel)
            allowed = self.allowed_columns(rel, use.write, frozenset(ops_by_rel.get(rel, ())))
            listed = ", ".join(sorted(_q(c) for c in allowed or ()))
            if col == "*":
                what = {
                    "insert": "writing every column (no column list)",
                    "copy": "every column (no column list)",
                    "join": "every column (NATURAL JOIN)",
                }.get(use.clause, "every column (* or a whole-row reference)")
                return _deny(
                    "column",
                    f"{what} of {text} is not allowed for {self._whose()}, which may use only "
                    "some of its columns",
                    f"list the columns you need; allowed: {listed}" if listed else None,
                )
            if use.exact:
                return _deny(
                    "column",
                    f"column {_q(col)} of {text} is not allowed for {self._whose()}",
                    self._ask(f"column {_q(col)} of {text}"),
                )
            return _deny(
                "column",
                f"column reference {_q(col)} may belong to {text}, whose columns are limited "
                f"for {self._whose()}",
                "qualify the column with its table name or alias",
            )
        return ALLOW


def allow_rule(facts_list: list[Facts], roleset: RoleSet, target: str | None = None) -> str:
    """The rule that allowed a message, as its audit record names it: the role (or roles)
    whose grants let each access through, e.g. "role:analyst allow select", or "builtin allow
    transaction" for statements every role may run (SELECT 1, SET, BEGIN). The first granting
    role is named, the one the judge's decision rests on."""
    judge = _judge(roleset, target, frozenset())
    grants: dict[str, set[str]] = {}
    builtin: set[str] = set()

    def grant(cls: str, role: RoleConfig | None) -> None:
        if role is None:
            builtin.add(cls)
        else:
            grants.setdefault(role.name, set()).add(cls)

    for f in facts_list:
        for kind in {f.kind, f.inner_kind} - {None}:
            assert kind is not None
            cls = "ddl" if kind == "ddl" else _CLASS_OF_KIND.get(kind)
            if cls is not None:
                granting = (r for r in judge.roles if cls in r.allow or cls in r.operations)
                grant(cls, next(granting, None))
        for schema, name, op in f.relations:
            if schema in _CATALOG_SCHEMAS:
                covering = next((r for r in judge.roles if r.covers(schema, name)), None)
                if covering is None and (schema, name) in SAFE_CATALOG_RELATIONS:
                    builtin.add("catalog read")
                else:
                    grant("catalog", covering or next(
                        (r for r in judge.roles if "catalog" in r.allow), None))
                continue
            role = next(
                (r for r in judge.roles if r.covers(schema, name) and op in r.operations), None
            )
            grant(op, role)
        for _, name, resolved in f.functions:
            if resolved != "pg_catalog" and resolved != RESERVED_SCHEMA:
                role = next((r for r in judge.roles if (resolved, name) in r.functions), None)
                grant("function", role)
    parts = [f"role:{name} allow {' '.join(sorted(ops))}" for name, ops in sorted(grants.items())]
    if builtin or not parts:
        kinds = sorted({f.kind for f in facts_list} | builtin) if not parts else sorted(builtin)
        parts.append("builtin allow " + " ".join(kinds))
    return "; ".join(parts)


def deny_rule(decision: Decision) -> str:
    """The rule that refused a message, as its audit record names it: "default deny
    relation" when no role grants the access, "never ..." for what no role can be granted."""
    if decision.audit_rule is not None:
        return decision.audit_rule
    rule = decision.rule or "policy"
    message = decision.message or ""
    if rule in ("relation", "operation", "column", "function", "catalog", "setting") and (
        "never" not in message
    ):
        return f"default deny {rule}"
    if "never" in message:
        return f"never {rule}"
    return f"deny {rule}"
