"""The validated config as frozen dataclasses, its public constants, and the data plane's JSON."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from phigate.errors import IdentityError
from phigate.masking.zip3 import restricted_prefixes

_EVENT_BACKLOG_WAKEUP = 512

DEFAULT_STARTUP_PARAMETERS: tuple[str, ...] = (
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "extra_float_digits",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
)

#: The schema unqualified names resolve to when a target's `params` set no search_path.
DEFAULT_SCHEMA = "public"

#: What a role may do to the relations it lists (`operations`); the default is ["select"].
OPERATIONS: tuple[str, ...] = (
    "select", "insert", "update", "delete", "merge", "copy_to", "copy_from", "truncate", "ddl",
)  # fmt: skip

#: Statement classes refused for agents unless a role opens them (`allow`).
ALLOW_CLASSES: tuple[str, ...] = (
    "listen", "notify", "prepare", "lock", "maintenance", "explain", "do", "call", "set_role",
    "discard", "catalog",
)  # fmt: skip

#: Shorthands usable in `approval`, besides the operations and allow classes themselves.
_APPROVAL_GROUPS: Mapping[str, frozenset[str]] = MappingProxyType({
    "write": frozenset({"insert", "update", "delete", "merge", "copy_from", "truncate"}),
    "read": frozenset({"select", "copy_to"}),
})  # fmt: skip

APPROVAL_CLASSES: tuple[str, ...] = (*_APPROVAL_GROUPS, *OPERATIONS, *ALLOW_CLASSES)

#: PHI kinds a classified column can have (`[phi.columns]` kind, roles' `see_clear`).
PHI_KINDS: tuple[str, ...] = (
    "ssn", "mrn", "name", "dob", "address", "city", "zip", "phone", "email", "free_text",
    "other",
)  # fmt: skip

#: A role's `masking_notices`: tell masked identities which columns a result masks once per
#: relation and session ("first", the default), with every result ("always"), or never ("off").
MASKING_NOTICES: tuple[str, ...] = ("first", "always", "off")

#: Masks (`partial` is written "partial:N", N = trailing characters kept).
MASKS: tuple[str, ...] = (
    "redact", "null", "partial", "year", "email_domain", "pseudonym", "free_text", "zip3",
)  # fmt: skip

# Relations no role may list: they hold other sessions' statements, column statistics (sampled
# values, i.e. PHI), password hashes or credentials. Kept in sync with policy/rules.py.
NEVER_RELATIONS: frozenset[tuple[str, str]] = frozenset(
    ("pg_catalog", n)
    for n in (
        "pg_authid", "pg_shadow", "pg_user_mapping", "pg_user_mappings", "pg_statistic",
        "pg_statistic_ext_data", "pg_stats", "pg_stats_ext", "pg_stats_ext_exprs",
        "pg_stat_activity", "pg_largeobject", "pg_file_settings", "pg_hba_file_rules",
        "pg_ident_file_mappings", "pg_subscription", "pg_replication_slots",
        "pg_stat_statements", "pg_stat_statements_info", "pg_prepared_xacts",
    )
)

#: The schema `phigate db install` creates (pseudonym_db.py): no role may name anything in it.
RESERVED_SCHEMA = "phigate"

_RESERVED_WHY = (
    "schema phigate holds the gateway's own pseudonym key and functions and is never "
    "accessible through the gateway"
)

#: Extension views that hold other sessions' statement texts (with the literal values in them)
#: -- never readable in whatever schema they live.
NEVER_RELATION_NAMES: frozenset[str] = frozenset({
    "pg_stat_statements", "pg_stat_statements_info", "pg_stat_monitor", "pg_stat_kcache",
    "pg_qualstats", "pg_store_plans", "pg_wait_sampling_history", "pg_wait_sampling_profile",
})  # fmt: skip

@dataclass(frozen=True, repr=False)
class Secret:
    """A secret string that never shows up in repr(), str() or f-strings; call reveal()."""

    _value: str

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

@dataclass(frozen=True, repr=False)
class SecretBytes:
    """Secret bytes (the pseudonym HMAC key) that never show up in repr() or str()."""

    _value: bytes

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "SecretBytes('********')"

    __str__ = __repr__

@dataclass(frozen=True)
class ColumnRule:
    """One `[phi.columns]` entry: a classified column, its PHI kind and its mask.

    ``mask`` is one of MASKS; ``keep`` is N for "partial:N" and None otherwise. ``config_key``
    is the dotted key naming the entry, e.g. ``phi.columns."public.patients.ssn"``, for messages.
    Names are folded like PostgreSQL folds identifiers.
    """

    schema: str
    table: str
    column: str
    kind: str
    mask: str
    keep: int | None
    config_key: str

    @property
    def mask_spec(self) -> str:
        """The mask as written in the config: "partial:4", "year", ..."""
        return f"partial:{self.keep}" if self.mask == "partial" else self.mask

    def masked_for(self, clear_kinds: frozenset[str]) -> bool:
        """True if an identity seeing ``clear_kinds`` in clear gets this column masked."""
        return self.kind not in clear_kinds

#: Kinds whose column values the identifier dictionary learns by default (dates of birth and
#: free text are not identifiers one can look up as words).
DICTIONARY_KINDS: tuple[str, ...] = (
    "name", "mrn", "address", "city", "zip", "email", "phone", "ssn",
)  # fmt: skip


@dataclass(frozen=True)
class DictionaryConfig:
    """`[phi.dictionary]`: the identifier dictionary the data plane masks free text with."""

    enabled: bool = True
    kinds: frozenset[str] = frozenset(DICTIONARY_KINDS)
    #: Seconds between re-reads of the classified columns (a new patient is masked by then).
    refresh_seconds: float = 300.0
    #: Folded words that never count as an identifier on their own (one per line in a file).
    stop_words: frozenset[str] = frozenset()
    stop_words_file: Path | None = None
    #: Tokens shorter than this (in characters) never count on their own.
    min_chars: int = 2


@dataclass(frozen=True)
class PhiConfig:
    """The `[phi]` table: classified columns and what masking and the detectors need."""

    # (schema, table, column) -> rule, as configured (partitions, children and views are
    # resolved against the database by phigate.masking.classification).
    columns: Mapping[tuple[str, str, str], ColumnRule] = field(
        default_factory=lambda: MappingProxyType({})
    )
    pseudonym_key_file: Path | None = None
    pseudonym_key: SecretBytes | None = None  # the file's bytes, as-is; set with the file
    mrn_pattern: str | None = None  # a regular expression; None: no MRN detector
    extra_patterns: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: 3-digit ZIP prefixes the zip3 mask shows as 000** (Safe Harbor's small areas): the
    #: package's list, or `zip3_restricted_file`. Both masking layers use this one set.
    zip3_restricted: frozenset[str] = field(default_factory=restricted_prefixes)
    zip3_restricted_file: Path | None = None
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)
    #: `[phi.subjects]`: (schema, table) -> the column naming the person each row describes.
    #: Every key holds the same person identifier (the value of the patients' key), so one
    #: person's rows are found in each of these relations by the same keyed hash.
    subjects: Mapping[tuple[str, str], str] = field(default_factory=lambda: MappingProxyType({}))

    def relations(self) -> frozenset[tuple[str, str]]:
        """The (schema, table) pairs with at least one classified column."""
        return frozenset((s, t) for s, t, _ in self.columns)

    def masked_kinds(self, clear_kinds: frozenset[str]) -> frozenset[str]:
        """The classified kinds an identity seeing ``clear_kinds`` in clear gets masked."""
        return frozenset(r.kind for r in self.columns.values()) - clear_kinds

@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...]
    require_tls: bool
    tls_cert: Path | None
    tls_key: Path | None
    workers: int
    auth_timeout: float
    decision_timeout: float
    startup_timeout: float
    max_statement_bytes: int
    max_message_bytes: int
    startup_parameters: tuple[str, ...]
    drain_timeout: float

@dataclass(frozen=True)
class AuditConfig:
    """The [audit] section (docs/audit.md): the trail's directory, keys and durability."""

    dir: Path
    origin: str
    signing_key: SecretBytes  # the C2SP signer key text (PRIVATE+KEY+...)
    signing_key_file: Path
    previous_signing_key: SecretBytes | None  # set while rotating: the key that signed before
    hmac_key: SecretBytes  # 32 raw bytes: keys every hash a record holds in place of a value
    sync: str  # "batch" | "write" | "statement"
    sync_window: float
    checkpoint_interval: float
    checkpoint_every: int
    checkpoint_copy_dir: Path | None
    checkpoint_command: tuple[str, ...]
    segment_max_bytes: int
    segment_max_age: float
    max_pending_records: int
    #: Subject-key hashes a result record keeps per relation before it counts the rest.
    disclosures_exact_max: int = 1000

