"""The approval service on a SQLite store, with fake data-plane requests: hold, approve,
deny, timeout, withdraw, return mode, binding of an approval to the exact execution, limits,
restarts and the audit records (hashes only)."""
# ruff: noqa: S608  # statements sent to a fake data plane, never to a database

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from approvals_support import (
    AGENT,
    OTHER_SESSION,
    SESSION,
    FakeRequest,
    Records,
    ask,
    hold,
    make_config,
    make_service,
    payload,
)
from phigate.approvals import ApprovalError, ApprovalService, Scope
from phigate.approvals.store_sqlite import SqliteStore
from phigate.config import Config

ONCALL = ("dba-oncall",)


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def run(tmp_path: Path, body: Callable[[ApprovalService, Records, Config, Clock],
        Awaitable[None]], **config: Any) -> Records:  # fmt: skip
    cfg = make_config(tmp_path, **config)
    records = Records()
    clock = Clock()

    async def main() -> None:
        service = make_service(cfg, SqliteStore(tmp_path / "approvals.db"), records, clock=clock)
        await service.start()
        try:
            await body(service, records, cfg, clock)
        finally:
            await service.close()

    asyncio.run(main())
    return records


def approver(service: ApprovalService, subject: str = "alice") -> Any:
    a = service.approver_for(subject, ONCALL)
    assert a is not None
    return a


def test_held_statement_runs_once_approved_and_the_trail_has_only_hashes(tmp_path: Path) -> None:
    async def body(service: ApprovalService, records: Records, *_: Any) -> None:
        request_id, waiting = await hold(service, payload("DELETE FROM notes WHERE id = 918273645"))
        assert not waiting.answered.is_set()
        view = await service.show(approver(service), request_id)
        assert view["sql"] == "DELETE FROM notes WHERE id = 918273645"  # approvers see values
        assert view["needed"][0]["missing"] == 1
        after = await service.vote(approver(service), request_id, "approve", "ok, ticket 99",
                                   Scope())  # fmt: skip
        assert after["status"] in ("approved", "used")
        assert await waiting.answer() == {"action": "run"}
        assert (await service.show(approver(service), request_id))["status"] == "used"

    records = run(tmp_path, body)
    assert [r["event"] for r in records] == [
        "approval_request", "approval_vote", "approval_outcome", "approval_used",
    ]  # fmt: skip
    assert records.of("approval_vote")[0]["approver"] == "alice"
    assert records.of("approval_outcome")[0]["outcome"] == "approved"
    text = json.dumps(records)
    assert "918273645" not in text and "ticket 99" not in text
    assert records.of("approval_request")[0]["normalized"] == "DELETE FROM notes WHERE id = $1"


def test_deny_answers_42501_with_approver_and_reason(tmp_path: Path) -> None:
    async def body(service: ApprovalService, *_: Any) -> None:
        request_id, waiting = await hold(service, payload("DELETE FROM notes WHERE id = 1"))
        await service.vote(approver(service), request_id, "deny", "not during business hours",
                           Scope())  # fmt: skip
        answer = await waiting.answer()
        assert answer["action"] == "deny" and answer["sqlstate"] == "42501"
        assert answer["message"] == (f"approval request {request_id} was denied by alice: "
                                     "not during business hours")  # fmt: skip

    run(tmp_path, body)


def test_timeout_answers_57014_and_is_recorded(tmp_path: Path) -> None:
    async def body(service: ApprovalService, *_: Any) -> None:
        request_id, waiting = await hold(
            service, payload("DELETE FROM notes WHERE id = 1", timeout_ms=200))
        answer = await waiting.answer()
        assert answer["sqlstate"] == "57014" and "timed out" in answer["message"]
        assert (await service.show(approver(service), request_id))["status"] == "timed_out"
        with pytest.raises(ApprovalError) as exc:
            await service.vote(approver(service), request_id, "approve", None, Scope())
        assert exc.value.http_status == 409

    records = run(tmp_path, body)
    assert records.of("approval_outcome")[0]["outcome"] == "timed_out"


def test_cancel_withdraws_the_request(tmp_path: Path) -> None:
    async def body(service: ApprovalService, *_: Any) -> None:
        request_id, waiting = await hold(service, payload("DELETE FROM notes WHERE id = 1"))
        withdraw = FakeRequest("withdraw", {"session": SESSION, "request": request_id,
                                            "reason": "cancel"})  # fmt: skip
        service.on_withdraw(withdraw)
        assert (await withdraw.answer())["ok"] is True
        assert (await waiting.answer())["sqlstate"] == "57014"
        assert (await service.show(approver(service), request_id))["status"] == "withdrawn"

    records = run(tmp_path, body)
    outcome = records.of("approval_outcome")[0]
    assert (outcome["outcome"], outcome["detail"]) == ("withdrawn", "cancel")


