"""The approval service: answers the data plane's `approval`, `await_approval`, `withdraw` and
`max_rows_exceeded` requests, takes approvers' votes, pushes each decision to the statement
held for it, and records every step in the audit trail (hashes only, never values)."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from phigate.approvals.estimate import EstimateError, Estimator
from phigate.approvals.model import (
    ApprovalError,
    ApprovalRequest,
    Grant,
    Scope,
    Status,
    Vote,
    values_hash,
)
from phigate.approvals.rules import Approver, applicable, approver_for, check_voter, decided
from phigate.approvals.store import ApprovalStore, Judgement
from phigate.approvals.views import request_view
from phigate.audit.hashing import keyed_hash
from phigate.config import Config, parse_identity_class
from phigate.config.durations import format_duration
from phigate.errors import PhigateError

__all__ = ["ApprovalError", "ApprovalService", "Approver", "Scope", "instance_name", "make_store"]

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL = 5.0  # expire return-mode requests nobody decided
RESYNC_INTERVAL = 60.0  # re-read held requests (a missed notification cannot strand one)
PURGE_INTERVAL = 3600.0
LIST_LIMIT = 500
_SUBSCRIBER_BACKLOG = 1000
_MAX_EXECUTIONS = 10_000
_MAX_VALID_FOR = 30 * 86400.0
_MAX_REASON = 2000
_UNCLAIMED_S = 60.0  # an answer nobody awaited is dropped after this long


class RequestLike(Protocol):
    """A data-plane request (phigate._native.Request, or a test's fake)."""

    @property
    def payload(self) -> dict[str, Any]: ...
    def reply(self, answer: dict[str, Any]) -> bool: ...


Decide = Callable[[str, str], dict[str, Any]]
WriteEvent = Callable[[dict[str, Any]], None]


def instance_name(config: Config) -> str:
    """This gateway's name in the shared store: `[approvals] instance`, else the audit trail's
    origin (unique per gateway), else the host name. Stable across restarts."""
    a = config.approvals
    if a is not None and a.instance:
        return a.instance
    if config.audit is not None:
        return config.audit.origin
    return socket.gethostname()


def make_store(config: Config) -> ApprovalStore:
    a = config.approvals
    if a is None:
        raise ValueError("no [approvals] section")
    if a.store_kind == "postgresql":
        from phigate.approvals.store_postgres import PostgresStore

        assert a.store_url is not None
        return PostgresStore(a.store_url.reveal(), a.store_where)
    from phigate.approvals.store_sqlite import SqliteStore

    assert a.store_path is not None
    return SqliteStore(a.store_path)


def _deny(sqlstate: str, message: str, hint: str | None = None) -> dict[str, Any]:
    return {"action": "deny", "sqlstate": sqlstate, "message": message, "hint": hint}


@dataclass
class _Held:
    """A statement held on this gateway: the future its await_approval answer comes from."""

    request: ApprovalRequest
    future: asyncio.Future[dict[str, Any]]
    timer: asyncio.TimerHandle | None = None
    settling: bool = False


@dataclass(eq=False)  # kept in a set, by identity
class _Subscription:
    """One listener of service.subscribe(); registered at once, so nothing is missed between
    subscribing and the first read."""

    service: ApprovalService
    queue: asyncio.Queue[dict[str, Any] | None] = field(
        default_factory=lambda: asyncio.Queue(_SUBSCRIBER_BACKLOG)
    )

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        item = await self.queue.get()
        if item is None:
            self.service._subscribers.discard(self)
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        self.service._subscribers.discard(self)


class ApprovalService:
    """Just-in-time approvals of one gateway. Every data-plane request gets exactly one
    reply, fail closed (a bug or a store outage refuses the statement, never runs it)."""

    def __init__(
        self,
        config: Config,
        store: ApprovalStore,
        *,
        write_event: WriteEvent,
        decide: Decide,
        instance: str | None = None,
        hash_key: bytes | None = None,
        estimator: Estimator | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if config.approvals is None:
            raise ValueError("ApprovalService needs an [approvals] section")
        self.config = config  # a reload replaces it (rules, limits, timeouts)
        self.store = store
        self.instance = instance or instance_name(config)
        self._write_event = write_event
        self._decide = decide
        # Keys the hashes of reasons (and of texts whose literals the lexer could not split).
        if hash_key is None:
            audit = config.audit
            hash_key = audit.hmac_key.reveal() if audit is not None else os.urandom(32)
        self._hash_key = hash_key
        self._estimator = estimator or Estimator(
            timeout=min(5.0, max(0.5, config.server.decision_timeout / 2))
        )
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscribers: set[_Subscription] = set()
        self._published: OrderedDict[tuple[str, str, str, int], None] = OrderedDict()
        self._closed = False
        self._started = False

    # --- life cycle ---------------------------------------------------------------------

    @property
    def settings(self) -> Any:
        assert self.config.approvals is not None
        return self.config.approvals

    async def start(self) -> None:
        """Open the store; statements this gateway held before it stopped are failed (their
        sessions ended with it) and recorded; approvals not yet used stay valid."""
        await self.store.open()
        self.store.on_change(self._on_store_change)
        now = self._clock()
        for request_id in await self.store.fail_held(self.instance, now, "gateway restarted"):
            self._record_outcome(request_id, "failed", None, "gateway restarted")
        await self._purge()
        self._started = True
        self._spawn(self._maintenance())

    async def close(self) -> None:
        """Answer every held statement 57P01 (the gateway is stopping), record it, close."""
        if self._closed:
            return
        self._closed = True
        held, self._held = list(self._held.values()), {}
        for h in held:
            if h.timer is not None:
                h.timer.cancel()
            if not h.future.done():
                h.future.set_result(self._shutdown_answer(h.request.id))
        await asyncio.sleep(0)  # the waiting await_approval handlers send those answers
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        now = self._clock()
        for h in held:
            try:
                if await self.store.finish(h.request.id, "failed", now,
                                           detail="gateway shutting down"):  # fmt: skip
                    self._record_outcome(h.request.id, "failed", None, "gateway shutting down")
            except Exception:  # noqa: BLE001 - the next start fails it (fail_held)
                log.warning("approval store: could not mark request %s failed", h.request.id)
        for sub in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)
        if self._started:
            await self.store.close()

    async def wait_idle(self) -> None:
        """Wait until no data-plane request is being worked on (held ones stay held)."""
        while True:
            busy = [t for t in self._tasks if not getattr(t, "_phigate_long", False)]
            if not busy:
                return
            await asyncio.gather(*busy, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, long: bool = True) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        task._phigate_long = long  # type: ignore[attr-defined]  # wait_idle skips these
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- data plane -----------------------------------------------------------------------

    def on_approval(self, req: RequestLike) -> None:
        self._answer(req, self._approval(req.payload))

    def on_await(self, req: RequestLike) -> None:
        self._answer(req, self._await(req.payload), long=True)

    def on_withdraw(self, req: RequestLike) -> None:
        self._answer(req, self._withdraw(req.payload))

    def on_max_rows(self, req: RequestLike) -> None:
        self._answer(req, self._max_rows(req.payload))

    def _answer(
        self, req: RequestLike, work: Coroutine[Any, Any, dict[str, Any]], *, long: bool = False
    ) -> None:
        async def run() -> None:
            try:
                answer = await work
            except asyncio.CancelledError:
                _send(req, _deny("57P01", "the gateway is shutting down; reconnect and run the "
                                 "statement again"))  # fmt: skip
                raise
            except Exception:  # noqa: BLE001 - fail closed; the type only (values in messages)
                exc = _exc_type()
                log.error("approvals: internal error answering a data-plane request: %s", exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))  # fmt: skip
                answer = _deny("58000", "internal error while asking for approval, see the "
                               "gateway log")  # fmt: skip
            _send(req, answer)

        if self._closed:
            work.close()
            _send(req, _deny("57P01", "the gateway is shutting down; reconnect and run the "
                             "statement again"))  # fmt: skip
            return
        self._spawn(run(), long=long)

    async def _approval(self, p: dict[str, Any]) -> dict[str, Any]:
        approval = p.get("approval") if isinstance(p.get("approval"), dict) else {}
        assert isinstance(approval, dict)
        rule = str(approval.get("rule") or "")
        subject, session = str(p.get("subject") or ""), str(p.get("session") or "")
        sql, identity_class = p.get("sql"), p.get("identity_class")
        if not rule or not subject or not session or not isinstance(sql, str) \
                or not isinstance(identity_class, str):  # fmt: skip
            return _deny("58000", "malformed approval request from the data plane")
        parsed = parse_identity_class(identity_class)
        roles = parsed[0] if parsed else ()
        target = p.get("target") if isinstance(p.get("target"), str) else (parsed or ((), None))[1]
        decision = self._decide(identity_class, sql)
        normalized = decision.get("normalized")
        if not isinstance(normalized, str) or not normalized:
            return _deny("42501", "this statement needs approval but the gateway cannot bind an "
                         "approval to it (it could not normalize the text)",
                         "Send the statement in a form PostgreSQL parses on its own.")  # fmt: skip
        vhash = self._values_hash(p, sql)
        now = self._clock()
        grant = await self.store.take_grant(subject, target or "", session, normalized, vhash,
                                            rule, now)  # fmt: skip
        if grant is not None:
            self._record_used(grant, session, p.get("stmt"))
            return {"action": "run", "max_rows": None} if rule == "max_rows" else {"action": "run"}
        if rule == "max_rows":
            return {"action": "run"}  # no approval to exceed the cap: the cap applies again
        estimate = None
        if rule == "row_estimate":
            estimate = await self._estimate(p, decision, roles, target)
            over = approval.get("row_estimate_over")
            if estimate is not None and isinstance(over, int) and estimate <= over:
                return {"action": "run"}
        role = approval.get("role") if isinstance(approval.get("role"), str) else None
        probe = _Probe(role=role, roles=tuple(roles), rule=rule, target=target)
        if not applicable(self.config.approvers, probe):
            return _deny(
                "42501",
                f"this statement needs approval (rule: {rule} of role {role or '-'}) but no "
                "approver may approve it, so it is refused",
                f"Ask the gateway administrator to add an [approvers.<name>] rule whose roles, "
                f"rules and targets cover role {role or '-'}, rule {rule} on target "
                f"{target or '-'}.",
            )
        return_mode = bool(p.get("return_mode")) or approval.get("mode") == "return"
        if return_mode:
            existing = await self.store.find_pending(subject, session, normalized, vhash, rule,
                                                     now)  # fmt: skip
            if existing is not None:
                return self._return_answer(existing.id)
        timeout_ms = approval.get("timeout_ms")
        timeout = timeout_ms / 1000 if isinstance(timeout_ms, int) and timeout_ms > 0 \
            else self.settings.timeout  # fmt: skip
        request = ApprovalRequest(
            id=str(uuid.uuid4()), created_at=now, expires_at=now + timeout,
            instance=self.instance, session=session, stmt=_int(p.get("stmt")), subject=subject,
            groups=tuple(str(g) for g in p.get("groups") or ()), roles=tuple(roles), role=role,
            target=target, rule=rule, reason=str(approval.get("reason") or rule),
            mode="return" if return_mode else "hold", normalized=normalized, sql=sql,
            parameters=p.get("parameters"), literal_hashes=p.get("literal_hashes"),
            parameter_hashes=p.get("parameter_hashes"), values_hash=vhash, estimate=estimate,
            masked_columns=_masked_columns(decision), earlier=_earlier(p.get("earlier")),
        )  # fmt: skip
        held: _Held | None = None
        if not return_mode:
            # Registered before the store has it: a vote cannot come before its future exists.
            held = _Held(request, asyncio.get_running_loop().create_future())
            self._held[request.id] = held
        try:
            created = await self.store.create(request, self.settings.max_pending_per_identity, now)
        except BaseException:
            self._held.pop(request.id, None)
            raise
        if not created:
            self._held.pop(request.id, None)
            n = self.settings.max_pending_per_identity
            return _deny("53400", f"too many approval requests pending for this identity "
                         f"(limit {n}); wait for approvers to decide them",
                         "Ask an approver to decide the pending requests, or wait until they "
                         "time out.")  # fmt: skip
        self._record_request(request, timeout)
        self._publish("request", request)
        if held is None:
            return self._return_answer(request.id)
        loop = asyncio.get_running_loop()
        held.timer = loop.call_later(timeout, lambda: self._spawn(self._timeout(request.id)))
        return {
            "action": "hold",
            "request": request.id,
            "notice": self._notice(request, timeout),
            "timeout_ms": round(timeout * 1000),
        }

    def _values_hash(self, p: dict[str, Any], sql: str) -> str:
        literals = p.get("literal_hashes")
        fallback = keyed_hash(self._hash_key, sql) if literals is None else None
        return values_hash(literals, p.get("parameter_hashes"), fallback)

    async def _estimate(
        self, p: dict[str, Any], decision: dict[str, Any], roles: Sequence[str],
        target: str | None,
    ) -> int | None:
        """The planner's row estimate, or None (then the statement is held: fail closed)."""
        if target is None:
            return None
        try:
            roleset = self.config.roleset(roles, target)
            db_role = roleset.db_role if roleset is not None else None
            text = decision.get("rewrite") or p["sql"]
            return await self._estimator.estimate(
                self.config, target, db_role, text, p.get("parameters")
            )
        except (EstimateError, PhigateError, TimeoutError) as exc:
            log.warning("approvals: no row estimate for a statement on target %s (%s); "
                        "holding it for approval", target, exc)  # fmt: skip
            return None

    def _notice(self, r: ApprovalRequest, timeout: float) -> str:
        where = f" or at {self.settings.public_url}" if self.settings.public_url else ""
        return (
            f"statement held for approval: request {r.id} ({r.reason}); waiting up to "
            f"{format_duration(timeout)}; approvers: phigate approvals approve {r.id}{where}"
        )

    def _return_answer(self, request_id: str) -> dict[str, Any]:
        where = f" or at {self.settings.public_url}" if self.settings.public_url else ""
        return _deny(
            "55000",
            f"needs approval: request {request_id} was sent to approvers; run the identical "
            "statement again once approved",
            f"An approver decides with `phigate approvals approve {request_id}`{where}; "
            f"`phigate approvals show {request_id}` shows its state. The approval is for this "
            "exact statement with these values.",
        )

    async def _await(self, p: dict[str, Any]) -> dict[str, Any]:
        request_id = str(p.get("request") or "")
        held = self._held.get(request_id)
        if held is None or held.request.session != p.get("session"):
            return _deny("57014", f"approval request {request_id} is not held on this gateway; "
                         "run the statement again")  # fmt: skip
        answer = await asyncio.shield(held.future)
        self._held.pop(request_id, None)
        return answer

    async def _withdraw(self, p: dict[str, Any]) -> dict[str, Any]:
        request_id = str(p.get("request") or "")
        reason = str(p.get("reason") or "cancel")
        if reason not in ("cancel", "disconnect", "session_end", "timeout", "token_expired"):
            reason = "cancel"
        held = self._held.get(request_id)
        if held is None or held.request.session != p.get("session"):
            return {"ok": False}
        now = self._clock()
        status: Status = "timed_out" if reason == "timeout" else "withdrawn"
        if await self.store.finish(request_id, status, now, detail=reason):
            self._record_outcome(request_id, status, None, reason)
            if (r := await self.store.get(request_id)) is not None:
                self._publish("outcome", r)
        await self._settle(request_id)
        return {"ok": True}

    async def _max_rows(self, p: dict[str, Any]) -> dict[str, Any]:
        """A result cut by max_rows: a return-mode request approvers may approve, so the
        identical statement runs uncapped once."""
        request_id, subject = str(p.get("request") or ""), str(p.get("subject") or "")
        sql, identity_class = p.get("sql"), p.get("identity_class")
        try:
            uuid.UUID(request_id)
        except ValueError:
            return {"ok": False}
        if not isinstance(sql, str) or not isinstance(identity_class, str) or not subject:
            return {"ok": False}
        parsed = parse_identity_class(identity_class)
        roles = parsed[0] if parsed else ()
        target = p.get("target") if isinstance(p.get("target"), str) else (parsed or ((), None))[1]
        approval = p.get("approval") if isinstance(p.get("approval"), dict) else {}
        assert isinstance(approval, dict)
        role = approval.get("role") if isinstance(approval.get("role"), str) else None
        if not applicable(self.config.approvers, _Probe(role, tuple(roles), "max_rows", target)):
            log.info("approvals: result cut by max_rows; no [approvers] rule covers rule "
                     "max_rows for these roles, so no request %s was made", request_id)
            return {"ok": False}
        normalized = self._decide(identity_class, sql).get("normalized")
        if not isinstance(normalized, str) or not normalized:
            return {"ok": False}
        now = self._clock()
        rows = _int(p.get("rows_sent"))
        request = ApprovalRequest(
            id=request_id, created_at=now, expires_at=now + self.settings.timeout,
            instance=self.instance, session=str(p.get("session") or ""),
            stmt=_int(p.get("stmt")), subject=subject,
            groups=tuple(str(g) for g in p.get("groups") or ()), roles=tuple(roles), role=role,
            target=target, rule="max_rows",
            reason=f"result cut after {rows} rows by the role limit max_rows",
            mode="return", normalized=normalized, sql=sql, parameters=p.get("parameters"),
            literal_hashes=p.get("literal_hashes"), parameter_hashes=p.get("parameter_hashes"),
            values_hash=self._values_hash(p, sql), estimate=None, masked_columns={},
            earlier=_earlier(p.get("earlier")),
        )  # fmt: skip
        if not await self.store.create(request, self.settings.max_pending_per_identity, now):
            log.info("approvals: max_rows request %s not made: its identity has too many "
                     "pending requests", request_id)  # fmt: skip
            return {"ok": False}
        self._record_request(request, self.settings.timeout, rows_sent=rows)
        self._publish("request", request)
        return {"ok": True}

    async def _timeout(self, request_id: str) -> None:
        now = self._clock()
        held = self._held.get(request_id)
        detail = "nobody decided"
        if held is not None:
            waited = held.request.expires_at - held.request.created_at
            detail += f" within {format_duration(waited)}"
        if await self.store.finish(request_id, "timed_out", now, detail=detail):
            self._record_outcome(request_id, "timed_out", None, detail)
            if (r := await self.store.get(request_id)) is not None:
                self._publish("outcome", r)
        await self._settle(request_id)

    async def _settle(self, request_id: str, known: ApprovalRequest | None = None) -> None:
        """Answer the statement held for ``request_id`` if it was decided."""
        held = self._held.get(request_id)
        if held is None or held.future.done() or held.settling:
            return
        held.settling = True
        try:
            r = known if known is not None else await self.store.get(request_id)
            if r is None or r.status == "pending":
                return
            answer = await self._outcome_answer(r)
            if held.timer is not None:
                held.timer.cancel()
            if not held.future.done():
                held.future.set_result(answer)
            # Kept until its await_approval takes the answer; dropped if that never comes.
            asyncio.get_running_loop().call_later(
                _UNCLAIMED_S, lambda: self._held.pop(request_id, None) if self._held.get(
                    request_id) is held else None)  # fmt: skip
        finally:
            held.settling = False

    async def _outcome_answer(self, r: ApprovalRequest) -> dict[str, Any]:
        if r.status in ("approved", "used"):
            # The held execution was reserved when the grant was made (uses_left excludes it).
            grant = await self.store.grant_of(r.id)
            if grant is not None and grant.uses_left == 0:
                await self.store.finish(
                    r.id, "used", self._clock(), by=r.outcome_by, detail=r.outcome_detail,
                    only_from=("approved",),
                )
            self._record_used_held(r, grant)
            return {"action": "run"}
        if r.status == "denied":
            deny = next((v for v in reversed(r.votes) if v.verdict == "deny"), None)
            why = deny.reason if deny is not None and deny.reason else "no reason given"
            return _deny("42501", f"approval request {r.id} was denied by {r.outcome_by}: {why}")
        if r.status == "timed_out":
            waited = format_duration(round(r.expires_at - r.created_at))
            return _deny("57014", f"approval request {r.id} timed out after {waited}; nobody "
                         "decided")  # fmt: skip
        if r.status == "withdrawn":
            return {**_deny("57014", "canceling statement due to user request"),
                    "detail": f"approval request {r.id} was withdrawn"}  # fmt: skip
        return self._shutdown_answer(r.id)

    @staticmethod
    def _shutdown_answer(request_id: str) -> dict[str, Any]:
        return _deny("57P01", f"terminating connection: the gateway is shutting down and "
                     f"approval request {request_id} was not decided",
                     "Reconnect and run the statement again.")  # fmt: skip

    # --- approvers ------------------------------------------------------------------------

    def approver_for(self, subject: str, groups: Sequence[str]) -> Approver | None:
        return approver_for(self.config.approvers, subject, groups)

    def view(self, request: ApprovalRequest) -> dict[str, Any]:
        return request_view(request, self.config.approvers)

    def _may_see(self, approver: Approver, r: ApprovalRequest) -> bool:
        mine = set(approver.groups)
        return any(rule.groups & mine for rule in applicable(self.config.approvers, r))

    async def list(
        self, approver: Approver, status: str | None = "pending", limit: int = LIST_LIMIT
    ) -> builtins.list[dict[str, Any]]:
        """Requests this approver may decide (the newest ``limit``); ``status`` None: all."""
        requests = await self.store.list_requests(status, limit)
        return [self.view(r) for r in requests if self._may_see(approver, r)]

    async def show(self, approver: Approver, request_id: str) -> dict[str, Any]:
        r = await self.store.get(request_id)
        if r is None:
            raise ApprovalError(404, f"no approval request {request_id}")
        if not self._may_see(approver, r):
            raise ApprovalError(403, f"none of your approver groups may see request "
                                f"{request_id}")  # fmt: skip
        return self.view(r)

    async def vote(
        self,
        approver: Approver,
        request_id: str,
        verdict: Literal["approve", "deny"],
        reason: str | None,
        scope: Scope,
    ) -> dict[str, Any]:
        """Record a vote; when it decides the request, the held statement is answered at once
        (here, or through the store's notification on the gateway holding it)."""
        if verdict not in ("approve", "deny"):
            raise ApprovalError(400, 'verdict must be "approve" or "deny"')
        _check_scope(scope)
        if reason is not None and len(reason) > _MAX_REASON:
            raise ApprovalError(400, f"reason is longer than {_MAX_REASON} characters")
        now = self._clock()
        vote = Vote(request=request_id, approver=approver.subject,
                    approver_groups=tuple(approver.groups), verdict=verdict, reason=reason or None,
                    scope=scope if verdict == "approve" else Scope(), at=now)  # fmt: skip

        def judge(r: ApprovalRequest, v: Vote) -> Judgement:
            return self._judge(approver, r, v, now)

        r = await self.store.vote(request_id, vote, judge)
        self._write_event({
            "event": "approval_vote", "request": request_id, "approver": approver.subject,
            "approver_groups": list(approver.groups), "verdict": verdict,
            "reason_hash": keyed_hash(self._hash_key, reason) if reason else None,
            "scope": vote.scope.to_json() if verdict == "approve" else None,
        })  # fmt: skip
        self._publish("vote", r)
        if r.status != "pending":
            self._record_outcome(r.id, r.status, r.outcome_by, r.outcome_detail)
            self._publish("outcome", r)
            await self._settle(r.id, known=r)
        return self.view(r)

    def _judge(self, approver: Approver, r: ApprovalRequest, v: Vote, now: float) -> Judgement:
        if r.status != "pending":
            raise ApprovalError(409, f"request {r.id} is already {r.status.replace('_', ' ')}")
        if r.expires_at <= now:
            raise ApprovalError(409, f"request {r.id} has expired; the agent must run the "
                                "statement again")  # fmt: skip
        check_voter(self.config.approvers, approver, r)
        if any(x.approver == approver.subject for x in r.votes):
            raise ApprovalError(409, f"you already voted on request {r.id}")
        after = dataclasses.replace(r, votes=(*r.votes, v))
        outcome = decided(self.config.approvers, after)
        if outcome is None:
            return Judgement(None)
        status, by = outcome
        if status == "denied":
            return Judgement("denied", by=by)
        scope = Scope(session="any", shape_only=True, executions=None, valid_for_s=None)
        for x in after.votes:
            if x.verdict == "approve":
                scope = scope.narrowest(x.scope)
        return Judgement("approved", by=approver.subject, detail=f"rule {by}",
                         grant=self._grant(r, scope, now))  # fmt: skip

    def _grant(self, r: ApprovalRequest, scope: Scope, now: float) -> Grant:
        uses = scope.executions
        if uses is not None and r.mode == "hold":
            uses -= 1  # the held execution runs now
        return Grant(
            id=str(uuid.uuid4()), request=r.id, subject=r.subject, target=r.target or "",
            session=None if scope.session == "any" else r.session, normalized=r.normalized,
            values_hash=None if scope.shape_only else r.values_hash, rule=r.rule,
            uses_left=uses, expires_at=now + (scope.valid_for_s or self.settings.grant_valid_for),
            created_at=now,
        )  # fmt: skip

    def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        """New requests, votes and outcomes (from every gateway sharing the store) as
        ``{"event": "request"|"vote"|"outcome", "request": <view>}``. A listener that falls
        more than 1000 events behind is dropped (its iteration ends)."""
        sub = _Subscription(self)
        self._subscribers.add(sub)
        return sub

    def _publish(self, event: str, r: ApprovalRequest) -> None:
        key = (r.id, event, r.status, len(r.votes))
        if key in self._published:
            return  # this gateway's own change, coming back by notification
        self._published[key] = None
        while len(self._published) > 10_000:
            self._published.popitem(last=False)
        if not self._subscribers:
            return
        item = {"event": event, "request": self.view(r)}
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(item)
            except asyncio.QueueFull:
                log.warning("approvals: an event listener fell behind; dropping it")
                self._subscribers.discard(sub)
                with contextlib.suppress(asyncio.QueueEmpty):
                    sub.queue.get_nowait()
                sub.queue.put_nowait(None)

    # --- another gateway's changes, upkeep --------------------------------------------------

    def _on_store_change(self, request_id: str) -> None:
        if self._closed:
            return
        if not request_id:
            self._spawn(self._resync())
            return
        if request_id in self._held or self._subscribers:
            self._spawn(self._changed(request_id))

    async def _changed(self, request_id: str) -> None:
        r = await self.store.get(request_id)
        if r is None:
            return
        event = "request" if r.status == "pending" and not r.votes else \
            "vote" if r.status == "pending" else "outcome"  # fmt: skip
        self._publish(event, r)
        if request_id in self._held:
            await self._settle(request_id, known=r)

    async def _resync(self) -> None:
        for request_id in list(self._held):
            await self._settle(request_id)

    async def _maintenance(self) -> None:
        last_resync = last_purge = time.monotonic()
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            try:
                now = self._clock()
                for request_id in await self.store.expire(now):
                    self._record_outcome(request_id, "timed_out", None, "nobody decided")
                    await self._settle(request_id)
                if time.monotonic() - last_resync >= RESYNC_INTERVAL:
                    last_resync = time.monotonic()
                    await self._resync()
                if time.monotonic() - last_purge >= PURGE_INTERVAL:
                    last_purge = time.monotonic()
                    await self._purge()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - retried next round; the store may be down
                log.warning("approvals: upkeep of the store %s failed (%s); retrying",
                            self.store.where, _exc_type())  # fmt: skip

    async def _purge(self) -> None:
        now = self._clock()
        cleared = await self.store.purge(now - self.settings.keep_decided, now)
        if cleared:
            kept = format_duration(self.settings.keep_decided)
            log.info("approvals: cleared the statement text and values of %d requests decided "
                     "more than %s ago", cleared, kept)  # fmt: skip

    # --- audit records ----------------------------------------------------------------------

    def _record_request(self, r: ApprovalRequest, timeout: float, **extra: Any) -> None:
        self._write_event({
            "event": "approval_request", "request": r.id, "session": r.session, "stmt": r.stmt,
            "subject": r.subject, "role": r.role, "roles": list(r.roles), "target": r.target,
            "rule": r.rule, "mode": r.mode, "normalized": r.normalized,
            "literals": r.literal_hashes, "parameters": r.parameter_hashes,
            "estimate": r.estimate, "timeout_s": round(timeout), "instance": self.instance,
            **extra,
        })  # fmt: skip

    def _record_outcome(self, request_id: str, outcome: str, by: str | None,
                        detail: str | None) -> None:  # fmt: skip
        event: dict[str, Any] = {"event": "approval_outcome", "request": request_id,
                                 "outcome": outcome, "detail": detail, "instance": self.instance}
        if by is not None:
            event["by"] = by
        self._write_event(event)

    def _record_used(self, grant: Grant, session: str, stmt: Any) -> None:
        self._write_event({"event": "approval_used", "request": grant.request,
                           "grant": grant.id, "session": session, "stmt": _int(stmt)})  # fmt: skip

    def _record_used_held(self, r: ApprovalRequest, grant: Grant | None) -> None:
        self._write_event({"event": "approval_used", "request": r.id,
                           "grant": grant.id if grant is not None else None,
                           "session": r.session, "stmt": r.stmt})  # fmt: skip


