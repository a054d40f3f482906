"""Run the control plane: build the Engine, answer its requests, drain events, handle signals."""

from __future__ import annotations

import asyncio
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
from pglast import parser as pg_parser

from phigate.config import Config, load_config
from phigate.errors import IdentityError, PhigateError
from phigate.events import EventSink
from phigate.identity import Identity, OidcVerifier

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
    def reconfigure(self, config_json: str) -> int: ...
    def shutdown(self, grace_seconds: float) -> None: ...


class Verifier(Protocol):
    def verify_cached(self, token: str) -> Identity | None: ...
    async def verify(self, token: str) -> Identity: ...


EngineFactory = Callable[[str], EngineLike]


class ControlPlane:
    """Answers data-plane requests. Every request gets exactly one reply, even on bugs: if the
    answer cannot be computed it fails closed (auth refused, statement denied)."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self._tasks: set[asyncio.Task[None]] = set()

    def dispatch(self, requests: Iterable[RequestLike]) -> None:
        for req in requests:
            self.handle(req)

    def handle(self, req: RequestLike) -> None:
        try:
            kind = req.kind
            if kind == "authenticate":
                self._authenticate(req)
            elif kind == "decide":
                _reply(req, _decide(req.payload))
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
        verifier = self.verifier  # a reload may swap it; this request keeps the one it started with
        try:
            identity = verifier.verify_cached(token)
        except IdentityError as exc:
            _reply(req, _auth_refused(req, exc))
            return
        if identity is not None:
            _reply(req, _auth_ok(identity))
            return
        task = asyncio.get_running_loop().create_task(self._authenticate_slow(req, token, verifier))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _authenticate_slow(self, req: RequestLike, token: str, verifier: Verifier) -> None:
        try:
            answer = _auth_ok(await verifier.verify(token))
        except IdentityError as exc:
            answer = _auth_refused(req, exc)
        except asyncio.CancelledError:
            _reply(req, {"ok": False, "sqlstate": "28000", "message": "gateway is shutting down"})
            raise
        except Exception:  # noqa: BLE001
            _log_internal("verifying identity", req)
            answer = _internal_answer(req)
        _reply(req, answer)


def _auth_ok(identity: Identity) -> dict[str, Any]:
    return {
        "ok": True,
        "subject": identity.subject,
        "groups": list(identity.groups),
        "identity_class": identity.identity_class,
        "expires_at": identity.expires_at,
    }


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


def _decide(payload: dict[str, Any]) -> dict[str, Any]:
    # Policy arrives with its own issue; until then every statement is allowed, and the
    # normalized text (literals replaced by $n) keys the cache and the PHI-free event.
    sql = payload["sql"]
    if not isinstance(sql, str):
        raise TypeError("decide payload without SQL text")
    try:
        normalized: str | None = pg_parser.normalize(sql)
    except Exception:  # noqa: BLE001  # unparsable: PostgreSQL will report the syntax error
        normalized = None
    if normalized is None:
        return {"action": "allow", "cache": "exact", "normalized": None}
    return {"action": "allow", "cache": "normalized", "normalized": normalized}


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


class Gateway:
    """One Engine plus the control loop that serves it, on the running (uvloop) event loop."""

    def __init__(self, config: Config, *, engine_factory: EngineFactory | None = None) -> None:
        self.config = config
        self._engine_factory = engine_factory or _native_engine
        self._engine: EngineLike | None = None
        self._control: ControlPlane | None = None
        self._sink: EventSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._stopped = asyncio.Event()

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
        verifier = OidcVerifier(self.config.identity.oidc)
        if not await verifier.prime():
            log.warning("no signing keys loaded yet; logins fail until the JWKS can be read")
        self._control = ControlPlane(verifier)
        self._sink = EventSink(self.config.server.events_log)
        try:
            engine = self._engine_factory(self.config.native_json())
            engine.start()
        except BaseException:
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
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._control is not None:
            await self._control.close()
        if self._sink is not None:
            self._sink.close()
        self._stopped.set()
        log.info("phigate stopped")

    def reload(self, new_config: Config) -> None:
        """Apply a new config to new sessions; must run on the gateway's loop."""
        old = self.config
        if new_config.server.listen != old.server.listen:
            log.warning("listen addresses change only on restart; keeping %s", old.server.listen)
        # The engine validates first: if it refuses, nothing here has changed yet.
        epoch = self.engine.reconfigure(new_config.native_json())
        verifier = OidcVerifier(new_config.identity.oidc)
        self.control.verifier = verifier
        self._spawn(verifier.prime())  # also re-reads a rotated JWKS even if config is unchanged
        if new_config.server.events_log != old.server.events_log and self._sink is not None:
            self._drain_events()
            self._sink.close()
            self._sink = EventSink(new_config.server.events_log)
        self.config = new_config
        log.info("reloaded config from %s (decision cache epoch %d)", new_config.source, epoch)

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
        while True:
            await asyncio.sleep(EVENT_DRAIN_INTERVAL)
            self._drain_events()


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

    def on_hup() -> None:
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            gateway.reload(load_config(path))
        except (PhigateError, ValueError, OSError) as exc:
            log.error("reload failed, keeping the previous config: %s", exc)
        gateway.reopen_events()
        sd_notify("READY=1")

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
    uvloop.run(run(config_path, config))


class GatewayThread:
    """A Gateway on its own uvloop in a background thread, for tests and the demo."""

    def __init__(self, config: Config, *, engine_factory: EngineFactory | None = None) -> None:
        self.config = config
        self._engine_factory = engine_factory
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
        self._call(lambda: self.gateway.reload(config))
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
        gateway = Gateway(self.config, engine_factory=self._engine_factory)
        try:
            await gateway.start()
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            self._ready.set()
            return
        self._gateway = gateway
        self._ready.set()
        await gateway.serve_forever()
