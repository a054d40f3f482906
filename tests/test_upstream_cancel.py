"""A statement does not outlive its session: when the client goes away mid-statement, or the
gateway closes the session at the end of its drain period, the statement is cancelled upstream."""

from __future__ import annotations

import secrets
import time

import psycopg
import pytest

from rawpg import RawConn, query, tags

pytestmark = pytest.mark.integration


def _login(gw, token) -> RawConn:
    c = RawConn(gw.host, gw.port)
    assert c.login(token)[-1].tag == "Z"
    return c


def _running(pg, label: str) -> int:
    """Backends whose statement is (or last was) the labelled one, seen directly on the server:
    0 once the backend is gone, not only once the statement stopped."""
    with psycopg.connect(pg.service_dsn(), autocommit=True) as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity where query like %s and pid <> pg_backend_pid()",
            (f"%{label}%",),
        ).fetchone()
        assert row is not None
        return int(row[0])


def _wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _sleep_statement() -> tuple[str, str]:
    label = f"cancel_probe_{secrets.token_hex(4)}"
    return label, f"select pg_sleep(30) as {label}"


def test_client_that_disconnects_mid_statement(_session_gateways, token, pg):
    gw = _session_gateways(require_tls=False)
    # A client that leaves after its results costs no cancel.
    idle = _login(gw, token())
    idle.send(query("select 1"))
    assert tags(idle.read_until()) == "TDCZ"
    before = gw.engine.stats()["cancels_forwarded"]
    idle.close()
    time.sleep(0.3)
    assert gw.engine.stats()["cancels_forwarded"] == before

    label, sql = _sleep_statement()
    c = _login(gw, token())
    c.send(query(sql))
    assert _wait_until(lambda: _running(pg, label) == 1)
    c.close()
    assert _wait_until(lambda: _running(pg, label) == 0), "the statement outlived its client"
    assert gw.engine.stats()["cancels_forwarded"] == before + 1


def test_session_closed_by_the_drain_timeout(gateway_factory, token, pg):
    gw = gateway_factory(require_tls=False)
    label, sql = _sleep_statement()
    c = _login(gw, token())
    c.send(query(sql))
    assert _wait_until(lambda: _running(pg, label) == 1)
    t0 = time.monotonic()
    gw.stop()  # drains for 1 s, then closes what is left
    assert time.monotonic() - t0 < 10
    out = c.read_until()
    assert out[-1].tag == "E" and out[-1].fields()["C"] == "57P01"
    assert _wait_until(lambda: _running(pg, label) == 0), "the statement outlived the gateway"
    assert gw.engine.stats()["cancels_forwarded"] == 1
