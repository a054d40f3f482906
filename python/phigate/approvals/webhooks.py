"""Webhook notifications of new approval requests: generic JSON signed with HMAC-SHA256 and a
timestamp, or a Slack incoming-webhook message with approve/deny links; retried with exponential
backoff in background tasks that never hold up anything else."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from phigate.config.approvals_admin import WebhookConfig

__all__ = ["WebhookNotifier", "json_payload", "slack_payload", "sign", "SIGNATURE_HEADER",
           "TIMESTAMP_HEADER"]  # fmt: skip

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Phigate-Signature"
TIMESTAMP_HEADER = "X-Phigate-Timestamp"
EVENT = "approval.requested"
# The statement with its values and the session's earlier statements: only sent to hooks that
# say include_values = true (a chat channel is not an approver).
_VALUE_FIELDS = ("sql", "parameters", "earlier")
_MAX_BACKOFF = 300.0
_MAX_PENDING = 1000  # deliveries in flight (all hooks); beyond that new ones are dropped, logged
_PER_HOOK_CONCURRENCY = 4
_SLACK_STATEMENT_CHARS = 2500  # Slack cuts a section's text at 3000 characters


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 over "<timestamp>.<body>" (so a captured
    delivery cannot be replayed later with a fresh timestamp)."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={mac}"


def _view(request: dict[str, Any], include_values: bool) -> dict[str, Any]:
    if include_values:
        return dict(request)
    return {k: v for k, v in request.items() if k not in _VALUE_FIELDS}


def json_payload(request: dict[str, Any], include_values: bool) -> dict[str, Any]:
    return {"event": EVENT, "request": _view(request, include_values)}


def _links(public_url: str | None, rid: str) -> tuple[str, str] | None:
    if not public_url:
        return None
    base = f"{public_url.rstrip('/')}/approvals/{rid}"
    return f"{base}?action=approve", f"{base}?action=deny"


def _esc(text: Any) -> str:
    """Slack mrkdwn control characters."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(
    request: dict[str, Any], public_url: str | None, include_values: bool
) -> dict[str, Any]:
    """A Slack incoming-webhook message: summary text, the facts, the statement (its shape unless
    include_values) and approve/deny buttons linking to the gateway's public URL."""
    rid = str(request.get("id", "?"))
    roles = request.get("roles") or []
    role = ", ".join(map(str, roles)) if isinstance(roles, list) else str(roles)
    subject, target = request.get("subject", "?"), request.get("target", "?")
    reason = request.get("reason") or "needs approval"
    text = f"phigate: approval needed for {subject} ({role or 'no role'}) on {target}: {reason}"
    statement = request.get("sql") if include_values and request.get("sql") else None
    statement = statement or request.get("normalized") or ""
    statement = str(statement)
    if len(statement) > _SLACK_STATEMENT_CHARS:
        statement = statement[:_SLACK_STATEMENT_CHARS] + " …"
    facts = [("Request", rid), ("Subject", subject), ("Role", role or "-"),
             ("Rule", request.get("rule", "-")), ("Target", target),
             ("Expires", request.get("expires_at", "-"))]  # fmt: skip
    if request.get("estimate") is not None:
        facts.append(("Estimated rows", request["estimate"]))
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn",
                                     "text": f"*Approval needed*: {_esc(reason)}"}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{_esc(v)}"}
                                       for k, v in facts]},
        {"type": "section", "text": {"type": "mrkdwn", "text": _code(statement)}},
    ]  # fmt: skip
    links = _links(public_url, rid)
    if links is not None:
        blocks.append({"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "Approve"},
             "style": "primary", "url": links[0], "action_id": "approve"},
            {"type": "button", "text": {"type": "plain_text", "text": "Deny"},
             "style": "danger", "url": links[1], "action_id": "deny"},
        ]})  # fmt: skip
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text":
                   f"or on the gateway host: `phigate approvals show {_esc(rid)}`"}]})  # fmt: skip
    return {"text": text, "blocks": blocks}


