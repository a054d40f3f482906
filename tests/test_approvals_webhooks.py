"""Webhook notifications to a real local receiver: the HMAC signature verifies, the Slack
message's shape and links, retries after a failure, and a stuck receiver delays nothing else."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import pytest
from aiohttp import web

from admin_fake import FakeApprovals
from phigate.approvals.webhooks import WebhookNotifier
from phigate.config.approvals_admin import WebhookConfig
from phigate.config.model import SecretBytes

SECRET = b"test-webhook-secret-0123456789"


class Receiver:
    """An HTTP server on 127.0.0.1 recording what it gets; it answers `fail_first` 500s first,
    or (stuck) never answers."""

    def __init__(self, fail_first: int = 0, stuck: bool = False) -> None:
        self.fail_first = fail_first
        self.stuck = stuck
        self.received: list[tuple[float, dict[str, str], bytes]] = []
        self.got = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((time.monotonic(), dict(request.headers), body))
        if self.stuck:
            await asyncio.sleep(3600)
        if len(self.received) <= self.fail_first:
            return web.Response(status=500)
        self.got.set()
        return web.Response(status=204)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def hook(url: str, fmt: str = "json", **kw: Any) -> WebhookConfig:
    settings: dict[str, Any] = {"retries": 5, "backoff": 0.05, "timeout": 5.0,
                                "include_values": False, "secret": SecretBytes(SECRET)}
    settings.update(kw)
    return WebhookConfig(url=url, format=fmt, **settings)


async def notified(notifier: WebhookNotifier, fake: FakeApprovals, **kw: Any) -> dict[str, Any]:
    await notifier.start(fake.subscribe())
    while fake.subscribers == 0:
        await asyncio.sleep(0.01)
    return await fake.add(**kw)


def verify(headers: dict[str, str], body: bytes, secret: bytes, max_age: float = 300) -> bool:
    """What a receiver does (docs/approvals-api.md)."""
    timestamp = headers["X-Phigate-Timestamp"]
    expected = "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body,
                                    hashlib.sha256).hexdigest()  # fmt: skip
    fresh = abs(time.time() - int(timestamp)) <= max_age
    return fresh and hmac.compare_digest(expected, headers["X-Phigate-Signature"])


def test_json_webhook_is_signed_and_carries_no_values() -> None:
    async def run() -> tuple[dict[str, Any], list[tuple[float, dict[str, str], bytes]]]:
        fake = FakeApprovals()
        async with Receiver() as rx:
            notifier = WebhookNotifier([hook(rx.url)], "https://gw.example.org:8443")
            view = await notified(notifier, fake, sql="DELETE FROM notes WHERE id = 'canary-9'")
            await asyncio.wait_for(rx.got.wait(), 5)
            await notifier.stop()
            return view, rx.received

    view, received = asyncio.run(run())
    assert len(received) == 1
    _, headers, body = received[0]
    assert verify(headers, body, SECRET)
    assert not verify(headers, body, b"another-secret-of-enough-length")
    assert not verify(headers, body.replace(b"agent-1", b"agent-2"), SECRET)
    payload = json.loads(body)
    assert payload["event"] == headers["X-Phigate-Event"] == "approval.requested"
    assert payload["request"]["id"] == view["id"] and payload["request"]["rule"] == "write"
    assert b"canary-9" not in body  # values only for hooks with include_values = true
    assert not {"sql", "parameters", "earlier"} & set(payload["request"])


def test_include_values_sends_the_statement() -> None:
    async def run() -> bytes:
        fake = FakeApprovals()
        async with Receiver() as rx:
            notifier = WebhookNotifier([hook(rx.url, include_values=True)])
            await notified(notifier, fake, sql="DELETE FROM notes WHERE id = 'canary-9'")
            await asyncio.wait_for(rx.got.wait(), 5)
            await notifier.stop()
            return rx.received[0][2]

    assert json.loads(asyncio.run(run()))["request"]["sql"].endswith("'canary-9'")


def test_slack_message_has_approve_and_deny_links() -> None:
    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        fake = FakeApprovals()
        async with Receiver() as rx:
            notifier = WebhookNotifier([hook(rx.url, "slack", secret=None)],
                                       "https://gw.example.org:8443/")  # fmt: skip
            view = await notified(notifier, fake, sql="UPDATE notes SET body = 'canary-3'")
            await asyncio.wait_for(rx.got.wait(), 5)
            await notifier.stop()
            return view, json.loads(rx.received[0][2])

    view, msg = asyncio.run(run())
    rid = view["id"]
    assert set(msg) == {"text", "blocks"}
    assert "approval needed for agent-1" in msg["text"]
    actions = [b for b in msg["blocks"] if b["type"] == "actions"][0]["elements"]
    assert [(a["text"]["text"], a["url"]) for a in actions] == [
        ("Approve", f"https://gw.example.org:8443/approvals/{rid}?action=approve"),
        ("Deny", f"https://gw.example.org:8443/approvals/{rid}?action=deny"),
    ]
    text = json.dumps(msg)
    assert "UPDATE notes SET body = $1" in text and "canary-3" not in text
    assert all(b["type"] in ("section", "actions", "context") for b in msg["blocks"])


def test_retries_after_500_then_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def run() -> list[tuple[float, dict[str, str], bytes]]:
        fake = FakeApprovals()
        async with Receiver(fail_first=2) as rx:
            notifier = WebhookNotifier([hook(rx.url, backoff=0.1)])
            await notified(notifier, fake)
            await asyncio.wait_for(rx.got.wait(), 10)
            await notifier.stop()
            return rx.received

    received = asyncio.run(run())
    assert len(received) == 3
    gaps = [b[0] - a[0] for a, b in zip(received, received[1:], strict=False)]
    assert 0.08 <= gaps[0] < 1.0 and gaps[1] >= 1.5 * gaps[0] * 0.9  # exponential backoff
    assert len({r[1]["X-Phigate-Delivery"] for r in received}) == 1  # one delivery, retried
    assert all(verify(h, b, SECRET) for _, h, b in received)
    assert "delivery failed (HTTP 500); retry 1 of 5" in caplog.text
    assert "delivered after 2 retries" in caplog.text
    ours = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("phigate"))
    assert "/hook" not in ours  # only scheme and host: a URL path may hold a secret


def test_a_stuck_receiver_blocks_nothing_else() -> None:
    async def run() -> tuple[float, float, int]:
        fake = FakeApprovals()
        async with Receiver(stuck=True) as stuck, Receiver() as ok:
            notifier = WebhookNotifier([hook(stuck.url, timeout=30), hook(ok.url)])
            await notifier.start(fake.subscribe())
            while fake.subscribers == 0:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            for _ in range(3):
                await fake.add()  # the service publishing is not held up either
            published = time.monotonic() - started
            await asyncio.wait_for(ok.got.wait(), 5)
            while len(ok.received) < 3:
                await asyncio.sleep(0.01)
            delivered = time.monotonic() - started
            await notifier.stop()
            return published, delivered, len(stuck.received)

    published, delivered, stuck_got = asyncio.run(run())
    assert published < 0.05
    assert delivered < 2.0
    assert stuck_got >= 1  # it was tried, and is still hanging when the others are done


def test_client_errors_are_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> int:
        fake = FakeApprovals()
        app = web.Application()
        seen: list[int] = []

        async def gone(request: web.Request) -> web.Response:
            seen.append(1)
            return web.Response(status=404)

        app.router.add_post("/hook", gone)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        notifier = WebhookNotifier([hook(url)])
        await notified(notifier, fake)
        await asyncio.sleep(0.5)
        await notifier.stop()
        await runner.cleanup()
        return len(seen)

    assert asyncio.run(run()) == 1
    assert "refused with HTTP 404; not retrying" in caplog.text




def test_the_admin_server_notifies_its_webhooks(dev_issuer: Any, dev_cert: Any) -> None:
    import tempfile
    from pathlib import Path

    from admin_fake import start_admin

    async def run() -> bytes:
        loop = asyncio.get_running_loop()
        async with Receiver() as rx:
            with tempfile.TemporaryDirectory(prefix="pgwh", dir="/tmp") as d:
                admin = await loop.run_in_executor(None, lambda: start_admin(
                    Path(d), dev_issuer, dev_cert, local_approvers={},
                    webhooks=[hook(rx.url)], public_url="https://gw.example.org"))  # fmt: skip
                try:
                    while admin.fake.subscribers == 0:
                        await asyncio.sleep(0.01)
                    await loop.run_in_executor(None, admin.add)
                    await asyncio.wait_for(rx.got.wait(), 5)
                finally:
                    await loop.run_in_executor(None, admin.stop)
            return rx.received[0][2]

    assert json.loads(asyncio.run(run()))["event"] == "approval.requested"
