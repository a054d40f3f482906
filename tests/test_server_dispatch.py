"""The control loop against a fake engine: every request answered once, fail closed, signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from phigate.audit.records import audit_section
from phigate.config import Config, load_config
from phigate.control import server
from phigate.control.server import ControlPlane, Gateway, sd_notify
from phigate.control.thread import GatewayThread
from phigate.dev.tokens import DevIssuer
from phigate.errors import ConfigError, IdentityError
from phigate.identity.oidc import Identity, OidcVerifier


class FakeRequest:
    def __init__(self, kind: str, payload: dict[str, Any], *, id: int = 1) -> None:
        self.id, self.kind, self.payload = id, kind, payload
        self.answers: list[dict[str, Any]] = []
        self.answered = threading.Event()

    def reply(self, answer: dict[str, Any]) -> bool:
        self.answers.append(answer)
        self.answered.set()
        return True

    @property
    def answer(self) -> dict[str, Any]:
        assert len(self.answers) == 1, f"expected exactly one reply, got {self.answers}"
        return self.answers[0]


class FakeEngine:
    """Mimics phigate._native.Engine: a pipe as the wakeup fd, a queue for requests, and the
    audit records the control plane appends."""

    def __init__(self, config_json: str) -> None:
        self.configs = [json.loads(config_json)]
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self._requests: list[FakeRequest] = []
        self.records: list[dict[str, Any]] = []
        self.trail_closed = False
        self._lock = threading.Lock()
        self.started = False
        self.shutdown_grace: float | None = None
        self.epoch = 0
        self.subjects: dict[str, Any] = {}

    def start(self) -> None:
        self.started = True

    def listen_addresses(self) -> list[str]:
        return ["127.0.0.1:16432", "[::1]:16432"]

    def wakeup_fd(self) -> int:
        return self._r

    def push(self, req: FakeRequest) -> None:
        with self._lock:
            self._requests.append(req)
        os.write(self._w, b"x")


    def take_requests(self) -> list[FakeRequest]:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        with self._lock:
            reqs, self._requests = self._requests, []
        return reqs

    def audit_append(self, body: bytes) -> None:
        assert not self.trail_closed, "a record after audit_close()"
        self.records.append(json.loads(body))

    def audit_status(self) -> dict[str, Any] | None:
        return {"state": "closed" if self.trail_closed else "ok"}

    def audit_close(self) -> None:
        self.trail_closed = True

    def stats(self) -> dict[str, int]:
        return {"sessions_active": 0, "cache_hits": 0, "cache_misses": 0}

    def set_masking(self, state_json: str) -> None:
        self.masking = state_json

    def set_subjects(self, target: str, relations: list[Any], names: list[str]) -> None:
        self.subjects[target] = (relations, names)

    def reconfigure(self, config_json: str) -> int:
        self.configs.append(json.loads(config_json))
        self.epoch += 1
        return self.epoch

    def bump_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def shutdown(self, grace_seconds: float) -> None:
        self.shutdown_grace = grace_seconds


class FailingVerifier:
    """A verifier with a bug: its exception text must never reach logs or clients."""

    def verify_cached(self, token: str) -> Identity | None:
        raise RuntimeError(f"boom {token}")

    async def verify(self, token: str) -> Identity:
        raise RuntimeError(f"boom {token}")


class SlowFailingVerifier(FailingVerifier):
    def verify_cached(self, token: str) -> Identity | None:
        return None


class HangingVerifier(SlowFailingVerifier):
    async def verify(self, token: str) -> Identity:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


@pytest.fixture
def issuer(tmp_path: Path) -> DevIssuer:
    dev = DevIssuer(tmp_path / "keys")
    dev.ensure_keys()
    return dev


@pytest.fixture
def config_path(tmp_path: Path, issuer: DevIssuer) -> Path:
    path = tmp_path / "phigate.toml"
    audit = audit_section(tmp_path / "trail", tmp_path / "audit-keys", name="dispatch-tests")
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
require_tls = false
drain_timeout = 7

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
readers = ["reader"]

[roles.reader]
relations = ["public.*"]
"""
    )
    return path