class WebhookNotifier:
    """Sends each new approval request to every configured hook. ``notify`` only schedules work;
    deliveries run in their own tasks with retries, so a slow or failing receiver delays nothing
    (not the service, not the other hooks, not the admin API)."""

    def __init__(self, hooks: Sequence[WebhookConfig], public_url: str | None = None) -> None:
        self.hooks = tuple(hooks)
        self.public_url = public_url
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumer: asyncio.Task[None] | None = None
        self._limits: list[asyncio.Semaphore] = []
        self.dropped = 0

    async def start(self, events: AsyncIterator[dict[str, Any]] | None = None) -> None:
        """Open the HTTP client; with ``events`` (the service's subscribe()), follow them."""
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": "phigate-webhooks"}, raise_for_status=False
        )
        self._limits = [asyncio.Semaphore(_PER_HOOK_CONCURRENCY) for _ in self.hooks]
        if events is not None:
            self._consumer = asyncio.create_task(self._follow(events), name="webhooks-follow")

    async def stop(self) -> None:
        """Abandon pending deliveries (they are notifications; the requests stay listed)."""
        tasks = [t for t in (self._consumer, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _follow(self, events: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for event in events:
                self.notify(event)
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    def notify(self, event: dict[str, Any]) -> None:
        """Schedule deliveries for a service event (only new requests are sent)."""
        request = event.get("request")
        if event.get("event") != "request" or not isinstance(request, dict):
            return
        for index, hook in enumerate(self.hooks):
            if len(self._tasks) >= _MAX_PENDING:
                self.dropped += 1
                log.warning("webhook %s: %d deliveries pending; dropping the one for request %s",
                            hook.where, _MAX_PENDING, request.get("id"))  # fmt: skip
                continue
            task = asyncio.create_task(self._deliver(index, hook, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def body(self, hook: WebhookConfig, request: dict[str, Any]) -> bytes:
        if hook.format == "slack":
            payload = slack_payload(request, self.public_url, hook.include_values)
        else:
            payload = json_payload(request, hook.include_values)
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()

    async def _deliver(self, index: int, hook: WebhookConfig, request: dict[str, Any]) -> None:
        assert self._session is not None
        rid = request.get("id")
        body = self.body(hook, request)
        delivery = str(uuid.uuid4())  # the same on retries: receivers can drop duplicates
        for attempt in range(hook.retries + 1):
            headers = {"Content-Type": "application/json", "X-Phigate-Event": EVENT,
                       "X-Phigate-Delivery": delivery}  # fmt: skip
            if hook.secret is not None:
                timestamp = str(int(time.time()))
                headers[TIMESTAMP_HEADER] = timestamp
                headers[SIGNATURE_HEADER] = sign(hook.secret.reveal(), timestamp, body)
            retry_after: float | None = None
            try:
                async with self._limits[index], self._session.post(
                    hook.url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=hook.timeout),
                ) as response:  # fmt: skip
                    status = response.status
                    if 200 <= status < 300:
                        if attempt:
                            log.info("webhook %s: request %s delivered after %d retries",
                                     hook.where, rid, attempt)  # fmt: skip
                        return
                    retry_after = _retry_after(response.headers.get("Retry-After"))
                    outcome = f"HTTP {status}"
                    if 400 <= status < 500 and status not in (408, 429):
                        log.error("webhook %s: request %s refused with %s; not retrying (check "
                                  "the URL and secret)", hook.where, rid, outcome)  # fmt: skip
                        return
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                outcome = type(exc).__name__  # never the message: it may quote the URL
            if attempt == hook.retries:
                log.error("webhook %s: request %s not delivered after %d attempts (last: %s)",
                          hook.where, rid, attempt + 1, outcome)  # fmt: skip
                return
            delay = min(_MAX_BACKOFF, hook.backoff * 2**attempt) * random.uniform(0.9, 1.1)
            if retry_after is not None:
                delay = max(delay, min(retry_after, _MAX_BACKOFF))
            log.warning("webhook %s: request %s delivery failed (%s); retry %d of %d in %.1f s",
                        hook.where, rid, outcome, attempt + 1, hook.retries, delay)  # fmt: skip
            await asyncio.sleep(delay)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _code(statement: str) -> str:
    """The statement as a Slack code block (a fence inside it would end the block early)."""
    fence = "`" * 3
    return fence + _esc(statement).replace(fence, "'''") + fence
