"""Load and validate phigate's TOML config into frozen dataclasses and the data-plane JSON."""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NoReturn

from phigate.errors import ConfigError, IdentityError

__all__ = [
    "DEFAULT_SCHEMA",
    "DEFAULT_STARTUP_PARAMETERS",
    "ApiKeysConfig",
    "ColumnRule",
    "Config",
    "MASKS",
    "PHI_KINDS",
    "PhiConfig",
    "OidcConfig",
    "IdentityConfig",
    "OPERATIONS",
    "ALLOW_CLASSES",
    "APPROVAL_CLASSES",
    "RoleConfig",
    "RoleSet",
    "Secret",
    "SecretBytes",
    "ServerConfig",
    "TargetConfig",
    "apikeys_store_from_file",
    "load_config",
    "parse_config",
]

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
# The gateway itself decides these: forwarding them from the client would let an agent pick the
# upstream database or user, start replication, or set arbitrary GUCs (search_path, role) via
# `options=-c ...`, all of which policy relies on being pinned.
_NEVER_FORWARDED = frozenset({"user", "database", "replication", "options"})
#: The schema unqualified names resolve to when a target's `params` set no search_path.
DEFAULT_SCHEMA = "public"
# Settings a target's `params` may not set (names compared case-insensitively, as the server
# does), and why. The gateway parses every statement itself and judges it for the session it
# chose: a setting that changes how the server reads statement text, or who the session is,
# would make the server run something other than what the gateway judged.
_REFUSED_PARAMS: Mapping[str, str] = MappingProxyType({
    "client_encoding": "the gateway always sends UTF8 (another encoding makes the server read "
    "the statement bytes differently from the gateway's parser)",
    "standard_conforming_strings": "the gateway always sends on (off makes the server read a "
    "backslash in '...' as an escape, so SQL could hide in what the gateway parsed as a string)",
    "backslash_quote": "it changes which string literals the server accepts, which the gateway's "
    "parser must read the same way",
    "role": "sessions run as the target's user, or as their role's db_role ([roles.*] db_role)",
    "session_authorization": "sessions run as the target's user, or as their role's db_role "
    "([roles.*] db_role)",
    "default_transaction_read_only": "it would override the read-only default the database sets "
    "for the target's user (set it there, with ALTER ROLE ... SET)",
    "session_replication_role": "it disables triggers and rules",
})  # fmt: skip
# Of those, what clients may never send either (the gateway replaces the other two itself).
_NEVER_FROM_CLIENTS: Mapping[str, str] = MappingProxyType({
    **{k: v for k, v in _REFUSED_PARAMS.items()
       if k not in ("client_encoding", "standard_conforming_strings")},
    "search_path": "unqualified names resolve with the target's params.search_path",
})  # fmt: skip
# Schema names sent upstream unquoted (the server reads them back as the same name); any other
# name is sent in double quotes.
_PLAIN_SCHEMA = re.compile(r"[a-z_][a-z0-9_$]*")
_SEARCH_PATH_SPACE = " \t\n\r\f\v"
_ALLOWED_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
_DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
_TARGET_TLS_MODES = ("disable", "require", "verify-full")
# PostgreSQL truncates identifiers (and so database names) at 63 bytes; a target name is what
# clients send as dbname, so keep it to a safe, unambiguous alphabet.
_TARGET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")
_GUC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,62}")
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_@-][A-Za-z0-9_.@-]{0,254}")
_MAX_SECRET_BYTES = 4096
_MAX_PG_MESSAGE = 0x3FFF_FFFF  # PostgreSQL's MaxAllocSize - 1: no legal message is larger
_EVENT_BACKLOG_WAKEUP = 512
_SERVER_KEYS = frozenset({
    "listen", "require_tls", "tls_cert", "tls_key", "workers", "auth_timeout",
    "decision_timeout", "startup_timeout", "max_statement_bytes", "max_message_bytes",
    "startup_parameters", "events_log", "drain_timeout",
})  # fmt: skip
_OIDC_KEYS = frozenset({
    "issuer", "audience", "jwks_file", "jwks_url", "groups_claim", "algorithms", "leeway",
    "jwks_cache_ttl", "jwks_min_refresh_interval",
})  # fmt: skip
_IDENTITY_KEYS = frozenset({"oidc", "apikeys", "close_on_expiry"})
_APIKEYS_KEYS = frozenset({"store"})
_TARGET_KEYS = frozenset({
    "host", "port", "database", "user", "password_file", "password_env", "password_credential",
    "tls", "ca_file", "server_name", "connect_timeout", "params",
})  # fmt: skip
_MISSING: Any = object()

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
_ROLE_KEYS = frozenset({
    "targets", "relations", "columns", "operations", "functions", "allow", "approval", "db_role",
    "see_clear",
})  # fmt: skip
#: PHI kinds a classified column can have (`[phi.columns]` kind, roles' `see_clear`).
PHI_KINDS: tuple[str, ...] = (
    "ssn", "mrn", "name", "dob", "address", "phone", "email", "free_text", "other",
)  # fmt: skip
#: Masks (`partial` is written "partial:N", N = trailing characters kept).
MASKS: tuple[str, ...] = (
    "redact", "null", "partial", "year", "email_domain", "pseudonym", "free_text",
)  # fmt: skip
# Which kinds each mask makes sense for (the column's type is checked against the database by
# phigate.masking.classification). Masks missing here fit every kind.
_MASK_KINDS: Mapping[str, frozenset[str]] = MappingProxyType({
    "partial": frozenset({"ssn", "mrn", "name", "address", "phone", "email", "other"}),
    "year": frozenset({"dob", "other"}),
    "email_domain": frozenset({"email", "other"}),
    "free_text": frozenset({"free_text", "address", "other"}),
})  # fmt: skip
_PHI_KEYS = frozenset({"columns", "pseudonym_key_file", "mrn_pattern", "extra_patterns"})
_PHI_COLUMN_KEYS = frozenset({"kind", "mask"})
_PARTIAL_MAX = 64
_PSEUDONYM_KEY_MIN_BYTES = 32
_PATTERN_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_ROLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")
_NAMEDATALEN = 64
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
    events_log: str  # "-" means stdout, otherwise an absolute path
    drain_timeout: float


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
        }
        return json.dumps(doc, ensure_ascii=False)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


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


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; relative paths in it resolve against its directory."""
    p = Path(path).absolute()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("", str(p), "config file not found") from None
    except OSError as exc:
        raise ConfigError("", str(p), f"cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("", str(p), "config file is not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", str(p), f"invalid TOML: {exc}") from None
    return parse_config(data, source=str(p), base_dir=p.parent)


def parse_config(
    data: Mapping[str, Any], source: str = "<string>", *, base_dir: str | Path | None = None
) -> Config:
    """Validate an already-parsed TOML document.

    Relative paths resolve against ``base_dir``, else the directory of ``source`` when it is a
    path, else the current directory.
    """
    if base_dir is None:
        base_dir = Path(source).parent if not source.startswith("<") else Path.cwd()
    ctx = _Ctx(source, Path(base_dir).absolute())
    root = _Table(data, "", ctx, {"server", "identity", "targets", "groups", "roles", "phi"})
    server = _server(root.table("server", required=False, allowed=_SERVER_KEYS), ctx)
    identity = root.table("identity", required=True, allowed=_IDENTITY_KEYS)
    identity_config = _identity(identity)
    targets_tbl = root.table("targets", required=True, allowed=None)
    if not targets_tbl.data:
        targets_tbl.fail("", "at least one target is required, e.g. [targets.ehr]")
    targets: dict[str, TargetConfig] = {}
    for name in targets_tbl.data:
        if not _TARGET_NAME.fullmatch(name):
            targets_tbl.fail(
                name, "target names are what clients send as dbname: use 1-63 of A-Z a-z 0-9 _ . -"
            )
        targets[name] = _target(name, targets_tbl.table(name, required=True, allowed=_TARGET_KEYS))
    roles = _roles(root.table("roles", required=False, allowed=None), targets)
    groups = _groups(root.table("groups", required=False, allowed=None), roles)
    phi = _phi(root.table("phi", required=False, allowed=_PHI_KEYS))
    return Config(
        server=server,
        identity=identity_config,
        targets=MappingProxyType(targets),
        source=source,
        groups=MappingProxyType(groups),
        roles=MappingProxyType(roles),
        phi=phi,
    )


@dataclass(frozen=True)
class _Ctx:
    file: str
    base_dir: Path


class _Table:
    """One TOML table under validation; unknown keys are rejected up front (typos fail loudly)."""

    def __init__(
        self, data: Any, prefix: str, ctx: _Ctx, allowed: set[str] | frozenset[str] | None
    ) -> None:
        self.prefix = prefix
        self.ctx = ctx
        if not isinstance(data, Mapping):
            self.fail("", f"must be a table, not {_kind(data)}")
        self.data: Mapping[str, Any] = data
        if allowed is not None:
            for key in data:
                if key not in allowed:
                    near = difflib.get_close_matches(key, sorted(allowed), n=1)
                    hint = f" (did you mean {near[0]!r}?)" if near else ""
                    self.fail(key, f"unknown key{hint}")

    def key(self, key: str) -> str:
        if not key:
            return self.prefix
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(self.key(key), self.ctx.file, message)

    def table(
        self, key: str, *, required: bool, allowed: set[str] | frozenset[str] | None
    ) -> _Table:
        if key not in self.data:
            if required:
                self.fail(key, "is required")
            return _Table({}, self.key(key), self.ctx, allowed)
        return _Table(self.data[key], self.key(key), self.ctx, allowed)

    def string(self, key: str, default: Any = _MISSING) -> str:
        value = self.data.get(key, default)
        if value is _MISSING:
            self.fail(key, "is required")
        if not isinstance(value, str):
            self.fail(key, f"must be a string, not {_kind(value)}")
        if not value or "\x00" in value:
            self.fail(key, "must be a non-empty string without NUL characters")
        return value

    def opt_string(self, key: str) -> str | None:
        return self.string(key) if key in self.data else None

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {_kind(value)}")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.data.get(key, default)
        # bool is an int subclass in Python; `port = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, not {_kind(value)}")
        if not lo <= value <= hi:
            self.fail(key, f"must be between {lo} and {hi}, got {value}")
        return value

    def seconds(self, key: str, default: float, lo: float, hi: float, *, lo_open: bool) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"must be a number of seconds, not {_kind(value)}")
        bad_lo = value <= lo if lo_open else value < lo
        if bad_lo or value > hi or value != value:  # value != value catches NaN
            bound = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
            self.fail(key, f"must be {bound} and at most {hi:g} seconds, got {value}")
        return float(value)

    def string_list(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.data.get(key, list(default))
        if not isinstance(value, list):
            self.fail(key, f"must be a list of strings, not {_kind(value)}")
        for item in value:
            if not isinstance(item, str) or not item:
                self.fail(key, "must be a list of non-empty strings")
        return tuple(value)

    def path(self, key: str, *, what: str) -> Path | None:
        """A file that must exist now; relative paths resolve against the config's directory."""
        if key not in self.data:
            return None
        p = Path(self.string(key)).expanduser()
        if not p.is_absolute():
            p = self.ctx.base_dir / p
        if not p.is_file():
            self.fail(key, f"{what} {str(p)!r} does not exist or is not a regular file")
        if not os.access(p, os.R_OK):
            self.fail(key, f"{what} {str(p)!r} is not readable by this user")
        return p


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return names.get(type(value), type(value).__name__)


