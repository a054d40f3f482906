"""Resolve `[phi.columns]` against a target's catalog: what is protected, where, and how.

The gateway reads the catalog through its own upstream connection (the target's service user)
and builds an immutable CatalogSnapshot:

- every classified column with its table OID, attnum and type, and each protected relation's
  full column list in order (the rewrite layer needs names, order and types to build masking
  subqueries; the data plane needs (table OID, attnum) to build mask plans);
- partitions and inheritance children of classified tables, recursively (rules follow column
  *names*: attnums may differ), and their ancestors (a parent returns its children's rows);
- views and materialized views whose definitions use a protected column. A view column that is
  a plain reference to a protected column gets that column's rule; when any other use is made of
  a protected column (expressions, predicates, grouping, sub-queries, whole-row references, set
  operations, ...) the whole view is marked "refuse". The definition is read from
  ``pg_rewrite.ev_action`` (the stored query tree) and cross-checked with ``pg_depend``.

`load_catalog` is synchronous: the server calls it in a thread at start, on reload and on
demand. Config that names a missing column or a mask that does not fit a column's type raises
ConfigError naming the `[phi.columns]` key; an unreachable upstream raises CatalogError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

from phigate.config import ColumnRule, Config, TargetConfig
from phigate.errors import ConfigError, PhigateError
from phigate.masking.dictionary_loader import IdentifierLoad, load_identifiers
from phigate.masking.pseudonym_db import FunctionsState, grantees
from phigate.masking.pseudonym_db import check as check_functions

log = logging.getLogger(__name__)

__all__ = [
    "CatalogError",
    "CatalogSnapshot",
    "ColumnInfo",
    "RelationInfo",
    "SubjectRelation",
    "load_catalog",
    "build_snapshot",
    "connect_args",
]

#: Why a relation is protected (RelationInfo.origin).
ORIGINS = ("configured", "partition", "child", "ancestor", "view")
_TABLE_KINDS = ("r", "p", "f")
_VIEW_KINDS = ("v", "m")
_DATE_TYPES = frozenset({1082, 1114, 1184})  # date, timestamp, timestamptz
_STRING_MASKS = frozenset({"partial", "email_domain", "free_text"})
_PSEUDONYM_NUMBERS = frozenset({20, 21, 23, 1700})  # int8, int2, int4, numeric: hashed digits
_MAX_ROUNDS = 64  # views over views over views ...


class CatalogError(PhigateError):
    """The catalog could not be read (upstream unreachable, authentication, timeout)."""


@dataclass(frozen=True)
class ColumnInfo:
    """One column of a protected relation (attnum > 0, not dropped), in attnum order."""

    name: str
    attnum: int
    type_oid: int
    type_name: str  # format_type(atttypid, atttypmod): "text", "character varying(20)", ...
    typmod: int
    not_null: bool
    rule: ColumnRule | None  # None: not classified here
    # (relation OID, attnum) the rule was inherited from (parent, child or a view's source
    # column); None when the rule is configured on this very column, or there is no rule.
    source: tuple[int, int] | None = None


@dataclass(frozen=True)
class RelationInfo:
    oid: int
    schema: str
    name: str
    relkind: str  # r (table), p (partitioned table), f (foreign table), v (view), m (matview)
    origin: str  # one of ORIGINS: why it is protected
    columns: tuple[ColumnInfo, ...]  # every column, in attnum order
    derived_from: tuple[int, ...] = ()  # OIDs of protected relations its rules came from
    refuse_reason: str | None = None  # set for views whose mapping is not clear

    @property
    def refuse(self) -> bool:
        return self.refuse_reason is not None

    def column(self, name: str) -> ColumnInfo | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None

    def classified_columns(self) -> tuple[ColumnInfo, ...]:
        return tuple(c for c in self.columns if c.rule is not None)

    def masked_columns(self, clear_kinds: frozenset[str]) -> tuple[ColumnInfo, ...]:
        """Columns an identity seeing ``clear_kinds`` in clear gets masked."""
        return tuple(
            c for c in self.columns if c.rule is not None and c.rule.masked_for(clear_kinds)
        )


@dataclass(frozen=True)
class SubjectRelation:
    """A `[phi.subjects]` relation resolved on a target: its OID, the attnum of the column that
    names the person, and every column's name by attnum (records name columns, never aliases)."""

    oid: int
    name: str  # "schema.table" as configured (folded)
    key_attnum: int
    columns: Mapping[int, str]


