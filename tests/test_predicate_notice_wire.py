"""The 01M02 notice through the gateway (psycopg and asyncpg): a masked identity that compares a
masked column with a clear value gets its (masked) result and a NOTICE saying that the column is
masked and how, naming the column and the mask but never the value; a comparison with a masked
value, a parameter, or a role that sees the kind in clear gets none.

The control plane puts the notice in the decision's ``notices``; the data plane sends it as a
NoticeResponse before the result."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import GatewayFactory, RunningGateway, asyncpg_connect, psycopg_connect
from phigate.dev.demo import DEMO_PHI_COLUMNS, DEMO_PHI_KINDS

pytestmark = pytest.mark.integration

CODE = "01M02"
ROLES = {
    "groups": {"agents": ["agent"], "readers": ["reader"]},
    "roles": {
        "agent": {"relations": ["public.*"]},
        "reader": {"relations": ["public.*"], "see_clear": list(DEMO_PHI_KINDS)},
    },
}
# A value no real patient has, in the shapes an agent would try.
CLEAR_NAME = "Zzyzxharris"
LAST_NAME = "SELECT id FROM patients WHERE last_name = 'Zzyzxharris'"
SSN_PREFIX = "SELECT id FROM patients WHERE ssn LIKE '123%'"
BIRTH_DATE = "SELECT id FROM patients WHERE date_of_birth = '1980-03-04'"


@pytest.fixture
def gw(gateway_factory: GatewayFactory, tmp_path: Path) -> Iterator[RunningGateway]:
    key_file = tmp_path / "pseudonym.key"
    key_file.write_bytes(secrets.token_bytes(32))
    key_file.chmod(0o600)
    yield gateway_factory(
        phi={"columns": DEMO_PHI_COLUMNS, "pseudonym_key_file": str(key_file)}, **ROLES
    )


def _told(
    conn: psycopg.Connection[Any], sql: str, params: Any = None
) -> tuple[list[Any], list[tuple[str, str]]]:
    """The rows of ``sql`` and the 01M02 notices that came with them, as (message, hint)."""
    notices: list[tuple[str, str]] = []

    def handler(diag: Any) -> None:
        # The diagnostic is only readable during the call.
        if diag.sqlstate == CODE:
            notices.append((diag.message_primary or "", diag.message_hint or ""))

    conn.add_notice_handler(handler)
    try:
        rows = conn.execute(sql, params).fetchall()
    finally:
        conn.remove_notice_handler(handler)
    return rows, notices


def test_a_clear_value_compared_with_a_masked_column_is_told(
    gw: RunningGateway, token: Any
) -> None:
    with psycopg_connect(gw, token(groups=("agents",))) as conn:
        for sql, column, mask in (
            (LAST_NAME, "public.patients.last_name", "pseudonym"),
            (SSN_PREFIX, "public.patients.ssn", "partial:4"),
            (BIRTH_DATE, "public.patients.date_of_birth", "year"),
        ):
            rows, notices = _told(conn, sql)
            assert rows == [], sql  # the statement ran on the masked values
            assert len(notices) == 1, sql
            message, hint = notices[0]
            assert message.startswith(f"phigate: {column} is masked ({mask}) for this session")
            assert "SHOW phigate.masking" in hint
            assert CLEAR_NAME not in message and "123" not in message and "1980" not in message
        # Not a per-session notice: the same statement is told again.
        assert len(_told(conn, LAST_NAME)[1]) == 1


def test_masked_values_parameters_and_clear_roles_are_not_told(
    gw: RunningGateway, token: Any
) -> None:
    with psycopg_connect(gw, token(groups=("agents",))) as conn:
        pid, pseudonym = conn.execute(
            "SELECT id, last_name FROM patients ORDER BY id LIMIT 1"
        ).fetchone()
        assert pseudonym.startswith("psn_")
        # The same text up to the constant: one is told, the other not, in either order (the
        # decision cache must not reuse one for the other).
        sql = f"SELECT id FROM patients WHERE last_name = '{pseudonym}'"  # noqa: S608
        for expected in (0, 1, 0):
            rows, notices = _told(conn, LAST_NAME if expected else sql)
            assert len(notices) == expected
            ids = [r[0] for r in rows]
            assert ids == [] if expected else pid in ids
        # Parameter values arrive after the decision: not checked.
        rows, notices = _told(conn, "SELECT id FROM patients WHERE last_name = %s", (CLEAR_NAME,))
        assert rows == [] and notices == []
    with psycopg_connect(gw, token(groups=("readers",))) as conn:
        assert _told(conn, LAST_NAME)[1] == []


def test_asyncpg_gets_the_notice(gw: RunningGateway, token: Any) -> None:
    async def main() -> list[Any]:
        conn = await asyncpg_connect(gw, token(groups=("agents",)))
        told: list[Any] = []
        conn.add_log_listener(lambda _conn, msg: told.append(msg) if msg.sqlstate == CODE else None)
        try:
            assert await conn.fetch(LAST_NAME) == []
            await asyncio.sleep(0.1)  # listeners are called from the event loop
        finally:
            await conn.close(timeout=5)
        return told

    told = asyncio.run(main())
    assert len(told) == 1
    assert told[0].message.startswith("phigate: public.patients.last_name is masked (pseudonym)")
    assert CLEAR_NAME not in told[0].message
