"""Hostile PostgreSQL clients for benches/hostile_rss.py: garbage, truncated startups, bad
passwords, half-done TLS, random messages after login and abrupt disconnects mid-query."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

PROTOCOL_3_0 = 196608
SSL_REQUEST = struct.pack("!II", 8, 80877103)
# A result big enough that the client can hang up while the gateway is still relaying it.
BIG_QUERY = b"SELECT i, repeat('x', 200) FROM generate_series(1, 20000) AS g(i)"
# Frontend message types, valid and not, for the random messages sent after login.
FRONTEND_TYPES = b"PBDECSHQFdcfpX?\x00\xff"


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    user: str
    database: str
    token: str  # a valid token: the login kinds get a real upstream session
    masked_table: str  # a table with a classified column, so masked paths run too


@dataclass
class Tally:
    """Per kind: how many ran, and how they ended (the server's answer or what broke)."""

    runs: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, kind: str, outcome: str) -> None:
        self.runs[kind] += 1
        self.outcomes[(kind, outcome)] += 1


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def startup(user: str, database: str) -> bytes:
    params = f"user\0{user}\0database\0{database}\0application_name\0hostile\0\0".encode()
    body = struct.pack("!I", PROTOCOL_3_0) + params
    return struct.pack("!I", len(body) + 4) + body


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0): the abrupt end of a killed client."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_msg(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readexactly(5)
    n = struct.unpack("!I", head[1:])[0]
    if n < 4 or n > 1 << 24:
        raise ValueError(f"bad length {n}")
    return head[:1], await r.readexactly(n - 4)


async def _until(r: asyncio.StreamReader, kinds: bytes) -> bytes:
    """Read messages until one of ``kinds`` (returned) or an ErrorResponse ("E")."""
    while True:
        kind, _ = await _read_msg(r)
        if kind in kinds or kind == b"E":
            return kind


async def _login(t: Target, password: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                      bytes]:
    """Startup and cleartext password; returns the streams and b"Z" (ready) or b"E"."""
    r, w = await asyncio.open_connection(t.host, t.port)
    w.write(startup(t.user, t.database))
    kind, body = await _read_msg(r)
    if kind != b"R" or struct.unpack("!I", body[:4])[0] != 3:
        return r, w, kind
    w.write(_msg(b"p", password.encode() + b"\0"))
    return r, w, await _until(r, b"Z")


# --- the kinds --------------------------------------------------------------------------------


async def garbage(t: Target, rng: random.Random) -> str:
    r, w = await asyncio.open_connection(t.host, t.port)
    w.write(rng.randbytes(rng.randint(1, 4096)))
    return await _finish(r, w, rng)


async def truncated_startup(t: Target, rng: random.Random) -> str:
    r, w = await asyncio.open_connection(t.host, t.port)
    full = startup(t.user, t.database)
    w.write(full[: rng.randint(1, len(full) - 1)])
    await w.drain()
    _rst(w)
    return "reset_sent"


async def huge_length(t: Target, rng: random.Random) -> str:
    r, w = await asyncio.open_connection(t.host, t.port)
    w.write(struct.pack("!I", rng.choice((0x7FFFFFFF, 0xFFFFFFFF, 3, 1 << 20))) + b"\0\3\0\0")
    return await _finish(r, w, rng)


async def bad_password(t: Target, rng: random.Random) -> str:
    # Half look like a JWT (they go through signature checking), half are plain garbage.
    if rng.random() < 0.5:
        parts = t.token.split(".")
        fake = ".".join((parts[0], parts[1], "A" * len(parts[2])))
    else:
        fake = rng.randbytes(rng.randint(1, 200)).hex()
    r, w, kind = await _login(t, fake)
    w.close()
    return "refused" if kind == b"E" else f"got_{kind!r}"


async def tls_half_handshake(t: Target, rng: random.Random) -> str:
    """SSLRequest, then part of a ClientHello, then half-close and go."""
    r, w = await asyncio.open_connection(t.host, t.port)
    w.write(SSL_REQUEST)
    if await r.readexactly(1) != b"S":
        w.close()
        return "no_tls"
    hello = _client_hello()
    w.write(hello[: rng.randint(1, len(hello))])
    await w.drain()
    if rng.random() < 0.5:
        w.write_eof()  # half-closed: the server may still write
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(r.read(65536), 0.5)
        w.close()
    else:
        _rst(w)
    return "done"


