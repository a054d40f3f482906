"""The control plane's answers to the data plane's requests: authenticate a login, decide a
statement."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from phigate.config import Config
from phigate.errors import IdentityError
from phigate.identity.apikeys import ApiKeyVerifier, looks_like_api_key
from phigate.identity.oidc import Identity
from phigate.masking.classification import CatalogSnapshot
from phigate.policy.engine import PolicyEngine

if TYPE_CHECKING:
    from phigate.approvals.service import ApprovalService

log = logging.getLogger(__name__)

AUTH_INTERNAL_ERROR = "internal error while verifying identity, see gateway log"


DECIDE_INTERNAL_ERROR = "internal error while deciding on this statement, see gateway log"


class RequestLike(Protocol):
    """What the control plane needs of a phigate._native.Request (fakes in tests too)."""

    @property
    def id(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def payload(self) -> dict[str, Any]: ...
    def reply(self, answer: dict[str, Any]) -> bool: ...


class Verifier(Protocol):
    def verify_cached(self, token: str) -> Identity | None: ...
    async def verify(self, token: str) -> Identity: ...


class PrimableVerifier(Verifier, Protocol):
    async def prime(self) -> bool: ...


class ControlPlane:
    """Answers data-plane requests. Every request gets exactly one reply, even on bugs: if the
    answer cannot be computed it fails closed (auth refused, statement denied)."""

    def __init__(
        self,
        verifier: Verifier,
        *,
        apikeys: ApiKeyVerifier | None = None,
        config: Config | None = None,
    ) -> None:
        self.verifier = verifier  # OIDC access tokens
        self.apikeys = apikeys  # None: API keys are not enabled
        # Roles mapping and identity settings; None (unit tests) keeps group-based classes.
        self.config = config
        # PHI catalogs per target (None: could not be loaded; masked identities are refused),
        # and why each missing one is missing (told to the refused clients). Replaced whole.
        self.catalogs: dict[str, CatalogSnapshot | None] = {}
        self.catalog_notes: dict[str, str] = {}
        # True when a text holds an identifier the data plane's detectors or dictionary find
        # (the native Engine's text_has_phi, set once it exists): names the analyzer would log
        # as written are replaced when it says so.
        self.phi_in_text: Callable[[str], bool] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Just-in-time approvals (None: no [approvals] section; statements needing one are
        # refused). The Gateway sets it once the service has started.
        self.approvals: ApprovalService | None = None

    @property
    def policy(self) -> PolicyEngine | None:
        """Statement policy of the current config, rebuilt when a reload swaps ``config``
        (the data plane's epoch bump drops cached decisions at the same time). None without
        a config: every statement is refused."""
        config = self.config
        if config is None:
            return None
        engine: PolicyEngine | None = getattr(self, "_policy", None)
        if (
            engine is None
            or engine.config is not config
            or engine.catalogs is not self.catalogs
            or engine.notes is not self.catalog_notes
        ):
            engine = self._policy = PolicyEngine(config, self.catalogs, self.catalog_notes)
        engine.phi_in_text = self.phi_in_text
        return engine

    def dispatch(self, requests: Iterable[RequestLike]) -> None:
        for req in requests:
            self.handle(req)

    def handle(self, req: RequestLike) -> None:
        try:
            kind = req.kind
            if kind == "authenticate":
                self._authenticate(req)
            elif kind == "decide":
                _reply(req, _decide(req.payload, self.policy))
            elif kind in _APPROVAL_KINDS:
                self._approval_request(kind, req)
            else:
                log.error("request %s: unknown kind %r, refusing it", req.id, kind)
                _reply(req, _deny_internal())
        except Exception:  # noqa: BLE001  # fail closed, never leave a request hanging
            _log_internal("answering a request", req)
            _reply(req, _internal_answer(req))

    def _approval_request(self, kind: str, req: RequestLike) -> None:
        """The approval service answers these (asynchronously); without one, fail closed."""
        service = self.approvals
        if service is None:
            if kind in ("withdraw", "max_rows_exceeded"):
                return  # fire and forget: nothing was held, and nobody waits for an answer
            _reply(req, _no_approvals(req.payload))
        elif kind == "approval":
            service.on_approval(req)
        elif kind == "await_approval":
            service.on_await(req)
        elif kind == "withdraw":
            service.on_withdraw(req)
        else:
            service.on_max_rows(req)

    async def wait_idle(self) -> None:
        """Wait until every slow-path answer has been sent (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel slow-path work; each cancelled request is still answered (refused)."""
        for task in self._tasks:
            task.cancel()
        await self.wait_idle()

    def _authenticate(self, req: RequestLike) -> None:
        token = req.payload.get("password")
        token = token if isinstance(token, str) else ""
        # A reload may swap these; this request keeps the ones it started with.
        verifier, config = self.verifier, self.config
        if looks_like_api_key(token):
            self._authenticate_apikey(req, token, config)
            return
        try:
            identity = verifier.verify_cached(token)
            if identity is not None:
                _reply(req, _auth_ok(identity, config, _target(req)))
                return
        except IdentityError as exc:
            _reply(req, _auth_refused(req, exc))
            return
        task = asyncio.get_running_loop().create_task(
            self._authenticate_slow(req, token, verifier, config)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _authenticate_apikey(self, req: RequestLike, key: str, config: Config | None) -> None:
        # Never falls back to OIDC: a phk_ password is an API key or nothing.
        apikeys = self.apikeys
        try:
            if apikeys is None:
                raise IdentityError(
                    "28P01",
                    "API keys are not enabled on this gateway: send an OIDC access token as the "
                    "password",
                    "not_enabled",
                )
            answer = _auth_ok(apikeys.verify(key), config, _target(req))
        except IdentityError as exc:
            _reply(req, _auth_refused(req, exc))
            return
        _reply(req, answer)
        if apikeys.flush_due():  # record last use off the loop: it locks, fsyncs and renames
            apikeys.mark_flushing()
            future = asyncio.get_running_loop().run_in_executor(None, apikeys.flush)
            future.add_done_callback(_log_flush_failure)

    async def _authenticate_slow(
        self, req: RequestLike, token: str, verifier: Verifier, config: Config | None
    ) -> None:
        try:
            answer = _auth_ok(await verifier.verify(token), config, _target(req))
        except IdentityError as exc:
            answer = _auth_refused(req, exc)
        except asyncio.CancelledError:
            _reply(
                req,
                {
                    "ok": False,
                    "sqlstate": "28000",
                    "message": "gateway is shutting down",
                    "reason": "shutting_down",
                },
            )
            raise
        except Exception:  # noqa: BLE001
            _log_internal("verifying identity", req)
            answer = _internal_answer(req)
        _reply(req, answer)


_APPROVAL_KINDS = frozenset({"approval", "await_approval", "withdraw", "max_rows_exceeded"})


def _no_approvals(payload: dict[str, Any]) -> dict[str, Any]:
    approval = payload.get("approval")
    if isinstance(approval, dict) and approval.get("rule") == "max_rows":
        # A statement cut at max_rows before asks whether an approver lifted the cap: nobody
        # can have, so it runs under the cap again.
        return {"action": "run"}
    return {
        "action": "deny",
        "sqlstate": "42501",
        "message": "this statement needs approval, but approvals are not enabled on this "
        "gateway, so it is refused",
        "hint": "Ask the gateway administrator to add an [approvals] section and restart the "
        "gateway (see docs/approvals.md).",
    }


def _target(req: RequestLike) -> str | None:
    database = req.payload.get("database")
    return database if isinstance(database, str) else None


def _auth_ok(
    identity: Identity, config: Config | None = None, target: str | None = None
) -> dict[str, Any]:
    """The data plane's answer for a verified identity; IdentityError(28000) if no role fits.

    Groups map to roles through ``config.roles_for(groups, target=...)`` (the policy side owns
    it): it returns a role set, or None when no role grants access on that target (it may also
    raise IdentityError itself). The role set's canonical ``identity_class`` keys the decision
    cache; ``db_role`` is the upstream role the session runs as. Without ``config`` (unit tests
    of the dispatch) the class is the groups'.
    """
    identity_class = identity.identity_class
    db_role: str | None = None
    masked = False
    clear_kinds: list[str] = []
    roles: list[str] = []
    max_rows: int | None = None
    approval_mode = "hold"
    roles_for = getattr(config, "roles_for", None)
    if roles_for is not None:
        roleset = roles_for(identity.groups, target=target)
        if roleset is None:
            raise IdentityError("28000", _no_role_message(identity), "no_role")
        identity_class = roleset.identity_class
        roles = list(getattr(roleset, "names", ()))  # stand-in configs in tests lack it
        db_role = roleset.db_role or None
        # The data plane cuts results beyond max_rows; approval_mode "return" refuses a
        # statement needing approval at once instead of holding it (stand-ins lack both).
        max_rows = getattr(roleset, "max_rows", None)
        approval_mode = getattr(roleset, "approval_mode", "hold")
        # Sees some classified PHI kind masked: the data plane scrubs errors and notices.
        phi = getattr(config, "phi", None)  # absent from the dispatch tests' stand-in configs
        if phi is not None:
            masked = bool(phi.masked_kinds(roleset.clear_kinds))
            clear_kinds = sorted(roleset.clear_kinds)  # layer 2 passes these kinds untouched
    close_on_expiry = config.identity.close_on_expiry if config is not None else True
    return {
        "ok": True,
        "subject": identity.subject,
        "groups": list(identity.groups),
        "identity_class": identity_class,
        "db_role": db_role,
        "expires_at": identity.expires_at,
        "close_on_expiry": close_on_expiry,
        "masked": masked,
        "clear_kinds": clear_kinds,
        "max_rows": max_rows,
        "approval_mode": approval_mode,
        # For the session_start record: the roles it holds and what it presented.
        "roles": roles,
        "credential": identity.credential(),
    }


_MAX_GROUPS_SHOWN = 10


def _no_role_message(identity: Identity) -> str:
    # json.dumps quotes and escapes: a subject or group holding quotes or control characters
    # cannot forge the rest of the message (it is also logged).
    shown = [json.dumps(g, ensure_ascii=False) for g in identity.groups[:_MAX_GROUPS_SHOWN]]
    more = len(identity.groups) - len(shown)
    if more > 0:
        shown.append(f"and {more} more")
    groups = ", ".join(shown) if shown else "none"
    return (
        f"no role grants access to identity {json.dumps(identity.subject, ensure_ascii=False)} "
        f"(groups: {groups}); ask your gateway administrator to map one of your groups to a role"
    )


def _log_flush_failure(future: asyncio.Future[bool]) -> None:
    if not future.cancelled() and future.exception() is not None:
        exc = future.exception()
        log.error("recording API key use failed: %s", type(exc).__name__)


def _auth_refused(req: RequestLike, exc: IdentityError) -> dict[str, Any]:
    # The message is client-safe by construction (no token, no paths), so it may be logged too.
    log.info(
        "session %s from %s refused (%s, %s): %s",
        req.payload.get("session"),
        req.payload.get("peer"),
        exc.sqlstate,
        exc.reason,
        exc.message,
    )
    answer: dict[str, Any] = {
        "ok": False,
        "sqlstate": exc.sqlstate,
        "message": exc.message,
        "reason": exc.reason,
    }
    if exc.credential is not None:
        answer["credential"] = exc.credential
    return answer


def _decide(payload: dict[str, Any], policy: PolicyEngine | None) -> dict[str, Any]:
    # Analyze with the PostgreSQL parser and judge against the session's roles (its
    # identity_class comes from the authenticate answer). The normalized text (literals
    # replaced by $n) keys the cache when the decision cannot depend on literals, and is the
    # PHI-free text of the statement event.
    sql = payload["sql"]
    identity_class = payload["identity_class"]
    if not isinstance(sql, str) or not isinstance(identity_class, str):
        raise TypeError("decide payload without SQL text or identity class")
    if policy is None:
        return {
            "action": "deny",
            "sqlstate": "42501",
            "message": "no statement policy is loaded on this gateway (rule: no-policy)",
            "hint": None,
            "cache": "none",
            "normalized": None,
            "audit": {"rule": "deny no-policy"},
        }
    return policy.decide(identity_class, sql)


def _deny_internal() -> dict[str, Any]:
    return {
        "action": "deny",
        "sqlstate": "58000",
        "message": DECIDE_INTERNAL_ERROR,
        "hint": None,
        "cache": "none",
        "normalized": None,
        "audit": {"rule": "deny internal error"},
    }


def _internal_answer(req: RequestLike) -> dict[str, Any]:
    if getattr(req, "kind", None) == "authenticate":
        return {
            "ok": False,
            "sqlstate": "28000",
            "message": AUTH_INTERNAL_ERROR,
            "reason": "internal_error",
        }
    return _deny_internal()


def _log_internal(what: str, req: RequestLike) -> None:
    # Exception messages can quote their inputs (a token, a SQL literal holding PHI), so log the
    # type and the stack only, never str(exc) or the payload.
    exc = sys.exc_info()[1]
    stack = "".join(traceback.format_tb(exc.__traceback__)) if exc else ""
    log.error(
        "internal error while %s (request %s, %s): %s\n%s",
        what,
        getattr(req, "id", "?"),
        getattr(req, "kind", "?"),
        type(exc).__name__,
        stack,
    )


def _reply(req: RequestLike, answer: dict[str, Any]) -> None:
    try:
        delivered = req.reply(answer)
    except ValueError:
        log.error("data plane rejected the answer to request %s (%s)", req.id, req.kind)
        return
    except Exception:  # noqa: BLE001
        log.exception("replying to request %s failed", req.id)
        return
    if not delivered:
        log.warning("request %s (%s) answered after the data plane gave up", req.id, req.kind)