@dataclass(frozen=True, eq=False)
class CatalogSnapshot:
    """What is protected on one target, as read at ``loaded_at``. Immutable; replace it whole."""

    target: str
    loaded_at: float  # time.time()
    server_version_num: int  # 0 when nothing was read (no [phi.columns])
    relations: Mapping[int, RelationInfo] = field(default_factory=lambda: MappingProxyType({}))
    _by_name: Mapping[tuple[str, str], RelationInfo] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    _rules: Mapping[tuple[int, int], ColumnRule] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    # phigate's pseudonym functions in this database, as checked with this snapshot; None when
    # not checked (no pseudonym key configured). The rewrite needs them ready for pseudonyms.
    pseudonym_functions: FunctionsState | None = None
    # The identifier dictionary read with this snapshot (same connection and transaction);
    # the gateway hands its builder to the data plane once. None: dictionary off or no read.
    identifiers: IdentifierLoad | None = field(default=None, compare=False, repr=False)
    # `[phi.subjects]` relations resolved in this database (accounting of disclosures).
    subjects: tuple[SubjectRelation, ...] = ()

    @classmethod
    def empty(cls, target: str) -> CatalogSnapshot:
        return cls(target=target, loaded_at=time.time(), server_version_num=0)

    @classmethod
    def from_relations(
        cls, target: str, server_version_num: int, relations: Iterable[RelationInfo]
    ) -> CatalogSnapshot:
        by_oid = {r.oid: r for r in relations}
        by_name = {(r.schema, r.name): r for r in by_oid.values()}
        rules = {
            (r.oid, c.attnum): c.rule
            for r in by_oid.values()
            if not r.refuse
            for c in r.columns
            if c.rule is not None
        }
        return cls(
            target=target,
            loaded_at=time.time(),
            server_version_num=server_version_num,
            relations=MappingProxyType(by_oid),
            _by_name=MappingProxyType(by_name),
            _rules=MappingProxyType(rules),
        )

    def protected_relations(self) -> frozenset[tuple[str, str]]:
        """(schema, name) of every protected relation, refused views included."""
        return frozenset(self._by_name)

    def protected_oids(self) -> frozenset[int]:
        """OIDs of classified tables, their partitions, children and ancestors, and dependent
        views and materialized views (refused ones included)."""
        return frozenset(self.relations)

    def relation(self, schema: str, name: str) -> RelationInfo | None:
        """The protected relation with this (already folded) schema and name, else None."""
        return self._by_name.get((schema, name))

    def relation_by_oid(self, oid: int) -> RelationInfo | None:
        return self.relations.get(oid)

    def rule_for(self, table_oid: int, attnum: int) -> ColumnRule | None:
        """The rule for a RowDescription column origin; None if unclassified (or refused view:
        check protected_oids() / views_to_refuse() for those)."""
        return self._rules.get((table_oid, attnum))

    def column_rules(self) -> Mapping[tuple[int, int], ColumnRule]:
        """Every (table OID, attnum) with its rule: what the data plane masks rows by."""
        return self._rules

    def views_to_refuse(self) -> frozenset[tuple[str, str]]:
        """(schema, name) of views whose use of classified columns phigate cannot map."""
        return frozenset(k for k, r in self._by_name.items() if r.refuse)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description (what `phigate catalog show --json` prints)."""
        rels = []
        for r in sorted(self.relations.values(), key=lambda r: (r.schema, r.name)):
            rels.append(
                {
                    "oid": r.oid,
                    "schema": r.schema,
                    "name": r.name,
                    "relkind": r.relkind,
                    "origin": r.origin,
                    "derived_from": [_qname(self.relations[o]) for o in r.derived_from
                                     if o in self.relations],
                    "refuse": r.refuse_reason,
                    "columns": [
                        {
                            "name": c.name,
                            "attnum": c.attnum,
                            "type": c.type_name,
                            "type_oid": c.type_oid,
                            "not_null": c.not_null,
                            "kind": c.rule.kind if c.rule else None,
                            "mask": c.rule.mask_spec if c.rule else None,
                            "config_key": c.rule.config_key if c.rule else None,
                        }
                        for c in r.columns
                    ],
                }
            )  # fmt: skip
        return {
            "target": self.target,
            "server_version_num": self.server_version_num,
            "loaded_at": self.loaded_at,
            "pseudonym_functions": (
                self.pseudonym_functions.to_json() if self.pseudonym_functions else None
            ),
            "relations": rels,
        }


def _qname(r: RelationInfo) -> str:
    return f"{r.schema}.{r.name}"


# --- loading ---------------------------------------------------------------------------------


def load_catalog(
    config: Config, target_name: str, *, identifiers: bool = True
) -> CatalogSnapshot:
    """Read the catalog of ``target_name`` through the gateway's own upstream connection.

    With ``identifiers`` the identifier dictionary's values are read in the same transaction
    (dictionary_loader.py). Synchronous (call it in a thread from async code). Raises
    ConfigError when `[phi.columns]` names a relation or column that does not exist or a mask
    that does not fit the column's type, CatalogError when the upstream cannot be reached or
    read, KeyError for an unknown target name.
    """
    target = config.targets[target_name]
    if not config.phi.columns and not config.phi.subjects:
        return CatalogSnapshot.empty(target_name)
    with read_only_transaction(config, target_name, "the catalog") as conn:
        with conn.cursor() as cur:
            # The search_path the target's sessions run with: format_type() spells a type
            # unqualified only when it is visible there, so the rewrite's CASTs name the
            # same types in those sessions.
            cur.execute(
                "SELECT pg_catalog.set_config('search_path', %s, true)",
                (target.params["search_path"],),
            )
            if config.phi.columns:
                snap = build_snapshot(cur, config, target_name)
            else:
                snap = CatalogSnapshot.empty(target_name)
            if config.phi.subjects:
                subjects = resolve_subjects(cur, config, target_name)
                snap = dataclasses.replace(snap, subjects=subjects)
        snap = _check_functions(conn, config, target_name, snap)
        if not identifiers:
            return snap
        load = load_identifiers(conn, config)
        if load is not None:
            log.info("target %s: identifier dictionary read: %d columns, %d distinct "
                     "values in %.2f s", target_name, load.columns, load.values,
                     load.seconds)  # fmt: skip
        return dataclasses.replace(snap, identifiers=load)


@contextlib.contextmanager
def read_only_transaction(config: Config, target_name: str, what: str) -> Iterator[Any]:
    """The gateway's own connection to ``target_name`` inside a read-only REPEATABLE READ
    transaction (one snapshot for everything read). A connection or server error becomes a
    CatalogError saying it could not read ``what`` ("the catalog") and naming the target."""
    import psycopg

    target = config.targets[target_name]
    try:
        with psycopg.connect(**connect_args(target), autocommit=False) as conn:
            conn.read_only = True
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            yield conn
    except psycopg.Error as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CatalogError(
            f"cannot read {what} of target {target_name!r} "
            f"({target.host}:{target.port}, database {target.database}, user {target.user}): {msg}"
        ) from None
    except OSError as exc:
        raise CatalogError(
            f"cannot reach target {target_name!r} ({target.host}:{target.port}): {exc}"
        ) from None


def _check_functions(
    conn: Any, config: Config, target_name: str, snap: CatalogSnapshot
) -> CatalogSnapshot:
    """The snapshot with the state of phigate's pseudonym functions (pseudonym_db.check),
    logged: an error when a configured pseudonym mask cannot be computed in SQL."""
    key = config.phi.pseudonym_key
    if key is None:
        return snap
    roles = grantees(config, target_name)
    state = check_functions(conn, key.reveal(), roles, target_name)
    needed = any(r.mask == "pseudonym" for r in config.phi.columns.values())
    if state.ready:
        log.info("target %s: pseudonym functions %s", target_name, state.summary)
    elif needed:
        log.error("target %s: statements whose masking needs a pseudonym in SQL are refused: %s",
                  target_name, state.summary)  # fmt: skip
    else:
        log.info("target %s: %s (no column uses mask 'pseudonym')", target_name, state.summary)
    for warning in state.warnings:
        log.warning("target %s: %s", target_name, warning)
    return dataclasses.replace(snap, pseudonym_functions=state)


def connect_args(t: TargetConfig) -> dict[str, Any]:
    """psycopg.connect() arguments for the gateway's own connection to target ``t``."""
    args: dict[str, Any] = {
        "host": t.host,
        "port": t.port,
        "dbname": t.database,
        "user": t.user,
        "sslmode": t.tls,
        "connect_timeout": max(2, round(t.connect_timeout)),
        "application_name": "phigate-catalog",
        # Nothing here may hang the gateway's reload: bound every statement and lock wait.
        "options": "-c statement_timeout=30000 -c lock_timeout=10000",
    }
    if t.password is not None:
        args["password"] = t.password.reveal()
    if t.tls == "verify-full":
        args["sslrootcert"] = str(t.ca_file)
        if t.server_name and t.server_name != t.host:
            # Verify the certificate against server_name while connecting to host.
            args["host"] = t.server_name
            args["hostaddr"] = _resolve(t.host, t.port)
    return args


