"""Run the control plane: build the Engine, answer its requests, drain events, handle signals."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import uvloop

from phigate.audit.events import EventSink
from phigate.config import Config, load_config
from phigate.control.allocator import tune_malloc
from phigate.errors import ConfigError, IdentityError, PhigateError
from phigate.identity.apikeys import ApiKeyVerifier, looks_like_api_key
from phigate.identity.oidc import Identity, NoOidcVerifier, OidcVerifier
from phigate.masking.catalog_keeper import CatalogKeeper, Loader
from phigate.masking.classification import CatalogSnapshot, load_catalog
from phigate.masking.layer2 import masking_state_json
from phigate.policy.engine import PolicyEngine

__all__ = [
    "ControlPlane",
    "Gateway",
    "GatewayThread",
    "run",
    "sd_notify",
    "serve",
]

log = logging.getLogger(__name__)

EVENT_DRAIN_INTERVAL = 0.2
# How often the data plane's counters (sessions, decision-cache hits/misses, timeouts, bytes)
# are written to the events log as a `stats` event, for operators and monitoring.
STATS_INTERVAL = 60.0
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


class EngineLike(Protocol):
    """The subset of phigate._native.Engine the Gateway uses."""

    def start(self) -> None: ...
    def listen_addresses(self) -> list[str]: ...
    def wakeup_fd(self) -> int: ...
    def take_requests(self) -> list[Any]: ...
    def take_events(self) -> bytes: ...

    def stats(self) -> dict[str, int]: ...
    def reconfigure(self, config_json: str) -> int: ...
    def bump_epoch(self) -> int: ...
    def set_masking(self, state_json: str) -> None: ...
    def shutdown(self, grace_seconds: float) -> None: ...


class Verifier(Protocol):
    def verify_cached(self, token: str) -> Identity | None: ...
    async def verify(self, token: str) -> Identity: ...


class PrimableVerifier(Verifier, Protocol):
    async def prime(self) -> bool: ...


EngineFactory = Callable[[str], EngineLike]


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
        self._tasks: set[asyncio.Task[None]] = set()

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
            else:
                log.error("request %s: unknown kind %r, refusing it", req.id, kind)
                _reply(req, _deny_internal())
        except Exception:  # noqa: BLE001  # fail closed, never leave a request hanging
            _log_internal("answering a request", req)
            _reply(req, _internal_answer(req))

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
            _reply(req, {"ok": False, "sqlstate": "28000", "message": "gateway is shutting down"})
            raise
        except Exception:  # noqa: BLE001
            _log_internal("verifying identity", req)
            answer = _internal_answer(req)
        _reply(req, answer)


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
    roles_for = getattr(config, "roles_for", None)
    if roles_for is not None:
        roleset = roles_for(identity.groups, target=target)
        if roleset is None:
            raise IdentityError("28000", _no_role_message(identity))
        identity_class = roleset.identity_class
        db_role = roleset.db_role or None
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
        "session %s from %s refused (%s): %s",
        req.payload.get("session_id"),
        req.payload.get("peer"),
        exc.sqlstate,
        exc.message,
    )
    return {"ok": False, "sqlstate": exc.sqlstate, "message": exc.message}


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
    }


def _internal_answer(req: RequestLike) -> dict[str, Any]:
    if getattr(req, "kind", None) == "authenticate":
        return {"ok": False, "sqlstate": "28000", "message": AUTH_INTERNAL_ERROR}
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


def sd_notify(state: str) -> bool:
    """Tell systemd about our state (READY=1, RELOADING=1, STOPPING=1); False if not under it."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract socket namespace
    elif not addr.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)
        return False
    return True


def _native_engine(config_json: str) -> EngineLike:
    from phigate import _native  # imported late so the control plane is testable without it

    return _native.Engine(config_json)


def _oidc_verifier(config: Config) -> PrimableVerifier:
    oidc = config.identity.oidc
    return OidcVerifier(oidc) if oidc is not None else NoOidcVerifier()


def _apikey_verifier(config: Config, old: ApiKeyVerifier | None) -> ApiKeyVerifier | None:
    """The API key verifier for a (re)loaded config; an unchanged store keeps its verifier (and
    the uses it has not written yet), re-read now."""
    settings = config.identity.apikeys
    if settings is None:
        return None
    if old is not None and old.path == settings.store:
        old.reload(force=True)
        return old
    return ApiKeyVerifier(settings.store)


