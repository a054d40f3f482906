"""The approvers' interfaces in the config: [approvals.admin_socket], [approvals.api] and
[[approvals.webhooks]]."""

from __future__ import annotations

import grp
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from phigate.audit.keys import AuditKeyError, resolve_credential
from phigate.config.model import SecretBytes
from phigate.config.server import parse_listen
from phigate.config.table import _Ctx, _Table
from phigate.config.targets import _is_loopback

__all__ = [
    "AdminSocketConfig",
    "ApiConfig",
    "WebhookConfig",
    "WEBHOOK_FORMATS",
    "parse_admin_socket",
    "parse_api",
    "parse_webhooks",
]

_SOCKET_KEYS = frozenset({"path", "mode", "group", "local_approvers"})
_API_KEYS = frozenset({"listen", "cert", "key"})
_WEBHOOK_KEYS = frozenset(
    {"url", "format", "secret", "retries", "backoff", "timeout", "include_values"}
)
WEBHOOK_FORMATS = ("json", "slack")
_MAX_SECRET_BYTES = 4096
_MIN_SECRET_BYTES = 16  # a guessable secret makes the signature worthless


@dataclass(frozen=True)
class AdminSocketConfig:
    """The local admin socket: who may connect is the file's mode and group; who may vote is
    the peer's unix user mapped to approver groups (a bearer token is accepted as well)."""

    path: Path  # absolute
    mode: int  # e.g. 0o660; never grants "others"
    group: str | None  # the socket file's group (None: the service user's primary group)
    local_approvers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ApiConfig:
    """The HTTPS admin API listener (bearer tokens only ever travel over TLS)."""

    host: str
    port: int  # 0: any free port (tests)
    cert: Path
    key: Path


