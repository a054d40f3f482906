"""The approvals event stream (server-sent events): new requests, votes and outcomes, each as the
approver is allowed to see it, with keepalives; closed when the credential expires or the gateway
stops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from phigate.admin.auth import Caller
from phigate.admin.protocol import ApprovalServiceLike, error_status

__all__ = ["stream_events", "STREAMS", "close_streams", "KEEPALIVE_SECONDS"]

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0  # proxies and load balancers drop connections idle for longer
_QUEUE_MAX = 1000  # events waiting for one slow reader; beyond that the reader is disconnected
_EVENTS = frozenset({"request", "vote", "outcome"})
_CLOSE: dict[str, Any] = {"event": "__close__"}  # tells a stream to end (gateway stopping)

STREAMS = web.AppKey("sse_streams", set[asyncio.Queue[dict[str, Any]]])


async def close_streams(app: web.Application) -> None:
    """on_shutdown: end every open stream so the listener can stop without waiting for them."""
    for queue in list(app.get(STREAMS, ())):
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(_CLOSE)


async def _pump(
    events: AsyncIterator[dict[str, Any]], queue: asyncio.Queue[dict[str, Any]]
) -> None:
    """Move the service's events into this stream's queue; a reader too slow to keep up is cut
    off (it re-lists after reconnecting) rather than holding events in memory without bound."""
    try:
        async for event in events:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("admin API: an event stream reader fell %d events behind; closing it",
                            _QUEUE_MAX)  # fmt: skip
                break
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(_CLOSE)


async def stream_events(
    request: web.Request, service: ApprovalServiceLike, caller: Caller
) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-store",
        "X-Accel-Buffering": "no",  # reverse proxies must pass events on at once
    })  # fmt: skip
    await response.prepare(request)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=_QUEUE_MAX)
    streams = request.app[STREAMS]
    streams.add(queue)
    pump = asyncio.create_task(_pump(service.subscribe(), queue))
    sent = 0
    try:
        await response.write(b"retry: 3000\n: phigate approvals stream\n\n")
        while True:
            wait = KEEPALIVE_SECONDS
            if caller.expires_at is not None:
                wait = min(wait, caller.expires_at - time.time())
                if wait <= 0:
                    await _send(response, "end", None, {"reason": "credential expired; "
                                                        "reconnect with a fresh token"})
                    break
            try:
                event = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if event is _CLOSE:
                await _send(response, "end", None, {"reason": "stream closed by the gateway; "
                                                    "reconnect and list pending requests"})
                break
            view = await _visible(service, caller, event)
            if view is not None:
                sent += 1
                await _send(response, str(event["event"]), sent,
                            {"event": event["event"], "request": view})  # fmt: skip
    except (ConnectionResetError, ConnectionError):
        pass  # the reader went away
    finally:
        streams.discard(queue)
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump
    return response


async def _visible(
    service: ApprovalServiceLike, caller: Caller, event: dict[str, Any]
) -> dict[str, Any] | None:
    """The event's request as this approver may see it now (the service decides; a request the
    approver may not act on is not shown at all)."""
    if event.get("event") not in _EVENTS:
        return None
    request = event.get("request")
    rid = request.get("id") if isinstance(request, dict) else None
    if not isinstance(rid, str):
        return None
    try:
        return await service.show(caller.approver, rid)
    except Exception as exc:
        if error_status(exc) is None:
            log.exception("admin API: event stream could not load a request")
        return None


async def _send(
    response: web.StreamResponse, event: str, seq: int | None, data: dict[str, Any]
) -> None:
    lines = [f"event: {event}"]
    if seq is not None:
        lines.append(f"id: {seq}")
    lines.append("data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")))
    await response.write(("\n".join(lines) + "\n\n").encode())
