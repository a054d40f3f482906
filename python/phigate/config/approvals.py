"""The [approvals] section (state store, limits, timeouts) and the [approvers.*] rules: who may
approve which role's held statements, and how many must agree."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from phigate.config.durations import parse_duration
from phigate.config.model import APPROVAL_CLASSES, Secret, TargetConfig
from phigate.config.table import _Ctx, _Table
from phigate.config.targets import _is_loopback

__all__ = [
    "APPROVER_RULE_NAMES",
    "ApprovalsConfig",
    "ApproverRule",
    "parse_duration",
]

_APPROVALS_KEYS = frozenset({
    "store", "public_url", "max_pending_per_identity", "keep_decided", "timeout",
    "grant_valid_for", "instance", "admin_socket", "api", "webhooks",
})  # fmt: skip
_APPROVER_KEYS = frozenset({"groups", "roles", "rules", "targets", "quorum", "require"})

#: What an approver rule's `rules` may name: the risk rules a decision's `approval.rule`
#: carries (operations, classes and their shorthands, and the rule kinds), or "*".
APPROVER_RULE_NAMES: tuple[str, ...] = (
    *APPROVAL_CLASSES, "bulk_read", "row_estimate", "relation", "pattern", "max_rows",
)  # fmt: skip

_INSTANCE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_APPROVER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class ApprovalsConfig:
    """`[approvals]`: where requests and grants are kept and the limits that apply to them."""

    #: "sqlite" (store_path set) or "postgresql" (store_url set).
    store_kind: Literal["sqlite", "postgresql"]
    store_path: Path | None
    store_url: Secret | None  # may hold a password: never logged; see store_where
    store_where: str  # the store as messages may name it (no credentials)
    public_url: str | None
    max_pending_per_identity: int
    keep_decided: float  # seconds: clear statement text and values of requests decided before
    timeout: float  # seconds a held statement waits when its role sets no approval_timeout
    grant_valid_for: float  # seconds an approval stays usable when the approver sets no window
    instance: str | None  # this gateway's name in the store (None: the audit origin or host)
    admin_socket: Any = None  # phigate.config.approvals_admin dataclasses, or None
    api: Any = None
    webhooks: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ApproverRule:
    """One `[approvers.NAME]` table: members of ``groups`` may approve requests of ``roles``
    held by ``rules`` on ``targets`` ("*" = any); ``quorum`` distinct approvers must approve,
    and with ``require = "all"`` at least one from each group."""

    name: str
    groups: frozenset[str]
    roles: frozenset[str]  # role names, or {"*"}
    rules: frozenset[str]  # APPROVER_RULE_NAMES entries, or {"*"}
    targets: frozenset[str]  # target names, or {"*"}
    quorum: int
    require: Literal["any", "all"]

    @property
    def config_key(self) -> str:
        return f"approvers.{self.name}"


def _approvals(
    t: _Table, ctx: _Ctx, targets: Mapping[str, TargetConfig]
) -> ApprovalsConfig:
    from phigate.config import approvals_admin  # another module's section; parsed there

    kind, path, url, where = _store(t, ctx, targets)
    public_url = t.opt_string("public_url")
    if public_url is not None:
        parts = urlsplit(public_url)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            t.fail("public_url", f"{public_url!r} must be an http(s) URL approvers can open, "
                   'e.g. "https://gw.example.org:8443"')  # fmt: skip
    instance = t.opt_string("instance")
    if instance is not None and not _INSTANCE.fullmatch(instance):
        t.fail("instance", "use 1-128 of A-Z a-z 0-9 _ . : @ -")
    admin_socket = api = None
    webhooks: tuple[Any, ...] = ()
    if "admin_socket" in t.data:
        admin_socket = approvals_admin.parse_admin_socket(
            _Table(t.data["admin_socket"], t.key("admin_socket"), ctx, None), ctx.file
        )
    if "api" in t.data:
        api = approvals_admin.parse_api(_Table(t.data["api"], t.key("api"), ctx, None), ctx.file)
    if "webhooks" in t.data:
        webhooks = tuple(approvals_admin.parse_webhooks(t.data["webhooks"], ctx.file))
    return ApprovalsConfig(
        store_kind=kind,
        store_path=path,
        store_url=url,
        store_where=where,
        public_url=public_url.rstrip("/") if public_url is not None else None,
        max_pending_per_identity=t.integer("max_pending_per_identity", 5, 1, 10_000),
        keep_decided=parse_duration(t, "keep_decided", "7d", 60, 3660 * 86400),
        timeout=parse_duration(t, "timeout", "15m", 1, 7 * 86400),
        grant_valid_for=parse_duration(t, "grant_valid_for", "1h", 1, 30 * 86400),
        instance=instance,
        admin_socket=admin_socket,
        api=api,
        webhooks=webhooks,
    )


def _store(
    t: _Table, ctx: _Ctx, targets: Mapping[str, TargetConfig]
) -> tuple[Literal["sqlite", "postgresql"], Path | None, Secret | None, str]:
    text = t.string("store")
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql", None, Secret(text), _postgres_store(t, text, targets)
    if "://" in text:
        t.fail("store", "must be a file path (SQLite, one gateway) or a postgresql:// URL (a "
               "state database shared by several gateways)")  # fmt: skip
    if re.search(r"(^|\s)(host|dbname|user|port)\s*=", text):
        # A libpq key=value string would otherwise become a SQLite file of that name (with
        # any password in the name), and gateways meant to share a store would not.
        t.fail("store", "looks like a key=value connection string; write the state database as "
               "a postgresql:// URL, e.g. postgresql://phigate@db.example.org/phigate_state")
    p = Path(text).expanduser()
    p = p if p.is_absolute() else ctx.base_dir / p
    if not p.parent.is_dir():
        t.fail("store", f"directory {str(p.parent)!r} does not exist (create it, owned by the "
               "service user)")  # fmt: skip
    if p.exists() and not p.is_file():
        t.fail("store", f"{str(p)!r} exists and is not a file")
    return "sqlite", p, None, str(p)


def _postgres_store(t: _Table, url: str, targets: Mapping[str, TargetConfig]) -> str:
    """Validate a state database URL; the answer names it without credentials."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - psycopg raises ProgrammingError; the text may hold secrets
        t.fail("store", "is not a valid postgresql:// URL")
    dbname = str(params.get("dbname") or "")
    if not dbname:
        t.fail("store", "must name the state database, e.g. postgresql://phigate@db/phigate_state")
    host = str(params.get("host") or "localhost")
    port_text = str(params.get("port") or "5432")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        t.fail("store", "has an invalid port")
    port = int(port_text)
    for name, target in targets.items():
        same_host = host == target.host or (_is_loopback(host) and _is_loopback(target.host))
        if same_host and port == target.port and dbname == target.database:
            t.fail("store", f"is the database of target {name!r}: agents could read or change "
                   "approvals through the gateway; use a database no target names")  # fmt: skip
    return f"postgresql://{host}:{port}/{dbname}"