@dataclass(frozen=True)
class WebhookConfig:
    """One notification endpoint for new approval requests."""

    url: str
    format: str  # "json" (signed) or "slack" (incoming-webhook message)
    secret: SecretBytes | None  # HMAC key; required for json, optional for slack
    retries: int  # attempts after the first
    backoff: float  # seconds before the first retry; doubles each time (capped at 5 minutes)
    timeout: float  # seconds per attempt
    include_values: bool  # send the statement with its values (otherwise only its shape)

    @property
    def where(self) -> str:
        """The endpoint as logs may name it: scheme and host only (Slack URLs hold a secret)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _table(t: _Table | Mapping[str, Any], source: str | os.PathLike[str], prefix: str,
           allowed: frozenset[str]) -> _Table:  # fmt: skip
    """Accept either an already-wrapped table (its prefix and file are kept) or the raw TOML
    value with the config file it came from."""
    if isinstance(t, _Table):
        return _Table(t.data, t.prefix, t.ctx, allowed)
    path = Path(source)
    return _Table(t, prefix, _Ctx(str(path), path.parent), allowed)


def parse_admin_socket(
    t: _Table | Mapping[str, Any], source: str | os.PathLike[str]
) -> AdminSocketConfig:
    """[approvals.admin_socket] of the config file ``source``."""
    table = _table(t, source, "approvals.admin_socket", _SOCKET_KEYS)
    path = Path(table.string("path", "/run/phigate/admin.sock")).expanduser()
    if not path.is_absolute():
        path = table.ctx.base_dir / path
    if not path.parent.is_dir():
        table.fail("path", f"directory {str(path.parent)!r} does not exist (create it, owned by "
                   "the service user, e.g. systemd RuntimeDirectory=phigate)")  # fmt: skip
    if path.exists() and not path.is_socket():
        table.fail("path", f"{str(path)!r} exists and is not a socket; choose another path")
    raw_mode = table.string("mode", "0660")
    try:
        mode = int(raw_mode, 8)
    except ValueError:
        table.fail("mode", f"{raw_mode!r} is not an octal file mode like \"0660\"")
    if not 0o600 <= mode <= 0o777 or mode & 0o600 != 0o600:
        table.fail("mode", f"{raw_mode!r}: the owner (the gateway) needs read and write, e.g. 0660")
    if mode & 0o007:
        table.fail("mode", f"{raw_mode!r} lets every local user connect; grant a group instead "
                   "(e.g. mode = \"0660\", group = \"phigate\")")  # fmt: skip
    group = table.opt_string("group")
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            table.fail("group", f"no unix group {group!r} on this host")
    approvers = table.table("local_approvers", required=False, allowed=None)
    local: dict[str, tuple[str, ...]] = {}
    for user in approvers.data:
        groups = approvers.string_list(user, ())
        if not groups:
            approvers.fail(user, "needs at least one approver group, e.g. [\"dba-oncall\"]")
        local[user] = groups
    return AdminSocketConfig(path=path, mode=mode, group=group, local_approvers=local)


def parse_api(t: _Table | Mapping[str, Any], source: str | os.PathLike[str]) -> ApiConfig:
    """[approvals.api] of the config file ``source``: HTTPS only."""
    table = _table(t, source, "approvals.api", _API_KEYS)
    listen = table.string("listen", "127.0.0.1:8443")
    host, port = parse_listen(table, "listen", listen, 8443)
    hint = "the admin API is HTTPS only; `phigate cert dev` makes a development pair"
    if "cert" not in table.data:
        table.fail("cert", f"is required: {hint}")
    if "key" not in table.data:
        table.fail("key", f"is required: {hint}")
    cert = table.path("cert", what="certificate file")
    key = table.path("key", what="private key file")
    assert cert is not None and key is not None
    return ApiConfig(host=host, port=port, cert=cert, key=key)


def parse_webhooks(
    t: _Table | Mapping[str, Any] | list[Any], source: str | os.PathLike[str]
) -> tuple[WebhookConfig, ...]:
    """[[approvals.webhooks]] (a list of tables) of the config file ``source``."""
    items: Any
    if isinstance(t, _Table):
        ctx, prefix, items = t.ctx, t.prefix, t.data
    else:
        path = Path(source)
        ctx, prefix, items = _Ctx(str(path), path.parent), "approvals.webhooks", t
    if not isinstance(items, list):
        _Table({}, prefix, ctx, None).fail("", "must be a list of tables: [[approvals.webhooks]]")
    return tuple(_webhook(_Table(item, f"{prefix}[{i}]", ctx, _WEBHOOK_KEYS))
                 for i, item in enumerate(items))  # fmt: skip


def _webhook(t: _Table) -> WebhookConfig:
    url = t.string("url")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        t.fail("url", "must be an https:// URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        # Request details (and with include_values, statement values) must not cross a network
        # in clear text.
        t.fail("url", "must be https:// (plain http is only accepted for a loopback receiver)")
    fmt = t.string("format", "json")
    if fmt not in WEBHOOK_FORMATS:
        t.fail("format", f"must be one of {', '.join(WEBHOOK_FORMATS)}, got {fmt!r}")
    secret = _secret(t) if "secret" in t.data else None
    if secret is None and fmt == "json":
        t.fail("secret", "is required for format = \"json\" (receivers check the signature); "
               "give a file path or credential:NAME")  # fmt: skip
    return WebhookConfig(
        url=url,
        format=fmt,
        secret=secret,
        retries=t.integer("retries", 5, 0, 20),
        backoff=t.seconds("backoff", 1.0, 0, 300, lo_open=True),
        timeout=t.seconds("timeout", 10.0, 0, 120, lo_open=True),
        include_values=t.boolean("include_values", False),
    )


def _secret(t: _Table) -> SecretBytes:
    """The webhook's HMAC key from a file (mode 0600) or a systemd credential."""
    try:
        path = resolve_credential(t.string("secret"), t.ctx.base_dir)
    except AuditKeyError as exc:
        t.fail("secret", str(exc))
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(_MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        t.fail("secret", f"{str(path)!r} does not exist (e.g. `head -c 32 /dev/urandom | "
               f"base64 > {path}; chmod 600 {path}`)")  # fmt: skip
    except OSError as exc:
        t.fail("secret", f"cannot read {str(path)!r}: {exc.strerror}")
    if mode & 0o077:
        t.fail("secret", f"{str(path)!r} is readable or writable by group or others (mode "
               f"{mode & 0o777:04o}); run chmod 600 on it")  # fmt: skip
    value = raw.strip()
    if len(raw) > _MAX_SECRET_BYTES or len(value) < _MIN_SECRET_BYTES:
        t.fail("secret", f"{str(path)!r} must hold {_MIN_SECRET_BYTES} to {_MAX_SECRET_BYTES} "
               "bytes (a random string)")  # fmt: skip
    return SecretBytes(value)
