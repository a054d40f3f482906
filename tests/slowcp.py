"""Test-only: the native engine with its decisions answered late, so a test can have statements'
decisions still in flight while the server answers the messages pipelined before them."""

from __future__ import annotations

import threading
from typing import Any


class _LateReply:
    """A decide request whose reply reaches the data plane `delay` seconds after it is given."""

    def __init__(self, request: Any, delay: float) -> None:
        self._request = request
        self._delay = delay

    def reply(self, answer: dict[str, Any]) -> bool:
        timer = threading.Timer(self._delay, self._request.reply, args=(answer,))
        timer.daemon = True
        timer.start()
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


class SlowDecisions:
    """Wraps `phigate._native.Engine`: every decision is delivered `delay` seconds late."""

    def __init__(self, config_json: str, delay: float) -> None:
        from phigate import _native

        self._engine = _native.Engine(config_json)
        self.delay = delay

    def take_requests(self) -> list[Any]:
        return [
            _LateReply(r, self.delay) if r.kind == "decide" else r
            for r in self._engine.take_requests()
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def slow_decisions(delay: float) -> Any:
    """An engine factory for GatewayFactory(engine_factory=...)."""
    return lambda config_json: SlowDecisions(config_json, delay)