def test_return_mode_identical_retry_passes_once(tmp_path: Path) -> None:
    async def body(service: ApprovalService, records: Records, *_: Any) -> None:
        doc = payload("SELECT * FROM notes WHERE id = $1", rule="read", params=["12"],
                      return_mode=True)  # fmt: skip
        first = await ask(service, doc)
        assert first["sqlstate"] == "55000" and "was sent to approvers" in first["message"]
        request_id = first["message"].split()[3]
        # Asking again before anyone decided is the same request, not a new one.
        assert (await ask(service, doc))["message"] == first["message"]
        await service.vote(approver(service), request_id, "approve", None, Scope())
        other_value = payload("SELECT * FROM notes WHERE id = $1", rule="read", params=["13"],
                              return_mode=True)  # fmt: skip
        assert (await ask(service, other_value))["sqlstate"] == "55000"
        assert await ask(service, doc) == {"action": "run"}
        again = await ask(service, doc)  # a single-use approval is used up
        assert again["sqlstate"] == "55000" and request_id not in again["message"]
        assert records.of("approval_used")[0]["request"] == request_id

    run(tmp_path, body)


def test_single_use_hold_approval_holds_the_second_execution(tmp_path: Path) -> None:
    async def body(service: ApprovalService, *_: Any) -> None:
        doc = payload("DELETE FROM notes WHERE id = 1")
        request_id, waiting = await hold(service, doc)
        await service.vote(approver(service), request_id, "approve", None, Scope())
        assert await waiting.answer() == {"action": "run"}
        assert (await ask(service, doc))["action"] == "hold"

    run(tmp_path, body)


def test_widened_approval_any_values_any_session_until_it_expires(tmp_path: Path) -> None:
    async def body(service: ApprovalService, records: Records, cfg: Config, clock: Clock) -> None:
        request_id, waiting = await hold(service, payload("DELETE FROM notes WHERE id = 1"))
        wide = Scope(session="any", shape_only=True, executions=None, valid_for_s=3600)
        await service.vote(approver(service), request_id, "approve", None, wide)
        assert await waiting.answer() == {"action": "run"}
        for n in (2, 3, 4):
            doc = payload(f"DELETE FROM notes WHERE id = {n}", session=OTHER_SESSION)
            assert await ask(service, doc) == {"action": "run"}
        other_shape = payload("DELETE FROM notes WHERE id = 2 OR id = 3")
        assert (await ask(service, other_shape))["action"] == "hold"
        clock.now += 3601
        assert (await ask(service, payload("DELETE FROM notes WHERE id = 5")))["action"] == "hold"
        vote = records.of("approval_vote")[0]
        assert vote["scope"] == {"session": "any", "shape_only": True, "executions": None,
                                 "valid_for_s": 3600}  # fmt: skip

    run(tmp_path, body)


def test_an_approval_binds_its_target(tmp_path: Path) -> None:
    # The same text on another database is another statement: even an approval widened to any
    # session and any values does not run it there.
    async def body(service: ApprovalService, records: Records, cfg: Config, clock: Clock) -> None:
        request_id, waiting = await hold(service, payload("DELETE FROM notes WHERE id = 1"))
        wide = Scope(session="any", shape_only=True, executions=None, valid_for_s=3600)
        await service.vote(approver(service), request_id, "approve", None, wide)
        assert await waiting.answer() == {"action": "run"}
        elsewhere = {**payload("DELETE FROM notes WHERE id = 1"), "target": "ehr_copy"}
        assert (await ask(service, elsewhere))["action"] == "hold"
        assert await ask(service, payload("DELETE FROM notes WHERE id = 1")) == {"action": "run"}

    run(tmp_path, body)


def test_quorum_of_two_and_self_approval_refused(tmp_path: Path) -> None:
    approvers = {"pair": {"groups": ["dba-oncall"], "roles": ["agents"], "quorum": 2}}

    async def body(service: ApprovalService, *_: Any) -> None:
        request_id, waiting = await hold(service, payload("DELETE FROM notes WHERE id = 1"))
        me = service.approver_for(AGENT, ONCALL)
        assert me is not None
        with pytest.raises(ApprovalError) as exc:
            await service.vote(me, request_id, "approve", None, Scope())
        assert exc.value.http_status == 403 and "yourself" in exc.value.message
        view = await service.vote(approver(service, "alice"), request_id, "approve", None,
                                  Scope())  # fmt: skip
        assert view["status"] == "pending" and view["needed"][0]["missing"] == 1
        with pytest.raises(ApprovalError) as exc:
            await service.vote(approver(service, "alice"), request_id, "approve", None, Scope())
        assert exc.value.http_status == 409
        assert not waiting.answered.is_set()
        await service.vote(approver(service, "bob"), request_id, "approve", None, Scope())
        assert await waiting.answer() == {"action": "run"}

    run(tmp_path, body, approvers=approvers)


def test_pending_limit_per_identity_is_53400(tmp_path: Path) -> None:
    async def body(service: ApprovalService, *_: Any) -> None:
        for n in (1, 2):
            await hold(service, payload(f"DELETE FROM notes WHERE id = {n}"))
        third = await ask(service, payload("DELETE FROM notes WHERE id = 3"))
        assert third["sqlstate"] == "53400"

    run(tmp_path, body, max_pending_per_identity=2)