def _server(t: _Table, ctx: _Ctx) -> ServerConfig:
    raw_listen = t.data.get("listen", "127.0.0.1:6432")
    if isinstance(raw_listen, str):
        listen: tuple[str, ...] = (t.string("listen", "127.0.0.1:6432"),)
    else:
        listen = t.string_list("listen", ())
    if not listen:
        t.fail("listen", "needs at least one address")
    for addr in listen:
        _check_listen(t, addr)
    if len(set(listen)) != len(listen):
        t.fail("listen", "lists the same address twice")

    require_tls = t.boolean("require_tls", True)
    cert = t.path("tls_cert", what="certificate file")
    key = t.path("tls_key", what="private key file")
    if (cert is None) != (key is None):
        t.fail("tls_key" if key is None else "tls_cert", "tls_cert and tls_key go together")
    if require_tls and cert is None:
        t.fail(
            "tls_cert",
            "is required when require_tls = true (agents send tokens as passwords; "
            "`phigate cert dev` makes a development pair)",
        )

    max_stmt = t.integer("max_statement_bytes", 8 * 1024 * 1024, 1024, _MAX_PG_MESSAGE)
    max_msg = t.integer("max_message_bytes", 64 * 1024 * 1024, 8192, _MAX_PG_MESSAGE)
    if max_stmt > max_msg:
        t.fail("max_statement_bytes", f"must not exceed max_message_bytes ({max_msg})")

    params = t.string_list("startup_parameters", DEFAULT_STARTUP_PARAMETERS)
    for name in params:
        if name in _NEVER_FORWARDED or name.startswith("_pq_."):
            t.fail("startup_parameters", f"{name!r} is set by the gateway and is never forwarded")
        why = _NEVER_FROM_CLIENTS.get(name.lower())
        if why is not None:
            t.fail("startup_parameters", f"{name!r} is never forwarded from clients: {why}")
        if not _GUC_NAME.fullmatch(name):
            t.fail("startup_parameters", f"{name!r} is not a parameter name")

    events_log = t.string("events_log", "-")
    if events_log != "-":
        p = Path(events_log).expanduser()
        p = p if p.is_absolute() else ctx.base_dir / p
        if not p.parent.is_dir():
            t.fail("events_log", f"directory {str(p.parent)!r} does not exist")
        events_log = str(p)

    return ServerConfig(
        listen=listen,
        require_tls=require_tls,
        tls_cert=cert,
        tls_key=key,
        workers=t.integer("workers", min(os.cpu_count() or 1, 8), 1, 64),
        auth_timeout=t.seconds("auth_timeout", 10, 0, 600, lo_open=True),
        decision_timeout=t.seconds("decision_timeout", 5, 0, 86400, lo_open=True),
        startup_timeout=t.seconds("startup_timeout", 15, 0, 600, lo_open=True),
        max_statement_bytes=max_stmt,
        max_message_bytes=max_msg,
        startup_parameters=params,
        events_log=events_log,
        drain_timeout=t.seconds("drain_timeout", 30, 0, 86400, lo_open=False),
    )