def _resolve(host: str, port: int) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CatalogError(f"cannot resolve upstream host {host!r}: {exc}") from None
    return str(infos[0][4][0])


# --- building the snapshot ------------------------------------------------------------------

_RELATIONS_SQL = """
SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN unnest(%s::text[], %s::text[]) AS w(s, r) ON n.nspname = w.s AND c.relname = w.r
"""
_RELATIONS_BY_OID_SQL = """
SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = ANY(%s::oid[])
"""
_COLUMNS_SQL = """
SELECT a.attrelid::int8, a.attname::text, a.attnum::int, a.atttypid::int8,
       pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypmod, a.attnotnull
  FROM pg_catalog.pg_attribute a
 WHERE a.attrelid = ANY(%s::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attrelid, a.attnum
"""
# Domains resolved to their base type: masks care about what the value really is.
_BASE_TYPES_SQL = """
WITH RECURSIVE b(orig, cur) AS (
    SELECT t.oid, t.oid FROM pg_catalog.pg_type t WHERE t.oid = ANY(%s::oid[])
  UNION ALL
    SELECT b.orig, t.typbasetype FROM b JOIN pg_catalog.pg_type t ON t.oid = b.cur
     WHERE t.typtype = 'd'
)
SELECT b.orig::int8, t.oid::int8, t.typcategory::text
  FROM b JOIN pg_catalog.pg_type t ON t.oid = b.cur
 WHERE t.typtype <> 'd'
"""
# Inheritance and partitioning edges among tables (pg_inherits also links partitioned indexes).
_INHERITS_SQL = """
SELECT i.inhrelid::int8, i.inhparent::int8
  FROM pg_catalog.pg_inherits i
  JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
 WHERE c.relkind IN ('r', 'p', 'f')
"""
# Views and materialized views whose _RETURN rule depends on one of the given relations
# (refobjsubid 0 is the whole relation, > 0 a column).
_DEPENDENT_VIEWS_SQL = """
SELECT DISTINCT r.ev_class::int8, d.refobjid::int8, d.refobjsubid::int
  FROM pg_catalog.pg_depend d
  JOIN pg_catalog.pg_rewrite r
    ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid
  JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
 WHERE d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
   AND v.relkind IN ('v', 'm') AND r.rulename = '_RETURN'
   AND r.ev_class <> d.refobjid
   AND r.ev_class IN (
       SELECT r2.ev_class FROM pg_catalog.pg_depend d2
         JOIN pg_catalog.pg_rewrite r2
           ON d2.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d2.objid = r2.oid
        WHERE d2.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
          AND d2.refobjid = ANY(%s::oid[]))
"""
_VIEW_ACTION_SQL = """
SELECT r.ev_class::int8, r.ev_action::text
  FROM pg_catalog.pg_rewrite r
 WHERE r.ev_class = ANY(%s::oid[]) AND r.rulename = '_RETURN'
"""