def _check_schemas(known: dict[str, str], config: Config) -> None:
    """Refuse a config that changes the schema a target pins: sessions opened before would run
    with the old search_path upstream while their statements were judged with the new one."""
    for name, target in config.targets.items():
        old = known.get(name)
        if old is not None and old != target.schema:
            raise ConfigError(
                f"targets.{name}.params.search_path",
                config.source,
                f"changes only on restart ({old!r} to {target.schema!r}): sessions opened "
                "before a reload keep the search_path they started with",
            )


class Gateway:
    """One Engine plus the control loop that serves it, on the running (uvloop) event loop."""

    def __init__(
        self,
        config: Config,
        *,
        engine_factory: EngineFactory | None = None,
        catalog_loader: Loader = load_catalog,
    ) -> None:
        self.config = config
        self._engine_factory = engine_factory or _native_engine
        self._catalog_loader = catalog_loader
        self._catalogs: CatalogKeeper | None = None
        self._reload_lock = asyncio.Lock()
        self._engine: EngineLike | None = None
        self._control: ControlPlane | None = None
        self._sink: EventSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._stopped = asyncio.Event()
        # Every target's pinned schema since start: a session keeps the search_path its
        # upstream connection started with, so no reload may change it (even after removing
        # the target: its sessions may still be open).
        self._schemas = {name: t.schema for name, t in config.targets.items()}

    @property
    def engine(self) -> EngineLike:
        if self._engine is None:
            raise RuntimeError("gateway not started")
        return self._engine

    @property
    def control(self) -> ControlPlane:
        if self._control is None:
            raise RuntimeError("gateway not started")
        return self._control

    @property
    def addresses(self) -> list[str]:
        return list(self.engine.listen_addresses())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        verifier = _oidc_verifier(self.config)
        if not await verifier.prime():
            log.warning("no signing keys loaded yet; logins fail until the JWKS can be read")
        self._control = ControlPlane(
            verifier, apikeys=_apikey_verifier(self.config, None), config=self.config
        )
        self._sink = EventSink(self.config.server.events_log)
        # A target whose catalog cannot be read now is retried in the background; until it
        # loads, its masked identities are refused with a message saying so.
        keeper = self._catalogs = CatalogKeeper(
            loader=self._catalog_loader, on_change=self._catalog_changed, emit=self.write_event
        )
        results = await asyncio.to_thread(keeper.load_all, self.config)
        keeper.apply(self.config, results)
        self._control.catalogs = keeper.catalogs()
        self._control.catalog_notes = keeper.notes()
        try:
            engine = self._engine_factory(self.config.native_json())
            engine.set_masking(masking_state_json(self.config, self._control.catalogs))
            engine.start()
        except BaseException:
            await keeper.close()
            self._sink.close()
            raise
        self._engine = engine
        self._loop.add_reader(engine.wakeup_fd(), self._on_wakeup)
        self._spawn(self._drain_events_periodically())
        self._on_wakeup()  # requests may have queued before the reader was registered
        log.info("phigate listening on %s", ", ".join(self.addresses))

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: stop accepting, let sessions finish for up to ``grace`` seconds, then close."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.server.drain_timeout if grace is None else grace
        try:
            if self._engine is not None:
                # shutdown() blocks without the GIL; the loop keeps answering the requests of
                # sessions that are still finishing meanwhile.
                await asyncio.to_thread(self._engine.shutdown, grace)
        finally:
            await self._finish()

    async def _finish(self) -> None:
        if self._engine is not None and self._loop is not None:
            self._loop.remove_reader(self._engine.wakeup_fd())
            self._on_wakeup()
            self.write_stats()  # the final counters, so a short run still reports them
        if self._catalogs is not None:
            await self._catalogs.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._control is not None:
            await self._control.close()
        if self._sink is not None:
            self._sink.close()
        self._stopped.set()
        log.info("phigate stopped")

    async def reload(self, new_config: Config) -> None:
        """Apply a new config to new sessions; must run on the gateway's loop.

        The catalogs are read first, in a thread: the loop keeps serving with the old config
        and its catalogs meanwhile (a database that drops packets would otherwise stall every
        login and statement for connect_timeout), then everything switches in one step, so no
        statement is judged with a new classification and an old catalog. A catalog that
        cannot be read keeps the previous one if it is still valid (see catalog_keeper) and is
        retried in the background. Raises ValueError if the data plane refuses the config
        (nothing has changed then)."""
        async with self._reload_lock:
            keeper = self._keeper
            results = await asyncio.to_thread(keeper.load_all, new_config)
            if self._stopping:
                log.info("not reloading: the gateway is stopping")
                return
            self._apply_reload(new_config, results)

    def _apply_reload(
        self, new_config: Config, results: dict[str, CatalogSnapshot | Exception]
    ) -> None:
        old = self.config
        if new_config.server.listen != old.server.listen:
            log.warning("listen addresses change only on restart; keeping %s", old.server.listen)
        _check_schemas(self._schemas, new_config)
        # The engine validates first: if it refuses, nothing here has changed yet.
        epoch = self.engine.reconfigure(new_config.native_json())
        self._schemas.update((name, t.schema) for name, t in new_config.targets.items())
        verifier = _oidc_verifier(new_config)
        self.control.verifier = verifier
        self.control.apikeys = _apikey_verifier(new_config, self.control.apikeys)
        if new_config.server.events_log != old.server.events_log and self._sink is not None:
            self._drain_events()
            self._sink.close()
            self._sink = EventSink(new_config.server.events_log)
        keeper = self._keeper
        keeper.apply(new_config, results)  # reports (and retries) what could not be read
        catalogs = keeper.catalogs()
        self.engine.set_masking(masking_state_json(new_config, catalogs))
        self.control.catalogs = catalogs
        self.control.catalog_notes = keeper.notes()
        self.control.config = new_config
        self._spawn(verifier.prime())  # also re-reads a rotated JWKS even if config is unchanged
        self.config = new_config
        problems = keeper.describe()
        self.write_event({
            "ts": time.time(), "event": "reload", "source": new_config.source, "epoch": epoch,
            "catalogs": keeper.states(),
        })  # fmt: skip
        if problems:
            log.warning("reloaded config from %s (decision cache epoch %d), but %s",
                        new_config.source, epoch, problems)  # fmt: skip
        else:
            log.info("reloaded config from %s (decision cache epoch %d)", new_config.source, epoch)

    @property
    def _keeper(self) -> CatalogKeeper:
        if self._catalogs is None:
            raise RuntimeError("gateway not started")
        return self._catalogs

    def _catalog_changed(self) -> None:
        """A background read put a new catalog in force (or took one out of force)."""
        if self._engine is None or self._stopping:
            return
        keeper = self._keeper
        catalogs = keeper.catalogs()
        self.engine.set_masking(masking_state_json(self.config, catalogs))
        self.control.catalogs = catalogs
        self.control.catalog_notes = keeper.notes()
        # Decisions cached under the previous catalog are judged again.
        self.engine.bump_epoch()

    def reopen_events(self) -> None:
        if self._sink is not None:
            self._sink.reopen()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _on_wakeup(self) -> None:
        try:
            requests = self.engine.take_requests()
        except Exception:  # noqa: BLE001  # a bug in the bridge must not kill the loop
            log.exception("take_requests failed")
            return
        self.control.dispatch(requests)
        self._drain_events()  # the wakeup also fires when the event backlog is large

    def _drain_events(self) -> None:
        try:
            blob = self.engine.take_events()
        except Exception:  # noqa: BLE001
            log.exception("take_events failed")
            return
        if blob and self._sink is not None:
            self._sink.write(blob)

    async def _drain_events_periodically(self) -> None:
        next_stats = time.monotonic() + STATS_INTERVAL
        while True:
            await asyncio.sleep(EVENT_DRAIN_INTERVAL)
            self._drain_events()
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + STATS_INTERVAL
                self.write_stats()

    def write_stats(self) -> None:
        """Append the data plane's counters to the events log as one `stats` event."""
        if self._sink is None:
            return
        try:
            counters = dict(self.engine.stats())
        except Exception:  # noqa: BLE001 - statistics must never take the gateway down
            log.exception("engine.stats failed")
            return
        line: dict[str, Any] = {"ts": time.time(), "event": "stats", **counters}
        if self._catalogs is not None and self._catalogs.states():
            line["catalogs"] = self._catalogs.summary()
        self.write_event(line)

    def write_event(self, event: dict[str, Any]) -> None:
        """Append one control-plane event (reload, catalog, stats) to the events log."""
        if self._sink is not None:
            self._sink.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")