def _check_listen(t: _Table, addr: str) -> None:
    host, sep, port = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        t.fail("listen", f"{addr!r}: write IPv6 addresses in brackets, e.g. [::1]:6432")
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and port.isdigit() and 0 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        t.fail("listen", f"{addr!r} is not 'ip:port' (e.g. 127.0.0.1:6432 or [::1]:6432)")


def _identity(t: _Table) -> IdentityConfig:
    apikeys = None
    if "apikeys" in t.data:
        apikeys = _apikeys(t.table("apikeys", required=True, allowed=_APIKEYS_KEYS))
    oidc = None
    if "oidc" in t.data or apikeys is None:
        if "oidc" not in t.data:
            t.fail("oidc", "is required (or [identity.apikeys] for a gateway taking API keys only)")
        oidc = _oidc(t.table("oidc", required=True, allowed=_OIDC_KEYS))
    return IdentityConfig(
        oidc=oidc, apikeys=apikeys, close_on_expiry=t.boolean("close_on_expiry", True)
    )


def _apikeys(t: _Table) -> ApiKeysConfig:
    p = Path(t.string("store")).expanduser()
    if not p.is_absolute():
        p = t.ctx.base_dir / p
    if not p.parent.is_dir():
        t.fail("store", f"directory {str(p.parent)!r} does not exist")
    if p.exists():
        if not p.is_file():
            t.fail("store", f"{str(p)!r} is not a regular file")
        if not os.access(p, os.R_OK):
            t.fail("store", f"{str(p)!r} is not readable by this user")
    # A missing file is fine: it is an empty store until `phigate apikey create` writes it.
    return ApiKeysConfig(store=p)


