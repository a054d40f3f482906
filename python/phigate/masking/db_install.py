"""`phigate db install`: create phigate's schema, key table and pseudonym functions in a target
database and load the pseudonym key into it, so the masking rewrite never carries key material.

Run once per target by a database administrator (never as the gateway's service role, which
must not be able to read the key), and again after changing the key file: that rotates the key.
Everything happens in one transaction; it is idempotent. What it creates (pseudonym_db.py has
the function definitions):

- schema ``phigate``, owned by the installing role, ``USAGE`` for the roles below only;
- table ``phigate.pseudonym_key`` (one row: the key's HMAC pads), no privileges for anyone but
  its owner;
- ``phigate.pseudonym(text)`` and ``phigate.pseudonym_int(text, integer)``, SECURITY DEFINER,
  ``EXECUTE`` for the target's service user and every ``db_role`` of a role that applies to the
  target (pseudonym_db.grantees), revoked from PUBLIC and from anyone granted it before.

The key reaches the server only as COPY data (``COPY ... FROM STDIN`` in binary format): COPY
data is not statement text, so no log, statistics view or activity view shows it, and a binary
COPY error does not quote the value either.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from phigate.config import Config, TargetConfig
from phigate.errors import PhigateError
from phigate.masking.classification import connect_args
from phigate.masking.pseudonym_db import (
    FUNCTIONS_SQL,
    INT_FUNCTION,
    KEY_TABLE,
    MAX_INT_DIGITS,
    PROBE,
    TEXT_FUNCTION,
    grantees,
    int_pseudonym,
    pads,
    pseudonym,
)

__all__ = ["InstallError", "InstallReport", "admin_connect", "install", "install_target"]


class InstallError(PhigateError):
    """The install could not be done; nothing was changed (the transaction is rolled back)."""


@dataclass
class InstallReport:
    target: str
    installer: str  # the role that owns the objects (and can read the key)
    grantees: list[str]  # may call the functions
    key: str  # "loaded" (first install), "unchanged" or "rotated"
    warnings: list[str] = field(default_factory=list)


_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS phigate.pseudonym_key (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),  -- one row
    ipad bytea NOT NULL,
    opad bytea NOT NULL
)
"""
_TABLE_SHAPE = [("id", "boolean"), ("ipad", "bytea"), ("opad", "bytea")]
# Owners of what is already there: someone else's schema or function would either fail the
# install half-way or, worse, stay in control of what the gateway calls.
_OWNERS_SQL = """
SELECT 'schema phigate', pg_catalog.pg_get_userbyid(n.nspowner)
  FROM pg_catalog.pg_namespace n WHERE n.nspname = 'phigate'
UNION ALL
SELECT 'table phigate.' || c.relname, pg_catalog.pg_get_userbyid(c.relowner)
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'phigate'
UNION ALL
SELECT 'function ' || p.oid::pg_catalog.regprocedure, pg_catalog.pg_get_userbyid(p.proowner)
  FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'phigate'
"""
# Every role holding a privilege on phigate's objects other than their owner (PUBLIC is not a
# role: it is revoked by name).
_GRANTED_SQL = """
SELECT r.rolname::text FROM pg_catalog.pg_roles r WHERE r.oid IN (
    SELECT a.grantee FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
     WHERE n.nspname = 'phigate' AND a.grantee <> n.nspowner
    UNION
    SELECT a.grantee FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
     WHERE p.pronamespace = 'phigate'::pg_catalog.regnamespace AND a.grantee <> p.proowner
    UNION
    SELECT a.grantee FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
     WHERE c.relnamespace = 'phigate'::pg_catalog.regnamespace AND a.grantee <> c.relowner)
"""

def install_target(conn: Any, config: Config, target: str) -> InstallReport:
    """``install`` with what ``config`` says about ``target``: its key, service user and roles."""
    key = config.phi.pseudonym_key
    if key is None:
        raise InstallError(
            f"{config.source}: [phi] has no pseudonym_key_file, so there is no key to install"
        )
    return install(conn, key.reveal(), grantees(config, target), target)


def install(conn: Any, key: bytes, roles: Sequence[str], target: str = "") -> InstallReport:
    """Install (or update) phigate's objects through ``conn`` -- an administrator's psycopg
    connection to the target database -- and load ``key``; ``roles`` may call the functions
    (the service user first). Commits on success, rolls back and raises InstallError on any
    problem."""
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            report = _install(cur, key, list(roles), target)
        conn.commit()
        return report
    except psycopg.Error as exc:
        conn.rollback()
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InstallError(
            f"target {target}: the install failed, nothing changed: {first}"
        ) from None
    except BaseException:
        conn.rollback()
        raise


