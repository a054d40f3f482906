"""The audit trail's record bodies, through real drivers: what a compliance officer reads of
sessions, logins, statements and their results, and of the gateway itself — each with the
fields docs/audit-records.md promises, keyed hashes under the configured HMAC key, RFC 3339
timestamps and no float anywhere."""

from __future__ import annotations

import asyncio
import base64
import re
import struct
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import asyncpg_connect, conninfo, psycopg_connect
from phigate.audit.hashing import keyed_hash
from phigate.audit.keys import write_keys
from phigate.identity.apikeys import ApiKeyStore
from rawpg import RawConn

pytestmark = pytest.mark.integration

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
HASH = re.compile(r"^h:[0-9a-f]{32}$")


def audit_section(tmp_path: Path) -> tuple[dict[str, Any], bytes]:
    """An [audit] section with fresh keys, and the HMAC key it holds."""
    keys = tmp_path / "audit-keys"
    keys.mkdir()
    signer, _, hmac_file = write_keys(keys, "phigate.test/gw")
    trail = tmp_path / "trail"
    trail.mkdir()
    section = {"dir": str(trail), "signing_key": str(signer), "hmac_key": str(hmac_file)}
    return section, base64.b64decode(hmac_file.read_text().strip())


def no_floats(value: Any, where: str = "record") -> None:
    if isinstance(value, float):
        raise AssertionError(f"float at {where}")
    if isinstance(value, dict):
        for k, v in value.items():
            no_floats(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            no_floats(v, f"{where}[{i}]")


def records(gw: Any) -> list[dict[str, Any]]:
    out = gw.events()
    for r in out:
        assert TS.match(r["ts"]), r
        no_floats(r, r["event"])
    return out


def of(rs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [r for r in rs if r["event"] == event]


@pytest.fixture
def keyed_gw(gateway_factory: Any, tmp_path: Path) -> tuple[Any, bytes]:
    section, key = audit_section(tmp_path)
    return gateway_factory(audit=section), key


def test_session_statement_and_result_records(keyed_gw: tuple[Any, bytes], token: Any) -> None:
    gw, key = keyed_gw
    tok = token(sub="records-agent", jti="jti-4711")
    with psycopg_connect(gw, tok, application_name="ward-7-dashboard") as conn:
        for mrn in ("MRN-7001", "MRN-7002"):
            # Literals on purpose: the records hold keyed hashes of them, never the values.
            conn.execute(
                "select count(*), max(last_name) from patients where mrn = '" + mrn + "'"  # noqa: S608
            ).fetchall()
        conn.execute("select count(*) from patients where mrn = %s", ("MRN-7003",)).fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select * from pg_catalog.pg_authid")
    gw.stop()
    rs = records(gw)
    kinds = [r["event"] for r in rs]
    assert kinds[0] == "gateway_start" and kinds[-1] == "gateway_stop"
    (start,) = of(rs, "session_start")
    session = start["session"]
    assert UUID.match(session)
    assert start["subject"] == "records-agent" and start["target"] == "ehr"
    assert start["roles"] == ["gateway-tests"] and start["groups"] == ["clinicians"]
    issuer = gw.config.identity.oidc.issuer
    assert start["credential"] == {"kind": "token", "jti": "jti-4711", "iss": issuer}
    assert start["tls"] in ("TLSv1.3", "TLSv1.2")
    assert start["application_name"] == keyed_hash(key, "ward-7-dashboard")

    stmts = [s for s in of(rs, "statement") if "patients" in (s["normalized"] or "")]
    first, second, prepared = stmts
    assert [s["cached"] for s in (first, second)] == [False, True]
    for s in stmts:
        assert s["session"] == session and s["decision"] == "allow" and s["kind"] == "select"
        assert s["relations"] == ["public.patients"]
        assert s["rule"] == "role:gateway-tests allow select"
        assert "public.patients.mrn" in s["columns_read"] and s["columns_written"] == []
    # Each statement's own literal, hashed under the configured key (cache hit included).
    assert first["literals"] == [keyed_hash(key, "MRN-7001")]
    assert second["literals"] == [keyed_hash(key, "MRN-7002")]
    assert first["parameters"] is None and first["protocol"] == "simple"
    assert prepared["protocol"] == "extended" and prepared["parameters"] == [
        keyed_hash(key, "MRN-7003")
    ]
    assert "public.patients.last_name" in first["columns_read"]

    (denied,) = [s for s in of(rs, "statement") if s["decision"] == "deny"]
    assert denied["rule"] == "never relation pg_catalog.pg_authid"
    assert denied["relations"] == ["pg_catalog.pg_authid"]

    results = {r["stmt"]: r for r in of(rs, "result")}
    numbers = [s["stmt"] for s in of(rs, "statement")]
    assert sorted(results) == numbers == list(range(1, len(numbers) + 1))
    assert all(r["session"] == session for r in results.values())
    assert results[first["stmt"]]["sqlstate"] is None and results[first["stmt"]]["rows"] == 1
    assert results[first["stmt"]]["bytes"] > 0
    assert isinstance(results[first["stmt"]]["duration_us"], int)
    assert results[denied["stmt"]]["sqlstate"] == "42501"
    (end,) = of(rs, "session_end")
    assert end["session"] == session and end["reason"] == "client_quit"
    assert end["statements"] == len(numbers) and isinstance(end["duration_us"], int)
    raw = gw.trail_text()
    assert "MRN-700" not in raw and "ward-7" not in raw and tok not in raw


def test_a_pipeline_gives_one_result_per_statement(gateway: Any, token: Any) -> None:
    before = len(gateway.events())
    with psycopg_connect(gateway, token(sub="pipeline-agent")) as conn:
        with conn.pipeline():
            cursors = [
                conn.execute("select %s::int + 1", (n,)) for n in (1, 2, 3)
            ]  # fmt: skip
        assert [c.fetchone() for c in cursors] == [(2,), (3,), (4,)]
    time.sleep(0.5)  # the sink batches
    rs = gateway.events()[before:]
    (start,) = [r for r in of(rs, "session_start") if r["subject"] == "pipeline-agent"]
    mine = [r for r in rs if r.get("session") == start["session"]]
    stmts = [s for s in of(mine, "statement") if s["protocol"] == "extended"]
    assert len(stmts) == 3
    results = {r["stmt"]: r for r in of(mine, "result")}
    for s in stmts:
        assert results[s["stmt"]]["rows"] == 1 and results[s["stmt"]]["sqlstate"] is None


def test_a_failed_statement_in_a_pipeline_skips_the_rest(gateway: Any, token: Any) -> None:
    before = len(gateway.events())
    with (
        psycopg_connect(gateway, token(sub="skip-agent")) as conn,
        pytest.raises(psycopg.errors.DivisionByZero),
        conn.pipeline(),
    ):
        conn.execute("select 1 / %s::int", (0,))
        conn.execute("select %s::int", (5,))
    time.sleep(0.5)
    rs = gateway.events()[before:]
    (start,) = [r for r in of(rs, "session_start") if r["subject"] == "skip-agent"]
    results = [r for r in of(rs, "result") if r["session"] == start["session"]]
    assert [r["sqlstate"] for r in results[:2]] == ["22012", None]
    assert [r["skipped"] for r in results[:2]] == [False, True]


def test_api_key_session_and_key_records(gateway_factory: Any, tmp_path: Path) -> None:
    store = ApiKeyStore(tmp_path / "state" / "apikeys.json")
    store.path.parent.mkdir()
    gw = gateway_factory(identity={"apikeys": {"store": str(store.path)}})
    record, key = store.create("ci-bot", ["clinicians"], 3600)
    time.sleep(1.5)  # the gateway re-reads the store at most once a second
    with psycopg_connect(gw, key, user="ci-bot") as conn:
        conn.execute("select 1").fetchone()
    store.revoke(record.id)
    time.sleep(1.5)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(conninfo(gw, "ci-bot"), password=key).close()
    gw.stop()
    rs = records(gw)
    (start,) = of(rs, "session_start")
    assert start["credential"] == {"kind": "api_key", "key_id": record.id, "name": "ci-bot"}
    actions = [(r["action"], r["key_id"], r["name"]) for r in of(rs, "apikey")]
    assert actions == [("created", record.id, "ci-bot"), ("revoked", record.id, "ci-bot")]
    failure = of(rs, "auth_failure")[-1]
    assert failure["reason"] == "revoked_key" and failure["credential"]["key_id"] == record.id
    assert key.rsplit("_", 1)[1] not in gw.trail_text()


def test_auth_failure_reasons(gateway: Any, token: Any, dev_issuer: Any) -> None:
    cases = {
        "expired": token(ttl_seconds=-3600),
        "not_yet_valid": token(nbf=time.time() + 3600),
        "wrong_audience": token(audience="someone-else"),
        "wrong_issuer": token(issuer="https://elsewhere.example"),
        "malformed": "not-a-jwt",
        "bad_signature": token()[:-4] + "AAAA",
        "no_role": token(groups=("nobody-maps-this",)),
    }
    before = len(gateway.events())
    for tok in cases.values():
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(conninfo(gateway, "agent"), password=tok).close()
    with pytest.raises(psycopg.OperationalError):
        info = conninfo(gateway, "agent", dbname="no-such-target")
        psycopg.connect(info, password=token()).close()
    time.sleep(0.5)
    failures = of(gateway.events()[before:], "auth_failure")
    assert [f["reason"] for f in failures] == [*cases, "unknown_target"]
    assert all(HASH.match(f["user"]) and UUID.match(f["session"]) for f in failures)
    raw = gateway.trail_text()
    assert all(tok not in raw for tok in cases.values())


def test_end_reasons(gateway_factory: Any, token: Any, pg: Any) -> None:
    gw = gateway_factory(identity={"close_on_expiry": True}, require_tls=False)
    # Token expiry with close_on_expiry: named as such, not as a protocol violation.
    # Sessions close at exp plus the clock-skew leeway.
    leeway = gw.config.identity.oidc.leeway
    with psycopg_connect(gw, token(sub="expiring", ttl_seconds=2 - leeway)) as conn:
        time.sleep(3.5)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    # A protocol violation: a message type that does not exist.
    raw = RawConn(gw.host, gw.port)
    assert raw.login(token(sub="violator"), user="violator")[-1].tag == "Z"
    raw.send(b"\x01" + struct.pack("!i", 4))
    assert raw.read_until("Z")[-1].sqlstate == "08P01"
    raw.close()
    # An upstream failure: the backend is terminated under the session.
    with psycopg_connect(gw, token(sub="orphan")) as conn:
        with psycopg.connect(pg.dsn(pg.ehr_database)) as admin:
            admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where usename = %s and pid <> pg_backend_pid()",
                (pg.service_user,),
            )
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    # Drain: the gateway stops with a session still open.
    conn = psycopg_connect(gw, token(sub="drained"))
    conn.execute("select 1")
    gw.stop()
    conn.close()
    rs = records(gw)
    subjects = {r["session"]: r["subject"] for r in of(rs, "session_start")}
    ends = {subjects[r["session"]]: r["reason"] for r in of(rs, "session_end")}
    assert ends == {
        "expiring": "token_expired",
        "violator": "protocol_violation",
        "orphan": "upstream_failure",
        "drained": "drain",
    }
    assert of(rs, "gateway_stop")[-1]["reason"] == "shutdown"


def test_asyncpg_prepared_statements_are_recorded_per_execution(
    gateway: Any, token: Any
) -> None:
    async def run() -> str:
        conn = await asyncpg_connect(gateway, token(sub="asyncpg-agent"))
        try:
            stmt = await conn.prepare("select count(*) from patients where mrn = $1")
            for mrn in ("MRN-1", "MRN-2"):
                await stmt.fetchval(mrn)
        finally:
            await conn.close()
        return "asyncpg-agent"

    before = len(gateway.events())
    asyncio.run(run())
    time.sleep(0.5)
    rs = gateway.events()[before:]
    (start,) = [r for r in of(rs, "session_start") if r["subject"] == "asyncpg-agent"]
    mine = [
        s for s in of(rs, "statement")
        if s["session"] == start["session"] and "patients" in (s["normalized"] or "")
    ]  # fmt: skip
    executions = [s for s in mine if s["parameters"]]
    assert len(executions) == 2
    assert executions[0]["parameters"] != executions[1]["parameters"]
    assert all(HASH.match(p) for s in executions for p in s["parameters"])
    results = {r["stmt"]: r for r in of(rs, "result") if r["session"] == start["session"]}
    assert all(results[s["stmt"]]["rows"] == 1 for s in executions)


def test_reload_records_who_and_what_changed(gateway_factory: Any) -> None:
    gw = gateway_factory()
    from phigate.config import load_config
    from phigate.dev.demo import dump_toml, merge_config

    auditor = {"relations": ["public.encounters"], "operations": ["select"]}
    settings = merge_config(gw.settings, {"roles": {"auditor": auditor}})
    gw.config_path.write_text(dump_toml(settings))
    new = load_config(gw.config_path)
    deadline = time.monotonic() + 10
    while not of(gw.events(), "gateway_start") and time.monotonic() < deadline:
        time.sleep(0.05)  # batch mode: records reach the file within milliseconds
    old_sha = of(gw.events(), "gateway_start")[0]["config_sha256"]
    gw.thread.reload(new)
    gw.stop()
    (reload,) = of(records(gw), "reload")
    assert reload["outcome"] == "applied"
    assert reload["roles"] == {"added": ["auditor"], "removed": [], "changed": []}
    assert reload["old_sha256"] == old_sha and reload["new_sha256"] != old_sha
    assert reload["sender"]["via"] == "signal"
