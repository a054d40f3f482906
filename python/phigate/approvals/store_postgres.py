"""The approval state in a PostgreSQL state database shared by several gateways (never a
target): psycopg async, one transaction per call, and LISTEN/NOTIFY on channel
`phigate_approvals` (payload: the request id) so a decision reaches the gateway holding the
statement at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.string import TextLoader

from phigate.approvals.model import ApprovalError, ApprovalRequest, Grant, Status, Vote
from phigate.approvals.store import (
    GRANT_COLUMNS,
    REQUEST_COLUMNS,
    VOTE_COLUMNS,
    Judge,
    grant_from_row,
    grant_row,
    insert_sql,
    request_from_row,
    request_row,
    vote_from_row,
    vote_row,
)

__all__ = ["CHANNEL", "SCHEMA_NAME", "PostgresStore"]

log = logging.getLogger(__name__)

CHANNEL = "phigate_approvals"
SCHEMA_NAME = "phigate_approvals"
# Serializes schema creation when several gateways start at once (any constant works).
_SCHEMA_LOCK = 0x70686761
_RECONNECT_MAX = 5.0

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS phigate_approvals;
CREATE TABLE IF NOT EXISTS requests (
    id text PRIMARY KEY, created_at double precision NOT NULL,
    expires_at double precision NOT NULL, instance text NOT NULL, session text NOT NULL,
    stmt bigint, subject text NOT NULL, groups jsonb NOT NULL, roles jsonb NOT NULL, role text,
    target text, rule text NOT NULL, reason text NOT NULL, mode text NOT NULL,
    normalized text NOT NULL, sql text, parameters jsonb, literal_hashes jsonb,
    parameter_hashes jsonb, values_hash text NOT NULL, estimate bigint,
    masked_columns jsonb NOT NULL, earlier jsonb, status text NOT NULL,
    outcome_at double precision, outcome_by text, outcome_detail text
);
CREATE INDEX IF NOT EXISTS requests_pending
    ON requests (subject, status, expires_at);
CREATE INDEX IF NOT EXISTS requests_status ON requests (status, created_at);
CREATE TABLE IF NOT EXISTS votes (
    request text NOT NULL REFERENCES requests (id), approver text NOT NULL,
    approver_groups jsonb NOT NULL, verdict text NOT NULL, reason text, scope jsonb NOT NULL,
    at double precision NOT NULL, PRIMARY KEY (request, approver)
);
CREATE TABLE IF NOT EXISTS grants (
    id text PRIMARY KEY, request text NOT NULL REFERENCES requests (id),
    subject text NOT NULL, target text NOT NULL, session text,
    normalized text NOT NULL, values_hash text,
    rule text NOT NULL, uses_left integer, expires_at double precision NOT NULL,
    created_at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS grants_match ON grants (subject, normalized, rule);
"""

_REQ_INSERT = insert_sql("requests", REQUEST_COLUMNS, "%s")
_VOTE_INSERT = insert_sql("votes", VOTE_COLUMNS, "%s")
_GRANT_INSERT = insert_sql("grants", GRANT_COLUMNS, "%s")
_TAKE_GRANT = """
SELECT * FROM grants
 WHERE subject = %s AND target = %s AND normalized = %s AND rule = %s
   AND (session IS NULL OR session = %s)
   AND (values_hash IS NULL OR values_hash = %s) AND expires_at > %s
   AND (uses_left IS NULL OR uses_left > 0)
 ORDER BY values_hash IS NULL, session IS NULL, created_at
 LIMIT 1
 FOR UPDATE
"""
_NOTIFY = "SELECT pg_notify(%s, %s)"

Conn = psycopg.AsyncConnection[dict[str, Any]]


