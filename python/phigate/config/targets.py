"""The [targets.*] sections: upstream databases, their credentials, TLS and pinned parameters."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from phigate.config.model import DEFAULT_SCHEMA, RESERVED_SCHEMA, Secret, TargetConfig
from phigate.config.parameters import _GUC_NAME, _NEVER_FORWARDED, _REFUSED_PARAMS
from phigate.config.roles import _ASCII_LOWER, _truncate_identifier, read_quoted
from phigate.config.table import _kind, _Table

# Schema names sent upstream unquoted (the server reads them back as the same name); any other
# name is sent in double quotes.
_PLAIN_SCHEMA = re.compile(r"[a-z_][a-z0-9_$]*")

_SEARCH_PATH_SPACE = " \t\n\r\f\v"

_TARGET_TLS_MODES = ("disable", "require", "verify-full")

# PostgreSQL truncates identifiers (and so database names) at 63 bytes; a target name is what
# clients send as dbname, so keep it to a safe, unambiguous alphabet.
_TARGET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")


_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_@-][A-Za-z0-9_.@-]{0,254}")

_MAX_SECRET_BYTES = 4096

_TARGET_KEYS = frozenset({
    "host", "port", "database", "user", "password_file", "password_env", "password_credential",
    "tls", "ca_file", "server_name", "connect_timeout", "params",
})  # fmt: skip

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
    if schema == RESERVED_SCHEMA:
        t.fail(
            key,
            f"cannot be {schema}: that schema holds phigate's own pseudonym key and functions, "
            "which no session may use by name; name the schema your tables are in",
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
            quoted = read_quoted(text, i)
            if quoted is None:
                raise ValueError("has an unterminated quoted name")
            name, i = quoted
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

