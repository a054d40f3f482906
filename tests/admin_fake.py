"""A small in-memory approvals service for the admin API tests (the interface the real one keeps),
and the admin server running in a thread of its own so tests and subprocesses can call it."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from phigate.admin.protocol import Scope

T = TypeVar("T")


class ApprovalError(Exception):
    def __init__(self, http_status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message


@dataclass(frozen=True)
class FakeApprover:
    subject: str
    groups: tuple[str, ...]


@dataclass
class FakeRequest:
    id: str
    subject: str
    target: str
    sql: str
    parameters: list[Any]
    status: str = "pending"
    votes: list[dict[str, Any]] = field(default_factory=list)
    scopes: list[Scope] = field(default_factory=list)


class FakeApprovals:
    """Approver groups: "dba-oncall" may act on every target; "ehr-only" only on target "ehr"."""

    APPROVER_GROUPS = {"dba-oncall": "*", "ehr-only": "ehr"}

    def __init__(self) -> None:
        self.requests: dict[str, FakeRequest] = {}
        self._subscribers: list[asyncio.Queue[dict[str, Any]]] = []

    def approver_for(self, subject: str, groups: Sequence[str]) -> FakeApprover | None:
        if any(g in self.APPROVER_GROUPS for g in groups):
            return FakeApprover(subject, tuple(groups))
        return None

    def _may(self, approver: FakeApprover, req: FakeRequest) -> bool:
        return any(self.APPROVER_GROUPS.get(g) in ("*", req.target) for g in approver.groups)

    def view(self, req: FakeRequest) -> dict[str, Any]:
        return {
            "id": req.id, "status": req.status, "created_at": 1_800_000_000.0,
            "expires_at": 1_800_000_900.0, "subject": req.subject, "groups": ["agents"],
            "roles": ["agents"], "target": req.target, "rule": "write",
            "reason": 'writes need approval (rule: write of role "agents")', "mode": "hold",
            "normalized": "UPDATE notes SET body = $1 WHERE id = $2", "sql": req.sql,
            "parameters": req.parameters, "estimate": None, "masked_columns": [],
            "earlier": ["SELECT 1"], "votes": list(req.votes),
            "needed": "1 approval" if req.status == "pending" else None,
        }  # fmt: skip

    async def add(self, subject: str = "agent-1", target: str = "ehr",
                  sql: str = "UPDATE notes SET body = 'canary-7731' WHERE id = 42",
                  parameters: list[Any] | None = None) -> dict[str, Any]:  # fmt: skip
        req = FakeRequest(str(uuid.uuid4()), subject, target, sql, parameters or [])
        self.requests[req.id] = req
        self._publish("request", req)
        return self.view(req)

    def _publish(self, event: str, req: FakeRequest) -> None:
        for q in self._subscribers:
            q.put_nowait({"event": event, "request": self.view(req)})

    def _get(self, approver: FakeApprover, request_id: str) -> FakeRequest:
        req = self.requests.get(request_id)
        if req is None:
            raise ApprovalError(404, f"no approval request {request_id}")
        if not self._may(approver, req):
            raise ApprovalError(403, "your approver rules do not cover this request")
        return req

    async def list(self, approver: FakeApprover, status: str = "pending",
                   limit: int = 500) -> list[dict[str, Any]]:  # fmt: skip
        return [self.view(r) for r in self.requests.values()
                if r.status == status and self._may(approver, r)][:limit]  # fmt: skip

    async def show(self, approver: FakeApprover, request_id: str) -> dict[str, Any]:
        return self.view(self._get(approver, request_id))

    async def vote(self, approver: FakeApprover, request_id: str, verdict: str, reason: str,
                   scope: Scope) -> dict[str, Any]:  # fmt: skip
        req = self._get(approver, request_id)
        if approver.subject == req.subject:
            raise ApprovalError(403, "you cannot approve or deny your own request")
        if req.status != "pending":
            raise ApprovalError(409, f"approval request {request_id} is already {req.status}")
        vote = {"approver": approver.subject, "verdict": verdict, "reason": reason}
        req.votes.append(vote)
        req.scopes.append(scope)
        req.status = "approved" if verdict == "approve" else "denied"
        self._publish("vote", req)
        self._publish("outcome", req)
        return {"vote": vote, "request": self.view(req)}

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


class LoopThread:
    """An event loop in a daemon thread; ``call`` runs a coroutine there and returns its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, make: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class RunningAdmin:
    thread: LoopThread
    fake: FakeApprovals
    server: Any  # phigate.admin.AdminServer
    url: str  # https://127.0.0.1:<port>
    socket: Any  # Path of the admin socket
    ca: Any  # Path of the CA that signed the API's certificate

    def add(self, **kw: Any) -> dict[str, Any]:
        return self.thread.call(lambda: self.fake.add(**kw))

    def stop(self) -> None:
        self.thread.call(self.server.stop)
        self.thread.close()


def start_admin(
    socket_dir: Any, dev_issuer: Any, dev_cert: Any, *, local_approvers: dict[str, list[str]],
    webhooks: Sequence[Any] = (), public_url: str | None = None, apikeys_store: Any = None,
) -> RunningAdmin:  # fmt: skip
    """The admin API on 127.0.0.1 (HTTPS, a free port) and a socket in ``socket_dir``, tokens
    verified with the dev issuer's JWKS (and API keys from ``apikeys_store`` when given)."""
    import grp
    import os
    from pathlib import Path

    from phigate.admin import AdminServer, make_verify
    from phigate.config import OidcConfig
    from phigate.config.approvals_admin import AdminSocketConfig, ApiConfig
    from phigate.identity.apikeys import ApiKeyVerifier
    from phigate.identity.oidc import OidcVerifier

    oidc = OidcConfig(issuer=dev_issuer.issuer, audience="phigate", jwks_file=dev_issuer.jwks_path,
                      jwks_url=None, groups_claim="groups", algorithms=("RS256",), leeway=30,
                      jwks_cache_ttl=3600, jwks_min_refresh_interval=30)  # fmt: skip
    thread = LoopThread()
    fake = FakeApprovals()
    group = grp.getgrgid(os.getgid()).gr_name
    sock = AdminSocketConfig(path=Path(socket_dir) / "admin.sock", mode=0o660, group=group,
                             local_approvers={u: tuple(g) for u, g in local_approvers.items()})
    api = ApiConfig(host="127.0.0.1", port=0, cert=Path(dev_cert.cert), key=Path(dev_cert.key))

    async def make() -> Any:
        apikeys = ApiKeyVerifier(apikeys_store) if apikeys_store is not None else None
        server = AdminServer(fake, make_verify(OidcVerifier(oidc), apikeys), api=api,
                             admin_socket=sock, webhooks=webhooks, public_url=public_url)
        await server.start()
        return server

    try:
        server = thread.call(make)
    except BaseException:
        thread.close()
        raise
    host, port = server.api_address
    return RunningAdmin(thread, fake, server, f"https://{host}:{port}", sock.path,
                        Path(dev_cert.ca_cert))  # fmt: skip
