"""The admin API's routes (the same aiohttp app serves the HTTPS listener and the local admin
socket): list, show, approve and deny approval requests, the event stream, health, OpenAPI."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from phigate.admin.auth import Caller, Refusal, Verify, identify
from phigate.admin.openapi import openapi_document
from phigate.admin.protocol import (
    LIST_DEFAULT,
    LIST_MAX,
    STATUSES,
    ApprovalServiceLike,
    Scope,
    error_status,
)
from phigate.admin.sse import STREAMS, close_streams, stream_events
from phigate.config.durations import duration_seconds

__all__ = ["create_app", "SERVICE", "parse_scope"]

log = logging.getLogger(__name__)

SERVICE = web.AppKey("service", ApprovalServiceLike)
_VERIFY: web.AppKey[Verify] = web.AppKey("verify")
_CALLER = web.RequestKey("caller", Caller)
_LOCAL = web.AppKey("local_approvers", Mapping[str, Sequence[str]])

_MAX_BODY = 64 * 1024
_MAX_REASON = 2000
_MAX_VALID_FOR = 30 * 86400.0
_MAX_EXECUTIONS = 10_000
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Routes anyone may read: they carry nothing about requests or identities.
_PUBLIC = frozenset({"/v1/health", "/v1/openapi.json"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    service: ApprovalServiceLike,
    verify: Verify,
    local_approvers: Mapping[str, Sequence[str]] | None = None,
) -> web.Application:
    """The admin API as an aiohttp application; run it with phigate.admin.server.AdminServer."""
    app = web.Application(middlewares=[_errors_and_auth], client_max_size=_MAX_BODY)
    app[SERVICE] = service
    app[_VERIFY] = verify
    app[_LOCAL] = dict(local_approvers or {})
    app[STREAMS] = set()
    app.on_shutdown.append(close_streams)
    app.router.add_get("/v1/health", _health)
    app.router.add_get("/v1/openapi.json", _openapi)
    app.router.add_get("/v1/approvals", _list)
    app.router.add_get("/v1/approvals/stream", _stream)
    app.router.add_get("/v1/approvals/{id}", _show)
    app.router.add_post("/v1/approvals/{id}/approve", _approve)
    app.router.add_post("/v1/approvals/{id}/deny", _deny)
    return app


def error_response(status: int, message: str, challenge: str | None = None) -> web.Response:
    headers = {"WWW-Authenticate": challenge} if challenge else None
    return web.json_response({"error": {"status": status, "message": message}}, status=status,
                             headers=headers)  # fmt: skip


@web.middleware
async def _errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate every non-public route, turn refusals into JSON errors, log one line per
    request (method, route, status, approver; never bodies: reasons and values stay out)."""
    started = time.monotonic()
    route = request.match_info.route.resource
    pattern = route.canonical if route is not None else "(unknown)"
    who = "-"
    try:
        if pattern not in _PUBLIC and route is not None:
            app = request.app
            caller = await identify(request, app[_VERIFY], app[SERVICE].approver_for, app[_LOCAL])
            request[_CALLER] = caller
            who = caller.subject
        response = await handler(request)
    except Refusal as exc:
        response = error_response(exc.status, exc.message, exc.challenge)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason)
    except Exception as exc:
        status = error_status(exc)
        if status is None:
            log.exception("admin API: %s %s failed", request.method, pattern)
            response = error_response(500, "internal error in the gateway; see its log")
        else:
            response = error_response(status, str(getattr(exc, "message", None) or exc))
    log.info("admin API %s %s -> %d (%s, %.0f ms)", request.method, pattern, response.status, who,
             (time.monotonic() - started) * 1000)  # fmt: skip
    if not response.prepared:
        response.headers.setdefault("Cache-Control", "no-store")  # views carry statement values
    return response


def _caller(request: web.Request) -> Caller:
    return request[_CALLER]


