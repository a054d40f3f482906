"""Just-in-time approvals through real drivers: a held statement waits on the live session until
an approver decides through the admin API, then runs (or fails) on that same session."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from approvers import (
    APPROVER_GROUP,
    HELD_GROUP,
    SECOND_APPROVER_GROUP,
    Approver,
    approvals_config,
)
from harness import asyncpg_connect, psql, psycopg_connect

pytestmark = pytest.mark.integration

HELD_NOTICE = "01A01"


@pytest.fixture(scope="module")
def held(_session_gateways: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One gateway whose `held` role waits for approvers, shared by the tests that leave no
    request pending behind them."""
    tmp = tmp_path_factory.mktemp("approvals")
    gw = _session_gateways(**approvals_config(tmp, _session_gateways.cert))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def approver(held: Any, token: Any) -> Approver:
    return Approver(held, token(sub="approver-ann", groups=(APPROVER_GROUP,)))


@pytest.fixture
def agent(token: Any) -> str:
    return str(token(sub="agent-held", groups=(HELD_GROUP,)))


@pytest.fixture
def scratch(pg: Any) -> Iterator[str]:
    """A fresh, empty table the held role may write to."""
    with psycopg.connect(pg.dsn(pg.ehr_database), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS public.approval_scratch")
        c.execute("CREATE TABLE public.approval_scratch (id int PRIMARY KEY, note text)")
        c.execute("GRANT ALL ON public.approval_scratch TO PUBLIC")
    yield "approval_scratch"
    with psycopg.connect(pg.dsn(pg.ehr_database), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS public.approval_scratch")


def rows_in(pg: Any, table: str = "approval_scratch") -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.service_dsn(), autocommit=True) as c:
        return list(c.execute("SELECT * FROM public.approval_scratch ORDER BY id").fetchall())


class Notices:
    """The notices a psycopg connection received, as (sqlstate, message): psycopg's diagnostic
    is only readable inside the handler."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, str]] = []
        self.event = threading.Event()

    def __call__(self, diag: Any) -> None:
        self.seen.append((diag.sqlstate, diag.message_primary or ""))
        if diag.sqlstate == HELD_NOTICE:
            self.event.set()

    def held(self) -> list[str]:
        return [message for code, message in self.seen if code == HELD_NOTICE]


def in_thread(fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


def drop_socket(conn: psycopg.Connection[Any]) -> None:
    """Cut the connection at the socket, as a client that dies would, leaving libpq's state to
    the thread that is using it."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)


# --- hold, approve, deny, timeout ----------------------------------------------------------


def test_held_insert_runs_on_the_same_session_once_approved(
    held: Any, approver: Approver, agent: str, scratch: str, pg: Any
) -> None:
    notices = Notices()
    with psycopg_connect(held, agent) as conn:
        conn.add_notice_handler(notices)
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        future = in_thread(lambda: conn.execute(
            "INSERT INTO approval_scratch VALUES (1, 'first') RETURNING id").fetchone())
        # The agent is told at once, before anyone decides.
        assert notices.event.wait(10), "no notice that the statement is held"
        [note] = notices.held()
        [request] = approver.wait_pending()
        assert request["id"] in note
        assert "approv" in note.lower()
        assert rows_in(pg, scratch) == []  # nothing reached the database yet
        assert not future.done()
        # The approver sees the statement with its values, the identity and the rule.
        view = approver.show(request["id"])
        assert "'first'" in view["sql"]
        assert view["subject"] == "agent-held"
        assert view["rule"] == "write"
        status, _ = approver.approve(request["id"])
        assert status == 200
        assert future.result(10) == (1,)
        # Same session: the backend is the same one.
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == pid
    assert rows_in(pg, scratch) == [(1, "first")]


def test_denied_statement_fails_with_the_approvers_reason(
    held: Any, approver: Approver, agent: str, scratch: str, pg: Any
) -> None:
    with psycopg_connect(held, agent) as conn:
        future = in_thread(lambda: conn.execute("DELETE FROM approval_scratch"))
        [request] = approver.wait_pending()
        status, _ = approver.deny(request["id"], "not before the audit closes")
        assert status == 200
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            future.result(10)
        message = info.value.diag.message_primary or ""
        assert request["id"] in message
        assert "not before the audit closes" in message
        assert "approver-ann" in message
        # The session goes on.
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_request_nobody_decides_times_out_with_57014(
    gateway_factory: Any, tmp_path: Path, token: Any, scratch: str
) -> None:
    gw = gateway_factory(**approvals_config(tmp_path, gateway_factory.cert,
                                            role={"approval_timeout": "2s"}))  # fmt: skip
    agent = token(sub="agent-held", groups=(HELD_GROUP,))
    with psycopg_connect(gw, agent) as conn:
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            conn.execute("INSERT INTO approval_scratch VALUES (2, 'late')")
        assert "timed out" in (info.value.diag.message_primary or "")
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- withdrawal ----------------------------------------------------------------------------


def test_cancel_withdraws_the_request(
    held: Any, approver: Approver, agent: str, scratch: str, pg: Any
) -> None:
    with psycopg_connect(held, agent) as conn:
        future = in_thread(lambda: conn.execute("INSERT INTO approval_scratch VALUES (3, 'c')"))
        [request] = approver.wait_pending()
        conn.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled):
            future.result(10)
        view = approver.wait_status(request["id"], "withdrawn")
        assert "cancel" in str(view.get("outcome"))
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert rows_in(pg, scratch) == []


