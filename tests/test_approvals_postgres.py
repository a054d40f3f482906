"""Approvals on a real PostgreSQL state database: the store's atomic steps, two gateways
sharing it (held on A, approved through B, A's statement resumes by NOTIFY), and row
estimates by EXPLAIN upstream under the agent's database role."""
# ruff: noqa: S608  # statements held for approval in tests; values are test numbers

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from approvals_support import (
    SESSION,
    Records,
    ask,
    fake_decide,
    hold,
    make_config,
    make_service,
    payload,
)
from phigate.approvals import ApprovalService, Scope
from phigate.approvals.estimate import EstimateError, Estimator
from phigate.approvals.model import ApprovalRequest
from phigate.approvals.store_postgres import PostgresStore
from phigate.config import Config, parse_config

pytestmark = pytest.mark.integration

STATE_DB = "phigate_state"


@pytest.fixture(scope="module")
def state_url(pg: Any) -> Iterator[str]:
    if pg.database_exists(STATE_DB):
        pg.drop_database(STATE_DB)
    pg.create_database(STATE_DB)
    yield (f"postgresql://{pg.superuser}:{quote(pg.superuser_password, safe='')}"
           f"@{pg.host}:{pg.port}/{STATE_DB}")  # fmt: skip
    pg.drop_database(STATE_DB)


def _config(tmp_path: Path, url: str) -> Config:
    return make_config(tmp_path, store=url)


def _request(subject: str, now: float, **kw: Any) -> ApprovalRequest:
    doc: dict[str, Any] = dict(
        id=str(uuid.uuid4()), created_at=now, expires_at=now + 60, instance="gw-a",
        session=SESSION, stmt=1, subject=subject, groups=("agents",), roles=("agents",),
        role="agents", target="ehr", rule="delete", reason="r", mode="hold",
        normalized="DELETE FROM notes WHERE id = $1", sql="DELETE FROM notes WHERE id = 1",
        parameters=None, literal_hashes=["h:1"], parameter_hashes=None, values_hash="sha256:x",
        estimate=None, masked_columns={}, earlier=["SELECT 1"],
    )  # fmt: skip
    doc.update(kw)
    return ApprovalRequest(**doc)


def test_store_pending_limit_and_purge(state_url: str) -> None:
    async def main() -> None:
        store = PostgresStore(state_url, "state")
        await store.open()
        try:
            now = time.time()
            subject = f"limit-{uuid.uuid4()}"
            assert await store.create(_request(subject, now), 2, now)
            assert await store.create(_request(subject, now), 2, now)
            assert not await store.create(_request(subject, now), 2, now)
            old = _request(subject, now - 10 * 86400, expires_at=now - 9 * 86400)
            assert await store.create(old, 10, now)
            assert await store.expire(now) == [old.id]
            await store.purge(now + 1, now)
            purged = await store.get(old.id)
            assert purged is not None and purged.status == "timed_out"
            assert purged.sql is None and purged.earlier is None
            kept = await store.list_requests("pending", 10)
            assert all(r.sql is not None for r in kept)
        finally:
            await store.close()

    asyncio.run(main())


def test_held_on_a_approved_through_b_resumes_on_a(tmp_path: Path, state_url: str) -> None:
    cfg = _config(tmp_path, state_url)
    records_a, records_b = Records(), Records()

    async def main() -> None:
        a = make_service(cfg, PostgresStore(state_url, "state"), records_a, instance="gw-a")
        b = make_service(cfg, PostgresStore(state_url, "state"), records_b, instance="gw-b")
        await a.start()
        await b.start()
        try:
            events = a.subscribe()
            doc = payload(f"DELETE FROM notes WHERE id = {int(time.time() * 1000) % 100000}")
            request_id, waiting = await hold(a, doc)
            alice = b.approver_for("alice", ["dba-oncall"])
            assert alice is not None
            assert [v["id"] for v in await b.list(alice)].count(request_id) == 1
            await b.vote(alice, request_id, "approve", None, Scope())
            assert await waiting.answer(timeout=10) == {"action": "run"}
            # A's listeners learn of B's vote too (through the notification).
            kinds = set()
            while "outcome" not in kinds:
                event = await asyncio.wait_for(events.__anext__(), 10)
                if event["request"]["id"] == request_id:
                    kinds.add(event["event"])
            # Denied through A, held on B.
            request2, waiting2 = await hold(b, {**doc, "stmt": 2})
            await a.vote(alice, request2, "deny", "no", Scope())
            assert (await waiting2.answer(timeout=10))["sqlstate"] == "42501"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
    assert any(r["event"] == "approval_request" for r in records_a)  # A held it
    assert any(r["event"] == "approval_used" for r in records_a)  # A ran it
    assert any(r["event"] == "approval_vote" and r["approver"] == "alice" for r in records_b)


