"""API keys through real drivers: a valid key logs in; revoked, expired and unknown keys and
identities without a role are refused with FATALs that say which, and the key is never echoed.

psycopg reports no SQLSTATE for a failed connection attempt, so codes are checked with asyncpg
and messages with both (as in test_auth.py).
"""

# ruff: noqa: S105, S106  # keys here are test fixtures

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from harness import asyncpg_connect, conninfo, psycopg_connect
from phigate.cli import main as cli_main
from phigate.identity.apikeys import ApiKeyStore, read_store

pytestmark = pytest.mark.integration

DAY = 86400.0
# Roles of their own, so these tests do not depend on the default test config's mapping:
# "clinicians" maps to a read-only role; "interns" and "visitors" map to nothing.
ROLES = {
    "roles": {"apikey-reader": {"relations": ["public.*"], "operations": ["select"]}},
    "groups": {"clinicians": ["apikey-reader"]},
}
RELOAD_WAIT = 1.2  # the gateway re-checks the store file at most once a second


@pytest.fixture
def store(tmp_path: Path) -> ApiKeyStore:
    return ApiKeyStore(tmp_path / "state" / "apikeys.json")


@pytest.fixture
def gw(gateway_factory: Any, store: ApiKeyStore) -> Any:
    store.path.parent.mkdir()
    return gateway_factory(identity={"apikeys": {"store": str(store.path)}}, **ROLES)


@pytest.fixture
def captured_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


def secret_of(key: str) -> str:
    # An API key's secret is what follows its id; an OIDC token (a JWT, whose base64url may
    # end in "_x") is all secret. Splitting a JWT on "_" made this check flaky ("g" in a message).
    return key.rsplit("_", 1)[1] if key.startswith("phk_") else key


def assert_not_echoed(text: str, key: str) -> None:
    assert key not in text
    assert secret_of(key) not in text
    assert secret_of(key)[:16] not in text


def accepted(gw: Any, key: str, user: str) -> None:
    with psycopg_connect(gw, key, user=user) as conn:
        assert conn.execute("select 40 + 2").fetchone() == (42,)


def refused(gw: Any, key: str, sqlstate: str, *phrases: str, user: str = "agent") -> str:
    """Both drivers get a FATAL with `sqlstate` and every phrase; returns the message."""

    async def attempt() -> asyncpg.PostgresError:
        try:
            conn = await asyncpg_connect(gw, key, user=user)
        except asyncpg.PostgresError as exc:
            return exc
        await conn.close()
        raise AssertionError("the gateway accepted the key")

    exc = asyncio.run(attempt())
    message = exc.args[0] if exc.args else str(exc)
    assert exc.sqlstate == sqlstate, f"sqlstate {exc.sqlstate}, message {message!r}"
    assert getattr(exc, "severity", "FATAL") == "FATAL"
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(conninfo(gw, user), password=key).close()
    text = str(info.value)
    assert "FATAL:" in text and message in text, text
    assert_not_echoed(message + text, key)
    return message


def test_valid_api_key_connects(gw: Any, store: ApiKeyStore) -> None:
    record, key = store.create("ci-bot", ["clinicians"], 90 * DAY)
    time.sleep(RELOAD_WAIT)  # a new key works within a second, without a restart
    accepted(gw, key, user="ci-bot")

    async def via_asyncpg() -> None:
        conn = await asyncpg_connect(gw, key, user="whatever")  # the key's name is what counts
        try:
            assert await conn.fetchval("select count(*) > 0 from patients") is True
        finally:
            await conn.close()

    asyncio.run(via_asyncpg())
    # last use is recorded off the control loop, soon after the first login
    deadline = time.monotonic() + 5
    while read_store(store.path)[record.id].last_used is None:
        assert time.monotonic() < deadline, "last_used was never recorded"
        time.sleep(0.05)
    gw.stop()
    starts = [e for e in gw.events() if e.get("event") == "session_start"]
    assert [e["subject"] for e in starts] == ["ci-bot", "ci-bot"]
    assert starts[0]["groups"] == ["clinicians"]


def test_revoked_key_is_refused_at_the_next_connection(gw: Any, store: ApiKeyStore) -> None:
    record, key = store.create("ci-bot", ["clinicians"], DAY)
    time.sleep(RELOAD_WAIT)
    accepted(gw, key, user="ci-bot")
    assert cli_main(["apikey", "revoke", record.id, "--store", str(store.path)]) == 0
    time.sleep(RELOAD_WAIT)  # no restart, no SIGHUP
    refused(gw, key, "28P01", f"API key {record.id}", '("ci-bot") has been revoked')