@dataclass(frozen=True)
class OidcConfig:
    issuer: str
    audience: str
    jwks_file: Path | None
    jwks_url: str | None
    groups_claim: str
    algorithms: tuple[str, ...]
    leeway: float
    jwks_cache_ttl: float
    jwks_min_refresh_interval: float

@dataclass(frozen=True)
class ApiKeysConfig:
    store: Path  # absolute; the file may not exist yet (no keys created), its directory does

@dataclass(frozen=True)
class IdentityConfig:
    oidc: OidcConfig | None  # None: API keys only (then apikeys is set)
    apikeys: ApiKeysConfig | None = None  # None: passwords starting with phk_ are refused
    close_on_expiry: bool = True  # close a session at its next statement once its token expired

@dataclass(frozen=True)
class TargetConfig:
    name: str
    host: str
    port: int
    database: str
    user: str
    password: Secret | None  # None means trust authentication upstream
    password_source: str | None  # where it came from ("file /x", "env VAR"), never the value
    tls: Literal["disable", "require", "verify-full"]
    ca_file: Path | None
    server_name: str | None  # None only when tls = "disable"
    connect_timeout: float
    params: Mapping[str, str]  # sent upstream at startup; always holds search_path
    #: The one schema of the upstream sessions' search_path (params.search_path, folded):
    #: unqualified relation and function names resolve to it, after pg_catalog.
    schema: str = DEFAULT_SCHEMA