def _install(cur: Any, key: bytes, roles: list[str], target: str) -> InstallReport:
    cur.execute("SELECT current_user::text")
    installer = cur.fetchone()[0]
    if installer in roles:
        raise InstallError(
            f"target {target}: connected as {installer}, a role that runs masked statements; "
            "the key must belong to a role they are not and cannot become: connect as a "
            "database administrator (--admin-user)"
        )
    report = InstallReport(target, installer, roles, "loaded")
    _check_roles(cur, installer, roles, report)
    cur.execute(_OWNERS_SQL)
    for what, owner in cur.fetchall():
        if owner != installer:
            raise InstallError(
                f"target {target}: {what} belongs to {owner}; run the install as {owner}, or "
                f"drop schema phigate (DROP SCHEMA phigate CASCADE) and install again"
            )
    cur.execute(
        "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod) "
        "FROM pg_catalog.pg_attribute a WHERE a.attrelid = pg_catalog.to_regclass(%s) "
        "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (KEY_TABLE,),
    )
    shape = [tuple(r) for r in cur.fetchall()]
    if shape and shape != _TABLE_SHAPE:
        raise InstallError(
            f"target {target}: {KEY_TABLE} exists with other columns than phigate creates; "
            "drop it (DROP TABLE phigate.pseudonym_key) and install again"
        )
    cur.execute("CREATE SCHEMA IF NOT EXISTS phigate")
    cur.execute(_TABLE_SQL)
    for statement in FUNCTIONS_SQL:
        cur.execute(statement)
    _privileges(cur, roles)

    expected = (pseudonym(key, PROBE), int_pseudonym(key, PROBE, MAX_INT_DIGITS))
    probe = "SELECT phigate.pseudonym(%s), phigate.pseudonym_int(%s, %s)"
    cur.execute(probe, (PROBE, PROBE, MAX_INT_DIGITS))
    before = tuple(cur.fetchone())
    if before == expected:
        report.key = "unchanged"
    elif before[0] is not None:
        report.key = "rotated"
    # TRUNCATE, not DELETE: the old key's file is removed at commit instead of lingering as
    # dead rows. Rows are loaded as COPY data, never as statement text or bind parameters.
    cur.execute("TRUNCATE phigate.pseudonym_key")
    ipad, opad = pads(key)
    with cur.copy("COPY phigate.pseudonym_key (ipad, opad) FROM STDIN (FORMAT binary)") as copy:
        copy.set_types(["bytea", "bytea"])
        copy.write_row((ipad, opad))
    cur.execute(probe, (PROBE, PROBE, MAX_INT_DIGITS))
    if tuple(cur.fetchone()) != expected:
        raise InstallError(
            f"target {target}: the installed functions do not compute phigate's pseudonyms "
            "(nothing changed); please report this"
        )
    return report


def _check_roles(cur: Any, installer: str, roles: list[str], report: InstallReport) -> None:
    cur.execute(
        "SELECT r.rolname::text, r.rolsuper, pg_catalog.pg_has_role(r.oid, %s, 'MEMBER') "
        "FROM pg_catalog.pg_roles r WHERE r.rolname = ANY(%s)",
        (installer, roles),
    )
    found = {name: (superuser, member) for name, superuser, member in cur.fetchall()}
    missing = [r for r in roles if r not in found]
    if missing:
        raise InstallError(
            f"target {report.target}: role {', '.join(missing)} does not exist in the database; "
            "create it or correct the target's user / the roles' db_role"
        )
    for role in roles:
        superuser, member = found[role]
        if superuser or member:
            why = "is a superuser" if superuser else f"is a member of {installer}"
            report.warnings.append(
                f"role {role} {why}, so it can read {KEY_TABLE}: whoever logs in as it can "
                "read the pseudonym key"
            )


def _privileges(cur: Any, roles: list[str]) -> None:
    objects = (
        sql.SQL("SCHEMA phigate"),
        sql.SQL(f"TABLE {KEY_TABLE}"),
        sql.SQL(f"FUNCTION {TEXT_FUNCTION}, {INT_FUNCTION}"),
    )
    # Start from nothing: PUBLIC (CREATE FUNCTION grants it EXECUTE) and whoever held a
    # privilege before (a role since removed from the config, a hand-made grant) lose it;
    # then grant exactly what the gateway's roles need.
    cur.execute(_GRANTED_SQL)
    holders = sql.SQL(", ").join(
        [sql.SQL("PUBLIC"), *(sql.Identifier(name) for (name,) in cur.fetchall())]
    )
    for obj in objects:
        cur.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(obj, holders))
    who = sql.SQL(", ").join(sql.Identifier(r) for r in roles)
    cur.execute(sql.SQL("GRANT USAGE ON {} TO {}").format(objects[0], who))
    cur.execute(sql.SQL("GRANT EXECUTE ON {} TO {}").format(objects[2], who))


def admin_connect(
    target: TargetConfig,
    user: str,
    password: str | None,
    *,
    host: str | None = None,
    port: int | None = None,
) -> Any:
    """An administrator's connection to ``target``'s database: host, port, database and TLS
    from the target (``host``/``port`` override them, e.g. a Unix socket directory), the
    user and password given here. Prompts for a password on a terminal if the server asks."""
    args = connect_args(target)
    args.pop("password", None)
    args.update(user=user, application_name="phigate-db-install")
    if host is not None:
        args["host"] = host
        args.pop("hostaddr", None)
    if port is not None:
        args["port"] = port
    if password is not None:
        args["password"] = password
    try:
        return psycopg.connect(**args)
    except psycopg.OperationalError as exc:
        if password is None and "no password supplied" in str(exc) and sys.stdin.isatty():
            args["password"] = getpass.getpass(f"password for {user} on {target.name}: ")
            try:
                return psycopg.connect(**args)
            except psycopg.OperationalError as again:
                exc = again
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InstallError(
            f"cannot connect to target {target.name} ({args['host']}:{args['port']}, database "
            f"{target.database}) as {user}: {first}"
        ) from None


def admin_password(password_file: Path | None) -> str | None:
    """The administrator's password: the file's first line, else $PGPASSWORD, else None (libpq
    then tries ~/.pgpass, and admin_connect prompts on a terminal)."""
    if password_file is not None:
        text = password_file.read_text(encoding="utf-8")
        return text.splitlines()[0] if text else ""
    return os.environ.get("PGPASSWORD")
