"""Shared pieces of the approval tests: a config with [approvals]/[approvers], fake data-plane
requests, a stand-in for the policy's normalized text, and a service on a given store."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from phigate.approvals.service import ApprovalService
from phigate.approvals.store import ApprovalStore
from phigate.audit.hashing import keyed_hash
from phigate.config import Config, parse_config

HASH_KEY = b"k" * 32
AGENT = "agent-7"
SESSION = "7b0c3f0e-0000-4000-8000-000000000001"
OTHER_SESSION = "7b0c3f0e-0000-4000-8000-000000000002"
IDENTITY_CLASS = '[["agents"],"ehr"]'


def config_doc(
    store: str, *, target_port: int = 5432, target_db: str = "ehr",
    approvers: dict[str, Any] | None = None, **approvals: Any,
) -> dict[str, Any]:  # fmt: skip
    return {
        "server": {"listen": ["127.0.0.1:0"], "require_tls": False},
        "identity": {"oidc": {"issuer": "https://idp.example/", "audience": "phigate",
                              "jwks_url": "https://idp.example/jwks"}},  # fmt: skip
        "targets": {"ehr": {"host": "127.0.0.1", "port": target_port, "database": target_db,
                            "user": "phigate_svc", "tls": "disable"}},  # fmt: skip
        "roles": {
            "agents": {"relations": ["public.*"], "operations": ["select", "delete"]},
            "analysts": {"relations": ["public.*"]},
        },
        "groups": {"agents": ["agents"], "analysts": ["analysts"]},
        "approvals": {"store": store, **approvals},
        "approvers": approvers if approvers is not None else {
            "oncall": {"groups": ["dba-oncall"], "roles": ["agents"]},
        },
    }


def make_config(tmp: Path, store: str | None = None, **kw: Any) -> Config:
    return parse_config(config_doc(store or str(tmp / "approvals.db"), **kw),
                        source=str(tmp / "phigate.toml"), base_dir=tmp)  # fmt: skip


class FakeRequest:
    """A data-plane request: its payload, and the one reply it must get."""

    def __init__(self, kind: str, payload: dict[str, Any]) -> None:
        self.kind, self.payload = kind, payload
        self.answers: list[dict[str, Any]] = []
        self.answered = asyncio.Event()

    def reply(self, answer: dict[str, Any]) -> bool:
        self.answers.append(answer)
        self.answered.set()
        return True

    async def answer(self, timeout: float = 10.0) -> dict[str, Any]:
        await asyncio.wait_for(self.answered.wait(), timeout)
        assert len(self.answers) == 1, self.answers
        return self.answers[0]


_LITERAL = re.compile(r"'(?:[^']|'')*'|\b\d+\b")


def normalize(sql: str) -> str:
    n = 0

    def sub(_: re.Match[str]) -> str:
        nonlocal n
        n += 1
        return f"${n}"

    return _LITERAL.sub(sub, sql)


def fake_decide(identity_class: str, sql: str) -> dict[str, Any]:
    """What the service takes from the policy's decision: the normalized text."""
    return {"action": "allow", "normalized": normalize(sql),
            "audit": {"masking": {"columns": {"public.patients.ssn": "redact"}}}}  # fmt: skip


def payload(sql: str, *, session: str = SESSION, rule: str = "delete", params: list[str] | None
            = None, mode: str = "hold", timeout_ms: int | None = None, return_mode: bool = False,
            subject: str = AGENT, stmt: int = 1, **approval: Any) -> dict[str, Any]:  # fmt: skip
    """An `approval` request as the data plane sends it (literal hashes as it computes them)."""
    literals = [keyed_hash(HASH_KEY, m.group(0).strip("'")) for m in _LITERAL.finditer(sql)]
    doc: dict[str, Any] = {
        "session": session, "stmt": stmt, "subject": subject, "identity_class": IDENTITY_CLASS,
        "groups": ["agents"], "target": "ehr",
        "protocol": "extended" if params is not None else "simple", "sql": sql,
        "statement_name": None,
        "parameters": [{"format": 0, "value": v} for v in params] if params is not None else None,
        "literal_hashes": literals,
        "parameter_hashes": [keyed_hash(HASH_KEY, v) for v in params] if params is not None
        else None,
        "approval": {"rule": rule, "role": "agents", "reason": f"rule {rule} of role agents",
                     "mode": mode, **approval},
        "return_mode": return_mode, "earlier": ["SELECT 1"], "peer": "127.0.0.1:5555",
    }  # fmt: skip
    if timeout_ms is not None:
        doc["approval"]["timeout_ms"] = timeout_ms
    return doc


class Records(list[dict[str, Any]]):
    """The audit records a service wrote (write_event)."""

    def of(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self if r["event"] == event]


def make_service(config: Config, store: ApprovalStore, records: Records, *,
                 instance: str = "gw-a", clock: Any = None) -> ApprovalService:  # fmt: skip
    kw: dict[str, Any] = {"clock": clock} if clock is not None else {}
    return ApprovalService(config, store, write_event=records.append, decide=fake_decide,
                           instance=instance, hash_key=HASH_KEY, **kw)  # fmt: skip


async def ask(service: ApprovalService, doc: dict[str, Any]) -> dict[str, Any]:
    req = FakeRequest("approval", doc)
    service.on_approval(req)
    return await req.answer()


async def hold(service: ApprovalService, doc: dict[str, Any]) -> tuple[str, FakeRequest]:
    """Ask, expect a hold, and start awaiting it: the request id and the await request."""
    answer = await ask(service, doc)
    assert answer["action"] == "hold", answer
    waiting = FakeRequest("await_approval", {"session": doc["session"],
                                             "request": answer["request"]})  # fmt: skip
    service.on_await(waiting)
    return answer["request"], waiting