async def tls_then_abort(t: Target, rng: random.Random) -> str:
    """A full TLS handshake, a startup (sometimes a bad password), then drop the socket with no
    close_notify."""
    r, w = await asyncio.open_connection(t.host, t.port)
    w.write(SSL_REQUEST)
    if await r.readexactly(1) != b"S":
        w.close()
        return "no_tls"
    await w.start_tls(_tls_context(), server_hostname="localhost")
    w.write(startup(t.user, t.database))
    if rng.random() < 0.5:
        kind, _ = await _read_msg(r)
        w.write(_msg(b"p", b"not-a-token\0"))
        await w.drain()
    _rst(w)
    return "aborted"


async def random_after_login(t: Target, rng: random.Random) -> str:
    r, w, kind = await _login(t, t.token)
    if kind != b"Z":
        w.close()
        return "login_failed"
    for _ in range(rng.randint(1, 6)):
        w.write(_random_message(rng, t))
    w.write(_msg(b"S", b""))
    return await _finish(r, w, rng)


async def abort_mid_query(t: Target, rng: random.Random) -> str:
    r, w, kind = await _login(t, t.token)
    if kind != b"Z":
        w.close()
        return "login_failed"
    if rng.random() < 0.5:
        w.write(_msg(b"Q", BIG_QUERY + b"\0"))
    else:  # extended protocol, pipelined, on the masked table (masking plans get built)
        sql = b"SELECT * FROM " + t.masked_table.encode() + b" WHERE id > $1"
        w.write(_msg(b"P", b"\0" + sql + b"\0\0\0")
                + _msg(b"B", b"\0\0" + struct.pack("!hhi", 0, 1, 1) + b"0"
                       + struct.pack("!h", 0))
                + _msg(b"E", b"\0\0\0\0\0") + _msg(b"S", b""))
    want = rng.randint(1, 64 * 1024)
    got = 0
    with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        while got < want:
            chunk = await asyncio.wait_for(r.read(16384), 2.0)
            if not chunk:
                break
            got += len(chunk)
    _rst(w)
    return "aborted"


async def pipeline_flood(t: Target, rng: random.Random) -> str:
    """Thousands of pipelined statements written without reading a single answer, then gone."""
    r, w, kind = await _login(t, t.token)
    if kind != b"Z":
        w.close()
        return "login_failed"
    one = (_msg(b"P", b"\0SELECT $1::int, repeat('y', 100)\0\0\0")
           + _msg(b"B", b"\0\0\0\0\0\1" + struct.pack("!i", 1) + b"7\0\0")
           + _msg(b"E", b"\0\0\0\0\0"))
    n = rng.randint(500, 8000)
    w.write(one * n + _msg(b"S", b""))
    with contextlib.suppress(TimeoutError, ConnectionError):
        await asyncio.wait_for(w.drain(), 2.0)
        await asyncio.wait_for(r.read(rng.randint(1, 65536)), 1.0)
    _rst(w)
    return "aborted"


async def oversized_message(t: Target, rng: random.Random) -> str:
    """A Query that claims megabytes; part of it arrives, then the client is gone."""
    r, w, kind = await _login(t, t.token)
    if kind != b"Z":
        w.close()
        return "login_failed"
    claimed = rng.randint(1, 32) << 20
    w.write(b"Q" + struct.pack("!I", claimed) + b"SELECT 1 /* ")
    sent = 0
    goal = min(claimed - 16, rng.randint(64 << 10, 3 << 20))
    chunk = b"z" * 65536
    with contextlib.suppress(TimeoutError, ConnectionError):
        while sent < goal:
            w.write(chunk)
            sent += len(chunk)
            await asyncio.wait_for(w.drain(), 2.0)
    _rst(w)
    return "aborted"


async def slow_reader(t: Target, rng: random.Random) -> str:
    """Asks for a big result and does not read it for a while, then hangs up."""
    r, w, kind = await _login(t, t.token)
    if kind != b"Z":
        w.close()
        return "login_failed"
    w.write(_msg(b"Q", BIG_QUERY + b"\0"))
    await asyncio.sleep(rng.uniform(0.5, 1.5))
    _rst(w)
    return "aborted"


async def slowloris(t: Target, n: int, hold: float) -> int:
    """n connections at once, each dribbling a startup message, held ``hold`` s, then dropped:
    the gateway's peak of concurrent half-open sessions. Returns how many connected."""
    async def one() -> bool:
        try:
            r, w = await asyncio.open_connection(t.host, t.port)
        except OSError:
            return False
        try:
            msg = startup(t.user, t.database)
            for i in range(0, min(len(msg) - 1, 12), 3):
                w.write(msg[i:i + 3])
                await asyncio.sleep(hold / 4)
        except (ConnectionError, OSError):
            pass
        _rst(w)
        return True

    done = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    return sum(1 for d in done if d is True)


