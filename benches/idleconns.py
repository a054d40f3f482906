"""Opens thousands of idle, authenticated PostgreSQL connections with a tiny asyncio client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field

# A raw client rather than asyncpg/psycopg: per-connection client overhead stays tiny, nothing is
# sent after ReadyForQuery (truly idle), and every step has its own time limit.

_SCRAM_CACHE: dict[tuple[str, bytes, int], bytes] = {}


class PgError(Exception):
    """An ErrorResponse or protocol surprise during startup."""


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


async def _read_msg(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readexactly(5)
    n = struct.unpack("!I", head[1:])[0]
    if n < 4 or n > 1 << 20:
        raise PgError(f"bad message length {n}")
    return head[:1], await r.readexactly(n - 4)


def _error_text(body: bytes) -> str:
    fields = {p[:1]: p[1:].decode(errors="replace") for p in body.split(b"\0") if p}
    return f"{fields.get(b'C', '?')}: {fields.get(b'M', '?')}"


def _salted(password: str, salt: bytes, iters: int) -> bytes:
    # Cached: PgBouncer with a plain-text userlist reuses one salt, and PBKDF2 x 10,000 would make
    # the client, not the server under test, the bottleneck of the setup phase.
    key = (password, salt, iters)
    if key not in _SCRAM_CACHE:
        _SCRAM_CACHE[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iters)
    return _SCRAM_CACHE[key]


async def _scram(r: asyncio.StreamReader, w: asyncio.StreamWriter, password: str) -> None:
    """SCRAM-SHA-256 without channel binding (TLS is off in this benchmark)."""
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n=,r={nonce}"
    first = ("n,," + first_bare).encode()
    w.write(_msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
    kind, body = await _read_msg(r)
    if kind == b"E":
        raise PgError(_error_text(body))
    if kind != b"R" or struct.unpack("!I", body[:4])[0] != 11:
        raise PgError("expected SASLContinue")
    server_first = body[4:].decode()
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    if not attrs["r"].startswith(nonce):
        raise PgError("server nonce does not extend ours")
    salted = _salted(password, base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    final_wo_proof = f"c=biws,r={attrs['r']}"
    auth_msg = f"{first_bare},{server_first},{final_wo_proof}".encode()
    sig = hmac.digest(stored_key, auth_msg, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, sig, strict=True))
    w.write(_msg(b"p", f"{final_wo_proof},p={base64.b64encode(proof).decode()}".encode()))


async def connect_idle(host: str, port: int, user: str, database: str, password: str,
                       timeout: float) -> asyncio.StreamWriter:
    """Connect, authenticate (trust/cleartext/md5/SCRAM), wait for ReadyForQuery, return writer."""
    async def go() -> asyncio.StreamWriter:
        r, w = await asyncio.open_connection(host, port)
        try:
            params = (f"user\0{user}\0database\0{database}\0"
                      f"application_name\0phigate-bench-idle\0\0").encode()
            body = struct.pack("!I", 196608) + params
            w.write(struct.pack("!I", len(body) + 4) + body)
            while True:
                kind, body = await _read_msg(r)
                if kind == b"R":
                    code = struct.unpack("!I", body[:4])[0]
                    if code == 3:
                        w.write(_msg(b"p", password.encode() + b"\0"))
                    elif code == 5:
                        inner = hashlib.md5((password + user).encode()).hexdigest()  # noqa: S324
                        outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()  # noqa: S324
                        w.write(_msg(b"p", b"md5" + outer.encode() + b"\0"))
                    elif code == 10:
                        if b"SCRAM-SHA-256\0" not in body[4:]:
                            raise PgError("server offers no SCRAM-SHA-256")
                        await _scram(r, w, password)
                    elif code not in (0, 12):
                        raise PgError(f"unsupported auth request {code}")
                elif kind == b"E":
                    raise PgError(_error_text(body))
                elif kind == b"Z":
                    return w
                # S (ParameterStatus), K (BackendKeyData), N (Notice): nothing to do.
        except BaseException:
            w.close()
            raise

    return await asyncio.wait_for(go(), timeout)


@dataclass
class IdlePool:
    """The writers of open idle connections, plus the first few errors seen while opening."""

    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failed: int = 0

    async def close(self) -> None:
        """Send Terminate and close every connection, bounded."""
        for w in self.writers:
            with contextlib.suppress(Exception):
                w.write(b"X\0\0\0\4")
                w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(w.wait_closed() for w in self.writers), return_exceptions=True),
                30)
        self.writers.clear()


async def open_many(host: str, port: int, user: str, database: str, password: str, n: int,
                    *, concurrency: int = 64, per_conn_timeout: float = 60.0,
                    total_timeout: float = 900.0) -> IdlePool:
    """Open n idle authenticated connections, at most `concurrency` handshakes at a time."""
    pool = IdlePool()
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            try:
                pool.writers.append(
                    await connect_idle(host, port, user, database, password, per_conn_timeout))
            except Exception as e:  # noqa: BLE001 - counted and reported, not fatal per connection
                pool.failed += 1
                if len(pool.errors) < 5:
                    pool.errors.append(f"{type(e).__name__}: {e}")

    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), total_timeout)
    except TimeoutError:
        pool.errors.append(f"gave up after {total_timeout:.0f}s with {len(pool.writers)} open")
    return pool
