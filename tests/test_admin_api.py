"""The approvals admin API over HTTPS and the local admin socket: tokens verified like agent
logins, approvers only, list/show/approve/deny against an in-memory service, the event stream,
OpenAPI."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import ssl
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from admin_fake import RunningAdmin, start_admin
from phigate.admin.api import create_app
from phigate.admin.openapi import openapi_document, openapi_json
from phigate.admin.protocol import Scope

DOCS = Path(__file__).resolve().parent.parent / "docs" / "approvals-openapi.json"
ME = getpass.getuser()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="pgadm", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def api_keys(tmp_path: Path) -> dict[str, Any]:
    """An API key store with an approver's key and an agent's key."""
    from phigate.identity.apikeys import ApiKeyStore

    store = ApiKeyStore(tmp_path / "apikeys.json")
    _, oncall = store.create("oncall-bot", ["dba-oncall"], 3600)
    _, agent = store.create("etl-agent", ["clinicians"], 3600)
    return {"store": tmp_path / "apikeys.json", "oncall": oncall, "agent": agent}


@pytest.fixture
def admin(
    socket_dir: Path, dev_issuer: Any, dev_cert: Any, api_keys: dict[str, Any]
) -> Iterator[RunningAdmin]:
    running = start_admin(socket_dir, dev_issuer, dev_cert,
                          local_approvers={ME: ["dba-oncall"]}, apikeys_store=api_keys["store"])
    yield running
    running.stop()


def call(admin: RunningAdmin, method: str, path: str, *, token: str | None = None,
         body: Any = None, socket: bool = False) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    async def go() -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if socket:
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=str(admin.socket))
            base = "http://localhost"
        else:
            connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(admin.ca)))
            base = admin.url
        async with aiohttp.ClientSession(connector=connector) as s, s.request(
            method, base + path, headers=headers, json=body
        ) as r:
            text = await r.text()
            return r.status, dict(r.headers), json.loads(text) if text else None

    return asyncio.run(go())


@pytest.fixture
def approver_token(token: Any) -> str:
    return str(token(sub="alice@example.org", groups=("dba-oncall",)))


def test_health_and_openapi_need_no_token(admin: RunningAdmin) -> None:
    status, _, body = call(admin, "GET", "/v1/health")
    assert (status, body) == (200, {"status": "ok"})
    status, _, doc = call(admin, "GET", "/v1/openapi.json")
    assert status == 200 and doc["openapi"] == "3.1.0"


def test_shipped_openapi_is_the_served_one_and_documents_every_route(admin: RunningAdmin) -> None:
    _, _, served = call(admin, "GET", "/v1/openapi.json")
    shipped = json.loads(DOCS.read_text())
    assert served == shipped and DOCS.read_text() == openapi_json(), (
        "docs/approvals-openapi.json is stale: write phigate.admin.openapi.openapi_json() to it"
    )
    app = create_app(admin.fake, lambda token: None)  # type: ignore[arg-type,return-value]
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None}  # fmt: skip
    documented = {(m, p) for p, ops in served["paths"].items() for m in ops}
    assert routes == documented
    assert openapi_document() == served


def test_no_token_is_401_with_a_challenge(admin: RunningAdmin) -> None:
    status, headers, body = call(admin, "GET", "/v1/approvals")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert "Bearer" in body["error"]["message"]


@pytest.mark.parametrize("kind", ["garbage", "expired", "other-issuer", "not-bearer"])
def test_bad_tokens_are_401(admin: RunningAdmin, token: Any, kind: str) -> None:
    tok = {
        "garbage": "not-a-token",
        "expired": token(sub="alice", groups=("dba-oncall",), now=1_000_000_000),
        "other-issuer": token(sub="alice", groups=("dba-oncall",), issuer="https://evil.example"),
        "not-bearer": None,
    }[kind]

    async def basic() -> int:
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(admin.ca)))
        async with aiohttp.ClientSession(connector=connector) as s, s.get(
            admin.url + "/v1/approvals", headers={"Authorization": "Basic YWxpY2U6eA=="}
        ) as r:
            return r.status

    if tok is None:
        assert asyncio.run(basic()) == 401
        return
    status, headers, body = call(admin, "GET", "/v1/approvals", token=tok)
    assert status == 401, body
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]


def test_agent_token_is_refused_as_not_an_approver(admin: RunningAdmin, token: Any) -> None:
    rid = admin.add()["id"]
    agent = token(sub="agent-1", groups=("clinicians",))
    for method, path in (("GET", "/v1/approvals"), ("GET", f"/v1/approvals/{rid}"),
                         ("POST", f"/v1/approvals/{rid}/approve")):  # fmt: skip
        status, _, body = call(admin, method, path, token=agent)
        assert status == 403
        assert body["error"]["message"].startswith("this identity is not an approver")
    assert admin.fake.requests[rid].status == "pending"


def test_list_show_approve_with_scope(admin: RunningAdmin, approver_token: str,
                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    rid = admin.add(sql="UPDATE notes SET body = 'canary-5521' WHERE id = 42")["id"]
    status, _, listed = call(admin, "GET", "/v1/approvals", token=approver_token)
    assert status == 200 and [v["id"] for v in listed["approvals"]] == [rid]
    status, headers, view = call(admin, "GET", f"/v1/approvals/{rid}", token=approver_token)
    assert status == 200 and "canary-5521" in view["sql"]
    assert headers["Cache-Control"] == "no-store"
    body = {"reason": "ticket reason-canary-8812",
            "scope": {"session": "any", "shape_only": True, "executions": 3, "valid_for": "1h"}}
    status, _, result = call(admin, "POST", f"/v1/approvals/{rid}/approve", token=approver_token,
                             body=body)  # fmt: skip
    assert status == 200 and result["request"]["status"] == "approved"
    req = admin.fake.requests[rid]
    assert req.votes == [{"approver": "alice@example.org", "verdict": "approve",
                          "reason": "ticket reason-canary-8812"}]  # fmt: skip
    assert req.scopes == [Scope(session="any", shape_only=True, executions=3, valid_for_s=3600)]
    # Decided: listed no more as pending, a second vote is a conflict from the service.
    assert call(admin, "GET", "/v1/approvals", token=approver_token)[2] == {"approvals": []}
    status, _, body = call(admin, "POST", f"/v1/approvals/{rid}/deny", token=approver_token)
    assert status == 409 and "already approved" in body["error"]["message"]
    # Never in the gateway's log: the statement's values, the approver's reason.
    assert "canary-5521" not in caplog.text and "reason-canary" not in caplog.text
    assert "/v1/approvals/{id}/approve -> 200 (alice@example.org" in caplog.text


def test_list_returns_the_newest_up_to_the_limit(admin: RunningAdmin,
                                                 approver_token: str) -> None:  # fmt: skip
    ids = [admin.add(sql=sql)["id"] for sql in ("DELETE FROM notes WHERE id = 1",
                                                "DELETE FROM notes WHERE id = 2",
                                                "DELETE FROM notes WHERE id = 3")]
    status, _, listed = call(admin, "GET", "/v1/approvals?limit=2", token=approver_token)
    assert status == 200 and len(listed["approvals"]) == 2
    assert {v["id"] for v in listed["approvals"]} <= set(ids)
    for bad in ("0", "10001", "x"):
        status, _, body = call(admin, "GET", f"/v1/approvals?limit={bad}", token=approver_token)
        assert status == 400 and "limit" in body["error"]["message"]


def test_deny_and_default_scope(admin: RunningAdmin, approver_token: str) -> None:
    one, two = admin.add()["id"], admin.add()["id"]
    status, _, _ = call(admin, "POST", f"/v1/approvals/{one}/approve", token=approver_token)
    assert status == 200
    assert admin.fake.requests[one].scopes == [Scope("this", False, 1, None)]
    status, _, result = call(admin, "POST", f"/v1/approvals/{two}/deny", token=approver_token,
                             body={"reason": "not during business hours"})  # fmt: skip
    assert status == 200 and result["request"]["status"] == "denied"
    assert admin.fake.requests[two].votes[0]["reason"] == "not during business hours"


@pytest.mark.parametrize("body, phrase", [
    ({"scope": {"session": "everywhere"}}, "scope.session"),
    ({"scope": {"executions": 0}}, "scope.executions"),
    ({"scope": {"executions": None}}, "need scope.valid_for"),
    ({"scope": {"valid_for": "forever"}}, "scope.valid_for"),
    ({"scope": {"valid_for": "90d"}}, "at most 30d"),
    ({"reason": 5}, "reason must be a string"),
    ({"reason": "two\nlines"}, "one line"),
    ({"why": "x"}, "unknown field 'why'"),
    ([1, 2], "JSON object"),
])  # fmt: skip
def test_malformed_votes_are_400_and_change_nothing(
    admin: RunningAdmin, approver_token: str, body: Any, phrase: str
) -> None:
    rid = admin.add()["id"]
    status, _, answer = call(admin, "POST", f"/v1/approvals/{rid}/approve", token=approver_token,
                             body=body)  # fmt: skip
    assert status == 400 and phrase in answer["error"]["message"]
    assert admin.fake.requests[rid].status == "pending" and not admin.fake.requests[rid].votes


def test_service_refusals_pass_through(admin: RunningAdmin, token: Any) -> None:
    own = admin.add(subject="bob@example.org")["id"]
    bob = token(sub="bob@example.org", groups=("dba-oncall",))
    status, _, body = call(admin, "POST", f"/v1/approvals/{own}/approve", token=bob)
    assert status == 403 and "your own request" in body["error"]["message"]
    status, _, body = call(admin, "GET", "/v1/approvals/00000000-0000-0000-0000-000000000000",
                           token=bob)  # fmt: skip
    assert status == 404
    status, _, body = call(admin, "GET", "/v1/approvals/..%2f..%2fetc", token=bob)
    assert status == 404
    status, _, body = call(admin, "GET", "/v1/approvals?status=everything", token=bob)
    assert status == 400 and "pending" in body["error"]["message"]
    # An approver whose rules cover only target "ehr" neither sees nor decides the others.
    other = admin.add(target="billing")["id"]
    carol = token(sub="carol", groups=("ehr-only",))
    listed = call(admin, "GET", "/v1/approvals", token=carol)[2]["approvals"]
    assert other not in {v["id"] for v in listed} and own in {v["id"] for v in listed}
    assert call(admin, "POST", f"/v1/approvals/{other}/approve", token=carol)[0] == 403


def test_api_key_of_an_approver(admin: RunningAdmin, api_keys: dict[str, Any]) -> None:
    oncall, agent = api_keys["oncall"], api_keys["agent"]
    rid = admin.add()["id"]
    assert call(admin, "GET", f"/v1/approvals/{rid}", token=oncall)[0] == 200
    status, _, body = call(admin, "GET", f"/v1/approvals/{rid}", token=agent)
    assert status == 403 and "not an approver" in body["error"]["message"]
    assert call(admin, "GET", f"/v1/approvals/{rid}", token=oncall[:-4] + "AAAA")[0] == 401


def test_event_stream_sends_new_requests_the_approver_may_see(
    admin: RunningAdmin, token: Any
) -> None:
    carol = token(sub="carol", groups=("ehr-only",))

    async def read() -> list[tuple[str, dict[str, Any]]]:
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(admin.ca)))
        events: list[tuple[str, dict[str, Any]]] = []
        async with aiohttp.ClientSession(connector=connector) as s, s.get(
            admin.url + "/v1/approvals/stream", headers={"Authorization": f"Bearer {carol}"}
        ) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            while admin.fake.subscribers == 0:
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            # A request carol may not see, then one she may: only the second reaches her.
            await loop.run_in_executor(None, lambda: admin.add(target="billing"))
            visible = await loop.run_in_executor(None, lambda: admin.add(target="ehr"))
            event = ""
            async with asyncio.timeout(5):
                async for raw in r.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        events.append((event, json.loads(line[6:])))
                        break
            assert events[0][1]["request"]["id"] == visible["id"]
        return events

    events = asyncio.run(read())
    assert events[0][0] == "request" and events[0][1]["event"] == "request"
    assert "canary" in events[0][1]["request"]["sql"]  # approvers see the values


def test_event_stream_needs_an_approver(admin: RunningAdmin, token: Any) -> None:
    agent = token(sub="agent-1", groups=("clinicians",))
    assert call(admin, "GET", "/v1/approvals/stream")[0] == 401
    assert call(admin, "GET", "/v1/approvals/stream", token=agent)[0] == 403


def test_unix_socket_peer_credentials_and_file_mode(admin: RunningAdmin, token: Any) -> None:
    st = os.stat(admin.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == os.getgid()
    rid = admin.add()["id"]
    status, _, listed = call(admin, "GET", "/v1/approvals", socket=True)
    assert status == 200 and [v["id"] for v in listed["approvals"]] == [rid]
    status, _, _ = call(admin, "POST", f"/v1/approvals/{rid}/deny", socket=True,
                        body={"reason": "no"})  # fmt: skip
    assert status == 200
    assert admin.fake.requests[rid].votes[0]["approver"] == f"unix:{ME}"
    # A bearer token on the socket counts instead of the peer: an agent's is refused.
    agent = token(sub="agent-1", groups=("clinicians",))
    assert call(admin, "GET", "/v1/approvals", socket=True, token=agent)[0] == 403


def test_unix_user_not_in_local_approvers_is_refused(
    socket_dir: Path, dev_issuer: Any, dev_cert: Any, token: Any
) -> None:
    running = start_admin(socket_dir, dev_issuer, dev_cert, local_approvers={"nobody-else": ["x"]})
    try:
        status, _, body = call(running, "GET", "/v1/approvals", socket=True)
        assert status == 403 and "local_approvers" in body["error"]["message"]
        alice = token(sub="alice", groups=("dba-oncall",))
        assert call(running, "GET", "/v1/approvals", socket=True, token=alice)[0] == 200
    finally:
        running.stop()
    assert not running.socket.exists()  # removed at stop


def test_second_server_on_a_live_socket_is_refused(
    admin: RunningAdmin, dev_issuer: Any, dev_cert: Any
) -> None:
    from phigate.errors import PhigateError

    with pytest.raises(PhigateError, match="in use by a running gateway"):
        start_admin(admin.socket.parent, dev_issuer, dev_cert, local_approvers={})
    assert call(admin, "GET", "/v1/health", socket=True)[0] == 200


def test_stopping_the_server_ends_open_streams_at_once(
    socket_dir: Path, dev_issuer: Any, dev_cert: Any
) -> None:
    import time

    running = start_admin(socket_dir, dev_issuer, dev_cert, local_approvers={ME: ["dba-oncall"]})

    async def read() -> tuple[list[str], float]:
        lines: list[str] = []
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(running.socket))
        ) as s, s.get("http://localhost/v1/approvals/stream") as r:
            assert r.status == 200
            while running.fake.subscribers == 0:
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            stopping = loop.run_in_executor(None, running.stop)
            async with asyncio.timeout(5):
                async for raw in r.content:
                    lines.append(raw.decode().rstrip("\n"))
            await stopping
            return lines, time.monotonic() - started

    lines, took = asyncio.run(read())
    assert "event: end" in lines and took < 3
    assert running.fake.subscribers == 0  # the service's subscription was closed too