@dataclass(frozen=True)
class _Probe:
    """What approver rules are matched on, before a request exists."""

    role: str | None
    roles: tuple[str, ...]
    rule: str
    target: str | None


def _check_scope(scope: Scope) -> None:
    if scope.session not in ("this", "any"):
        raise ApprovalError(400, 'scope.session must be "this" or "any"')
    if scope.executions is not None and (
        isinstance(scope.executions, bool) or not isinstance(scope.executions, int)
        or not 1 <= scope.executions <= _MAX_EXECUTIONS
    ):  # fmt: skip
        raise ApprovalError(400, f"scope.executions must be between 1 and {_MAX_EXECUTIONS}, "
                            "or null for any number within the window")  # fmt: skip
    if scope.valid_for_s is not None and not 0 < scope.valid_for_s <= _MAX_VALID_FOR:
        raise ApprovalError(400, "scope.valid_for must be more than 0 and at most 30 days")


def _masked_columns(decision: dict[str, Any]) -> dict[str, str]:
    audit = decision.get("audit")
    masking = audit.get("masking") if isinstance(audit, dict) else None
    columns = masking.get("columns") if isinstance(masking, dict) else None
    return {str(k): str(v) for k, v in columns.items()} if isinstance(columns, dict) else {}


def _earlier(value: Any) -> list[str] | None:
    if not isinstance(value, list):
        return None
    return [s[:4096] for s in value[-10:] if isinstance(s, str)]


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _exc_type() -> str:
    import sys

    exc = sys.exc_info()[1]
    return type(exc).__name__ if exc is not None else "?"


def _send(req: RequestLike, answer: dict[str, Any]) -> None:
    try:
        req.reply(answer)
    except Exception:  # noqa: BLE001 - the data plane may have given up on it
        log.warning("approvals: the data plane did not take an answer (%s)", _exc_type())
