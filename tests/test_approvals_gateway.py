"""The approval service wired into the Gateway (fake engine): the data plane's approval
requests reach it, the real policy normalizes the statement, a vote resumes the held
statement, records go to the trail, and a stop answers held statements 57P01."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from phigate.approvals import Scope
from phigate.audit.records import audit_section
from phigate.config import load_config
from phigate.control.server import Gateway
from phigate.dev.tokens import DevIssuer
from phigate.errors import ConfigError
from test_server_dispatch import FakeEngine, FakeRequest

CLASS = '[["agents"],"ehr"]'

# A literal the statement carries and no record may: nine digits, so that it cannot turn up
# by chance in a record's random hex (keyed hashes, UUIDs) or timestamps, as "4711" could.
CANARY_ID = "918273645"


def _config(tmp_path: Path) -> Path:
    issuer = DevIssuer(tmp_path / "keys")
    issuer.ensure_keys()
    audit = audit_section(tmp_path / "trail", tmp_path / "audit-keys", name="approvals-tests")
    path = tmp_path / "phigate.toml"
    path.write_text(f"""
[server]
listen = "127.0.0.1:0"
require_tls = false

[audit]
dir = "{audit["dir"]}"
signing_key = "{audit["signing_key"]}"
hmac_key = "{audit["hmac_key"]}"

[identity.oidc]
issuer = "phigate-dev"
audience = "phigate"
jwks_file = "{issuer.jwks_path}"

[targets.ehr]
host = "127.0.0.1"
database = "ehr"
user = "svc"
tls = "disable"

[groups]
agents = ["agents"]

[roles.agents]
relations = ["public.*"]
operations = ["select", "delete"]

[approvals]
store = "approvals.db"

[approvers.oncall]
groups = ["dba-oncall"]
roles = ["agents"]
""")
    return path


def _approval(sql: str, stmt: int) -> FakeRequest:
    return FakeRequest("approval", {
        "session": "s-1", "stmt": stmt, "subject": "agent-7", "identity_class": CLASS,
        "groups": ["agents"], "target": "ehr", "protocol": "simple", "sql": sql,
        "statement_name": None, "parameters": None, "literal_hashes": ["h:00"],
        "parameter_hashes": None, "return_mode": False, "earlier": [], "peer": "127.0.0.1:1",
        "approval": {"rule": "delete", "role": "agents", "reason": "deletes need approval",
                     "mode": "hold", "timeout_ms": 60_000},
    })  # fmt: skip


async def _answer(req: FakeRequest) -> dict[str, object]:
    for _ in range(500):
        if req.answers:
            return req.answer
        await asyncio.sleep(0.01)
    raise AssertionError("no answer")


def test_gateway_holds_resumes_and_fails_held_statements_on_stop(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path))
    engines: list[FakeEngine] = []

    def factory(config_json: str) -> FakeEngine:
        engines.append(FakeEngine(config_json))
        return engines[0]

    async def go() -> None:
        gateway = Gateway(config, engine_factory=factory)
        await gateway.start()
        engine = engines[0]
        service = gateway.approvals
        assert service is not None
        ask = _approval("DELETE FROM notes WHERE id = 918273645", 1)  # CANARY_ID
        engine.push(ask)
        held = await _answer(ask)
        assert held["action"] == "hold" and "phigate approvals approve" in str(held["notice"])
        waiting = FakeRequest("await_approval", {"session": "s-1", "request": held["request"]})
        engine.push(waiting)
        alice = service.approver_for("alice", ["dba-oncall"])
        assert alice is not None
        view = await service.show(alice, str(held["request"]))
        assert view["normalized"] == "DELETE FROM notes WHERE id = $1"  # the policy's text
        await service.vote(alice, str(held["request"]), "approve", None, Scope())
        assert await _answer(waiting) == {"action": "run"}

        second = _approval("DELETE FROM notes WHERE id = 4712", 2)
        engine.push(second)
        held2 = await _answer(second)
        waiting2 = FakeRequest("await_approval", {"session": "s-1", "request": held2["request"]})
        engine.push(waiting2)
        await asyncio.sleep(0.05)
        await gateway.stop(grace=0)
        assert (await _answer(waiting2))["sqlstate"] == "57P01"
        events = [r["event"] for r in engine.records]
        assert events.count("approval_request") == 2
        assert "approval_used" in events and events.count("approval_outcome") == 2
        assert CANARY_ID not in json.dumps(engine.records)

    asyncio.run(go())


def test_a_reload_whose_approval_store_cannot_open_changes_nothing(tmp_path: Path) -> None:
    full = _config(tmp_path).read_text()
    without = full[: full.index("[approvals]")]
    plain = tmp_path / "plain.toml"
    plain.write_text(without)
    (tmp_path / "not-a-database").mkdir()
    broken = tmp_path / "broken.toml"
    broken.write_text(full.replace('store = "approvals.db"', 'store = "not-a-database"'))

    async def go() -> None:
        config = load_config(plain)
        gateway = Gateway(config, engine_factory=FakeEngine)
        await gateway.start()
        try:
            with pytest.raises(ConfigError, match="approvals.store"):
                await gateway.reload(load_config(broken))
            # Refused whole: the old config is in force, no service half started.
            assert gateway.config is config
            assert gateway.approvals is None and gateway.control.approvals is None
        finally:
            await gateway.stop(grace=0)

    asyncio.run(go())
