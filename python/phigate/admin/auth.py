"""Who is calling the admin API: a bearer token (OIDC access token or API key) verified like an
agent login, or on the local admin socket the peer's unix user (SO_PEERCRED) mapped through
local_approvers; either must be an approver."""

from __future__ import annotations

import asyncio
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from phigate.errors import IdentityError
from phigate.identity.apikeys import ApiKeyVerifier, looks_like_api_key
from phigate.identity.oidc import Identity

__all__ = ["Caller", "Refusal", "Verify", "make_verify", "peer_uid", "identify"]

Verify = Callable[[str], Awaitable[Identity]]
_MAX_TOKEN_BYTES = 16 * 1024
# Identity failures that are the gateway's, not the caller's: retrying later may work.
_GATEWAY_FAULTS = frozenset({"jwks_unavailable", "internal_error"})
_NOT_APPROVER = (
    "this identity is not an approver: no [approvers] rule names any of its groups "
    "(agent credentials cannot approve; sign in as a person who is an approver)"
)


class _TokenVerifier(Protocol):
    async def verify(self, token: str) -> Identity: ...


@dataclass(frozen=True)
class Caller:
    """An authenticated approver: how the request was authenticated and the service's handle."""

    subject: str
    groups: tuple[str, ...]
    approver: Any
    via: str  # "token" or "peer"
    expires_at: float | None  # the credential's expiry (a stream is closed then)


class Refusal(Exception):
    """A request refused before it reached the service: HTTP status and a message saying what to
    do; 401 answers carry a WWW-Authenticate challenge."""

    def __init__(self, status: int, message: str, *, challenge: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.challenge = challenge


def make_verify(oidc: _TokenVerifier | None, apikeys: ApiKeyVerifier | None) -> Verify:
    """The gateway's own verifiers as one coroutine: API keys (phk_…) by the key store, anything
    else as an OIDC access token."""

    async def verify(token: str) -> Identity:
        if looks_like_api_key(token):
            if apikeys is None:
                raise IdentityError("28000", "API keys are not enabled on this gateway")
            return apikeys.verify(token)
        if oidc is None:
            raise IdentityError("28000", "OIDC tokens are not enabled on this gateway", "no_oidc")
        return await oidc.verify(token)

    return verify


def peer_uid(request: web.Request) -> int | None:
    """The connecting process's uid on a unix socket (SO_PEERCRED), None on TCP."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Refusal(401, "use the Authorization header as 'Bearer <token>'",
                      challenge='Bearer realm="phigate", error="invalid_request"')  # fmt: skip
    if len(token) > _MAX_TOKEN_BYTES:
        raise Refusal(401, "the token is too large to be an access token or API key",
                      challenge='Bearer realm="phigate", error="invalid_token"')  # fmt: skip
    return token


async def identify(
    request: web.Request,
    verify: Verify,
    approver_for: Callable[[str, Sequence[str]], Any | None],
    local_approvers: Mapping[str, Sequence[str]],
) -> Caller:
    """Authenticate a request and map it to an approver, or raise Refusal (401/403)."""
    token = _bearer(request)
    if token is not None:
        try:
            identity = await verify(token)
        except IdentityError as exc:  # its message is client-safe (no token, no claims)
            if exc.reason in _GATEWAY_FAULTS:
                raise Refusal(503, exc.message) from None
            raise Refusal(401, exc.message,
                          challenge='Bearer realm="phigate", error="invalid_token"') from None
        approver = approver_for(identity.subject, identity.groups)
        if approver is None:
            raise Refusal(403, _NOT_APPROVER)
        return Caller(identity.subject, tuple(identity.groups), approver, "token",
                      identity.expires_at)  # fmt: skip
    uid = peer_uid(request)
    if uid is None:
        raise Refusal(401, "an approver's bearer token is required (Authorization: Bearer "
                      "<OIDC access token or API key>)",
                      challenge='Bearer realm="phigate"')  # fmt: skip
    user = await asyncio.to_thread(_user_name, uid)
    groups = local_approvers.get(user) if user is not None else None
    if user is None or groups is None:
        raise Refusal(403, f"unix user {user or uid} is not in [approvals.admin_socket] "
                      "local_approvers; ask the gateway operator to add it, or pass an "
                      "approver's token (--token-file)")  # fmt: skip
    subject = f"unix:{user}"
    approver = approver_for(subject, tuple(groups))
    if approver is None:
        raise Refusal(403, f"{_NOT_APPROVER} (local_approvers maps unix user {user} to "
                      f"{', '.join(groups)})")  # fmt: skip
    return Caller(subject, tuple(groups), approver, "peer", None)


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
