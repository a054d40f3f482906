"""A minimal raw PostgreSQL wire client for tests that must send exactly the bytes they mean."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from dataclasses import dataclass

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)


def msg(tag: bytes, body: bytes = b"") -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def cstr(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def startup_packet(params: dict[str, str], version: int = 196608) -> bytes:
    body = (
        struct.pack("!i", version) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    )
    return struct.pack("!i", len(body) + 4) + body


def query(sql: str) -> bytes:
    return msg(b"Q", cstr(sql))


def parse(sql: str, name: str = "") -> bytes:
    return msg(b"P", cstr(name) + cstr(sql) + struct.pack("!h", 0))


def bind(portal: str = "", stmt: str = "", params: tuple[bytes | None, ...] = ()) -> bytes:
    body = cstr(portal) + cstr(stmt) + struct.pack("!h", 0) + struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    return msg(b"B", body + struct.pack("!h", 0))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return msg(b"E", cstr(portal) + struct.pack("!i", max_rows))


def describe_portal(portal: str = "") -> bytes:
    return msg(b"D", b"P" + cstr(portal))


def close(kind: bytes, name: str = "") -> bytes:
    """Close (F) of a statement (b"S") or portal (b"P")."""
    return msg(b"C", kind + cstr(name))


SYNC = msg(b"S")
FLUSH = msg(b"H")
TERMINATE = msg(b"X")


@dataclass
class Message:
    tag: str
    body: bytes

    def fields(self) -> dict[str, str]:
        """Fields of an ErrorResponse/NoticeResponse."""
        out: dict[str, str] = {}
        for part in self.body.split(b"\0"):
            if part:
                out[chr(part[0])] = part[1:].decode("utf-8", "replace")
        return out

    @property
    def sqlstate(self) -> str:
        return self.fields().get("C", "")


class RawConn:
    """A socket speaking the wire protocol; no helpful client logic in the way."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (host, port), timeout=timeout
        )
        self.buf = b""

    @classmethod
    def unix(cls, path: str, timeout: float = 10.0) -> RawConn:
        """A connection over PostgreSQL's Unix-domain socket (direct, for reference answers)."""
        conn = cls.__new__(cls)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        conn.sock = sock
        conn.buf = b""
        return conn

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the gateway")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_message(self) -> Message:
        head = self.recv_exact(5)
        (length,) = struct.unpack("!i", head[1:])
        return Message(chr(head[0]), self.recv_exact(length - 4))

    def read_until(self, tag: str = "Z", stop_on_fatal: bool = True) -> list[Message]:
        """Messages up to and including `tag` (or a FATAL ErrorResponse, after which the
        gateway closes the connection)."""
        out = []
        while True:
            m = self.read_message()
            out.append(m)
            if m.tag == tag:
                return out
            if stop_on_fatal and m.tag == "E" and m.fields().get("S") == "FATAL":
                return out

    def closed(self) -> bool:
        """True once the peer has closed (after reading anything still buffered)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
        except TimeoutError:
            return False

    def start_tls(self, cafile: str, alpn: list[str] | None = None) -> None:
        ctx = ssl.create_default_context(cafile=cafile)
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def login(
        self, token: str, user: str = "agent-raw", database: str = "ehr", **params: str
    ) -> list[Message]:
        """StartupMessage + token; returns everything up to the first ReadyForQuery."""
        self.send(startup_packet({"user": user, "database": database, **params}))
        first = self.read_message()
        if first.tag != "R":
            return [first]
        self.send(msg(b"p", cstr(token)))
        return self.read_until("Z")

    def login_trust(self, user: str, database: str) -> list[Message]:
        """StartupMessage to a server that trusts the connection (no password exchange)."""
        self.send(startup_packet({"user": user, "database": database}))
        return self.read_until("Z")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def tags(msgs: list[Message]) -> str:
    return "".join(m.tag for m in msgs)