def test_expired_key_is_refused(gw: Any, store: ApiKeyStore) -> None:
    past = ApiKeyStore(store.path, clock=lambda: time.time() - 3 * DAY)
    record, key = past.create("old-bot", ["clinicians"], DAY)
    time.sleep(RELOAD_WAIT)
    refused(gw, key, "28P01", f'API key {record.id} ("old-bot") expired 2d')


def test_unknown_wrong_and_malformed_keys_are_refused(gw: Any, store: ApiKeyStore) -> None:
    record, key = store.create("ci-bot", ["clinicians"], DAY)
    time.sleep(RELOAD_WAIT)
    refused(gw, f"phk_{'0' * 12}_{'a' * 52}", "28P01", "API key is not recognized")
    wrong = f"phk_{record.id}_{'b' * 52}"
    refused(gw, wrong, "28P01", "API key is not recognized")
    refused(gw, key[:-1], "28P01", "malformed API key")
    accepted(gw, key, user="ci-bot")  # the store is fine


def test_api_keys_not_enabled(gateway: Any, store: ApiKeyStore) -> None:
    store.path.parent.mkdir()
    _, key = store.create("ci-bot", ["clinicians"], DAY)
    refused(gateway, key, "28P01", "API keys are not enabled on this gateway")


def test_api_keys_only_gateway(gateway_factory: Any, store: ApiKeyStore, token: Any) -> None:
    store.path.parent.mkdir()
    _, key = store.create("ci-bot", ["clinicians"], DAY)
    gw = gateway_factory(identity={"oidc": None, "apikeys": {"store": str(store.path)}}, **ROLES)
    accepted(gw, key, user="ci-bot")
    refused(gw, token(), "28P01", "this gateway accepts API keys only")


def test_identity_without_a_role_is_refused(gw: Any, store: ApiKeyStore, token: Any) -> None:
    _, key = store.create("lost-bot", ["interns", "visitors"], DAY)
    _, mapped = store.create("ci-bot", ["clinicians"], DAY)
    time.sleep(RELOAD_WAIT)
    refused(
        gw,
        key,
        "28000",
        'no role grants access to identity "lost-bot" (groups: "interns", "visitors"); ask your '
        "gateway administrator to map one of your groups to a role",
    )
    accepted(gw, mapped, user="ci-bot")
    # OIDC identities are mapped the same way.
    refused(gw, token(sub="agent-9", groups=("interns",)), "28000", 'identity "agent-9"')
    accepted(gw, token(sub="agent-9", groups=("clinicians",)), user="agent-9")


def test_keys_never_reach_logs_or_events(
    gw: Any, store: ApiKeyStore, captured_logs: pytest.LogCaptureFixture
) -> None:
    record, key = store.create("ci-bot", ["clinicians"], DAY)
    _, revoked_key = store.create("old-bot", ["clinicians"], DAY)
    store.revoke("old-bot")
    time.sleep(RELOAD_WAIT)
    accepted(gw, key, user="ci-bot")
    refused(gw, revoked_key, "28P01", "has been revoked")
    refused(gw, f"phk_{record.id}_{'c' * 52}", "28P01", "not recognized")
    gw.stop()
    raw = gw.trail_text()
    logs = "\n".join(r.getMessage() for r in captured_logs.records)
    for k in (key, revoked_key):
        assert_not_echoed(raw, k)
        assert_not_echoed(logs, k)
    failures = [e for e in gw.events() if e.get("event") == "auth_failure"]
    assert len(failures) >= 4 and all(e["sqlstate"] == "28P01" for e in failures)


@pytest.mark.parametrize("close_on_expiry", [True, False])
def test_key_expiring_mid_session(
    gateway_factory: Any, store: ApiKeyStore, close_on_expiry: bool
) -> None:
    store.path.parent.mkdir()
    record, key = store.create("short-bot", ["clinicians"], 3)
    gw = gateway_factory(
        identity={"apikeys": {"store": str(store.path)}, "close_on_expiry": close_on_expiry},
        **ROLES,
    )
    with psycopg_connect(gw, key, user="short-bot") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        time.sleep(max(0.0, record.expires - time.time()) + 0.5)
        if close_on_expiry:
            with pytest.raises(psycopg.OperationalError) as info:
                conn.execute("select 2")
            assert "expired" in str(info.value)
            assert_not_echoed(str(info.value), key)
        else:
            assert conn.execute("select 2").fetchone() == (2,)