def test_disconnect_withdraws_the_request(
    held: Any, approver: Approver, agent: str, scratch: str
) -> None:
    conn = psycopg_connect(held, agent)
    future = in_thread(lambda: conn.execute("INSERT INTO approval_scratch VALUES (4, 'd')"))
    [request] = approver.wait_pending()
    # The client goes away without a word. The socket is shut down rather than the connection
    # finished: finishing frees libpq's state under the thread still waiting on it (a crash).
    drop_socket(conn)
    view = approver.wait_status(request["id"], "withdrawn")
    assert "disconnect" in str(view.get("outcome"))
    with pytest.raises(psycopg.Error):
        future.result(10)
    conn.close()


def test_a_token_that_expires_while_held_closes_the_session(
    gateway_factory: Any, tmp_path: Path, token: Any, scratch: str, pg: Any
) -> None:
    # No clock-skew leeway: the session's credential ends at the token's exp.
    gw = gateway_factory(identity={"oidc": {"leeway": 0}},
                         **approvals_config(tmp_path, gateway_factory.cert))  # fmt: skip
    approver = Approver(gw, token(sub="approver-ann", groups=(APPROVER_GROUP,)))
    short = token(sub="agent-held", groups=(HELD_GROUP,), ttl_seconds=4)
    with psycopg_connect(gw, short) as conn:
        future = in_thread(lambda: conn.execute("INSERT INTO approval_scratch VALUES (21, 'x')"))
        [request] = approver.wait_pending()
        with pytest.raises(psycopg.OperationalError) as info:
            future.result(20)
        assert "token expired" in str(info.value)
    view = approver.wait_status(request["id"], "withdrawn")
    assert "token_expired" in str(view.get("outcome"))
    assert rows_in(pg) == []


# --- protocols: pipeline, transaction, psql, asyncpg ---------------------------------------


def test_pipeline_messages_wait_behind_the_held_one_in_order(
    held: Any, approver: Approver, agent: str, scratch: str, pg: Any
) -> None:
    with psycopg_connect(held, agent) as conn:
        def run() -> list[Any]:
            with conn.pipeline():
                a = conn.execute("SELECT 1")
                b = conn.execute("INSERT INTO approval_scratch VALUES (%s, %s) RETURNING id",
                                 (5, "pipelined"))  # fmt: skip
                c = conn.execute("SELECT count(*) FROM approval_scratch")
            return [a.fetchone(), b.fetchone(), c.fetchone()]

        future = in_thread(run)
        [request] = approver.wait_pending()
        assert not future.done()
        approver.approve(request["id"])
        assert future.result(10) == [(1,), (5,), (1,)]


