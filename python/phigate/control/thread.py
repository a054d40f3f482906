"""A gateway in a thread of its own, for the demo and the tests to start, reload and stop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import uvloop

from phigate.config import Config
from phigate.control.server import EngineFactory, EngineLike, Gateway, log
from phigate.masking.catalog_keeper import Loader
from phigate.masking.classification import load_catalog


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