@dataclass(frozen=True, eq=False)  # compared and hashed by identity: rules cache per object
class RoleConfig:
    """One `[roles.NAME]` table. Names are folded like PostgreSQL folds identifiers."""

    name: str
    targets: frozenset[str] | None  # None: every target
    relations: frozenset[tuple[str, str]]  # exact (schema, name)
    schemas: frozenset[str]  # "schema.*" patterns
    columns: Mapping[tuple[str, str], frozenset[str]]  # absent relation: every column
    operations: frozenset[str]
    functions: frozenset[tuple[str, str]]  # (schema, name) beyond the default allow-list
    allow: frozenset[str]
    approval: Mapping[str, str]  # operation or allow class -> the `approval` entry naming it
    db_role: str | None
    see_clear: frozenset[str] = frozenset()  # PHI kinds this role sees in clear
    masking_notices: str = "first"  # one of MASKING_NOTICES
    max_rows: int | None = None  # rows one result may send at most; None: no cap

    def covers(self, schema: str, name: str) -> bool:
        return schema in self.schemas or (schema, name) in self.relations

    def applies_to(self, target: str | None) -> bool:
        return self.targets is None or (target is not None and target in self.targets)

@dataclass(frozen=True, eq=False)
class RoleSet:
    """The roles one identity holds (the union of its groups' roles), seen from one target.

    Rules check every access against the roles one by one and allow it if any role does, so
    the union never grants a pairing (operation x relation, column) no single role grants.
    """

    roles: tuple[RoleConfig, ...]  # sorted by name; only roles that apply to `target`
    target: str | None  # None: bound to no target, so only roles valid for every target count
    db_role: str | None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.roles)

    @property
    def clear_kinds(self) -> frozenset[str]:
        """PHI kinds this identity sees in clear: the union of its roles' ``see_clear``."""
        return frozenset().union(*(r.see_clear for r in self.roles))

    @property
    def masking_notices(self) -> str:
        """How often this identity is told what a result masks: "always" if a role says so,
        "off" only if every role does, else "first" (once per relation and session)."""
        modes = {r.masking_notices for r in self.roles}
        if "always" in modes:
            return "always"
        if modes == {"off"}:
            return "off"
        return "first"

    @property
    def max_rows(self) -> int | None:
        """The smallest cap among the roles that set one (None: no role caps results)."""
        caps = [r.max_rows for r in self.roles if r.max_rows is not None]
        return min(caps) if caps else None

    @property
    def identity_class(self) -> str:
        """The decision-cache key: identities with the same roles on a target share decisions."""
        return _identity_class(self.names, self.target)

def _identity_class(names: tuple[str, ...], target: str | None) -> str:
    return json.dumps([list(names), target], separators=(",", ":"), ensure_ascii=False)

def parse_identity_class(value: str) -> tuple[tuple[str, ...], str | None] | None:
    """Inverse of RoleSet.identity_class; None if ``value`` is not one."""
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    if (
        isinstance(doc, list)
        and len(doc) == 2
        and isinstance(doc[0], list)
        and all(isinstance(n, str) for n in doc[0])
        and (doc[1] is None or isinstance(doc[1], str))
    ):
        return tuple(doc[0]), doc[1]
    return None