def test_held_inside_an_explicit_transaction(
    held: Any, approver: Approver, agent: str, scratch: str, pg: Any
) -> None:
    with psycopg_connect(held, agent, autocommit=False) as conn:
        conn.execute("SELECT 1")  # BEGIN
        future = in_thread(lambda: conn.execute("INSERT INTO approval_scratch VALUES (6, 'tx')"))
        [request] = approver.wait_pending()
        approver.approve(request["id"])
        future.result(10)
        assert rows_in(pg, scratch) == []  # not committed yet
        conn.commit()
    assert rows_in(pg, scratch) == [(6, "tx")]


def test_psql_waits_and_prints_the_result(
    held: Any, approver: Approver, agent: str, scratch: str, pg: Any
) -> None:
    future = in_thread(lambda: psql(held, agent, "INSERT INTO approval_scratch VALUES (7, 'psql')"))
    [request] = approver.wait_pending()
    approver.approve(request["id"])
    out = future.result(20)
    assert "INSERT 0 1" in out.stdout
    assert request["id"] in out.stderr  # the notice
    assert rows_in(pg, scratch) == [(7, "psql")]


def test_asyncpg_prepared_statement_single_use_approval(
    held: Any, approver: Approver, agent: str, scratch: str, pg: Any
) -> None:
    async def scenario() -> None:
        conn = await asyncpg_connect(held, agent)
        try:
            stmt = await conn.prepare("INSERT INTO approval_scratch VALUES ($1, $2) RETURNING id")
            first = asyncio.ensure_future(stmt.fetchval(8, "a"))
            [request] = await asyncio.to_thread(approver.wait_pending)
            await asyncio.to_thread(approver.approve, request["id"])
            assert await asyncio.wait_for(first, 10) == 8
            # One execution was approved: the next one waits for a person again.
            second = asyncio.ensure_future(stmt.fetchval(9, "b"))
            [again] = await asyncio.to_thread(approver.wait_pending)
            assert again["id"] != request["id"]
            await asyncio.to_thread(approver.approve, again["id"])
            assert await asyncio.wait_for(second, 10) == 9
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert rows_in(pg, scratch) == [(8, "a"), (9, "b")]


def test_asyncpg_cursor_over_a_bulk_read_is_held(
    held: Any, approver: Approver, agent: str
) -> None:
    async def scenario() -> int:
        conn = await asyncpg_connect(held, agent)
        try:
            async with conn.transaction():
                n = 0
                async for _ in conn.cursor("SELECT id FROM public.encounters", prefetch=50):
                    n += 1
                return n
        finally:
            await conn.close()

    future = in_thread(lambda: asyncio.run(scenario()))
    [request] = approver.wait_pending()
    assert request["rule"] == "bulk_read"
    approver.approve(request["id"])
    assert future.result(20) > 0


# --- rules ---------------------------------------------------------------------------------


def test_a_narrow_read_is_not_held(held: Any, agent: str) -> None:
    with psycopg_connect(held, agent) as conn:
        assert conn.execute("SELECT count(*) FROM public.encounters").fetchone()[0] > 0
        conn.execute("SELECT id FROM public.encounters WHERE id = 1").fetchall()
        conn.execute("SELECT id FROM public.encounters LIMIT 3").fetchall()


