"""The red-team oracle: a byte-recording TCP relay in front of a plaintext gateway, and the
canary forms every captured byte is searched for.

A canary is a value planted for one synthetic patient that appears nowhere else in the database.
After an attempt, every byte the gateway sent back during the session (startup answers, rows,
COPY data, errors, notices, notifications, parameter statuses) is searched for each canary in
each of its forms: as is, upper-case, lower-case, reversed, hex, base64, digits only, md5 hex
and sha256 hex -- both byte-exact and case-insensitively. A hit is reported by the FORM's label
("sha256(ssn)"), never by the value.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import threading
from collections.abc import Mapping

__all__ = ["Relay", "canary_forms", "find_leaks"]

_MIN_FORM = 6  # shorter forms (e.g. the digits of a short value) would match by chance


def canary_forms(canaries: Mapping[str, str]) -> list[tuple[str, bytes]]:
    """(label, bytes) for every searchable form of every canary; labels name the canary and
    the form, never the value."""
    forms: list[tuple[str, bytes]] = []
    for label, value in canaries.items():
        raw = value.encode("utf-8")
        digits = "".join(ch for ch in value if ch.isdigit()).encode()
        candidates = {
            f"{label}": raw,
            f"upper({label})": value.upper().encode("utf-8"),
            f"lower({label})": value.lower().encode("utf-8"),
            f"reverse({label})": value[::-1].encode("utf-8"),
            f"hex({label})": raw.hex().encode(),
            f"base64({label})": base64.b64encode(raw).rstrip(b"="),
            f"digits({label})": digits,
            f"md5({label})": hashlib.md5(raw).hexdigest().encode(),  # noqa: S324 - an oracle form
            f"sha256({label})": hashlib.sha256(raw).hexdigest().encode(),
        }
        seen: set[bytes] = set()
        for name, form in candidates.items():
            if len(form) < _MIN_FORM or form in seen:
                continue
            seen.add(form)
            forms.append((name, form))
    return forms


def find_leaks(captured: bytes, forms: list[tuple[str, bytes]]) -> list[str]:
    """Labels of the forms found in ``captured`` (byte-exact or case-insensitively)."""
    folded = captured.lower()
    return [label for label, form in forms if form in captured or form.lower() in folded]


class Relay:
    """127.0.0.1 TCP relay to (host, port) that records every byte the far side sends back.

    ``take()`` waits until every relayed connection has ended (both directions at EOF) and
    returns what was recorded since the last take, then starts over.
    """

    def __init__(self, host: str, port: int, io_timeout: float = 60.0) -> None:
        self.target = (host, port)
        self.io_timeout = io_timeout
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = "127.0.0.1"
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._captured = bytearray()
        self._handlers: list[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="redteam-relay", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._handle, args=(client,), daemon=True)
            with self._lock:
                self._handlers.append(t)
            t.start()

    def _handle(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=self.io_timeout)
        except OSError:
            client.close()
            return
        client.settimeout(self.io_timeout)
        up = threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True)
        down = threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True)
        up.start()
        down.start()
        up.join()
        down.join()
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        dst_gone = False
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            if record:
                with self._lock:
                    self._captured += data
            if not dst_gone:
                try:
                    dst.sendall(data)
                except OSError:
                    # The client went away: keep reading (and recording) what the gateway sends.
                    dst_gone = True
                    if not record:
                        break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def take(self, timeout: float = 30.0) -> bytes:
        """Everything recorded since the last take, once all relayed sessions have ended."""
        with self._lock:
            handlers = list(self._handlers)
        for t in handlers:
            t.join(timeout)
            if t.is_alive():
                raise AssertionError("a relayed session did not end; cannot judge its bytes")
        with self._lock:
            self._handlers = [t for t in self._handlers if t.is_alive()]
            out = bytes(self._captured)
            self._captured.clear()
        return out

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