@dataclass(frozen=True)
class Config:
    server: ServerConfig
    identity: IdentityConfig
    targets: Mapping[str, TargetConfig]
    source: str  # the file it was loaded from, or "<string>"
    # token group -> role names; role name -> role. Empty: no identity has a role (refused).
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    roles: Mapping[str, RoleConfig] = field(default_factory=lambda: MappingProxyType({}))
    phi: PhiConfig = field(default_factory=PhiConfig)
    audit: AuditConfig | None = None  # None: the gateway refuses to serve (no trail, no service)

    def roles_for(self, groups: Iterable[str], target: str | None = None) -> RoleSet | None:
        """The RoleSet of an identity with these token groups, or None if it has no role.

        With ``target`` (the dbname the client asked for) only roles that apply to it count,
        and the identity class includes it; without, only roles valid for every target count.
        Raises IdentityError (28000) when the roles disagree on ``db_role``: running as either
        upstream user would give the session more than one of its roles allows.
        """
        names = {n for g in groups for n in self.groups.get(g, ())}
        return self.roleset(names, target)

    def roleset(self, names: Iterable[str], target: str | None) -> RoleSet | None:
        """The RoleSet for these role names (unknown names are ignored), or None if empty."""
        roles = tuple(
            self.roles[n] for n in sorted(set(names)) if n in self.roles
        )
        roles = tuple(r for r in roles if r.applies_to(target))
        if not roles:
            return None
        db_roles = {r.db_role for r in roles}
        if len(db_roles) > 1:
            raise IdentityError(
                "28000",
                "your groups map to roles that run as different database users ("
                + ", ".join(f"{r.name}: {r.db_role or 'the gateway user'}" for r in roles)
                + "); ask your gateway administrator to give these roles the same db_role",
                "no_role",
            )
        return RoleSet(roles=roles, target=target, db_role=roles[0].db_role)

    def native_json(self) -> str:
        """The data-plane config (docs/native-config.md); holds resolved secrets, never log it."""
        s = self.server
        tls = None
        if s.tls_cert is not None and s.tls_key is not None:
            tls = {"cert_file": str(s.tls_cert), "key_file": str(s.tls_key)}
        doc = {
            "listen": list(s.listen),
            "workers": s.workers,
            "tls": tls,
            "require_tls": s.require_tls,
            "auth_timeout_ms": _ms(s.auth_timeout),
            "decision_timeout_ms": _ms(s.decision_timeout),
            "startup_timeout_ms": _ms(s.startup_timeout),
            "max_statement_bytes": s.max_statement_bytes,
            "max_message_bytes": s.max_message_bytes,
            "startup_parameters": list(s.startup_parameters),
            "event_backlog_wakeup": _EVENT_BACKLOG_WAKEUP,
            "targets": {name: _native_target(t) for name, t in self.targets.items()},
            "audit": native_audit(self.audit) if self.audit is not None else None,
        }
        return json.dumps(doc, ensure_ascii=False)

def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))

def native_audit(a: AuditConfig) -> dict[str, Any]:
    previous = a.previous_signing_key
    return {
        "dir": str(a.dir),
        "origin": a.origin,
        "signing_key": a.signing_key.reveal().decode(),
        "previous_signing_key": previous.reveal().decode() if previous is not None else None,
        "hmac_key": base64.b64encode(a.hmac_key.reveal()).decode(),
        "sync": a.sync,
        "sync_window_ms": _ms(a.sync_window),
        "checkpoint_interval_ms": _ms(a.checkpoint_interval),
        "checkpoint_every": a.checkpoint_every,
        "checkpoint_copy_dir": str(a.checkpoint_copy_dir) if a.checkpoint_copy_dir else None,
        "checkpoint_command": list(a.checkpoint_command),
        "segment_max_bytes": a.segment_max_bytes,
        "segment_max_age_ms": _ms(a.segment_max_age),
        "max_pending_records": a.max_pending_records,
        "disclosures_exact_max": a.disclosures_exact_max,
    }

def _native_target(t: TargetConfig) -> dict[str, Any]:
    return {
        "host": t.host,
        "port": t.port,
        "database": t.database,
        "user": t.user,
        "password": t.password.reveal() if t.password is not None else None,
        "tls": t.tls,
        "ca_file": str(t.ca_file) if t.ca_file is not None else None,
        "server_name": t.server_name,
        "connect_timeout_ms": _ms(t.connect_timeout),
        "params": dict(t.params),
    }