def _approvers(
    t: _Table, roles: Mapping[str, Any], targets: Mapping[str, TargetConfig]
) -> tuple[ApproverRule, ...]:
    rules: list[ApproverRule] = []
    for name in t.data:
        if not _APPROVER_NAME.fullmatch(name):
            t.fail(name, "approver rule names use 1-63 of A-Z a-z 0-9 _ . -")
        rules.append(_approver(name, t.table(name, required=True, allowed=_APPROVER_KEYS),
                               roles, targets))  # fmt: skip
    return tuple(rules)


def _approver(
    name: str, t: _Table, roles: Mapping[str, Any], targets: Mapping[str, TargetConfig]
) -> ApproverRule:
    groups = t.string_list("groups", ())
    if not groups:
        t.fail("groups", 'is required: the approver groups (token groups) this rule admits, '
               'e.g. ["dba-oncall"]')  # fmt: skip
    role_names = _listed(t, "roles", sorted(roles), "[roles.{}]")
    rule_names = _listed(t, "rules", APPROVER_RULE_NAMES, None)
    target_names = _listed(t, "targets", sorted(targets), "[targets.{}]")
    quorum = t.integer("quorum", 1, 1, 100)
    require = t.string("require", "any")
    if require not in ("any", "all"):
        t.fail("require", f'must be "any" or "all", not {require!r}')
    if require == "all" and quorum < len(set(groups)):
        # One approval from each group needs at least as many distinct approvers.
        quorum = len(set(groups))
    return ApproverRule(
        name=name,
        groups=frozenset(groups),
        roles=role_names,
        rules=rule_names,
        targets=target_names,
        quorum=quorum,
        require="all" if require == "all" else "any",
    )


def _listed(t: _Table, key: str, known: Any, where: str | None) -> frozenset[str]:
    values = t.string_list(key, ("*",))
    if not values:
        t.fail(key, 'must not be empty; use ["*"] for all')
    for v in values:
        if v == "*" or v in known:
            continue
        near = difflib.get_close_matches(v, list(known), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        what = f"is not defined as {where.format(v)}" if where else "is not a risk rule"
        t.fail(key, f"{v!r} {what}{hint}")
    return frozenset(values)