def apikeys_store_from_file(path: str | os.PathLike[str]) -> Path | None:
    """The ``[identity.apikeys] store`` of a config file, validating only that section.

    `phigate apikey` uses this instead of load_config(): an administrator managing keys may not
    be able to read the upstream password files or systemd credentials the full config names.
    """
    p = Path(path).absolute()
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError("", str(p), "config file not found") from None
    except OSError as exc:
        raise ConfigError("", str(p), f"cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", str(p), "config file is not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", str(p), f"invalid TOML: {exc}") from None
    ctx = _Ctx(str(p), p.parent)
    identity = _Table(data.get("identity", {}), "identity", ctx, None)
    if "apikeys" not in identity.data:
        return None
    return _apikeys(identity.table("apikeys", required=True, allowed=_APIKEYS_KEYS)).store


def _oidc(t: _Table) -> OidcConfig:
    jwks_file = t.path("jwks_file", what="JWKS file")
    jwks_url = t.opt_string("jwks_url")
    if (jwks_file is None) == (jwks_url is None):
        t.fail("jwks_file", "set exactly one of jwks_file or jwks_url")
    if jwks_file is not None:
        _check_jwks_file(t, jwks_file)
    if jwks_url is not None:
        _check_jwks_url(t, jwks_url)

    algorithms = t.string_list("algorithms", _DEFAULT_ALGORITHMS)
    if not algorithms:
        t.fail("algorithms", "needs at least one algorithm")
    for alg in algorithms:
        if alg.lower() == "none":
            t.fail("algorithms", "'none' is never allowed: it accepts unsigned tokens")
        if alg.upper().startswith("HS"):
            t.fail(
                "algorithms",
                f"{alg!r} is never allowed: HMAC keyed with a published key lets anyone forge "
                "tokens",
            )
        if alg not in _ALLOWED_ALGORITHMS:
            t.fail("algorithms", f"unknown algorithm {alg!r}; use {', '.join(_ALLOWED_ALGORITHMS)}")

    ttl = t.seconds("jwks_cache_ttl", 3600, 0, 7 * 86400, lo_open=True)
    return OidcConfig(
        issuer=t.string("issuer"),
        audience=t.string("audience"),
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        groups_claim=t.string("groups_claim", "groups"),
        algorithms=algorithms,
        leeway=t.seconds("leeway", 30, 0, 300, lo_open=False),
        jwks_cache_ttl=ttl,
        jwks_min_refresh_interval=t.seconds(
            "jwks_min_refresh_interval", 30, 0, 3600, lo_open=False
        ),
    )


def _check_jwks_file(t: _Table, path: Path) -> None:
    # A broken JWKS file would reject every agent; catch it at check-config time instead.
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        t.fail("jwks_file", f"{str(path)!r} is not valid JSON")
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
        t.fail("jwks_file", f'{str(path)!r} is not a JWKS (needs a non-empty "keys" list)')