def test_nobody_may_approve_is_refused_at_once(tmp_path: Path) -> None:
    approvers = {"analysts_only": {"groups": ["dba-oncall"], "roles": ["analysts"]}}

    async def body(service: ApprovalService, *_: Any) -> None:
        answer = await ask(service, payload("DELETE FROM notes WHERE id = 1"))
        assert answer["sqlstate"] == "42501" and "[approvers." in answer["hint"]
        assert await service.list(approver(service)) == []

    run(tmp_path, body, approvers=approvers)


def test_approver_of_other_rules_cannot_vote(tmp_path: Path) -> None:
    approvers = {"oncall": {"groups": ["dba-oncall"], "roles": ["agents"], "rules": ["ddl"]},
                 "writes": {"groups": ["leads"], "rules": ["write"]}}  # fmt: skip

    async def body(service: ApprovalService, *_: Any) -> None:
        request_id, waiting = await hold(service, payload("DELETE FROM notes WHERE id = 1"))
        with pytest.raises(ApprovalError) as exc:
            await service.vote(approver(service), request_id, "approve", None, Scope())
        assert exc.value.http_status == 403
        lead = service.approver_for("carol", ["leads"])
        assert lead is not None and lead.rules == ("writes",)
        await service.vote(lead, request_id, "approve", None, Scope())  # "write" covers delete
        assert await waiting.answer() == {"action": "run"}
        assert service.approver_for("mallory", ["agents"]) is None

    run(tmp_path, body, approvers=approvers)


def test_close_answers_held_57P01_and_restart_keeps_unused_approvals(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    records = Records()
    doc = payload("SELECT * FROM notes WHERE id = 8", rule="read", return_mode=True)

    async def main() -> None:
        service = make_service(cfg, SqliteStore(tmp_path / "approvals.db"), records)
        await service.start()
        request_id, waiting = await hold(service, payload("DELETE FROM notes WHERE id = 1"))
        returned = await ask(service, doc)
        await service.vote(approver(service), returned["message"].split()[3], "approve", None,
                           Scope())  # fmt: skip
        await service.close()
        assert (await waiting.answer())["sqlstate"] == "57P01"
        again = make_service(cfg, SqliteStore(tmp_path / "approvals.db"), records)
        await again.start()
        try:
            assert (await again.show(approver(again), request_id))["status"] == "failed"
            assert await ask(again, doc) == {"action": "run"}  # approved before the restart
        finally:
            await again.close()

    asyncio.run(main())
    failed = [r for r in records.of("approval_outcome") if r["outcome"] == "failed"]
    assert [r["detail"] for r in failed] == ["gateway shutting down"]


def test_crashed_gateway_fails_its_held_requests_on_start(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    records = Records()

    async def main() -> None:
        crashed = make_service(cfg, SqliteStore(tmp_path / "approvals.db"), records)
        await crashed.start()
        request_id, _ = await hold(crashed, payload("DELETE FROM notes WHERE id = 1"))
        await crashed.store.close()  # gone without answering anything
        restarted = make_service(cfg, SqliteStore(tmp_path / "approvals.db"), records)
        await restarted.start()
        try:
            assert (await restarted.show(approver(restarted), request_id))["status"] == "failed"
        finally:
            await restarted.close()

    asyncio.run(main())
    outcome = records.of("approval_outcome")[-1]
    assert (outcome["outcome"], outcome["detail"]) == ("failed", "gateway restarted")


def test_max_rows_cut_becomes_a_request_that_lifts_the_cap_once(tmp_path: Path) -> None:
    async def body(service: ApprovalService, records: Records, *_: Any) -> None:
        doc = payload("SELECT * FROM notes", rule="max_rows")
        cut = FakeRequest("max_rows_exceeded",
                          {**doc, "request": "5f0e7a64-1111-4222-8333-944455556666",
                           "rows_sent": 100})  # fmt: skip
        service.on_max_rows(cut)
        assert (await cut.answer())["ok"] is True
        assert await ask(service, doc) == {"action": "run"}  # no approval yet: capped again
        await service.vote(approver(service), "5f0e7a64-1111-4222-8333-944455556666",
                           "approve", None, Scope())  # fmt: skip
        assert await ask(service, doc) == {"action": "run", "max_rows": None}
        assert await ask(service, doc) == {"action": "run"}
        assert records.of("approval_request")[0]["rule"] == "max_rows"

    run(tmp_path, body)


def test_subscribers_see_request_vote_and_outcome(tmp_path: Path) -> None:
    async def body(service: ApprovalService, *_: Any) -> None:
        events = service.subscribe()
        request_id, waiting = await hold(service, payload("DELETE FROM notes WHERE id = 1"))
        await service.vote(approver(service), request_id, "approve", None, Scope())
        await waiting.answer()
        seen = [await asyncio.wait_for(events.__anext__(), 5) for _ in range(3)]
        assert [e["event"] for e in seen] == ["request", "vote", "outcome"]
        assert all(e["request"]["id"] == request_id for e in seen)

    run(tmp_path, body)