def test_row_estimate_rule_holds_only_large_reads(
    gateway_factory: Any, tmp_path: Path, token: Any
) -> None:
    gw = gateway_factory(**approvals_config(tmp_path, gateway_factory.cert, role={
        "approval_bulk_reads": False, "bulk_read_relations": [],
        "approval_row_estimate": 50, "approval_mode": "return"}))  # fmt: skip
    agent = token(sub="agent-held", groups=(HELD_GROUP,))
    with psycopg_connect(gw, agent) as conn:
        conn.execute("SELECT id FROM public.encounters WHERE id = 1").fetchall()
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as info:
            conn.execute("SELECT id FROM public.encounters WHERE id > 0").fetchall()
        assert "approv" in (info.value.diag.message_primary or "")
    approver = Approver(gw, token(sub="approver-ann", groups=(APPROVER_GROUP,)))
    [request] = approver.pending()
    assert request["rule"] == "row_estimate"
    assert request["estimate"] and request["estimate"] > 50


# --- return mode ---------------------------------------------------------------------------


def test_return_mode_identical_retry_passes_once_approved(
    held: Any, approver: Approver, agent: str, scratch: str, pg: Any
) -> None:
    with psycopg_connect(held, agent, application_name="nightly-agent+return") as conn:
        sql = "INSERT INTO approval_scratch VALUES (%s, %s)"
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as info:
            conn.execute(sql, (10, "r"))
        [request] = approver.pending()
        assert request["id"] in (info.value.diag.message_primary or "")
        assert request["mode"] == "return"
        approver.approve(request["id"])
        # A different value is a different statement: it is not covered.
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            conn.execute(sql, (11, "other"))
        conn.execute(sql, (10, "r"))
    assert rows_in(pg, scratch) == [(10, "r")]
    for r in approver.pending():
        approver.deny(r["id"], "cleanup")


# --- approvers -----------------------------------------------------------------------------


def test_requester_cannot_approve_its_own_request_and_agents_are_not_approvers(
    gateway_factory: Any, tmp_path: Path, token: Any, scratch: str
) -> None:
    gw = gateway_factory(**approvals_config(tmp_path, gateway_factory.cert))
    # An agent that is also in the approvers' group.
    both = token(sub="agent-both", groups=(HELD_GROUP, APPROVER_GROUP))
    plain_agent = token(sub="agent-held", groups=(HELD_GROUP,))
    with psycopg_connect(gw, both) as conn:
        future = in_thread(lambda: conn.execute("INSERT INTO approval_scratch VALUES (12, 's')"))
        self_approver = Approver(gw, both)
        [request] = self_approver.wait_pending()
        status, body = self_approver.approve(request["id"])
        assert status == 403
        assert "yourself" in body["error"]["message"]
        status, body = Approver(gw, plain_agent).call("GET", "/v1/approvals")
        assert status == 403
        assert "not an approver" in body["error"]["message"]
        Approver(gw, token(sub="approver-bob", groups=(APPROVER_GROUP,))).approve(request["id"])
        future.result(10)


def test_quorum_needs_one_approval_from_each_group(
    gateway_factory: Any, tmp_path: Path, token: Any, scratch: str, pg: Any
) -> None:
    gw = gateway_factory(**approvals_config(tmp_path, gateway_factory.cert, approvers={
        "two_keys": {"groups": [APPROVER_GROUP, SECOND_APPROVER_GROUP], "roles": ["held"],
                     "quorum": 2, "require": "all"}}))  # fmt: skip
    agent = token(sub="agent-held", groups=(HELD_GROUP,))
    dba = Approver(gw, token(sub="approver-ann", groups=(APPROVER_GROUP,)))
    dba2 = Approver(gw, token(sub="approver-cid", groups=(APPROVER_GROUP,)))
    privacy = Approver(gw, token(sub="approver-pat", groups=(SECOND_APPROVER_GROUP,)))
    with psycopg_connect(gw, agent) as conn:
        future = in_thread(lambda: conn.execute("INSERT INTO approval_scratch VALUES (13, 'q')"))
        [request] = dba.wait_pending()
        assert dba.approve(request["id"])[0] == 200
        assert dba2.approve(request["id"])[0] == 200  # two from one group are not enough
        time.sleep(0.3)
        assert not future.done()
        assert privacy.show(request["id"])["status"] == "pending"
        assert privacy.approve(request["id"])[0] == 200
        future.result(10)
    assert rows_in(pg, scratch) == [(13, "q")]


