"""Bench-only: the gateway WITHOUT an audit trail, the baseline of the audit part (benches/
audit_bench.py). Never a way to run phigate: `phigate serve` refuses a config without [audit].

What "off" means here: the data plane still formats every record (statement, result, session)
exactly as with a trail, but with no trail it queues them in memory for `take_events()`; this
launcher takes that queue every 20 ms (and whenever the data plane wakes the control loop for a
big backlog) and drops the bytes. Control-plane records (stats, gateway_start, ...) are formatted
and dropped too. So "off" = records formatted, then dropped: no writer thread, no chaining,
hashing, write(), fsync or checkpoints.

Usage: gateway_noaudit.py CONFIG.toml (serves until SIGTERM/SIGINT, like `phigate serve`)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import uvloop  # noqa: E402

from phigate.audit.records import canonical, now_ts  # noqa: E402
from phigate.config import load_config  # noqa: E402
from phigate.control.allocator import tune_malloc  # noqa: E402
from phigate.control.server import Gateway  # noqa: E402

DRAIN_EVERY = 0.02  # seconds; at 20k records/s that is ~400 records (~200 kB) held at most


class NoAuditGateway(Gateway):
    """A Gateway whose records are formatted and dropped instead of written to a trail."""

    dropped_bytes = 0

    def write_event(self, event: dict[str, Any]) -> None:
        # Formatted like Gateway.write_event, then dropped (the engine has no trail to take it).
        self.dropped_bytes += len(canonical({**event, "ts": now_ts()}))

    def _on_wakeup(self) -> None:
        self._drop_events()
        super()._on_wakeup()

    def _drop_events(self) -> None:
        if self._engine is not None:
            self.dropped_bytes += len(self._engine.take_events())  # type: ignore[attr-defined]

    async def drain_forever(self) -> None:
        while True:
            await asyncio.sleep(DRAIN_EVERY)
            self._drop_events()


async def serve(config_path: str) -> None:
    config = load_config(config_path)
    if config.audit is not None:
        raise SystemExit(f"{config_path} has an [audit] section; this launcher is for the "
                         "no-trail baseline only (use `phigate serve` with a trail)")
    gateway = NoAuditGateway(config)
    await gateway.start()
    drain = asyncio.get_running_loop().create_task(gateway.drain_forever())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: loop.create_task(gateway.stop(1.0)))
    try:
        await gateway.serve_forever()
    finally:
        drain.cancel()
        gateway._drop_events()
        print(f"gateway_noaudit: {gateway.dropped_bytes} record bytes formatted and dropped",
              flush=True)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    tune_malloc()  # as `phigate serve` does, before the data plane's threads allocate
    uvloop.run(serve(sys.argv[1]))


if __name__ == "__main__":
    main()