@dataclass
class _Rel:
    oid: int
    schema: str
    name: str
    relkind: str
    origin: str
    columns: list[ColumnInfo]
    rules: dict[str, tuple[ColumnRule, tuple[int, int] | None]] = field(default_factory=dict)
    derived_from: set[int] = field(default_factory=set)
    refuse_reason: str | None = None


def resolve_subjects(cur: Any, config: Config, target_name: str) -> tuple[SubjectRelation, ...]:
    """Each `[phi.subjects]` relation's OID, key attnum and column names on this target; a
    relation or key column that does not exist is a ConfigError naming the entry."""
    subjects = config.phi.subjects
    wanted = sorted(subjects)
    cur.execute(_RELATIONS_SQL, ([s for s, _ in wanted], [r for _, r in wanted]))
    found = {(s, n): (oid, kind) for oid, s, n, kind in cur.fetchall()}
    out = []
    for (schema, table), key_column in sorted(subjects.items()):
        config_key = f'phi.subjects."{schema}.{table}"'
        hit = found.get((schema, table))
        if hit is None:
            database = config.targets[target_name].database
            raise ConfigError(config_key, config.source, f"relation {schema}.{table} does not "
                              f"exist in target {target_name!r} (database {database})")  # fmt: skip
        oid, kind = hit
        if kind not in _TABLE_KINDS + _VIEW_KINDS:
            raise ConfigError(config_key, config.source,
                              f"{schema}.{table} is not a table or view (relkind {kind!r})")
        rel = _Rel(oid, schema, table, kind, "configured", [])
        _load_columns(cur, [rel])
        columns = {c.attnum: c.name for c in rel.columns}
        key = next((c.attnum for c in rel.columns if c.name == key_column), None)
        if key is None:
            raise ConfigError(config_key, config.source, f"column {key_column!r} does not exist "
                              f"in {schema}.{table} (its columns: {', '.join(columns.values())})")
        out.append(SubjectRelation(oid=oid, name=f"{schema}.{table}", key_attnum=key,
                                   columns=MappingProxyType(columns)))  # fmt: skip
    return tuple(out)