async def _finish(r: asyncio.StreamReader, w: asyncio.StreamWriter, rng: random.Random) -> str:
    """Read what the server says for a moment, then leave politely or with a reset."""
    outcome = "silent"
    try:
        data = await asyncio.wait_for(r.read(65536), 0.5)
        outcome = "answered" if data else "closed_by_server"
    except (TimeoutError, ConnectionError):
        outcome = "timeout_or_reset"
    if rng.random() < 0.5:
        _rst(w)
    else:
        w.close()
    return outcome


def _random_message(rng: random.Random, t: Target) -> bytes:
    kind = bytes([rng.choice(FRONTEND_TYPES)])
    roll = rng.random()
    if roll < 0.3 and kind in b"PBDCE":
        # Plausible bodies with random corruption: the parser's edges, not just its front door.
        base = {
            b"P": b"s1\0SELECT * FROM " + t.masked_table.encode() + b"\0"
                  + struct.pack("!h", 2) + struct.pack("!ii", rng.randint(-5, 1 << 30), 25),
            b"B": b"\0s1\0" + struct.pack("!hh", 1, 1) + struct.pack("!h", 1)
                  + struct.pack("!i", rng.randint(-2, 40)) + rng.randbytes(8)
                  + struct.pack("!hh", 1, 0),
            b"D": rng.choice((b"S", b"P", b"X")) + b"s1\0",
            b"C": rng.choice((b"S", b"P", b"Z")) + b"\0",
            b"E": b"\0" + struct.pack("!i", rng.randint(-1, 5)),
        }[kind]
        body = bytearray(base)
        for _ in range(rng.randint(0, 3)):
            if body:
                body[rng.randrange(len(body))] = rng.randrange(256)
        body_b = bytes(body[: rng.randint(0, len(body))]) if rng.random() < 0.3 else bytes(body)
    elif roll < 0.4:
        # A length that lies: claims more than is sent (the rest comes as the next "message").
        return kind + struct.pack("!I", rng.randint(5, 200)) + rng.randbytes(rng.randint(0, 8))
    else:
        body_b = rng.randbytes(rng.randint(0, 300))
    return _msg(kind, body_b)


_HELLO: bytes | None = None
_CTX: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    global _CTX
    if _CTX is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the dev cert; nothing here is confidential
        _CTX = ctx
    return _CTX


def _client_hello() -> bytes:
    global _HELLO
    if _HELLO is None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = _tls_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.do_handshake()
        _HELLO = outgoing.read()
    return _HELLO


Kind = Callable[[Target, random.Random], Awaitable[str]]
# Weights: cheap pre-login abuse dominates (as in a fuzzer's run); about a third of the
# connections log in (each costs an upstream backend) and then misbehave.
KINDS: dict[str, tuple[Kind, int]] = {
    "garbage": (garbage, 18),
    "truncated_startup": (truncated_startup, 12),
    "huge_length": (huge_length, 5),
    "bad_password": (bad_password, 18),
    "tls_half_handshake": (tls_half_handshake, 10),
    "tls_then_abort": (tls_then_abort, 8),
    "random_after_login": (random_after_login, 10),
    "abort_mid_query": (abort_mid_query, 7),
    "pipeline_flood": (pipeline_flood, 5),
    "oversized_message": (oversized_message, 4),
    "slow_reader": (slow_reader, 3),
}


async def run_round(t: Target, n: int, concurrency: int, seed: int,
                    per_conn_timeout: float = 10.0, slowloris_conns: int = 0) -> Tally:
    """n hostile connections, at most ``concurrency`` at a time, then ``slowloris_conns`` at
    once; never raises for one of them."""
    rng = random.Random(seed)
    names = list(KINDS)
    weights = [KINDS[k][1] for k in names]
    plan = rng.choices(names, weights, k=n)
    tally = Tally()
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for i, kind in enumerate(plan):
        queue.put_nowait((i, kind))

    async def worker() -> None:
        while True:
            try:
                i, kind = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            fn = KINDS[kind][0]
            try:
                outcome = await asyncio.wait_for(fn(t, random.Random(seed * 1_000_003 + i)),
                                                 per_conn_timeout)
            except TimeoutError:
                outcome = "client_timeout"
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError,
                    ValueError) as exc:
                outcome = type(exc).__name__
            tally.add(kind, outcome)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if slowloris_conns:
        tally.add("slowloris", f"connected_{await slowloris(t, slowloris_conns, 1.0)}")
    return tally
