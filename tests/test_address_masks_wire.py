"""The demo's address, city and ZIP masks through the gateway: agents see ZIPs as their 3-digit
prefix (000 for Safe Harbor's small areas) and street and city redacted, in plain reads (the
data plane masks), rewritten reads (the database masks), binary results and COPY; the state
stays; clinicians see everything in clear."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from harness import GatewayFactory, psycopg_connect
from layer2ref import zip3
from phigate.dev.demo import demo_masking, merge_config
from phigate.masking.zip3 import restricted_prefixes

pytestmark = pytest.mark.integration

RESTRICTED_ZIP = "03601-1234"  # prefix 036: fewer than 20,000 people (2000 Census)


@pytest.fixture(scope="module")
def clear(pg: Any) -> Iterator[dict[int, tuple[str, str, str, str]]]:
    """id -> (address, city, state, zip) read directly (never printed); one patient gets a ZIP
    in a restricted area for the module's duration."""
    with psycopg.connect(pg.service_dsn(), autocommit=True) as conn:
        pid, old = conn.execute("SELECT id, zip FROM patients ORDER BY id LIMIT 1").fetchone()
        conn.execute("UPDATE patients SET zip = %s WHERE id = %s", (RESTRICTED_ZIP, pid))
        try:
            rows = conn.execute("SELECT id, address, city, state, zip FROM patients").fetchall()
            yield {r[0]: tuple(r[1:]) for r in rows}
        finally:
            conn.execute("UPDATE patients SET zip = %s WHERE id = %s", (old, pid))


@pytest.fixture(scope="module")
def demo_gateway(
    pg: Any, dev_issuer: Any, dev_cert: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("zipmasks")
    key = tmp / "pseudonym.key"
    key.write_bytes(secrets.token_bytes(32))
    os.chmod(key, 0o600)
    demo = demo_masking(key)
    # The demo's own groups: agents masked, clinicians in clear (the tests' default policy
    # would otherwise give clinicians a role without see_clear).
    groups = {"agents": ["agent"], "clinicians": ["clinician"]}
    # The demo's agents may only SELECT; COPY TO is opened here to check its masking too.
    roles = {"agent": {"operations": ["select", "copy_to"]}}
    factory = GatewayFactory(pg, dev_issuer, dev_cert, tmp)
    try:
        yield factory(**merge_config(demo, {"groups": groups, "roles": roles}))
    finally:
        factory.stop_all()


def _expected(row: tuple[str, str, str, str]) -> tuple[str, str, str, str]:
    _address, _city, state, zip_ = row
    return ("***", "***", state, zip3(zip_, restricted_prefixes()))


def _agent(gw: Any, token: Any) -> psycopg.Connection[Any]:
    return psycopg_connect(gw, token(sub="agent-zip", groups=("agents",)))


SQL = "SELECT id, address, city, state, zip FROM patients"


def test_agents_see_zip3_and_redacted_places(demo_gateway: Any, token: Any, clear: Any) -> None:
    with _agent(demo_gateway, token) as conn:
        plain = conn.execute(SQL).fetchall()  # masked by the data plane alone
        ordered = conn.execute(SQL + " ORDER BY zip, id").fetchall()  # rewritten: masked in SQL
        binary = conn.cursor(binary=True).execute(SQL).fetchall()
    want = {pid: _expected(row) for pid, row in clear.items()}
    for rows in (plain, ordered, binary):
        assert len(rows) == len(clear)
        assert {r[0]: tuple(r[1:]) for r in rows} == want
    # ORDER BY sorts the masked values: the order itself shows nothing finer than zip3.
    assert [r[4] for r in ordered] == sorted(r[4] for r in ordered)
    shown = {r[4] for r in plain}
    assert "000**" in shown and all(len(z) == 5 and z.endswith("**") for z in shown)
    assert not {row[3] for row in clear.values()} & shown
    restricted = [pid for pid, row in clear.items() if row[3] == RESTRICTED_ZIP]
    assert [dict((r[0], r[4]) for r in plain)[pid] for pid in restricted] == ["000**"]


def test_agents_copy_is_masked(demo_gateway: Any, token: Any, clear: Any) -> None:
    want = {pid: _expected(row) for pid, row in clear.items()}
    for sql in (SQL, SQL + " ORDER BY zip"):  # plain (data plane) and rewritten (SQL)
        with (
            _agent(demo_gateway, token) as conn,
            conn.cursor() as cur,
            cur.copy(f"COPY ({sql}) TO STDOUT") as copy,
        ):
            data = b"".join(bytes(b) for b in copy).decode()
        got = {}
        for line in data.splitlines():
            pid, *rest = line.split("\t")
            got[int(pid)] = tuple(rest)
        assert got == want, sql


def test_predicates_see_masked_zips(demo_gateway: Any, token: Any, clear: Any) -> None:
    real = next(row[3] for row in clear.values() if row[3] != RESTRICTED_ZIP)
    with _agent(demo_gateway, token) as conn:
        # A clear ZIP matches nothing; the masked form matches its whole 3-digit area.
        count = "SELECT count(*) FROM patients WHERE zip = %s"
        assert conn.execute(count, (real,)).fetchone() == (0,)
        n = conn.execute(count, (real[:3] + "**",)).fetchone()
    assert n == (sum(1 for row in clear.values() if row[3][:3] == real[:3]),)


def test_clinicians_see_clear_values(demo_gateway: Any, token: Any, clear: Any) -> None:
    with psycopg_connect(demo_gateway, token(groups=("clinicians",))) as conn:
        rows = conn.execute(SQL + " ORDER BY zip").fetchall()
        plain = conn.execute(SQL).fetchall()
    assert {r[0]: tuple(r[1:]) for r in rows} == clear
    assert {r[0]: tuple(r[1:]) for r in plain} == clear