def build_snapshot(cur: Any, config: Config, target_name: str) -> CatalogSnapshot:
    """Build the snapshot with an open psycopg cursor (one consistent read-only transaction)."""
    phi = config.phi
    cur.execute("SELECT pg_catalog.current_setting('server_version_num')::int")
    version = int(cur.fetchone()[0])
    wanted = sorted(phi.relations())
    cur.execute(_RELATIONS_SQL, ([s for s, _ in wanted], [r for _, r in wanted]))
    found = {(s, n): (oid, kind) for oid, s, n, kind in cur.fetchall()}

    rels: dict[int, _Rel] = {}
    for rule in phi.columns.values():
        hit = found.get((rule.schema, rule.table))
        if hit is None:
            _fail(config, rule, f"relation {rule.schema}.{rule.table} does not exist in target "
                  f"{target_name!r} (database {config.targets[target_name].database})")  # fmt: skip
        oid, kind = hit
        if kind not in _TABLE_KINDS + _VIEW_KINDS:
            _fail(config, rule, f"{rule.schema}.{rule.table} is not a table or view "
                  f"(relkind {kind!r})")  # fmt: skip
        if oid not in rels:
            rels[oid] = _Rel(oid, rule.schema, rule.table, kind, "configured", [])
    _load_columns(cur, rels.values())
    for rule in phi.columns.values():
        rel = rels[found[(rule.schema, rule.table)][0]]
        if not any(c.name == rule.column for c in rel.columns):
            names = ", ".join(c.name for c in rel.columns)
            _fail(config, rule, f"column {rule.column!r} does not exist in "
                  f"{rule.schema}.{rule.table} (its columns: {names})")  # fmt: skip
        rel.rules[rule.column] = (rule, None)

    _extend_inheritance(cur, config, rels)
    _extend_views(cur, rels)
    _check_types(cur, config, rels)

    infos = []
    for rel in rels.values():
        cols = []
        for c in rel.columns:
            rule_src = rel.rules.get(c.name) if rel.refuse_reason is None else None
            if rule_src is None:
                cols.append(c)
            else:
                cols.append(_with_rule(c, rule_src[0], rule_src[1]))
        infos.append(
            RelationInfo(
                oid=rel.oid,
                schema=rel.schema,
                name=rel.name,
                relkind=rel.relkind,
                origin=rel.origin,
                columns=tuple(cols),
                derived_from=tuple(sorted(rel.derived_from)),
                refuse_reason=rel.refuse_reason,
            )
        )
    return CatalogSnapshot.from_relations(target_name, version, infos)


def _with_rule(c: ColumnInfo, rule: ColumnRule, source: tuple[int, int] | None) -> ColumnInfo:
    return ColumnInfo(
        name=c.name,
        attnum=c.attnum,
        type_oid=c.type_oid,
        type_name=c.type_name,
        typmod=c.typmod,
        not_null=c.not_null,
        rule=rule,
        source=source,
    )


def _fail(config: Config, rule: ColumnRule, message: str) -> NoReturn:
    raise ConfigError(rule.config_key, config.source, message)


def _load_columns(cur: Any, rels: Iterable[_Rel]) -> None:
    todo = {r.oid: r for r in rels if not r.columns}
    if not todo:
        return
    cur.execute(_COLUMNS_SQL, (list(todo),))
    for relid, name, attnum, typid, typname, typmod, notnull in cur.fetchall():
        todo[relid].columns.append(
            ColumnInfo(name, attnum, typid, typname, typmod, bool(notnull), None)
        )


def _add_relations(cur: Any, rels: dict[int, _Rel], oids: Iterable[int], origin: str) -> None:
    new = [o for o in oids if o not in rels]
    if not new:
        return
    cur.execute(_RELATIONS_BY_OID_SQL, (new,))
    added = []
    for oid, schema, name, kind in cur.fetchall():
        rels[oid] = _Rel(oid, schema, name, kind, origin, [])
        added.append(rels[oid])
    _load_columns(cur, added)


