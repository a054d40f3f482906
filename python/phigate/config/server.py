"""The [server] section: listeners, TLS, limits, timeouts, forwarded startup parameters."""

from __future__ import annotations

import ipaddress
import os

from phigate.config.model import DEFAULT_STARTUP_PARAMETERS, ServerConfig
from phigate.config.parameters import _GUC_NAME, _NEVER_FORWARDED, _NEVER_FROM_CLIENTS
from phigate.config.table import _Ctx, _Table

_MAX_PG_MESSAGE = 0x3FFF_FFFF  # PostgreSQL's MaxAllocSize - 1: no legal message is larger


_SERVER_KEYS = frozenset({
    "listen", "require_tls", "tls_cert", "tls_key", "workers", "auth_timeout",
    "decision_timeout", "startup_timeout", "max_statement_bytes", "max_message_bytes",
    "startup_parameters", "events_log", "drain_timeout",
})  # fmt: skip

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

    if "events_log" in t.data:
        # Still accepted as a key so that the message can say what replaced it.
        t.fail("events_log", "was replaced by the [audit] section, a signed, tamper-evident "
               "audit trail: remove events_log and add [audit] (see docs/audit.md)")  # fmt: skip

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
        drain_timeout=t.seconds("drain_timeout", 30, 0, 86400, lo_open=False),
    )

def _check_listen(t: _Table, addr: str) -> None:
    parse_listen(t, "listen", addr, 6432)


def parse_listen(t: _Table, key: str, addr: str, example_port: int) -> tuple[str, int]:
    """An 'ip:port' listen address (IPv6 in brackets) as (host, port); a ConfigError names
    ``key`` otherwise."""
    host, sep, port = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        t.fail(key, f"{addr!r}: write IPv6 addresses in brackets, e.g. [::1]:{example_port}")
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and port.isdigit() and 0 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        t.fail(key, f"{addr!r} is not 'ip:port' (e.g. 127.0.0.1:{example_port} or "
               f"[::1]:{example_port})")
    return host, int(port)