class PostgresStore:
    """ApprovalStore in a PostgreSQL state database (see store.py for what each call
    promises). One connection for the calls (serialized: approvals are few), one listening."""

    def __init__(self, url: str, where: str) -> None:
        self._url = url
        self.where = where
        self._conn: Conn | None = None
        self._lock = asyncio.Lock()
        self._callbacks: list[Callable[[str], None]] = []
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._closed = False

    async def _connect(self) -> Conn:
        conn = await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, row_factory=dict_row,
            application_name="phigate-approvals", connect_timeout=10,
            # Every table lives in this schema (made by open()).
            options=f"-c search_path={SCHEMA_NAME}",
        )  # fmt: skip
        # JSON columns come back as text: store.py parses them once, the same for SQLite.
        conn.adapters.register_loader("jsonb", TextLoader)
        return conn

    async def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()
            self._conn = await self._connect()
        return self._conn

    async def open(self) -> None:
        async with self._lock:
            conn = await self._connection()
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                await conn.execute(SCHEMA)
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        # Start listening before the first request is held: no decision can slip past.
        await asyncio.wait_for(self._listening.wait(), 15)

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        async with self._lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None

    def on_change(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)

    async def _listen(self) -> None:
        """LISTEN for the life of the store; reconnects after a loss, then tells the
        callbacks that changes may have been missed (``""``)."""
        delay = 0.2
        first = True
        while not self._closed:
            try:
                conn = await self._connect()
                try:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    if not first:
                        self._notify_all("")
                    first, delay = False, 0.2
                    async for note in conn.notifies():
                        self._notify_all(note.payload)
                finally:
                    with contextlib.suppress(Exception):
                        await conn.close()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                log.warning("approval store %s: listening connection lost (%s); reconnecting",
                            self.where, type(exc).__name__)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)

    def _notify_all(self, request_id: str) -> None:
        for cb in self._callbacks:
            try:
                cb(request_id)
            except Exception:  # noqa: BLE001 - one listener's bug must not stop the others
                log.exception("approval change listener failed")

    async def _one(self, sql: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        async with self._lock:
            conn = await self._connection()
            cur = await conn.execute(sql, params)
            return await cur.fetchone()

    async def create(self, request: ApprovalRequest, max_pending: int, now: float) -> bool:
        async with self._lock:
            conn = await self._connection()
            async with conn.transaction():
                # One subject's requests are counted and inserted one gateway at a time.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                   (request.subject,))  # fmt: skip
                cur = await conn.execute(
                    "SELECT count(*) AS n FROM requests WHERE subject = %s AND status = 'pending' "
                    "AND expires_at > %s", (request.subject, now),
                )  # fmt: skip
                row = await cur.fetchone()
                if row is not None and row["n"] >= max_pending:
                    return False
                await conn.execute(_REQ_INSERT, request_row(request))
                await conn.execute(_NOTIFY, (CHANNEL, request.id))
                return True

    async def find_pending(
        self, subject: str, session: str, normalized: str, values_hash: str, rule: str,
        now: float,
    ) -> ApprovalRequest | None:
        async with self._lock:
            conn = await self._connection()
            cur = await conn.execute(
                "SELECT * FROM requests WHERE subject = %s AND session = %s AND normalized = %s "
                "AND values_hash = %s AND rule = %s AND mode = 'return' AND status = 'pending' "
                "AND expires_at > %s ORDER BY created_at DESC LIMIT 1",
                (subject, session, normalized, values_hash, rule, now),
            )  # fmt: skip
            row = await cur.fetchone()
            return await _with_votes(conn, row) if row is not None else None

    async def get(self, request_id: str) -> ApprovalRequest | None:
        async with self._lock:
            conn = await self._connection()
            cur = await conn.execute("SELECT * FROM requests WHERE id = %s", (request_id,))
            row = await cur.fetchone()
            return await _with_votes(conn, row) if row is not None else None

    async def list_requests(self, status: str | None, limit: int) -> list[ApprovalRequest]:
        async with self._lock:
            conn = await self._connection()
            if status is None:
                cur = await conn.execute(
                    "SELECT * FROM requests ORDER BY created_at DESC LIMIT %s", (limit,))
            else:
                cur = await conn.execute(
                    "SELECT * FROM requests WHERE status = %s ORDER BY created_at DESC LIMIT %s",
                    (status, limit),
                )
            return [await _with_votes(conn, row) for row in await cur.fetchall()]

    async def vote(self, request_id: str, vote: Vote, judge: Judge) -> ApprovalRequest:
        async with self._lock:
            conn = await self._connection()
            async with conn.transaction():
                cur = await conn.execute("SELECT * FROM requests WHERE id = %s FOR UPDATE",
                                         (request_id,))  # fmt: skip
                row = await cur.fetchone()
                if row is None:
                    raise ApprovalError(404, f"no approval request {request_id}")
                judgement = judge(await _with_votes(conn, row), vote)
                await conn.execute(_VOTE_INSERT, vote_row(vote))
                if judgement.status is not None:
                    await conn.execute(
                        "UPDATE requests SET status = %s, outcome_at = %s, outcome_by = %s, "
                        "outcome_detail = %s WHERE id = %s",
                        (judgement.status, vote.at, judgement.by, judgement.detail, request_id),
                    )
                if judgement.grant is not None:
                    await conn.execute(
                        _GRANT_INSERT, grant_row(judgement.grant)
                    )
                await conn.execute(_NOTIFY, (CHANNEL, request_id))
                cur = await conn.execute("SELECT * FROM requests WHERE id = %s", (request_id,))
                after = await cur.fetchone()
                assert after is not None
                return await _with_votes(conn, after)

    async def finish(
        self, request_id: str, status: Status, now: float, *, by: str | None = None,
        detail: str | None = None, only_from: tuple[Status, ...] = ("pending",),
    ) -> bool:
        async with self._lock:
            conn = await self._connection()
            async with conn.transaction():
                cur = await conn.execute(
                    "UPDATE requests SET status = %s, outcome_at = %s, outcome_by = %s, "
                    "outcome_detail = %s WHERE id = %s AND status = ANY(%s)",
                    (status, now, by, detail, request_id, list(only_from)),
                )
                if cur.rowcount != 1:
                    return False
                await conn.execute(_NOTIFY, (CHANNEL, request_id))
                return True

    async def grant_of(self, request_id: str) -> Grant | None:
        row = await self._one("SELECT * FROM grants WHERE request = %s", (request_id,))
        return grant_from_row(row) if row is not None else None

    async def take_grant(
        self, subject: str, target: str, session: str, normalized: str, values_hash: str,
        rule: str, now: float,
    ) -> Grant | None:
        async with self._lock:
            conn = await self._connection()
            async with conn.transaction():
                cur = await conn.execute(
                    _TAKE_GRANT, (subject, target, normalized, rule, session, values_hash, now)
                )
                row = await cur.fetchone()
                if row is None:
                    return None
                grant = grant_from_row(row)
                if grant.uses_left is not None:
                    await conn.execute("UPDATE grants SET uses_left = uses_left - 1 WHERE id = %s",
                                       (grant.id,))  # fmt: skip
                    if grant.uses_left == 1:
                        await conn.execute(
                            "UPDATE requests SET status = 'used' WHERE id = %s AND status = "
                            "'approved'", (grant.request,),
                        )  # fmt: skip
                        await conn.execute(_NOTIFY, (CHANNEL, grant.request))
                return grant

    async def _mark_many(self, select: str, params: tuple[Any, ...], status: str, now: float,
                         detail: str | None) -> list[str]:  # fmt: skip
        async with self._lock:
            conn = await self._connection()
            async with conn.transaction():
                cur = await conn.execute(select, params)
                ids = [row["id"] for row in await cur.fetchall()]
                for request_id in ids:
                    await conn.execute(
                        "UPDATE requests SET status = %s, outcome_at = %s, outcome_detail = %s "
                        "WHERE id = %s", (status, now, detail, request_id),
                    )  # fmt: skip
                    await conn.execute(_NOTIFY, (CHANNEL, request_id))
                return ids

    async def fail_held(self, instance: str, now: float, detail: str) -> list[str]:
        return await self._mark_many(
            "SELECT id FROM requests WHERE instance = %s AND mode = 'hold' AND status = 'pending' "
            "FOR UPDATE", (instance,), "failed", now, detail,
        )  # fmt: skip

    async def expire(self, now: float) -> list[str]:
        return await self._mark_many(
            "SELECT id FROM requests WHERE status = 'pending' AND expires_at <= %s "
            "FOR UPDATE SKIP LOCKED", (now,), "timed_out", now, None,
        )  # fmt: skip

    async def purge(self, decided_before: float, now: float) -> int:
        async with self._lock:
            conn = await self._connection()
            async with conn.transaction():
                cur = await conn.execute(
                    "UPDATE requests SET sql = NULL, parameters = NULL, earlier = NULL "
                    "WHERE status <> 'pending' AND outcome_at < %s AND "
                    "(sql IS NOT NULL OR parameters IS NOT NULL OR earlier IS NOT NULL)",
                    (decided_before,),
                )
                await conn.execute("DELETE FROM grants WHERE expires_at < %s", (decided_before,))
                return cur.rowcount


async def _with_votes(conn: Conn, row: dict[str, Any]) -> ApprovalRequest:
    cur = await conn.execute("SELECT * FROM votes WHERE request = %s ORDER BY at", (row["id"],))
    votes = tuple(vote_from_row(v) for v in await cur.fetchall())
    return request_from_row(row, votes)