def _inherit(
    config: Config, rels: dict[int, _Rel], src: _Rel, dst: _Rel, explicit: set[tuple[int, str]]
) -> bool:
    """Copy src's rules to dst's same-named columns; True if anything changed."""
    changed = False
    names = {c.name: c for c in src.columns}
    for col, (rule, _) in list(src.rules.items()):
        if (dst.oid, col) in explicit or not any(c.name == col for c in dst.columns):
            continue
        have = dst.rules.get(col)
        source = (src.oid, names[col].attnum)
        if have is None:
            dst.rules[col] = (rule, source)
            dst.derived_from.add(src.oid)
            changed = True
        elif (have[0].kind, have[0].mask, have[0].keep) != (rule.kind, rule.mask, rule.keep):
            raise ConfigError(
                rule.config_key,
                config.source,
                f"{dst.schema}.{dst.name}.{col} inherits this rule and the different rule of "
                f"{have[0].config_key}; classify it explicitly to choose one",
            )
    return changed


def _extend_inheritance(cur: Any, config: Config, rels: dict[int, _Rel]) -> None:
    cur.execute(_INHERITS_SQL)
    children: dict[int, list[int]] = {}
    parents: dict[int, list[int]] = {}
    for child, parent in cur.fetchall():
        children.setdefault(parent, []).append(child)
        parents.setdefault(child, []).append(parent)
    explicit = {(oid, col) for oid, r in rels.items() for col in r.rules}
    configured = list(rels)
    # Downwards: partitions and inheritance children, recursively.
    stack = list(configured)
    while stack:
        oid = stack.pop()
        kids = children.get(oid, [])
        rel = rels[oid]
        _add_relations(cur, rels, kids, "partition" if rel.relkind == "p" else "child")
        for kid in kids:
            if kid in rels and _inherit(config, rels, rel, rels[kid], explicit):
                stack.append(kid)
    # Upwards: a parent's scan returns its children's rows, so it carries their rules.
    stack = list(rels)
    while stack:
        oid = stack.pop()
        ups = parents.get(oid, [])
        _add_relations(cur, rels, ups, "ancestor")
        for up in ups:
            if up in rels and _inherit(config, rels, rels[oid], rels[up], explicit):
                stack.append(up)


def _extend_views(cur: Any, rels: dict[int, _Rel]) -> None:
    """Add dependent views and materialized views until nothing changes."""
    for _ in range(_MAX_ROUNDS):
        sources = {
            (oid, c.attnum): (r.rules[c.name][0], oid)
            for oid, r in rels.items()
            if r.refuse_reason is None
            for c in r.columns
            if c.name in r.rules
        }
        protected = set(rels)
        refused = {oid for oid, r in rels.items() if r.refuse_reason is not None}
        cur.execute(_DEPENDENT_VIEWS_SQL, (sorted(protected),))
        deps: dict[int, set[tuple[int, int]]] = {}
        for view, refobj, subid in cur.fetchall():
            deps.setdefault(view, set()).add((refobj, subid))
        if not deps:
            return
        cur.execute(_VIEW_ACTION_SQL, (sorted(deps),))
        actions = dict(cur.fetchall())
        changed = False
        for view, vdeps in sorted(deps.items()):
            if view in rels and rels[view].origin != "view":
                continue  # configured directly (or a table): its own rules stand
            result = _analyze_view(actions.get(view), vdeps, sources, protected, refused, rels)
            if result is None:
                continue  # uses no protected column
            mapping, reason, from_oids = result
            if view not in rels:
                _add_relations(cur, rels, [view], "view")
                if view not in rels:
                    continue  # dropped meanwhile
            rel = rels[view]
            before = (dict(rel.rules), rel.refuse_reason)
            rel.refuse_reason = reason
            rel.derived_from = set(from_oids)
            rel.rules = {}
            if reason is None:
                by_attnum = {c.attnum: c for c in rel.columns}
                for resno, (rule, src) in mapping.items():
                    if resno in by_attnum:
                        rel.rules[by_attnum[resno].name] = (rule, src)
            if (rel.rules, rel.refuse_reason) != before:
                changed = True
        if not changed:
            return
    raise CatalogError("views depend on each other too deeply to resolve")


