"""phigate's pseudonym functions in a target database: their SQL, the formula they must match,
and the check the gateway runs on them each time it loads a target's catalog.

The masking rewrite computes pseudonyms in SQL by calling ``phigate.pseudonym(text)`` and
``phigate.pseudonym_int(text, integer)``. They are SECURITY DEFINER functions reading the key's
HMAC pads from ``phigate.pseudonym_key``, a table only the role that installed them can read,
so no key material is ever part of statement text: the server's log (``log_statement``,
``log_min_error_statement``), ``pg_stat_activity``, ``pg_stat_statements``, ``auto_explain``
and EXPLAIN only ever show the function names. `phigate db install` (dbinstall.py) creates
them; ``check`` proves with one probe value that they exist, that the gateway's database roles
may call them, and that they hold the gateway's key -- the same key layer 2 (the Rust data
plane, native/src/masking/values.rs) uses, so both layers give the same pseudonym for a value.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from phigate.config import RESERVED_SCHEMA, Config

__all__ = [
    "FUNCTIONS_SQL",
    "INT_FUNCTION",
    "MAX_INT_DIGITS",
    "PROBE",
    "SCHEMA",
    "TEXT_FUNCTION",
    "FunctionsState",
    "check",
    "grantees",
    "int_pseudonym",
    "pads",
    "pseudonym",
]

log = logging.getLogger(__name__)

SCHEMA = RESERVED_SCHEMA
KEY_TABLE = "phigate.pseudonym_key"
TEXT_FUNCTION = "phigate.pseudonym(text)"
INT_FUNCTION = "phigate.pseudonym_int(text, integer)"
#: Integer pseudonyms keep at most 15 hex digits (60 bits): every value fits a bigint.
MAX_INT_DIGITS = 15
#: What the gateway and the installer hash to compare with their own HMAC. Not PHI.
PROBE = "phigate pseudonym probe"
INSTALL_HINT = (
    "run `phigate db install --config FILE --target {target}` as a database administrator"
)


# --- the formula (also layer 2's: MaskContext::pseudonym) --------------------------------------


def pseudonym(key: bytes, value: str) -> str:
    """``psn_`` and the first 16 hex digits of HMAC-SHA256(key, value as UTF-8)."""
    return "psn_" + hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def int_pseudonym(key: bytes, text: str, hex_digits: int) -> int:
    """The first ``hex_digits`` hex digits of HMAC-SHA256(key, text) as an unsigned integer:
    what the rewrite gives integer columns (text = the value's text output)."""
    if not 1 <= hex_digits <= MAX_INT_DIGITS:
        raise ValueError(f"hex_digits must be 1..{MAX_INT_DIGITS}")
    return int(hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:hex_digits], 16)


def pads(key: bytes) -> tuple[bytes, bytes]:
    """HMAC-SHA256's inner and outer pads of ``key`` (RFC 2104): K0 xor 0x36.., K0 xor 0x5c..,
    K0 the key zero-padded to SHA-256's 64-byte block (its SHA-256 when longer)."""
    if not key:
        raise ValueError("the pseudonym key is empty")
    k0 = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
    return bytes(b ^ 0x36 for b in k0), bytes(b ^ 0x5C for b in k0)


# --- the objects `phigate db install` creates ------------------------------------------------

# sha256(opad || sha256(ipad || value)) is HMAC-SHA256 with built-ins only (pgcrypto may not be
# installed). Every name and operator is qualified and search_path is pinned, so nothing a
# caller creates can stand in for what these functions use (they run as their owner).
#
# STRICT: NULL stays NULL, as in layer 2, without reading the key.
# STABLE, not IMMUTABLE: the result depends on the key table, which `phigate db install`
#   rotates; IMMUTABLE would let the planner fold calls on constants into cached plans and
#   allow them in index expressions, which would keep old pseudonyms after a rotation. STABLE
#   is all the masking subqueries need: not volatile, so quals still push down into them.
# PARALLEL SAFE: it only reads a table, so masked scans keep their parallel plans.
# SECURITY DEFINER: the caller cannot read phigate.pseudonym_key; the owner can.
# pseudonym_int: the first $2 hex digits as an unsigned number; lpad to 16 digits keeps the
#   value and makes a bit(64) whose top bit is 0 for $2 <= 15 (a non-negative bigint).
FUNCTIONS_SQL: tuple[str, ...] = (
    """CREATE OR REPLACE FUNCTION phigate.pseudonym(text) RETURNS text
    LANGUAGE sql STABLE STRICT PARALLEL SAFE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $body$
    SELECT 'psn_' OPERATOR(pg_catalog.||) pg_catalog.left(pg_catalog.encode(
             pg_catalog.sha256(k.opad OPERATOR(pg_catalog.||) pg_catalog.sha256(
               k.ipad OPERATOR(pg_catalog.||) pg_catalog.convert_to($1, 'UTF8'))),
             'hex'), 16)
      FROM phigate.pseudonym_key k
$body$""",
    """CREATE OR REPLACE FUNCTION phigate.pseudonym_int(text, integer) RETURNS bigint
    LANGUAGE sql STABLE STRICT PARALLEL SAFE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $body$
    SELECT CASE WHEN $2 OPERATOR(pg_catalog.>=) 1 AND $2 OPERATOR(pg_catalog.<=) 15 THEN
           CAST(CAST('x' OPERATOR(pg_catalog.||) pg_catalog.lpad(pg_catalog.left(
             pg_catalog.encode(pg_catalog.sha256(k.opad OPERATOR(pg_catalog.||)
               pg_catalog.sha256(k.ipad OPERATOR(pg_catalog.||)
                 pg_catalog.convert_to($1, 'UTF8'))), 'hex'),
             $2), 16, '0') AS pg_catalog.bit(64)) AS pg_catalog.int8) END
      FROM phigate.pseudonym_key k
$body$""",
)