def _check_jwks_url(t: _Table, url: str) -> None:
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host = host[1:].split("]", 1)[0] if host.startswith("[") else host.split(":", 1)[0]
    if scheme == "https" and host:
        return
    if scheme == "http" and host and _is_loopback(host):
        return  # a development IdP on this machine
    t.fail("jwks_url", "must be an https:// URL (http:// only for a loopback host)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _target(name: str, t: _Table) -> TargetConfig:
    host = t.string("host")
    if host.startswith("/") or any(c.isspace() for c in host):
        t.fail("host", "must be a hostname or IP address (Unix sockets are not supported)")
    tls = t.string("tls", "verify-full")
    if tls not in _TARGET_TLS_MODES:
        t.fail("tls", f"must be one of {', '.join(map(repr, _TARGET_TLS_MODES))}, got {tls!r}")
    if tls == "disable" and not _is_loopback(host):
        t.fail(
            "tls",
            "'disable' is only allowed for loopback hosts (127.0.0.0/8, ::1, localhost); "
            "use 'verify-full' with ca_file",
        )
    ca_file = t.path("ca_file", what="CA file")
    if tls == "verify-full" and ca_file is None:
        t.fail("ca_file", "is required when tls = 'verify-full'")
    if tls != "verify-full" and ca_file is not None:
        t.fail("ca_file", "is only used with tls = 'verify-full'; remove it or change tls")
    server_name = t.opt_string("server_name")
    if tls == "disable" and server_name is not None:
        t.fail("server_name", "is meaningless with tls = 'disable'")
    if tls != "disable" and server_name is None:
        server_name = host
    password, source = _password(t)
    params, schema = _params(t)
    return TargetConfig(
        name=name,
        host=host,
        port=t.integer("port", 5432, 1, 65535),
        database=t.string("database"),
        user=t.string("user"),
        password=password,
        password_source=source,
        tls=tls,  # type: ignore[arg-type]  # checked against _TARGET_TLS_MODES above
        ca_file=ca_file,
        server_name=server_name,
        connect_timeout=t.seconds("connect_timeout", 5, 0, 600, lo_open=True),
        params=MappingProxyType(params),
        schema=schema,
    )


def _params(t: _Table) -> tuple[dict[str, str], str]:
    """The settings sent upstream at startup, and the one schema of their search_path."""
    raw = t.data.get("params", {})
    if not isinstance(raw, Mapping):
        t.fail("params", f"must be a table of strings, not {_kind(raw)}")
    params: dict[str, str] = {}
    seen: dict[str, str] = {}
    schema = DEFAULT_SCHEMA
    for key, value in raw.items():
        if not _GUC_NAME.fullmatch(key) or key in _NEVER_FORWARDED:
            t.fail(f"params.{key}", "is not a settable parameter name")
        if not isinstance(value, str) or "\x00" in value:
            t.fail(f"params.{key}", f"must be a string, not {_kind(value)}")
        name = key.lower()  # the server matches setting names case-insensitively
        if name in seen:
            t.fail(f"params.{key}", f"sets the same parameter as params.{seen[name]}")
        seen[name] = key
        why = _REFUSED_PARAMS.get(name)
        if why is not None:
            t.fail(f"params.{key}", f"cannot be set here: {why}")
        if name == "search_path":
            schema = _search_path(t, f"params.{key}", value)
        else:
            params[key] = value
    # Policy resolves unqualified names with exactly this schema, so it is always sent, spelled
    # so that the server reads back the very name the gateway resolves with.
    params["search_path"] = schema if _PLAIN_SCHEMA.fullmatch(schema) else _quote_ident(schema)
    return params, schema


def _search_path(t: _Table, key: str, value: str) -> str:
    """The one schema a target's params.search_path names, folded like the server folds it."""
    try:
        names = _split_search_path(value)
    except ValueError as exc:
        t.fail(key, f"{value!r} {exc}")
    if not names:
        t.fail(key, f'must name the schema unqualified names resolve to, e.g. "{DEFAULT_SCHEMA}"')
    if len(names) > 1:
        t.fail(
            key,
            f"{value!r} names {len(names)} schemas; pin exactly one. With several, which "
            "schema an unqualified name means depends on which tables exist when the statement "
            "runs, which the gateway cannot know when it judges the statement. Pin the schema "
            "most statements use and write names in the others schema-qualified "
            f"({names[1][0]}.<table>)",
        )
    ((schema, quoted),) = names
    if schema == "$user":
        t.fail(key, "cannot be $user: name the schema itself (the same for every session)")
    if schema.startswith("pg_"):
        t.fail(
            key,
            f"cannot be {schema}: pg_* schemas are the server's own (pg_catalog is always "
            "searched first; pg_temp is each session's temporary schema); name the schema "
            "your tables are in",
        )
    plain = (schema[0].isalpha() or schema[0] == "_") and all(
        c.isalnum() or c in "_$" for c in schema
    )
    if not quoted and not plain:
        t.fail(
            key,
            f"{value!r} is not a plain schema name; write it in double quotes "
            f'(search_path = \'"{schema}"\') if the schema is really named so',
        )
    return schema


def _split_search_path(text: str) -> list[tuple[str, bool]]:
    """The names in a search_path value as the server splits them (SplitIdentifierString):
    separated by commas, unquoted ones lower-cased, "double-quoted" ones kept with "" as ",
    all truncated to 63 bytes; each with whether it was quoted. ValueError says what is wrong."""
    out: list[tuple[str, bool]] = []
    i, n = 0, len(text)
    while i < n and text[i] in _SEARCH_PATH_SPACE:
        i += 1
    if i == n:
        return out
    while True:
        if text[i] == '"':
            j, buf = i + 1, []
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise ValueError("has an unterminated quoted name")
                buf.append(text[j:k])
                if k + 1 < n and text[k + 1] == '"':
                    buf.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            name = "".join(buf)
            if not name:
                raise ValueError('has an empty quoted name ("")')
            out.append((_truncate_identifier(name), True))
        else:
            j = i
            while j < n and text[j] != "," and text[j] not in _SEARCH_PATH_SPACE:
                j += 1
            if j == i:
                raise ValueError("has an empty name between commas")
            out.append((_truncate_identifier(text[i:j].translate(_ASCII_LOWER)), False))
            i = j
        while i < n and text[i] in _SEARCH_PATH_SPACE:
            i += 1
        if i == n:
            return out
        if text[i] != ",":
            raise ValueError(f"has {text[i]!r} where a comma or the end was expected")
        i += 1
        while i < n and text[i] in _SEARCH_PATH_SPACE:
            i += 1
        if i == n:
            raise ValueError("ends with a comma")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _password(t: _Table) -> tuple[Secret | None, str | None]:
    """Resolve the upstream password now, so a missing secret fails at load, not at first use."""
    given = [k for k in ("password_file", "password_env", "password_credential") if k in t.data]
    if len(given) > 1:
        t.fail(given[1], "set only one of password_file, password_env, password_credential")
    if not given:
        return None, None
    key = given[0]
    if key == "password_env":
        var = t.string(key)
        value = os.environ.get(var)
        if value is None:
            t.fail(key, f"environment variable {var} is not set")
        return _secret(t, key, value, f"environment variable {var}"), f"env {var}"
    if key == "password_credential":
        name = t.string(key)
        if not _CREDENTIAL_NAME.fullmatch(name) or name in (".", ".."):
            t.fail(key, "must be a systemd credential name, not a path")
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not cred_dir:
            t.fail(key, "$CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)")
        path = Path(cred_dir) / name
        if not path.is_file():
            t.fail(key, f"credential {name!r} not found in $CREDENTIALS_DIRECTORY")
        where = f"credential {name}"
        return _secret(t, key, _read_secret(t, key, path), where), where
    file_path = t.path(key, what="password file")
    if file_path is None:  # unreachable: the key is present, so path() returned or raised
        t.fail(key, "is required")
    where = f"file {file_path}"
    return _secret(t, key, _read_secret(t, key, file_path), where), where


def _read_secret(t: _Table, key: str, path: Path) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_SECRET_BYTES + 1)
    except OSError as exc:
        t.fail(key, f"cannot read {str(path)!r}: {exc.strerror}")
    if len(raw) > _MAX_SECRET_BYTES:
        t.fail(key, f"{str(path)!r} is larger than {_MAX_SECRET_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        t.fail(key, f"{str(path)!r} is not UTF-8")
    # Editors and `echo` add one trailing newline; passwords never end in one.
    return text.removesuffix("\n").removesuffix("\r")


def _secret(t: _Table, key: str, value: str, where: str) -> Secret:
    if not value:
        t.fail(key, f"{where} is empty")
    if "\x00" in value:
        t.fail(key, f"{where} contains a NUL character")
    return Secret(value)


# --- roles ----------------------------------------------------------------------------------


def fold_name(text: str, *, allow_star: bool = False) -> tuple[str, ...]:
    """Split a dotted SQL name and fold it like PostgreSQL: unquoted parts lower-cased (ASCII
    only, as the server does), quoted parts kept with "" unescaped, all truncated to 63 bytes.

    ``public.Patients`` -> ("public", "patients"); ``public."Patients"`` -> ("public",
    "Patients"). With ``allow_star`` a last part ``*`` is kept as "*". Raises ValueError.
    """
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == '"':
            j, buf = i + 1, []
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise ValueError("unterminated quoted identifier")
                buf.append(text[j:k])
                if k + 1 < n and text[k + 1] == '"':
                    buf.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            part = "".join(buf)
            if not part:
                raise ValueError("zero-length quoted identifier")
        else:
            j = i
            while j < n and text[j] not in '."' and not text[j].isspace():
                j += 1
            raw = text[i:j]
            i = j
            if raw == "*" and allow_star:
                part = "*"
            elif not raw or not (raw[0].isalpha() or raw[0] == "_") or not all(
                c.isalnum() or c in "_$" for c in raw
            ):
                raise ValueError(f"{raw or 'an empty name'!r} is not an identifier")
            else:
                part = raw.translate(_ASCII_LOWER)
        parts.append(_truncate_identifier(part))
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            break
        if text[i] != "." or parts[-1] == "*":
            raise ValueError(f"unexpected {text[i]!r}")
        i += 1
    return tuple(parts)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _truncate_identifier(name: str) -> str:
    raw = name.encode("utf-8")
    if len(raw) < _NAMEDATALEN:
        return name
    return raw[: _NAMEDATALEN - 1].decode("utf-8", errors="ignore")


def _qualified(t: _Table, key: str, text: str, *, allow_star: bool) -> tuple[str, str]:
    try:
        parts = fold_name(text, allow_star=allow_star)
    except ValueError as exc:
        t.fail(key, f"{text!r}: {exc}")
    if len(parts) != 2:
        example = "public.patients" + (' or "public.*"' if allow_star else "")
        t.fail(key, f"{text!r} must be schema-qualified, e.g. {example}")
    return parts[0], parts[1]


def _roles(t: _Table, targets: Mapping[str, TargetConfig]) -> dict[str, RoleConfig]:
    roles: dict[str, RoleConfig] = {}
    for name in t.data:
        if not _ROLE_NAME.fullmatch(name):
            t.fail(name, "role names use 1-63 of A-Z a-z 0-9 _ . - (they appear in messages)")
        roles[name] = _role(name, t.table(name, required=True, allowed=_ROLE_KEYS), targets)
    return roles


def _names(
    t: _Table, key: str, allowed: tuple[str, ...], default: tuple[str, ...]
) -> frozenset[str]:
    values = t.string_list(key, default)
    for v in values:
        if v not in allowed:
            near = difflib.get_close_matches(v, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            t.fail(key, f"unknown {key} entry {v!r}{hint}; use {', '.join(allowed)}")
    return frozenset(values)


def _role(name: str, t: _Table, targets: Mapping[str, TargetConfig]) -> RoleConfig:
    role_targets: frozenset[str] | None = None
    if "targets" in t.data:
        listed = t.string_list("targets", ())
        for target in listed:
            if target not in targets:
                t.fail("targets", f"{target!r} is not a configured target ([targets.{target}])")
        role_targets = frozenset(listed)

    relations: set[tuple[str, str]] = set()
    schemas: set[str] = set()
    for text in t.string_list("relations", ()):
        schema, rel = _qualified(t, "relations", text, allow_star=True)
        if schema == RESERVED_SCHEMA:
            t.fail("relations", f"{text!r}: {_RESERVED_WHY}")
        if (schema, rel) in NEVER_RELATIONS:
            t.fail("relations", f"{text!r} is never allowed through the gateway")
        if rel == "*":
            if schema == "pg_catalog":
                t.fail("relations", '"pg_catalog.*" is not allowed; use allow = ["catalog"]')
            schemas.add(schema)
        else:
            relations.add((schema, rel))

    columns: dict[tuple[str, str], frozenset[str]] = {}
    raw_columns = t.data.get("columns", {})
    if not isinstance(raw_columns, Mapping):
        t.fail("columns", f"must be a table of relation = [columns], not {_kind(raw_columns)}")
    for rel_text, cols in raw_columns.items():
        key = f"columns.{rel_text}"
        schema, rel = _qualified(t, key, rel_text, allow_star=False)
        if not (schema in schemas or (schema, rel) in relations):
            t.fail(key, f"{rel_text!r} is not one of this role's relations")
        if not isinstance(cols, list) or not cols:
            t.fail(key, "must be a non-empty list of column names")
        folded: set[str] = set()
        for col in cols:
            if not isinstance(col, str) or not col:
                t.fail(key, "must be a list of non-empty column names")
            try:
                parts = fold_name(col)
            except ValueError as exc:
                t.fail(key, f"{col!r}: {exc}")
            if len(parts) != 1:
                t.fail(key, f"{col!r} is a column name, write it without a relation")
            folded.add(parts[0])
        if (schema, rel) in columns:
            t.fail(key, "lists the same relation twice (after folding names)")
        columns[(schema, rel)] = frozenset(folded)

    operations = _names(t, "operations", OPERATIONS, ("select",))
    allow = _names(t, "allow", ALLOW_CLASSES, ())

    functions: set[tuple[str, str]] = set()
    for text in t.string_list("functions", ()):
        schema, fn = _qualified(t, "functions", text, allow_star=False)
        if schema == RESERVED_SCHEMA:
            t.fail("functions", f"{text!r}: {_RESERVED_WHY}")
        from phigate.policy.functions import never_reason  # late: policy imports this module

        reason = never_reason(fn)
        if reason is not None:
            t.fail("functions", f"{text!r} is never allowed: {reason}")
        functions.add((schema, fn))

    approval: dict[str, str] = {}
    for cls in sorted(_names(t, "approval", APPROVAL_CLASSES, ())):
        expanded = _APPROVAL_GROUPS.get(cls, frozenset({cls}))
        granted = expanded & (operations | allow)
        if not granted:
            t.fail(
                "approval",
                f"{cls!r} needs approval but the role does not grant it; add it to "
                + ("allow" if cls in ALLOW_CLASSES else "operations"),
            )
        for g in granted:
            approval.setdefault(g, cls)

    db_role = t.opt_string("db_role")
    if db_role is not None and len(db_role.encode("utf-8")) >= _NAMEDATALEN:
        t.fail("db_role", "must be at most 63 bytes (a PostgreSQL role name)")
    see_clear = _names(t, "see_clear", PHI_KINDS, ())

    return RoleConfig(
        name=name,
        targets=role_targets,
        relations=frozenset(relations),
        schemas=frozenset(schemas),
        columns=MappingProxyType(columns),
        operations=operations,
        functions=frozenset(functions),
        allow=allow,
        approval=MappingProxyType(approval),
        db_role=db_role,
        see_clear=see_clear,
    )


def _groups(t: _Table, roles: Mapping[str, RoleConfig]) -> dict[str, tuple[str, ...]]:
    groups: dict[str, tuple[str, ...]] = {}
    for group in t.data:
        if not group or "\x00" in group:
            t.fail(group, "group names must be non-empty")
        names = t.string_list(group, ())
        for role in names:
            if role not in roles:
                near = difflib.get_close_matches(role, sorted(roles), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                t.fail(group, f"role {role!r} is not defined as [roles.{role}]{hint}")
        db_roles = {roles[r].db_role for r in names}
        if len(db_roles) > 1:
            t.fail(group, "maps to roles with different db_role values; a session runs as one")
        groups[group] = tuple(dict.fromkeys(names))
    return groups


# --- PHI classification ---------------------------------------------------------------------


def _toml_key(text: str) -> str:
    """A TOML key as it would be written in the file: bare if it can be, else quoted."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _phi(t: _Table) -> PhiConfig:
    cols_tbl = t.table("columns", required=False, allowed=None)
    columns: dict[tuple[str, str, str], ColumnRule] = {}
    for text, value in cols_tbl.data.items():
        key = _toml_key(text)
        try:
            parts = fold_name(text)
        except ValueError as exc:
            cols_tbl.fail(key, f"{text!r}: {exc}")
        if len(parts) != 3:
            cols_tbl.fail(
                key, f"{text!r} must name schema.table.column, e.g. \"public.patients.ssn\""
            )
        schema, table, column = parts
        if schema == "pg_catalog" or schema.startswith("pg_"):
            cols_tbl.fail(key, "system schemas cannot be classified")
        entry = _Table(value, cols_tbl.key(key), t.ctx, _PHI_COLUMN_KEYS)
        kind = entry.string("kind")
        if kind not in PHI_KINDS:
            near = difflib.get_close_matches(kind, PHI_KINDS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            entry.fail("kind", f"unknown kind {kind!r}{hint}; use {', '.join(PHI_KINDS)}")
        mask, keep = _mask(entry, entry.string("mask", "redact"))
        fits = _MASK_KINDS.get(mask)
        if fits is not None and kind not in fits:
            entry.fail(
                "mask",
                f"{mask!r} does not fit kind {kind!r} (it fits {', '.join(sorted(fits))})",
            )
        if (schema, table, column) in columns:
            other = columns[(schema, table, column)].config_key
            cols_tbl.fail(key, f"names the same column as {other} (after folding names)")
        columns[(schema, table, column)] = ColumnRule(
            schema=schema,
            table=table,
            column=column,
            kind=kind,
            mask=mask,
            keep=keep,
            config_key=cols_tbl.key(key),
        )

    key_file = t.path("pseudonym_key_file", what="pseudonym key file")
    pseudonym_key = None
    if key_file is not None:
        pseudonym_key = _pseudonym_key(t, key_file)
    elif any(r.mask == "pseudonym" for r in columns.values()):
        first = next(r for r in columns.values() if r.mask == "pseudonym")
        t.fail(
            "pseudonym_key_file",
            f"is required: {first.config_key} uses mask 'pseudonym' (make one with "
            "`head -c 32 /dev/urandom > pseudonym.key; chmod 600 pseudonym.key`)",
        )

    mrn_pattern = t.opt_string("mrn_pattern")
    if mrn_pattern is not None:
        _check_pattern(t, "mrn_pattern", mrn_pattern)
    extra_tbl = t.table("extra_patterns", required=False, allowed=None)
    extra: dict[str, str] = {}
    for name in extra_tbl.data:
        if not _PATTERN_NAME.fullmatch(name):
            extra_tbl.fail(
                _toml_key(name), "pattern names use a-z 0-9 _ and start with a letter (they tag "
                "what was found)",
            )  # fmt: skip
        pattern = extra_tbl.string(name)
        _check_pattern(extra_tbl, name, pattern)
        extra[name] = pattern
    return PhiConfig(
        columns=MappingProxyType(columns),
        pseudonym_key_file=key_file,
        pseudonym_key=pseudonym_key,
        mrn_pattern=mrn_pattern,
        extra_patterns=MappingProxyType(extra),
    )


def _mask(t: _Table, text: str) -> tuple[str, int | None]:
    name, sep, arg = text.partition(":")
    if name == "partial":
        if not sep or not arg.isascii() or not arg.isdigit():
            t.fail("mask", f"write partial as 'partial:N' (N = characters kept), got {text!r}")
        keep = int(arg)
        if not 1 <= keep <= _PARTIAL_MAX:
            t.fail("mask", f"partial keeps 1 to {_PARTIAL_MAX} characters, got {keep}")
        return name, keep
    if name not in MASKS or sep:
        near = difflib.get_close_matches(name, MASKS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        shown = ", ".join("partial:N" if m == "partial" else m for m in MASKS)
        t.fail("mask", f"unknown mask {text!r}{hint}; use {shown}")
    return name, None


def _pseudonym_key(t: _Table, path: Path) -> SecretBytes:
    key = "pseudonym_key_file"
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(_MAX_SECRET_BYTES + 1)
    except OSError as exc:
        t.fail(key, f"cannot read {str(path)!r}: {exc.strerror}")
    if mode & 0o077:
        t.fail(
            key,
            f"{str(path)!r} is readable or writable by group or others (mode "
            f"{mode & 0o777:04o}); run chmod 600 on it",
        )
    if len(raw) > _MAX_SECRET_BYTES:
        t.fail(key, f"{str(path)!r} is larger than {_MAX_SECRET_BYTES} bytes")
    if len(raw) < _PSEUDONYM_KEY_MIN_BYTES:
        t.fail(
            key,
            f"{str(path)!r} holds {len(raw)} bytes; a pseudonym key needs at least "
            f"{_PSEUDONYM_KEY_MIN_BYTES} random bytes",
        )
    if len(set(raw)) < 8:
        t.fail(key, f"{str(path)!r} does not look random (too few distinct bytes)")
    return SecretBytes(raw)


def _check_pattern(t: _Table, key: str, pattern: str) -> None:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        t.fail(key, f"is not a valid regular expression: {exc}")
    if compiled.fullmatch("") is not None:
        t.fail(key, "matches the empty string; it would tag every value")
