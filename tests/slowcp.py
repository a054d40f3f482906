"""Test-only: the native engine with its decisions answered late, so a test can have statements'
decisions still in flight while the server answers the messages pipelined before them."""

from __future__ import annotations

import threading
import time
from typing import Any


class _LateReply:
    """A decide request whose reply reaches the data plane `delay` seconds after it is given."""

    def __init__(self, request: Any, engine: SlowDecisions) -> None:
        self._request = request
        self._engine = engine

    def reply(self, answer: dict[str, Any]) -> bool:
        sql = self._request.payload.get("sql", "")

        def deliver() -> None:
            self._engine.delivered[sql] = time.monotonic()
            self._request.reply(answer)

        timer = threading.Timer(self._engine.delay, deliver)
        timer.daemon = True
        timer.start()
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


class SlowDecisions:
    """Wraps `phigate._native.Engine`: every decision is delivered `delay` seconds late;
    `delivered` maps each statement text to when its decision reached the data plane."""

    def __init__(self, config_json: str, delay: float) -> None:
        from phigate import _native

        self._engine = _native.Engine(config_json)
        self.delay = delay
        self.delivered: dict[str, float] = {}

    def take_requests(self) -> list[Any]:
        return [
            _LateReply(r, self) if r.kind == "decide" else r for r in self._engine.take_requests()
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class SlowDecisionsFactory:
    """An engine factory for GatewayFactory(engine_factory=...); `engine` is the one it made."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.engine: SlowDecisions | None = None

    def __call__(self, config_json: str) -> SlowDecisions:
        self.engine = SlowDecisions(config_json, self.delay)
        return self.engine