def grantees(config: Config, target: str) -> list[str]:
    """The database roles that run masked statements on ``target``: the service user and every
    ``db_role`` of a role that applies to it. They may call the functions; none may read the
    key."""
    t = config.targets[target]
    roles = {r.db_role for r in config.roles.values() if r.db_role and r.applies_to(target)}
    return [t.user, *sorted(roles - {t.user})]


# --- the check ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionsState:
    """What the gateway found in a target: ``ready`` when the rewrite may call the functions.

    ``summary`` is one line for the log and `phigate catalog show` (never key material);
    ``warnings`` are problems that do not stop the functions from working."""

    ready: bool
    summary: str
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"ready": self.ready, "summary": self.summary, "warnings": list(self.warnings)}


_OBJECTS_SQL = """
SELECT (SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = 'phigate'),
       (SELECT c.oid FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'phigate' AND c.relname = 'pseudonym_key' AND c.relkind = 'r'),
       (SELECT p.oid FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'phigate' AND p.proname = 'pseudonym'
           AND p.proargtypes = '25'::pg_catalog.oidvector),
       (SELECT p.oid FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'phigate' AND p.proname = 'pseudonym_int'
           AND p.proargtypes = '25 23'::pg_catalog.oidvector)
"""
_ROLE_SQL = """
SELECT r.rolsuper,
       pg_catalog.has_schema_privilege(r.oid, %(schema)s::pg_catalog.oid, 'USAGE'),
       pg_catalog.has_function_privilege(r.oid, %(text_fn)s::pg_catalog.oid, 'EXECUTE'),
       pg_catalog.has_function_privilege(r.oid, %(int_fn)s::pg_catalog.oid, 'EXECUTE'),
       pg_catalog.has_table_privilege(r.oid, %(table)s::pg_catalog.oid, 'SELECT')
  FROM pg_catalog.pg_roles r WHERE r.rolname = %(role)s
"""


def check(conn: Any, key: bytes, roles: Sequence[str], target: str) -> FunctionsState:
    """Check the functions through ``conn`` (the gateway's own connection, in a transaction:
    the check runs in a savepoint, so a failure leaves that transaction usable)."""
    import psycopg

    hint = INSTALL_HINT.format(target=target)
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(_OBJECTS_SQL)
            schema, table, text_fn, int_fn = cur.fetchone()
            if schema is None or table is None or text_fn is None or int_fn is None:
                return FunctionsState(
                    False, f"phigate's pseudonym functions are not installed; {hint}"
                )
            warnings: list[str] = []
            for role in roles:
                cur.execute(_ROLE_SQL, {"schema": schema, "text_fn": text_fn, "int_fn": int_fn,
                                        "table": table, "role": role})  # fmt: skip
                row = cur.fetchone()
                if row is None:
                    warnings.append(f"role {role} does not exist")
                    continue
                superuser, usage, text_ok, int_ok, reads_key = row
                if not (usage and text_ok and int_ok):
                    return FunctionsState(
                        False, f"role {role} may not call phigate's pseudonym functions; {hint}"
                    )
                if reads_key:
                    why = "a superuser" if superuser else "granted it or a member of its owner"
                    warnings.append(
                        f"role {role} can read {KEY_TABLE} ({why}): whoever logs in as it can "
                        "read the pseudonym key"
                    )
            # The probe travels as a parameter and is not PHI; the answers are compared here.
            cur.execute(
                "SELECT phigate.pseudonym(%s), phigate.pseudonym_int(%s, %s)",
                (PROBE, PROBE, MAX_INT_DIGITS),
            )
            got_text, got_int = cur.fetchone()
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return FunctionsState(False, f"phigate's pseudonym functions failed: {first}; {hint}")
    if got_text is None:
        return FunctionsState(False, f"{KEY_TABLE} holds no key; {hint}")
    if got_text != pseudonym(key, PROBE) or got_int != int_pseudonym(key, PROBE, MAX_INT_DIGITS):
        return FunctionsState(
            False,
            f"phigate's pseudonym functions hold a different key than [phi] pseudonym_key_file "
            f"(rotated on one side only?); {hint}",
        )
    return FunctionsState(True, "installed, key matches", tuple(warnings))