# --- evidence ------------------------------------------------------------------------------


def test_every_step_is_in_the_audit_trail_with_the_approver(
    gateway_factory: Any, tmp_path: Path, token: Any, scratch: str
) -> None:
    gw = gateway_factory(**approvals_config(tmp_path, gateway_factory.cert))
    agent = token(sub="agent-held", groups=(HELD_GROUP,))
    approver = Approver(gw, token(sub="approver-ann", groups=(APPROVER_GROUP,)))
    with psycopg_connect(gw, agent) as conn:
        future = in_thread(lambda: conn.execute(
            "INSERT INTO approval_scratch VALUES (14, 'canary-note-7731')"))
        [request] = approver.wait_pending()
        approver.approve(request["id"], "ok for the ward round")
        future.result(10)
    gw.stop()
    events = [e for e in gw.events() if str(e.get("event", "")).startswith("approval")]
    kinds = [e["event"] for e in events if e.get("request") == request["id"]]
    assert kinds[0] == "approval_request"
    assert "approval_vote" in kinds and "approval_outcome" in kinds
    vote = next(e for e in events if e["event"] == "approval_vote")
    assert vote["approver"] == "approver-ann"
    text = gw.trail_text()
    assert "canary-note-7731" not in text
    assert "ok for the ward round" not in text


# --- several gateways ----------------------------------------------------------------------


@pytest.fixture
def state_db(pg: Any) -> Iterator[str]:
    """A PostgreSQL state database (not a target) for gateways that share approvals."""
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP DATABASE IF EXISTS phigate_state WITH (FORCE)")
        c.execute("CREATE DATABASE phigate_state")
    yield (f"postgresql://{pg.superuser}:{pg.superuser_password}@{pg.host}:{pg.port}"
           "/phigate_state")
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("DROP DATABASE IF EXISTS phigate_state WITH (FORCE)")


def test_held_on_one_gateway_approved_through_another(
    gateway_factory: Any, tmp_path: Path, token: Any, scratch: str, pg: Any, state_db: str
) -> None:
    gw_a = gateway_factory(**approvals_config(tmp_path / "a", gateway_factory.cert,
                                              store=state_db, instance="gw-a"))  # fmt: skip
    gw_b = gateway_factory(**approvals_config(tmp_path / "b", gateway_factory.cert,
                                              store=state_db, instance="gw-b"))  # fmt: skip
    agent = token(sub="agent-held", groups=(HELD_GROUP,))
    approver_token = token(sub="approver-ann", groups=(APPROVER_GROUP,))
    on_b = Approver(gw_b, approver_token)
    with psycopg_connect(gw_a, agent) as conn:
        future = in_thread(lambda: conn.execute(
            "INSERT INTO approval_scratch VALUES (20, 'two') RETURNING id").fetchone())
        [request] = on_b.wait_pending()  # B lists what A holds
        assert request["instance"] == "gw-a"
        assert not future.done()
        status, _ = on_b.approve(request["id"])
        assert status == 200
        assert future.result(10) == (20,)
    assert rows_in(pg) == [(20, "two")]
    gw_a.stop()
    gw_b.stop()
    # Each gateway's own trail: the request and its use where the statement was held and ran,
    # the vote and the decision where the approver gave it.
    a_kinds = {e["event"] for e in gw_a.events() if e.get("request") == request["id"]}
    b_kinds = {e["event"] for e in gw_b.events() if e.get("request") == request["id"]}
    assert {"approval_request", "approval_used"} <= a_kinds
    assert {"approval_vote", "approval_outcome"} <= b_kinds