def _check_types(cur: Any, config: Config, rels: dict[int, _Rel]) -> None:
    types = {c.type_oid for r in rels.values() for c in r.columns if c.name in r.rules}
    if not types:
        return
    cur.execute(_BASE_TYPES_SQL, (sorted(types),))
    base = {orig: (oid, cat) for orig, oid, cat in cur.fetchall()}
    for rel in rels.values():
        for c in rel.columns:
            if c.name not in rel.rules:
                continue
            rule = rel.rules[c.name][0]
            base_oid, category = base.get(c.type_oid, (c.type_oid, "X"))
            where = f"{rel.schema}.{rel.name}.{c.name}"
            if rule.mask == "year" and base_oid not in _DATE_TYPES:
                _fail(config, rule, f"mask 'year' needs a date or timestamp column, but {where} "
                      f"is {c.type_name}")  # fmt: skip
            if rule.mask == "pseudonym" and category != "S" and base_oid not in _PSEUDONYM_NUMBERS:
                _fail(config, rule, f"mask 'pseudonym' needs a text or integer column, but "
                      f"{where} is {c.type_name}; use redact or null")  # fmt: skip
            if rule.mask == "zip3":
                _check_zip3(config, rule, where, c.type_name, category)
            if rule.mask in _STRING_MASKS and category != "S":
                _fail(config, rule, f"mask {rule.mask_spec!r} needs a text column, but {where} "
                      f"is {c.type_name}; use redact or null")  # fmt: skip


_LENGTH_LIMIT = re.compile(r"\((\d+)\)$")


def _check_zip3(config: Config, rule: ColumnRule, where: str, type_name: str, cat: str) -> None:
    # zip3 shows "021**", "000**" or "***": a text column that can hold five characters. An
    # integer ZIP column cannot hold "021**" (and has lost the leading zeros anyway).
    if cat != "S":
        _fail(config, rule, f"mask 'zip3' needs a text column (text, varchar or char), but "
              f"{where} is {type_name}; store ZIPs as text, or use redact or null")  # fmt: skip
    m = _LENGTH_LIMIT.search(type_name)
    if m is not None and int(m.group(1)) < 5:
        _fail(config, rule, f"mask 'zip3' shows five characters (\"021**\"), but {where} is "
              f"{type_name}; use redact or null")  # fmt: skip


# --- view definitions ------------------------------------------------------------------------

_Mapping = dict[int, tuple[ColumnRule, tuple[int, int]]]


def _analyze_view(
    action: str | None,
    deps: set[tuple[int, int]],
    sources: Mapping[tuple[int, int], tuple[ColumnRule, int]],
    protected: set[int],
    refused: set[int],
    rels: Mapping[int, _Rel],
) -> tuple[_Mapping, str | None, set[int]] | None:
    """(resno -> (rule, source), refuse reason or None, OIDs it derives from), or None when the
    view uses no protected column."""
    from_oids = {o for o, _ in deps if o in protected}
    used = {d for d in deps if d in sources}
    bad_view = sorted(o for o in from_oids if o in refused)
    if bad_view:
        names = ", ".join(f"{rels[o].schema}.{rels[o].name}" for o in bad_view)
        return {}, f"it selects from {names}, which is refused", from_oids
    if action is None:
        return ({}, "its definition could not be read", from_oids) if used else None
    try:
        tree = _parse_node_tree(action)
        query = tree[0] if isinstance(tree, list) and len(tree) == 1 else None
        if not isinstance(query, _Node) or query.type != "QUERY":
            raise ValueError("not a single query")
    except (ValueError, IndexError):
        return {}, "its definition could not be read", from_oids
    whole_rows = [v for v in _walk(query) if v.type == "VAR" and v.get("varattno") == "0"]
    if whole_rows:
        return {}, "it uses a whole-row reference to a protected relation", from_oids
    if not used:
        return None
    if not _is_simple(query):
        return {}, "it computes over protected columns in ways phigate cannot map", from_oids
    rtable = query.get("rtable") or []
    direct: set[int] = set()
    mapping: _Mapping = {}
    for tle in query.get("targetList") or []:
        expr = tle.get("expr")
        if isinstance(expr, _Node) and expr.type == "RELABELTYPE":
            expr = expr.get("arg")
        if not (isinstance(expr, _Node) and expr.type == "VAR"):
            continue
        origin = _resolve_var(expr, rtable)
        if origin is None or origin not in sources:
            continue
        if tle.get("resjunk") != "false" or tle.get("ressortgroupref") != "0":
            return {}, "it sorts, groups or filters by a protected column", from_oids
        direct.add(id(expr))
        rule, src_oid = sources[origin]
        mapping[int(tle.get("resno"))] = (rule, (src_oid, origin[1]))
    for key, value in query.fields.items():
        if key in ("rtable", "rteperminfos"):
            continue
        for node in _walk(value):
            if node.type != "VAR" or id(node) in direct:
                continue
            for origin in _var_origins(node, rtable):
                if origin in sources:
                    return {}, "it computes over or filters by a protected column", from_oids
    mapped = {(s[0], s[1]) for _, s in mapping.values()}
    if not used <= mapped:
        return {}, "it uses protected columns phigate cannot map to its output", from_oids
    return mapping, None, from_oids


