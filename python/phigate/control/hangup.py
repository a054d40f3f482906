"""SIGHUP with its sender: a thread waits for the signal with sigwaitinfo, so the reload record
can say which process and user asked for it (asyncio's signal handlers get no siginfo)."""

from __future__ import annotations

import asyncio
import logging
import pwd
import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["block_hangup", "watch_hangup"]

log = logging.getLogger(__name__)


def block_hangup() -> None:
    """Block SIGHUP in the calling thread, and so in every thread it starts afterwards (the data
    plane's, the executor's): call it first thing, before any thread exists, so the kernel keeps
    SIGHUP pending for the watcher's sigwaitinfo instead of delivering it to some thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def _sender(info: Any) -> dict[str, Any]:
    uid = int(info.si_uid)
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    return {"via": "signal", "pid": int(info.si_pid), "uid": uid, "user": user}


def watch_hangup(
    loop: asyncio.AbstractEventLoop, on_hangup: Callable[[dict[str, Any]], None]
) -> threading.Thread:
    """Start a daemon thread that calls ``on_hangup(sender)`` on ``loop`` for every SIGHUP
    (sender: pid, uid and user name of the process that sent it, e.g. `systemctl reload`'s
    kill). SIGHUP must be blocked in this thread (``block_hangup`` earlier)."""

    def wait() -> None:
        while True:
            try:
                info = signal.sigwaitinfo({signal.SIGHUP})
            except Exception:  # noqa: BLE001 - never lose reloads to one odd wakeup
                log.exception("waiting for SIGHUP failed")
                continue
            try:
                loop.call_soon_threadsafe(on_hangup, _sender(info))
            except RuntimeError:  # the loop is closed: the gateway is stopping
                return

    thread = threading.Thread(target=wait, name="phigate-sighup", daemon=True)
    thread.start()
    return thread