def test_return_mode_approval_on_one_gateway_is_used_on_the_other(
    tmp_path: Path, state_url: str
) -> None:
    cfg = _config(tmp_path, state_url)

    async def main() -> None:
        a = make_service(cfg, PostgresStore(state_url, "state"), Records(), instance="gw-a")
        b = make_service(cfg, PostgresStore(state_url, "state"), Records(), instance="gw-b")
        await a.start()
        await b.start()
        try:
            doc = payload("SELECT * FROM notes WHERE id = $1", rule="read",
                          params=[str(uuid.uuid4())], return_mode=True)  # fmt: skip
            first = await ask(a, doc)
            assert first["sqlstate"] == "55000"
            alice = a.approver_for("alice", ["dba-oncall"])
            assert alice is not None
            await a.vote(alice, first["message"].split()[3], "approve", None,
                         Scope(session="any"))  # fmt: skip
            assert await ask(b, doc) == {"action": "run"}
            assert (await ask(a, doc))["sqlstate"] == "55000"  # used once, on B
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


@pytest.fixture(scope="module")
def reader(pg: Any) -> None:
    """The agents' db_role: may read patients, nothing else."""
    pg.psql("CREATE ROLE approvals_reader NOLOGIN; "
            f"GRANT approvals_reader TO {pg.service_user}; "
            "GRANT USAGE ON SCHEMA public TO approvals_reader; "
            "GRANT SELECT ON patients TO approvals_reader;", dbname=pg.ehr_database)  # fmt: skip


def _ehr_config(tmp_path: Path, pg: Any) -> Config:
    (tmp_path / "ehr.password").write_text(pg.service_password)
    (tmp_path / "ehr.password").chmod(0o600)
    return parse_config({
        "server": {"listen": ["127.0.0.1:0"], "require_tls": False},
        "identity": {"oidc": {"issuer": "https://idp.example/", "audience": "phigate",
                              "jwks_url": "https://idp.example/jwks"}},
        "targets": {"ehr": {"host": pg.host, "port": pg.port, "database": pg.ehr_database,
                            "user": pg.service_user, "password_file": "ehr.password",
                            "tls": "disable"}},
        "roles": {"agents": {"relations": ["public.*"], "db_role": "approvals_reader"}},
        "groups": {"agents": ["agents"]},
        "approvals": {"store": str(tmp_path / "a.db")},
        "approvers": {"oncall": {"groups": ["dba-oncall"]}},
    }, source=str(tmp_path / "phigate.toml"), base_dir=tmp_path)  # fmt: skip


def test_row_estimate_explains_as_the_agents_role(tmp_path: Path, pg: Any, reader: None) -> None:
    cfg = _ehr_config(tmp_path, pg)
    estimator = Estimator(timeout=5)

    async def main() -> None:
        everyone = await estimator.estimate(cfg, "ehr", "approvals_reader",
                                            "SELECT * FROM patients", None)  # fmt: skip
        assert everyone >= 100  # the test database has 200 patients, analyzed
        one = await estimator.estimate(
            cfg, "ehr", "approvals_reader", "SELECT * FROM patients WHERE id = $1",
            [{"format": 0, "value": "1"}],
        )
        assert one == 1
        with pytest.raises(EstimateError, match="42501"):  # not granted to the agent's role
            await estimator.estimate(cfg, "ehr", "approvals_reader", "SELECT * FROM notes", None)

    asyncio.run(main())


def test_row_estimate_rule_runs_small_reads_and_holds_big_ones(
    tmp_path: Path, pg: Any, reader: None
) -> None:
    cfg = _ehr_config(tmp_path, pg)
    from approvals_support import HASH_KEY
    from phigate.approvals.store_sqlite import SqliteStore

    async def main() -> None:
        service = ApprovalService(cfg, SqliteStore(tmp_path / "a.db"), write_event=Records().append,
                                  decide=fake_decide, instance="gw", hash_key=HASH_KEY)  # fmt: skip
        await service.start()
        try:
            small = payload("SELECT * FROM patients WHERE id = 3", rule="row_estimate",
                            row_estimate_over=50)  # fmt: skip
            small["identity_class"] = '[["agents"],"ehr"]'
            assert await ask(service, small) == {"action": "run"}
            big = {**small, "sql": "SELECT * FROM patients"}
            request_id, _ = await hold(service, big)
            alice = service.approver_for("alice", ["dba-oncall"])
            assert alice is not None
            assert (await service.show(alice, request_id))["estimate"] >= 100
        finally:
            await service.close()

    asyncio.run(main())