@pytest.fixture
def config(config_path: Path) -> Config:
    return load_config(config_path)


@pytest.fixture
def verifier(config: Config) -> OidcVerifier:
    return OidcVerifier(config.identity.oidc)


def auth(token: str, id: int = 1) -> FakeRequest:
    payload = {"session": f"s-{id}", "user": "agent", "database": "ehr", "password": token,
               "peer": "127.0.0.1:5555", "tls": True, "application_name": "psql"}  # fmt: skip
    return FakeRequest("authenticate", payload, id=id)


READER_CLASS = '[["reader"],"ehr"]'  # RoleSet.identity_class of role "reader" on target ehr


def decide(sql: Any, id: int = 1, identity_class: str = READER_CLASS) -> FakeRequest:
    payload = {"session_id": 1, "identity_class": identity_class, "subject": "agent",
               "sql": sql, "statement_name": None, "protocol": "simple"}  # fmt: skip
    return FakeRequest("decide", payload, id=id)


def in_loop(fn: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(fn())  # type: ignore[arg-type]


def test_authenticate_ok_slow_then_fast_path(issuer: DevIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint("agent-7", ["readers", "analysts"])
    first, second = auth(token, 1), auth(token, 2)

    async def go() -> None:
        control = ControlPlane(verifier)
        control.dispatch([first])  # keys not loaded yet: answered from a task
        await control.wait_idle()
        control.dispatch([second])  # keys cached: answered before dispatch returns
        assert second.answers

    in_loop(go)
    for req in (first, second):
        answer = req.answer
        assert answer["ok"] is True
        assert answer["subject"] == "agent-7"
        assert answer["groups"] == ["readers", "analysts"]
        assert (
            answer["identity_class"] == Identity("x", ("analysts", "readers"), None).identity_class
        )
        assert answer["expires_at"] > time.time()


def test_authenticate_refused_with_reason(
    issuer: DevIssuer, verifier: OidcVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    token = issuer.mint("agent-7", [], ttl_seconds=60, now=time.time() - 3600)
    req = auth(token)

    async def go() -> None:
        await verifier.prime()
        ControlPlane(verifier).dispatch([req])

    caplog.set_level(logging.DEBUG)
    in_loop(go)
    assert req.answer["ok"] is False
    assert req.answer["sqlstate"] == "28P01"
    assert req.answer["message"].startswith("token expired 5")
    assert token not in caplog.text


@pytest.mark.parametrize("verifier_cls", [FailingVerifier, SlowFailingVerifier])
def test_verifier_bug_fails_closed_without_leaking(
    verifier_cls: type[FailingVerifier], caplog: pytest.LogCaptureFixture
) -> None:
    req = auth("secret-token-value")

    async def go() -> None:
        control = ControlPlane(verifier_cls())
        control.dispatch([req])
        await control.wait_idle()

    caplog.set_level(logging.DEBUG)
    in_loop(go)
    assert req.answer == {
        "ok": False,
        "sqlstate": "28000",
        "message": "internal error while verifying identity, see gateway log",
        "reason": "internal_error",
    }
    assert "RuntimeError" in caplog.text  # the operator sees that something broke
    assert "secret-token-value" not in caplog.text


def test_shutdown_answers_pending_slow_authentications() -> None:
    req = auth("whatever")

    async def go() -> None:
        control = ControlPlane(HangingVerifier())
        control.dispatch([req])
        await asyncio.sleep(0)
        await control.close()

    in_loop(go)
    assert req.answer["ok"] is False and req.answer["sqlstate"] == "28000"


def test_decide_allows_with_normalized_sql(config: Config) -> None:
    req = decide("SELECT name FROM patients WHERE mrn = 'MRN-000123' AND age > 40")
    ControlPlane(FailingVerifier(), config=config).dispatch([req])
    audit = req.answer.pop("audit")
    assert req.answer == {
        "action": "allow",
        "cache": "normalized",
        "normalized": "SELECT name FROM patients WHERE mrn = $1 AND age > $2",
    }
    # What the statement record says: the deciding role, what is read, never the literals.
    assert audit["rule"].startswith("role:") and audit["rule"].endswith("allow select")
    assert audit["kind"] == "select" and audit["relations"] == ["public.patients"]
    assert audit["columns_read"] == [
        "public.patients.age", "public.patients.mrn", "public.patients.name",
    ]  # fmt: skip
    assert "MRN-000123" not in str(audit)


def test_decide_refuses_by_policy_and_caches_literal_sensitive_exactly(config: Config) -> None:
    control = ControlPlane(FailingVerifier(), config=config)
    refused, literal, nobody = (
        decide("DELETE FROM notes WHERE body = 'PHI here'"),
        decide("SET statement_timeout = '5s'", id=2),
        decide("SELECT 1", id=3, identity_class='[["no-such-role"],"ehr"]'),
    )
    control.dispatch([refused, literal, nobody])
    assert refused.answer["action"] == "deny" and refused.answer["sqlstate"] == "42501"
    assert "rule: operation" in refused.answer["message"]
    assert "PHI" not in refused.answer["message"] + (refused.answer["hint"] or "")
    assert refused.answer["cache"] == "normalized"
    assert refused.answer["audit"]["rule"] == "default deny operation"
    assert refused.answer["audit"]["columns_written"] == []
    assert literal.answer.pop("audit")["rule"] == "builtin allow set"
    assert literal.answer == {
        "action": "allow", "cache": "exact", "normalized": "SET statement_timeout = $1",
    }  # fmt: skip
    assert nobody.answer["action"] == "deny" and "rule: no-role" in nobody.answer["message"]


def _pin(config_path: Path, schema: str, *, extra: str = "") -> Config:
    text = config_path.read_text().replace(
        'tls = "disable"\n', f'tls = "disable"\nparams = {{ search_path = "{schema}" }}\n', 1
    )
    config_path.write_text(text + extra)
    return load_config(config_path)


def test_decide_resolves_names_with_the_target_schema(config_path: Path) -> None:
    # Target ehr pinned to pii: its sessions read pii.people for "people", so a role granted
    # public.* must not get it by leaving the schema out; pii.* may.
    config = _pin(config_path, "pii", extra='\n[roles.pii-reader]\nrelations = ["pii.*"]\n')
    control = ControlPlane(FailingVerifier(), config=config)
    reader, pii, qualified = (
        decide("SELECT name, ssn FROM people"),
        decide("SELECT name, ssn FROM people", id=2, identity_class='[["pii-reader"],"ehr"]'),
        decide("SELECT name FROM public.people", id=3),
    )
    control.dispatch([reader, pii, qualified])
    assert reader.answer["action"] == "deny" and reader.answer["sqlstate"] == "42501"
    assert "pii.people" in reader.answer["message"] and "rule: relation" in reader.answer["message"]
    assert pii.answer["action"] == "allow"
    assert qualified.answer["action"] == "allow"


def test_decide_refuses_sessions_of_a_removed_target(config: Config) -> None:
    # The role applies to every target, so a session opened on a target a reload removed still
    # has one; what its names mean upstream is no longer known, so nothing runs.
    req = decide("SELECT 1", identity_class='[["reader"],"old"]')
    ControlPlane(FailingVerifier(), config=config).dispatch([req])
    assert req.answer.pop("audit") == {"rule": "deny target removed"}
    assert req.answer == {
        "action": "deny", "sqlstate": "3D000", "cache": "none", "normalized": None,
        "message": 'database "old" is no longer a target configured on this gateway',
        "hint": "Reconnect with a target name your gateway administrator gave you.",
    }  # fmt: skip


def test_decide_unparsable_sql_is_refused_and_cached_exactly(config: Config) -> None:
    req = decide("SELEC oops FROM")
    ControlPlane(FailingVerifier(), config=config).dispatch([req])
    answer = req.answer
    assert (answer["action"], answer["sqlstate"], answer["cache"]) == ("deny", "42601", "exact")
    assert answer["message"] == 'syntax error at or near "SELEC" at character 1'


def test_decide_without_config_refuses_everything() -> None:
    req = decide("SELECT 1")
    ControlPlane(FailingVerifier()).dispatch([req])
    assert req.answer["action"] == "deny" and req.answer["sqlstate"] == "42501"


@pytest.mark.parametrize(
    "req", [decide(None), FakeRequest("decide", {}), FakeRequest("mystery", {})]
)
def test_malformed_or_unknown_requests_are_denied(req: FakeRequest) -> None:
    ControlPlane(FailingVerifier()).dispatch([req])
    answer = req.answer
    assert answer["action"] == "deny" and answer["sqlstate"] == "58000"
    assert "see gateway log" in answer["message"]


def test_a_rejected_reply_does_not_stop_the_batch(config: Config) -> None:
    class Rejecting(FakeRequest):
        def reply(self, answer: dict[str, Any]) -> bool:
            super().reply(answer)
            raise ValueError("malformed answer")

    bad, good = Rejecting("decide", {"sql": "SELECT 1"}), decide("SELECT 2", id=2)
    ControlPlane(FailingVerifier(), config=config).dispatch([bad, good])
    assert len(bad.answers) == 1
    assert good.answer["action"] == "allow"


def test_gateway_serves_requests_writes_its_records_reloads_and_stops(
    config: Config, config_path: Path, issuer: DevIssuer, tmp_path: Path
) -> None:
    engines: list[FakeEngine] = []

    def factory(config_json: str) -> FakeEngine:
        engines.append(FakeEngine(config_json))
        return engines[0]

    token = issuer.mint("agent-7", ["readers"])

    async def go() -> None:
        gateway = Gateway(config, engine_factory=factory)
        await gateway.start()
        engine = engines[0]
        assert engine.started and engine.configs[0]["targets"]["ehr"]["database"] == "ehr"
        assert engine.configs[0]["audit"]["sync"] == "batch"
        assert gateway.addresses == ["127.0.0.1:16432", "[::1]:16432"]

        req = auth(token)
        engine.push(req)  # wakes the loop through the fd
        for _ in range(100):
            if req.answers:
                break
            await asyncio.sleep(0.01)
        assert req.answer["ok"] is True

        config_path.write_text(config_path.read_text().replace('user = "svc"', 'user = "svc2"'))
        await gateway.reload(load_config(config_path))
        assert engine.configs[-1]["targets"]["ehr"]["user"] == "svc2"
        reload = [r for r in engine.records if r["event"] == "reload"]
        assert len(reload) == 1 and "audit_restart_needed" not in reload[0]
        assert reload[0]["ts"].endswith("Z") and len(reload[0]["ts"]) == 27

        # Another trail directory takes effect only on restart, and the record says so.
        other = tmp_path / "other-trail"
        other.mkdir()
        config_path.write_text(config_path.read_text().replace(
            f'dir = "{config.audit.dir if config.audit else ""}"', f'dir = "{other}"'))  # fmt: skip
        await gateway.reload(load_config(config_path))
        assert engine.records[-1]["event"] == "reload"
        assert engine.records[-1]["audit_restart_needed"] is True

        await gateway.stop(0.5)
        assert engine.shutdown_grace == 0.5
        # The final counters, then the stop record, then the close.
        assert [r["event"] for r in engine.records[-2:]] == ["stats", "gateway_stop"]
        assert engine.trail_closed

    in_loop(go)


def test_reload_never_changes_the_schema_a_target_pins(config: Config, config_path: Path) -> None:
    original = config_path.read_text()
    engines: list[FakeEngine] = []

    def factory(config_json: str) -> FakeEngine:
        engines.append(FakeEngine(config_json))
        return engines[0]

    async def go() -> None:
        gateway = Gateway(config, engine_factory=factory)
        await gateway.start()
        engine = engines[0]
        # Sessions already open keep search_path = public upstream: judging their statements
        # with pii would resolve "people" to another table than the one they read.
        with pytest.raises(ConfigError) as info:
            await gateway.reload(_pin(config_path, "pii"))
        assert str(info.value) == (
            f"{config_path}: targets.ehr.params.search_path: changes only on restart ('public' "
            "to 'pii'): sessions opened before a reload keep the search_path they started with"
        )
        assert len(engine.configs) == 1 and gateway.control.config is config  # nothing applied
        # Removing the target and adding it back later does not get around it.
        config_path.write_text(original.replace("[targets.ehr]", "[targets.other]"))
        await gateway.reload(load_config(config_path))
        config_path.write_text(original)
        with pytest.raises(ConfigError):
            await gateway.reload(_pin(config_path, "pii"))
        config_path.write_text(original.replace('user = "svc"', 'user = "svc2"'))
        await gateway.reload(load_config(config_path))  # anything else still reloads
        assert engine.configs[-1]["targets"]["ehr"]["user"] == "svc2"
        await gateway.stop(0.1)

    in_loop(go)


def test_gateway_thread(config: Config, issuer: DevIssuer) -> None:
    engine: FakeEngine | None = None

    def factory(config_json: str) -> FakeEngine:
        nonlocal engine
        engine = FakeEngine(config_json)
        return engine

    gw = GatewayThread(config, engine_factory=factory).start()
    try:
        assert gw.engine is engine
        assert (gw.address, gw.host, gw.port) == ("127.0.0.1:16432", "127.0.0.1", 16432)
        assert engine is not None
        req = auth(issuer.mint("agent-7", ["readers"]))
        engine.push(req)
        assert req.answered.wait(5)
        assert req.answer["ok"] is True
        gw.reload(config)
        assert len(engine.configs) == 2
        assert gw.is_alive()
    finally:
        gw.stop()
    assert engine.shutdown_grace == 1.0
    assert not gw.is_alive()


def test_gateway_thread_start_raises_when_bind_fails(config: Config) -> None:
    class Unbindable(FakeEngine):
        def start(self) -> None:
            raise OSError(98, "Address already in use")

    with pytest.raises(OSError, match="Address already in use"):
        GatewayThread(config, engine_factory=Unbindable).start()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    return sock


def test_sd_notify(notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sd_notify("READY=1")
    assert notify_socket.recv(1024) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("READY=1") is False


def test_run_handles_sighup_and_sigterm(
    config_path: Path, notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    engines: list[FakeEngine] = []

    def factory(config_json: str) -> FakeEngine:
        engines.append(FakeEngine(config_json))
        return engines[-1]

    monkeypatch.setattr(server, "_native_engine", factory)
    messages: list[bytes] = []

    async def go() -> None:
        task = asyncio.get_running_loop().create_task(server.run(config_path))
        while not engines or not engines[0].started:
            await asyncio.sleep(0.01)
        messages.append(await asyncio.to_thread(notify_socket.recv, 1024))

        config_path.write_text(config_path.read_text().replace("[server]", "[server]\nbogus = 1"))
        os.kill(os.getpid(), signal.SIGHUP)  # a broken config keeps the old one
        messages.append(await asyncio.to_thread(notify_socket.recv, 1024))
        messages.append(await asyncio.to_thread(notify_socket.recv, 1024))
        assert len(engines[0].configs) == 1

        config_path.write_text(config_path.read_text().replace("bogus = 1\n", ""))
        os.kill(os.getpid(), signal.SIGHUP)
        messages.append(await asyncio.to_thread(notify_socket.recv, 1024))
        messages.append(await asyncio.to_thread(notify_socket.recv, 1024))
        assert len(engines[0].configs) == 2

        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 5)
        messages.append(await asyncio.to_thread(notify_socket.recv, 1024))

    caplog.set_level(logging.INFO)
    in_loop(go)
    assert messages[0].startswith(b"READY=1\nSTATUS=listening on 127.0.0.1:16432")
    assert messages[1].startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert messages[2] == b"READY=1"
    assert messages[5] == b"STOPPING=1"
    assert "server.bogus: unknown key" in caplog.text
    assert engines[0].shutdown_grace == 7  # server.drain_timeout


def test_identity_error_requires_auth_sqlstate() -> None:
    with pytest.raises(ValueError):
        IdentityError("42501", "x")  # type: ignore[arg-type]