def _is_simple(query: _Node) -> bool:
    if query.get("setOperations") is not None or query.get("cteList") is not None:
        return False
    if query.get("hasSubLinks") != "false" or query.get("hasTargetSRFs") != "false":
        return False
    for rte in query.get("rtable") or []:
        if not isinstance(rte, _Node) or rte.get("rtekind") not in ("0", "2"):
            return False
    return True


def _rte(rtable: list[Any], varno: Any) -> _Node | None:
    try:
        i = int(varno)
    except (TypeError, ValueError):
        return None
    rte = rtable[i - 1] if 1 <= i <= len(rtable) else None
    return rte if isinstance(rte, _Node) else None


def _resolve_var(var: _Node, rtable: list[Any]) -> tuple[int, int] | None:
    """(relation OID, attnum) if the Var is a plain (possibly join-aliased) column, else None."""
    for _ in range(100):
        if var.get("varlevelsup") != "0":
            return None
        rte = _rte(rtable, var.get("varno"))
        attno = int(var.get("varattno") or 0)
        if rte is None or attno <= 0:
            return None
        if rte.get("rtekind") == "0":
            return int(rte.get("relid")), attno
        if rte.get("rtekind") != "2":
            return None
        aliases = rte.get("joinaliasvars") or []
        if attno > len(aliases):
            return None
        nxt = aliases[attno - 1]
        if isinstance(nxt, _Node) and nxt.type == "RELABELTYPE":
            nxt = nxt.get("arg")
        if not (isinstance(nxt, _Node) and nxt.type == "VAR"):
            return None
        var = nxt
    return None


def _var_origins(var: _Node, rtable: list[Any], depth: int = 0) -> set[tuple[int, int]]:
    """Every base column a Var's value may come from (through join alias expressions)."""
    if depth > 100 or var.get("varlevelsup") != "0":
        return set()
    rte = _rte(rtable, var.get("varno"))
    attno = int(var.get("varattno") or 0)
    if rte is None or attno <= 0:
        return set()
    if rte.get("rtekind") == "0":
        return {(int(rte.get("relid")), attno)}
    aliases = rte.get("joinaliasvars") or []
    if rte.get("rtekind") != "2" or attno > len(aliases):
        return set()
    out: set[tuple[int, int]] = set()
    for node in _walk(aliases[attno - 1]):
        if node.type == "VAR":
            out |= _var_origins(node, rtable, depth + 1)
    return out


# --- PostgreSQL node-tree text (nodeToString) -----------------------------------------------


class _Node:
    __slots__ = ("fields", "type")

    def __init__(self, type_: str) -> None:
        self.type = type_
        self.fields: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.fields.get(key)


def _walk(value: Any) -> Iterator[_Node]:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, _Node):
            yield v
            stack.extend(v.fields.values())
        elif isinstance(v, list):
            stack.extend(v)


def _tokens(text: str) -> Iterator[str]:
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch in "(){}":
            yield ch
            i += 1
            continue
        if ch == '"':
            j, buf = i + 1, []
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            if j >= n:
                raise ValueError("unterminated string")
            yield '"' + "".join(buf)
            i = j + 1
            continue
        buf = []
        while i < n and not text[i].isspace() and text[i] not in "(){}":
            if text[i] == "\\" and i + 1 < n:
                i += 1
            buf.append(text[i])
            i += 1
        yield "".join(buf)


_END = object()


def _parse_node_tree(text: str) -> Any:
    toks = list(_tokens(text))
    pos = 0

    def value() -> Any:
        nonlocal pos
        if pos >= len(toks):
            raise ValueError("unexpected end")
        tok = toks[pos]
        pos += 1
        if tok == "{":
            node = _Node(toks[pos])
            pos += 1
            while toks[pos] != "}":
                name = toks[pos]
                if not name.startswith(":"):
                    raise ValueError(f"expected a field name, got {name!r}")
                pos += 1
                vals = []
                while toks[pos] != "}" and not (
                    toks[pos].startswith(":") and len(toks[pos]) > 1
                ):
                    vals.append(value())
                node.fields[name[1:]] = vals[0] if len(vals) == 1 else (vals or None)
            pos += 1
            return node
        if tok == "(":
            items = []
            while toks[pos] != ")":
                items.append(value())
            pos += 1
            return items
        if tok in (")", "}"):
            raise ValueError(f"unexpected {tok!r}")
        return None if tok == "<>" else tok

    result = value()
    if pos != len(toks):
        raise ValueError("trailing tokens")
    return result