def _request_id(request: web.Request) -> str:
    rid = request.match_info["id"]
    if not _REQUEST_ID.fullmatch(rid):
        raise Refusal(404, "no such approval request (ids look like 2f1c…; see GET /v1/approvals)")
    return rid


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def _list(request: web.Request) -> web.Response:
    status = request.query.get("status", "pending")
    if status not in STATUSES:
        raise Refusal(400, f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    raw = request.query.get("limit", str(LIST_DEFAULT))
    if not raw.isdigit() or not 1 <= int(raw) <= LIST_MAX:
        raise Refusal(400, f"limit must be 1 to {LIST_MAX}, got {raw!r}")
    caller = _caller(request)
    views = await request.app[SERVICE].list(caller.approver, status, int(raw))
    return web.json_response({"approvals": views})


async def _show(request: web.Request) -> web.Response:
    view = await request.app[SERVICE].show(_caller(request).approver, _request_id(request))
    return web.json_response(view)


async def _approve(request: web.Request) -> web.Response:
    rid = _request_id(request)
    body = await _body(request)
    scope = parse_scope(body.get("scope"))
    result = await request.app[SERVICE].vote(
        _caller(request).approver, rid, "approve", _reason(body), scope
    )
    return web.json_response(result)


async def _deny(request: web.Request) -> web.Response:
    rid = _request_id(request)
    body = await _body(request)
    if "scope" in body:
        raise Refusal(400, "a deny has no scope; send only {\"reason\": \"...\"}")
    result = await request.app[SERVICE].vote(
        _caller(request).approver, rid, "deny", _reason(body), Scope()
    )
    return web.json_response(result)


async def _stream(request: web.Request) -> web.StreamResponse:
    return await stream_events(request, request.app[SERVICE], _caller(request))


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise Refusal(400, "the body must be JSON, e.g. {\"reason\": \"...\"}") from None
    if not isinstance(body, dict):
        raise Refusal(400, "the body must be a JSON object, e.g. {\"reason\": \"...\"}")
    unknown = set(body) - {"reason", "scope"}
    if unknown:
        raise Refusal(400, f"unknown field {sorted(unknown)[0]!r} (fields: reason, scope)")
    return body


def _reason(body: Mapping[str, Any]) -> str:
    reason = body.get("reason", "")
    if reason is None:
        return ""
    if not isinstance(reason, str):
        raise Refusal(400, "reason must be a string")
    reason = reason.strip()
    if len(reason) > _MAX_REASON:
        raise Refusal(400, f"reason is longer than {_MAX_REASON} characters")
    if any(ord(c) < 32 and c not in "\t" for c in reason):
        raise Refusal(400, "reason must be one line of text (no control characters)")
    return reason


def parse_scope(raw: Any) -> Scope:
    """An approve body's scope; missing fields keep the narrowest choice (this session, these
    values, one execution, the service's default expiry)."""
    if raw is None:
        return Scope()
    if not isinstance(raw, dict):
        raise Refusal(400, "scope must be an object like {\"session\": \"this\"}")
    unknown = set(raw) - {"session", "shape_only", "executions", "valid_for"}
    if unknown:
        raise Refusal(400, f"unknown scope field {sorted(unknown)[0]!r} (fields: session, "
                      "shape_only, executions, valid_for)")  # fmt: skip
    session = raw.get("session", "this")
    if session not in ("this", "any"):
        raise Refusal(400, "scope.session must be \"this\" or \"any\"")
    shape_only = raw.get("shape_only", False)
    if not isinstance(shape_only, bool):
        raise Refusal(400, "scope.shape_only must be true or false")
    valid_for = _valid_for(raw.get("valid_for"))
    executions = raw.get("executions", 1)
    if executions is None:
        if valid_for is None:
            raise Refusal(400, "unlimited executions (null) need scope.valid_for, e.g. \"1h\"")
    elif isinstance(executions, bool) or not isinstance(executions, int) or not (
        1 <= executions <= _MAX_EXECUTIONS
    ):
        raise Refusal(400, f"scope.executions must be 1 to {_MAX_EXECUTIONS} (or null with "
                      "valid_for)")  # fmt: skip
    return Scope(session=session, shape_only=shape_only, executions=executions,
                 valid_for_s=valid_for)  # fmt: skip


def _valid_for(raw: Any) -> float | None:
    if raw is None:
        return None
    seconds: float | None = None
    if isinstance(raw, str):
        seconds = duration_seconds(raw)
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        seconds = float(raw)
    if seconds is None or not 0 < seconds <= _MAX_VALID_FOR:
        raise Refusal(400, "scope.valid_for must be a duration like \"90s\", \"15m\", \"1h\" or "
                      "\"1d\" (at most 30d)")  # fmt: skip
    return seconds