async def run(config_path: str | os.PathLike[str], config: Config | None = None) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads ``config_path`` and reopens the events log."""
    path = Path(config_path)
    gateway = Gateway(config if config is not None else load_config(path))
    await gateway.start()
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def on_stop(signame: str) -> None:
        if gateway.stopping:
            log.info("%s: already draining", signame)
            return
        grace = gateway.config.server.drain_timeout
        log.info("%s: draining connections for up to %gs", signame, grace)
        sd_notify("STOPPING=1")
        task = loop.create_task(gateway.stop(grace))
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def reload() -> None:
        try:
            await gateway.reload(load_config(path))
        except (PhigateError, ValueError, OSError) as exc:
            log.error("reload failed, keeping the previous config: %s", exc)
        sd_notify("READY=1")

    def on_hup() -> None:
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        gateway.reopen_events()  # at once: logrotate has already moved the file
        task = loop.create_task(reload())
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    sd_notify(f"READY=1\nSTATUS=listening on {', '.join(gateway.addresses)}")
    try:
        await gateway.serve_forever()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def serve(config_path: str | os.PathLike[str], config: Config | None = None) -> None:
    """Blocking entry point for `phigate serve`."""
    tune_malloc()  # before the data plane's threads allocate anything
    uvloop.run(run(config_path, config))


class GatewayThread:
    """A Gateway on its own uvloop in a background thread, for tests and the demo."""

    def __init__(
        self,
        config: Config,
        *,
        engine_factory: EngineFactory | None = None,
        catalog_loader: Loader = load_catalog,
    ) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self._catalog_loader = catalog_loader
        self._gateway: Gateway | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 60.0) -> GatewayThread:
        """Return once the engine is listening; re-raise whatever made startup fail."""
        self._thread = threading.Thread(target=self._run, name="phigate-gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"gateway did not start within {timeout}s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            raise RuntimeError("gateway not started")
        return self._gateway

    @property
    def engine(self) -> EngineLike:
        return self.gateway.engine

    @property
    def address(self) -> str:
        addresses: list[str] = self._call(lambda: self.gateway.addresses)
        return addresses[0]

    @property
    def host(self) -> str:
        host = self.address.rpartition(":")[0]
        return host[1:-1] if host.startswith("[") else host

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def is_alive(self) -> bool:
        """False once the gateway's thread has ended (stopped, or crashed)."""
        return self._thread is not None and self._thread.is_alive()

    def reload(self, config: Config) -> None:
        """Reload like SIGHUP does; returns once the new config is in force."""
        if self._loop is None:
            raise RuntimeError("gateway not started")
        asyncio.run_coroutine_threadsafe(self.gateway.reload(config), self._loop).result()
        self.config = config

    def stop(self, grace: float = 1.0) -> None:
        """Drain for up to ``grace`` seconds (short by default: tests leave idle sessions open)."""
        if self._loop is None or self._thread is None:
            return
        try:
            if self._gateway is not None and self._loop.is_running():
                asyncio.run_coroutine_threadsafe(self._gateway.stop(grace), self._loop).result()
        finally:
            self._thread.join()  # stop() ends serve_forever even when shutdown raised

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the gateway's loop thread and return its result (or raise its error)."""
        if self._loop is None:
            raise RuntimeError("gateway not started")

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def _run(self) -> None:
        try:
            uvloop.run(self._main())
        except BaseException as exc:  # noqa: BLE001  # reported to start() or logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.exception("gateway thread crashed")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        gateway = Gateway(
            self.config, engine_factory=self._engine_factory, catalog_loader=self._catalog_loader
        )
        try:
            await gateway.start()
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            self._ready.set()
            return
        self._gateway = gateway
        self._ready.set()
        await gateway.serve_forever()
