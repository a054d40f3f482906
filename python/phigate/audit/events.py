"""The simple event sink: append the data plane's JSON-line event batches to a file or stdout."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import BinaryIO

__all__ = ["EventSink"]

log = logging.getLogger(__name__)


class EventSink:
    """Appends batches of JSON lines; ``"-"`` means stdout. Call reopen() after logrotate."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._lock = threading.Lock()  # GatewayThread callers and the loop may both touch it
        self._file: BinaryIO | None = None
        self._failing = False
        self._open()

    def write(self, blob: bytes) -> None:
        """Append one batch (bytes from Engine.take_events()) and flush it."""
        if not blob:
            return
        if not blob.endswith(b"\n"):
            blob += b"\n"  # the next batch must start on its own line
        with self._lock:
            try:
                if self._file is None:
                    self._open()
                assert self._file is not None
                self._file.write(blob)
                self._file.flush()
            except OSError as exc:
                # Losing events is bad, but a full disk must not take the gateway down with it;
                # say so once per failure streak instead of once per batch.
                if not self._failing:
                    log.error("cannot write events to %s: %s", self.path, exc.strerror or exc)
                self._failing = True
                return
            if self._failing:
                log.warning("writing events to %s again", self.path)
            self._failing = False

    def reopen(self) -> None:
        """Close and reopen the file (SIGHUP after logrotate); a no-op for stdout."""
        if self.path == "-":
            return
        with self._lock:
            self._close()
            try:
                self._open()
            except OSError as exc:
                log.error("cannot reopen events log %s: %s", self.path, exc.strerror or exc)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _open(self) -> None:
        if self.path == "-":
            self._file = sys.stdout.buffer
            return
        # Events name subjects and peers: readable by the service's group, not by everyone.
        fd = os.open(Path(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._file = os.fdopen(fd, "ab")

    def _close(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        try:
            if self.path == "-":
                f.flush()  # never close the process's stdout
            else:
                f.close()
        except OSError as exc:
            log.error("cannot close events log %s: %s", self.path, exc.strerror or exc)
