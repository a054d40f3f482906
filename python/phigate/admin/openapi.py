"""The admin API's OpenAPI 3.1 description, served at GET /v1/openapi.json and shipped as
docs/approvals-openapi.json (written from ``openapi_json()``; a test keeps the two equal)."""

from __future__ import annotations

import json
from typing import Any

from phigate import __version__
from phigate.admin.protocol import LIST_DEFAULT, LIST_MAX, STATUSES

__all__ = ["openapi_document", "openapi_json"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "401": {"$ref": "#/components/responses/Unauthenticated"},
    "403": {"$ref": "#/components/responses/Forbidden"},
}
_REQUEST_ID = {
    "name": "id", "in": "path", "required": True, "description": "the approval request's id",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
}  # fmt: skip

_VIEW = {
    "type": "object",
    "description": "An approval request as an approver sees it: who asked, why it is held and "
    "the statement with its values (approvers are authorized to see them).",
    "required": ["id", "status"],
    "additionalProperties": True,
    "properties": {
        "id": {"type": "string"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "created_at": {"description": "when the statement was held"},
        "expires_at": {"description": "when it times out unless someone decides"},
        "subject": {"type": "string", "description": "the agent identity that sent it"},
        "groups": {"type": "array", "items": {"type": "string"}},
        "roles": {"type": "array", "items": {"type": "string"}},
        "target": {"type": "string", "description": "the database target"},
        "rule": {"type": "string", "description": "the risk rule that held it"},
        "reason": {"type": "string", "description": "why it needs approval"},
        "mode": {"type": "string", "enum": ["hold", "return"]},
        "normalized": {"type": "string", "description": "the statement without its values"},
        "sql": {"type": ["string", "null"], "description": "the statement as sent, with values"},
        "parameters": {"type": ["array", "null"], "description": "bound parameter values"},
        "estimate": {"type": ["number", "null"], "description": "estimated rows (EXPLAIN)"},
        "masked_columns": {"description": "columns the agent would see masked"},
        "earlier": {"type": ["array", "null"], "description": "the session's earlier statements"},
        "votes": {"type": "array", "description": "votes so far"},
        "needed": {"description": "what is still needed for the quorum"},
    },
}
_SCOPE = {
    "type": "object",
    "additionalProperties": False,
    "description": "What the approval covers. Defaults are the narrowest: this session, these "
    "exact values, one execution, the gateway's default expiry.",
    "properties": {
        "session": {"type": "string", "enum": ["this", "any"], "default": "this"},
        "shape_only": {"type": "boolean", "default": False,
                       "description": "any parameter or literal values (the statement's shape)"},
        "executions": {"type": ["integer", "null"], "minimum": 1, "maximum": 10000, "default": 1,
                       "description": "null: unlimited until valid_for ends (needs valid_for)"},
        "valid_for": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?[smhd]?$",
                      "description": "how long the approval stays usable, e.g. 15m, 1h (<= 30d)"},
    },
}  # fmt: skip
_REASON = {"type": "string", "maxLength": 2000,
           "description": "free text for the audit trail (stored as a hash) and, on a deny, for "
           "the agent's error message"}  # fmt: skip


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may not share mutable state)."""
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "phigate approvals admin API",
            "version": __version__,
            "description": "Approve or deny statements phigate holds for a person's decision. "
            "Over HTTPS every route but /v1/health and /v1/openapi.json needs "
            "'Authorization: Bearer <OIDC access token or API key>' of an approver; on the "
            "local admin socket the connecting unix user may be mapped to approver groups "
            "instead.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "OIDC access token or phigate API key"}},
            "schemas": {
                "ApprovalView": _VIEW,
                "Scope": _SCOPE,
                "ApproveBody": {"type": "object", "additionalProperties": False,
                                "properties": {"reason": _REASON, "scope": _ref("Scope")}},
                "DenyBody": {"type": "object", "additionalProperties": False,
                             "properties": {"reason": _REASON}},
                "ApprovalList": {"type": "object", "required": ["approvals"], "properties": {
                    "approvals": {"type": "array", "items": _ref("ApprovalView")}}},
                "VoteResult": {"type": "object", "additionalProperties": True,
                               "description": "the vote as recorded and the request's state"},
                "Error": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "object", "required": ["status", "message"], "properties": {
                        "status": {"type": "integer"}, "message": {"type": "string"}}}}},
            },
            "responses": {
                "Unauthenticated": {
                    "description": "no, malformed, expired or unverifiable credential",
                    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": _ref("Error")}},
                },
                "Forbidden": _json(_ref("Error"), "the identity is not an approver, or not one "
                                   "who may act on this request (or it is the requester)"),
                "NotFound": _json(_ref("Error"), "no such request visible to this approver"),
                "BadRequest": _json(_ref("Error"), "the request is malformed; the message says "
                                    "what to send"),
                "Conflict": _json(_ref("Error"), "the request is already decided or withdrawn"),
            },
        },  # fmt: skip
        "security": secured,
        "paths": {
            "/v1/health": {"get": {
                "summary": "liveness of the admin API", "operationId": "health", "security": [],
                "responses": {"200": _json({"type": "object"}, "the API is up")},
            }},
            "/v1/openapi.json": {"get": {
                "summary": "this document", "operationId": "openapi", "security": [],
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document")},
            }},
            "/v1/approvals": {"get": {
                "summary": "approval requests this approver may act on",
                "operationId": "listApprovals",
                "parameters": [{"name": "status", "in": "query", "required": False,
                                "schema": {"type": "string", "enum": list(STATUSES),
                                           "default": "pending"}},
                               {"name": "limit", "in": "query", "required": False,
                                "description": "at most this many (the newest)",
                                "schema": {"type": "integer", "minimum": 1,
                                           "maximum": LIST_MAX, "default": LIST_DEFAULT}}],
                "responses": {"200": _json(_ref("ApprovalList"), "the requests, newest first"),
                              "400": {"$ref": "#/components/responses/BadRequest"}, **_ERRORS},
            }},
            "/v1/approvals/stream": {"get": {
                "summary": "server-sent events: new requests, votes and outcomes",
                "description": "text/event-stream. Each event is `event: request|vote|outcome` "
                "with `data: {\"event\": ..., \"request\": ApprovalView}`; comments are sent as "
                "keepalives every 15 s; `event: end` says why the gateway closed the stream. "
                "Open the stream first, then list pending requests, so nothing is missed.",
                "operationId": "streamApprovals",
                "responses": {"200": {"description": "the event stream", "content": {
                    "text/event-stream": {"schema": {"type": "string"}}}}, **_ERRORS},
            }},
            "/v1/approvals/{id}": {"get": {
                "summary": "one approval request with the statement, values and votes",
                "operationId": "showApproval", "parameters": [_REQUEST_ID],
                "responses": {"200": _json(_ref("ApprovalView"), "the request"), **_ERRORS,
                              "404": {"$ref": "#/components/responses/NotFound"}},
            }},
            "/v1/approvals/{id}/approve": {"post": {
                "summary": "approve (a vote; the request is approved once the quorum is met)",
                "operationId": "approve", "parameters": [_REQUEST_ID],
                "requestBody": {"required": False, "content": {
                    "application/json": {"schema": _ref("ApproveBody")}}},
                "responses": {"200": _json(_ref("VoteResult"), "the vote was recorded"),
                              "400": {"$ref": "#/components/responses/BadRequest"}, **_ERRORS,
                              "404": {"$ref": "#/components/responses/NotFound"},
                              "409": {"$ref": "#/components/responses/Conflict"}},
            }},
            "/v1/approvals/{id}/deny": {"post": {
                "summary": "deny (one deny from an authorized approver denies the request)",
                "operationId": "deny", "parameters": [_REQUEST_ID],
                "requestBody": {"required": False, "content": {
                    "application/json": {"schema": _ref("DenyBody")}}},
                "responses": {"200": _json(_ref("VoteResult"), "the vote was recorded"),
                              "400": {"$ref": "#/components/responses/BadRequest"}, **_ERRORS,
                              "404": {"$ref": "#/components/responses/NotFound"},
                              "409": {"$ref": "#/components/responses/Conflict"}},
            }},
        },  # fmt: skip
    }


def openapi_json() -> str:
    """The document as docs/approvals-openapi.json holds it."""
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"
