"""Statements held for approval, on the wire: the data plane asks `approval`, tells a held
client at once with a notice, waits for the decision and runs or refuses the statement; cancel,
disconnect and timeouts withdraw the request. The control plane here is a stand-in that answers
as each test says (the approvals service itself has its own tests)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import psycopg
import pytest

from rawpg import RawConn, query

pytestmark = pytest.mark.integration

#: Statements whose text holds this word need approval (the stand-in's only risk rule).
HOLD = "needs_ok"
APPROVAL = {
    "rule": "read",
    "role": "agents",
    "reason": "reads need approval (test rule)",
    "mode": "hold",
    "timeout_ms": 600000,
}
WAIT = 15.0
#: The stand-in accepts any credential.
TOKEN = "stand-in"  # noqa: S105 (not a secret)


class StandIn:
    """The native engine with a control plane that allows every statement, attaches APPROVAL to
    those containing HOLD, and answers `approval` with `on_approval(payload)` (default: hold).
    `await_approval` requests wait in `awaiting` until the test answers them; every request is
    logged in arrival order, with the test's answers in between."""

    def __init__(
        self, pg: Any, on_approval: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    ) -> None:
        from phigate import _native

        cfg = {
            "listen": ["127.0.0.1:0"],
            "require_tls": False,
            "startup_parameters": ["application_name", "client_encoding", "DateStyle", "TimeZone",
                                   "extra_float_digits"],
            "targets": {
                "ehr": {
                    "host": pg.host, "port": pg.port, "database": pg.ehr_database,
                    "user": pg.service_user, "password": pg.service_password, "tls": "disable",
                }
            },
        }  # fmt: skip
        self.on_approval = on_approval or self.hold
        self.log: list[tuple[str, Any]] = []
        self.awaiting: dict[str, Any] = {}
        self.cond = threading.Condition()
        self._ids = itertools.count(1)
        self._events: list[dict[str, Any]] = []
        self.engine = _native.Engine(json.dumps(cfg))
        self.engine.start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        host, port = self.engine.listen_addresses()[0].rsplit(":", 1)
        self.host, self.port = host, int(port)

    def hold(self, payload: dict[str, Any]) -> dict[str, Any]:
        request = f"req-{next(self._ids)}"
        notice = f"held for approval: request {request}"
        return {"action": "hold", "request": request, "notice": notice, "timeout_ms": 600000}

    def _serve(self) -> None:
        while not self._stop.is_set():
            for r in self.engine.take_requests():
                with self.cond:
                    self.log.append((r.kind, r.payload))
                    self.cond.notify_all()
                if r.kind == "authenticate":
                    r.reply(
                        {
                            "ok": True,
                            "subject": "agent",
                            "groups": [],
                            "identity_class": "c",
                            "masked": False,
                        }
                    )
                elif r.kind == "decide":
                    extra = {"approval": APPROVAL} if HOLD in r.payload["sql"] else {}
                    r.reply({"action": "allow", "cache": "exact", **extra})
                elif r.kind == "approval":
                    r.reply(self.on_approval(r.payload))
                elif r.kind == "await_approval":
                    with self.cond:
                        self.awaiting[r.payload["request"]] = r
                        self.cond.notify_all()
                # withdraw: fire and forget, nobody waits for an answer.
            time.sleep(0.002)

    def dsn(self, **params: str) -> str:
        extra = "".join(f" {k}={v}" for k, v in params.items())
        where = f"host={self.host} port={self.port} dbname=ehr user=agent sslmode=disable"
        return f"{where} password={TOKEN}{extra}"

    def wait_held(self) -> str:
        """The id of the next request a session waits on (not yet answered)."""
        with self.cond:
            assert self.cond.wait_for(lambda: self.awaiting, WAIT), "no statement was held"
            return next(iter(self.awaiting))

    def answer(self, request: str, answer: dict[str, Any]) -> None:
        with self.cond:
            r = self.awaiting.pop(request)
            self.log.append(("answered", request))
        r.reply(answer)

    def release_all(self) -> None:
        """Denies whatever still waits (a failed test must not leave a client blocked)."""
        with self.cond:
            pending = list(self.awaiting)
        for request in pending:
            self.answer(
                request,
                {
                    "action": "deny",
                    "sqlstate": "57014",
                    "message": "released by the test's teardown",
                },
            )

    @contextlib.contextmanager
    def background(self) -> Iterator[ThreadPoolExecutor]:
        """A thread for the client that waits on a held statement; on the way out, whatever
        is still held is released first."""
        pool = ThreadPoolExecutor(1)
        try:
            yield pool
        finally:
            self.release_all()
            pool.shutdown(wait=True)

    def payloads(self, kind: str) -> list[dict[str, Any]]:
        with self.cond:
            return [p for k, p in self.log if k == kind]

    def wait_withdrawn(self) -> dict[str, Any]:
        with self.cond:
            assert self.cond.wait_for(lambda: any(k == "withdraw" for k, _ in self.log), WAIT), (
                "nothing withdrawn"
            )
        return self.payloads("withdraw")[0]

    def events(self) -> list[dict[str, Any]]:
        """The records the engine made so far (it has no audit trail: they queue)."""
        self._events += [
            json.loads(line) for line in self.engine.take_events().splitlines() if line
        ]
        return self._events

    def wait_event(self, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while not (found := [e for e in self.events() if e.get("event") == name]):
            assert time.monotonic() < deadline, f"no {name} record"
            time.sleep(0.01)
        return found[0]

    def close(self) -> None:
        self._stop.set()
        self.engine.shutdown(0.5)


@pytest.fixture
def standin(pg: Any) -> Iterator[Callable[..., StandIn]]:
    made: list[StandIn] = []

    def make(**kw: Any) -> StandIn:
        s = StandIn(pg, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _noticing(
    conn: psycopg.Connection[Any], seen: list[tuple[str, ...]], got: threading.Event
) -> None:
    def on_notice(d: psycopg.errors.Diagnostic) -> None:
        seen.append(("notice", d.sqlstate or "", d.message_primary or ""))
        got.set()

    conn.add_notice_handler(on_notice)


def test_held_query_gets_a_notice_at_once_then_runs_when_approved(
    standin: Callable[..., StandIn],
) -> None:
    cp = standin()
    seen: list[tuple[str, ...]] = []
    got_notice = threading.Event()
    with psycopg.connect(cp.dsn(), autocommit=True) as conn, cp.background() as pool:
        _noticing(conn, seen, got_notice)
        conn.execute("select 'an earlier statement'")
        held = pool.submit(lambda: conn.execute(f"select 41 + 1 as {HOLD}").fetchall())
        assert got_notice.wait(WAIT), "the held client got no notice"
        request = cp.wait_held()
        assert not held.done()
        seen.append(("approved",))
        cp.answer(request, {"action": "run"})
        assert held.result(WAIT) == [(42,)]
        assert seen == [("notice", "01A01", f"held for approval: request {request}"), ("approved",)]
        # A decision is cached, an approval is not: the same statement is asked about again.
        second = pool.submit(lambda: conn.execute(f"select 41 + 1 as {HOLD}").fetchall())
        cp.answer(cp.wait_held(), {"action": "run"})
        assert second.result(WAIT) == [(42,)]
    asked = cp.payloads("approval")
    assert len(asked) == 2
    p = asked[0]
    assert p["sql"] == f"select 41 + 1 as {HOLD}"
    assert (p["protocol"], p["statement_name"], p["parameters"], p["parameter_hashes"]) == (
        "simple",
        None,
        None,
        None,
    )
    assert (p["subject"], p["identity_class"], p["target"], p["return_mode"]) == (
        "agent",
        "c",
        "ehr",
        False,
    )
    assert p["approval"] == APPROVAL
    assert p["earlier"] == ["select 'an earlier statement'"]
    assert p["peer"].startswith("127.0.0.1:")
    assert p["stmt"] == 2 and asked[1]["stmt"] == 3
    assert p["literal_hashes"] is not None
    assert cp.payloads("await_approval")[0] == {"session": p["session"], "request": request}
    assert cp.payloads("withdraw") == []


def test_denied_statements_fail_with_the_answer_and_the_session_goes_on(
    standin: Callable[..., StandIn],
) -> None:
    def deny_at_once(payload: dict[str, Any]) -> dict[str, Any]:
        if "nobody_can" in payload["sql"]:
            return {
                "action": "deny",
                "sqlstate": "42501",
                "message": "no approver can approve this statement",
                "hint": "Add an [approvers] rule covering role agents.",
            }
        return cp.hold(payload)

    cp = standin(on_approval=deny_at_once)
    with psycopg.connect(cp.dsn(), autocommit=True) as conn, cp.background() as pool:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            conn.execute(f"select 1 as {HOLD}_nobody_can")
        assert refused.value.diag.message_primary == "no approver can approve this statement"
        assert refused.value.diag.message_hint == "Add an [approvers] rule covering role agents."
        assert conn.execute("select 7").fetchone() == (7,)
        # Held, then denied by a person, inside a transaction: PostgreSQL's own state follows.
        conn.execute("begin")
        held = pool.submit(lambda: conn.execute(f"select 2 as {HOLD}"))
        request = cp.wait_held()
        denied = f"approval request {request} was denied by approver-1: too broad"
        cp.answer(request, {"action": "deny", "sqlstate": "42501", "message": denied})
        with pytest.raises(
            psycopg.errors.InsufficientPrivilege, match="denied by approver-1: too broad"
        ):
            held.result(WAIT)
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 8")
        conn.execute("rollback")
        assert conn.execute("select 9").fetchone() == (9,)


def test_cancel_withdraws_the_held_statement(standin: Callable[..., StandIn]) -> None:
    cp = standin()
    with psycopg.connect(cp.dsn(), autocommit=True) as conn, cp.background() as pool:
        held = pool.submit(lambda: conn.execute(f"select 3 as {HOLD}"))
        request = cp.wait_held()
        conn.cancel()
        with pytest.raises(psycopg.errors.QueryCanceled) as cancelled:
            held.result(WAIT)
        assert cancelled.value.diag.message_primary == "canceling statement due to user request"
        assert request in (cancelled.value.diag.message_detail or "")
        assert cp.wait_withdrawn()["reason"] == "cancel"
        assert conn.execute("select 10").fetchone() == (10,)
    assert cp.payloads("withdraw") == [
        {"session": cp.payloads("approval")[0]["session"], "request": request, "reason": "cancel"}
    ]


def test_disconnect_withdraws_and_ends_the_session(standin: Callable[..., StandIn]) -> None:
    cp = standin()
    c = RawConn(cp.host, cp.port)
    assert c.login(TOKEN)[-1].tag == "Z"
    c.send(query(f"select 4 as {HOLD}"))
    notice = c.read_message()
    assert (notice.tag, notice.sqlstate) == ("N", "01A01")
    request = cp.wait_held()
    c.close()
    withdrawn = cp.wait_withdrawn()
    assert (withdrawn["request"], withdrawn["reason"]) == (request, "disconnect")
    assert cp.wait_event("session_end")["reason"] == "client_disconnected"


def test_later_pipelined_statements_wait_behind_the_held_one(
    standin: Callable[..., StandIn],
) -> None:
    cp = standin()
    seen: list[tuple[str, ...]] = []
    got_notice = threading.Event()
    with psycopg.connect(cp.dsn(), autocommit=True) as conn, cp.background() as pool:
        _noticing(conn, seen, got_notice)

        def pipelined() -> list[Any]:
            with conn.pipeline() as p:
                cursors = [
                    conn.execute(sql)
                    for sql in (
                        "select 1 as first_one",
                        f"select 2 as {HOLD}",
                        "select 3 as third_one",
                    )
                ]
                p.sync()
                return [c.fetchall() for c in cursors]

        results = pool.submit(pipelined)
        request = cp.wait_held()
        assert got_notice.wait(WAIT)
        cp.answer(request, {"action": "run"})
        assert results.result(WAIT) == [[(1,)], [(2,)], [(3,)]]
    kinds = [(k, p.get("sql") if isinstance(p, dict) else p) for k, p in cp.log]
    held_at = kinds.index(("answered", request))
    # The statement after the held one reached the gateway's judgement only once it was decided.
    assert (
        kinds.index(("decide", "select 1 as first_one"))
        < held_at
        < kinds.index(("decide", "select 3 as third_one"))
    )


def test_prepared_statement_is_held_at_bind_with_its_values(
    standin: Callable[..., StandIn],
) -> None:
    cp = standin()

    async def main() -> tuple[Any, list[Any]]:
        conn = await asyncpg.connect(
            host=cp.host, port=cp.port, user="agent", password=TOKEN, database="ehr", ssl=False
        )
        logged: list[Any] = []
        conn.add_log_listener(lambda _c, m: logged.append((m.sqlstate, m.message)))
        try:
            stmt = await conn.prepare(f"select $1::int + 1 as {HOLD}, $2::text as label")
            # Prepared (Parse/Describe) without approval: nothing ran yet.
            assert cp.payloads("approval") == []
            task = asyncio.create_task(stmt.fetchrow(41, "a label"))
            request = await asyncio.to_thread(cp.wait_held)
            cp.answer(request, {"action": "run"})
            row = await asyncio.wait_for(task, WAIT)
            return tuple(row), logged
        finally:
            await conn.close(timeout=5)

    row, logged = asyncio.run(main())
    assert row == (42, "a label")
    assert [s for s, _ in logged] == ["01A01"]
    p = cp.payloads("approval")[0]
    assert p["protocol"] == "extended" and p["statement_name"].startswith("__asyncpg_stmt")
    assert p["sql"] == f"select $1::int + 1 as {HOLD}, $2::text as label"
    # asyncpg binds in binary: int4 41 and the text's bytes.
    assert p["parameters"] == [
        {"format": 1, "hex": "00000029"},
        {"format": 1, "hex": b"a label".hex()},
    ]
    assert p["parameter_hashes"] is not None


def test_return_mode_is_asked_for_by_the_connection_and_not_forwarded(
    standin: Callable[..., StandIn],
) -> None:
    def returns(payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "action": "deny",
            "sqlstate": "55000",
            "message": "needs approval: request req-x was sent to approvers; "
            "run the identical statement again once approved",
        }

    cp = standin(on_approval=returns)
    with psycopg.connect(cp.dsn(application_name="my_agent+return"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="request req-x"):
            conn.execute(f"select 5 as {HOLD}")
        assert conn.execute("select current_setting('application_name')").fetchone() == (
            "my_agent",
        )

    async def by_parameter() -> Any:
        conn = await asyncpg.connect(
            host=cp.host,
            port=cp.port,
            user="agent",
            password=TOKEN,
            database="ehr",
            ssl=False,
            server_settings={"phigate.approval_mode": "return"},
        )
        try:
            with pytest.raises(asyncpg.exceptions.ObjectNotInPrerequisiteStateError):
                await conn.fetchval(f"select 6 as {HOLD}")
            return await conn.fetchval("select current_setting('phigate.approval_mode', true)")
        finally:
            await conn.close(timeout=5)

    assert asyncio.run(by_parameter()) is None  # consumed by the gateway, never sent upstream
    assert [p["return_mode"] for p in cp.payloads("approval")] == [True, True]
    with (
        psycopg.connect(cp.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState),
    ):
        conn.execute(f"select 7 as {HOLD}")
    assert cp.payloads("approval")[-1]["return_mode"] is False
    # The gateway's own parameter is not reported as dropped either.
    starts = [e for e in cp.events() if e.get("event") == "session_start"]
    assert len(starts) == 3 and all(e["dropped_parameters"] == [] for e in starts)


def test_a_shutdown_answer_ends_the_held_session(standin: Callable[..., StandIn]) -> None:
    cp = standin()
    with psycopg.connect(cp.dsn(), autocommit=True) as conn, cp.background() as pool:
        held = pool.submit(lambda: conn.execute(f"select 8 as {HOLD}"))
        cp.answer(
            cp.wait_held(),
            {"action": "deny", "sqlstate": "57P01", "message": "the gateway is shutting down"},
        )
        with pytest.raises(psycopg.errors.AdminShutdown):
            held.result(WAIT)
        assert conn.closed or conn.pgconn.status != psycopg.pq.ConnStatus.OK


def test_a_session_that_ends_while_held_withdraws(standin: Callable[..., StandIn]) -> None:
    cp = standin()
    c = RawConn(cp.host, cp.port)
    assert c.login(TOKEN)[-1].tag == "Z"
    c.send(query(f"select 9 as {HOLD}"))
    request = cp.wait_held()
    # The engine stops: the session is closed and its held request withdrawn.
    cp.engine.shutdown(0.1)
    assert cp.wait_withdrawn() == {
        "session": cp.payloads("approval")[0]["session"],
        "request": request,
        "reason": "session_end",
    }
    msgs = c.read_until("Z")
    assert msgs[0].sqlstate == "01A01" and msgs[-1].sqlstate == "57P01"
    c.close()


def test_the_data_plane_gives_up_on_its_own_when_nobody_answers(
    standin: Callable[..., StandIn],
) -> None:
    """The control plane answers its own timeouts; should it not, the data plane fails the
    statement closed 10 s after the request's timeout and withdraws it."""

    def short(payload: dict[str, Any]) -> dict[str, Any]:
        return {**cp.hold(payload), "timeout_ms": 0}

    cp = standin(on_approval=short)
    with psycopg.connect(cp.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.QueryCanceled, match=r"approval request req-1 timed out"):
            conn.execute(f"select 11 as {HOLD}")
        assert cp.wait_withdrawn()["reason"] == "timeout"
        assert conn.execute("select 12").fetchone() == (12,)
