"""The approval state in a SQLite file, for a single gateway: stdlib sqlite3 on one thread of
its own (the event loop never blocks on the disk), WAL journal, one transaction per call."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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

__all__ = ["SqliteStore"]

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    instance TEXT NOT NULL, session TEXT NOT NULL, stmt INTEGER, subject TEXT NOT NULL,
    groups TEXT NOT NULL, roles TEXT NOT NULL, role TEXT, target TEXT, rule TEXT NOT NULL,
    reason TEXT NOT NULL, mode TEXT NOT NULL, normalized TEXT NOT NULL, sql TEXT,
    parameters TEXT, literal_hashes TEXT, parameter_hashes TEXT, values_hash TEXT NOT NULL,
    estimate INTEGER, masked_columns TEXT NOT NULL, earlier TEXT, status TEXT NOT NULL,
    outcome_at REAL, outcome_by TEXT, outcome_detail TEXT
);
CREATE INDEX IF NOT EXISTS requests_pending ON requests (subject, status, expires_at);
CREATE INDEX IF NOT EXISTS requests_status ON requests (status, created_at);
CREATE TABLE IF NOT EXISTS votes (
    request TEXT NOT NULL REFERENCES requests (id), approver TEXT NOT NULL,
    approver_groups TEXT NOT NULL, verdict TEXT NOT NULL, reason TEXT, scope TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (request, approver)
);
CREATE TABLE IF NOT EXISTS grants (
    id TEXT PRIMARY KEY, request TEXT NOT NULL REFERENCES requests (id),
    subject TEXT NOT NULL, target TEXT NOT NULL, session TEXT,
    normalized TEXT NOT NULL, values_hash TEXT,
    rule TEXT NOT NULL, uses_left INTEGER, expires_at REAL NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS grants_match ON grants (subject, normalized, rule);
"""

_REQ_INSERT = insert_sql("requests", REQUEST_COLUMNS, "?")
_VOTE_INSERT = insert_sql("votes", VOTE_COLUMNS, "?")
_GRANT_INSERT = insert_sql("grants", GRANT_COLUMNS, "?")
_TAKE_GRANT = """
SELECT * FROM grants
 WHERE subject = ? AND target = ? AND normalized = ? AND rule = ?
   AND (session IS NULL OR session = ?)
   AND (values_hash IS NULL OR values_hash = ?) AND expires_at > ?
   AND (uses_left IS NULL OR uses_left > 0)
 ORDER BY values_hash IS NULL, session IS NULL, created_at
 LIMIT 1
"""


class SqliteStore:
    """ApprovalStore in one SQLite file (see store.py for what each call promises)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="approvals-db")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._db is None:
                raise RuntimeError("approval store is not open")
            return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` in one write transaction (BEGIN IMMEDIATE: no other writer in between)."""

        def in_tx(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return await self._run(in_tx)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            # Created private before SQLite opens it: it holds statements with their values
            # (its -wal and -shm files take the same permissions).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self.path.chmod(0o600)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=10.0)  # fmt: skip
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a decision must survive a power cut
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA)
            return db

        self._db = await asyncio.get_running_loop().run_in_executor(self._executor, connect)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(lambda db: db.close())
            self._db = None
        self._executor.shutdown(wait=True)

    async def create(self, request: ApprovalRequest, max_pending: int, now: float) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            (pending,) = db.execute(
                "SELECT count(*) FROM requests WHERE subject = ? AND status = 'pending' "
                "AND expires_at > ?", (request.subject, now),
            ).fetchone()  # fmt: skip
            if pending >= max_pending:
                return False
            db.execute(_REQ_INSERT, request_row(request))
            return True

        return await self._tx(run)

    async def find_pending(
        self, subject: str, session: str, normalized: str, values_hash: str, rule: str,
        now: float,
    ) -> ApprovalRequest | None:
        def run(db: sqlite3.Connection) -> ApprovalRequest | None:
            row = db.execute(
                "SELECT * FROM requests WHERE subject = ? AND session = ? AND normalized = ? "
                "AND values_hash = ? AND rule = ? AND mode = 'return' AND status = 'pending' "
                "AND expires_at > ? ORDER BY created_at DESC LIMIT 1",
                (subject, session, normalized, values_hash, rule, now),
            ).fetchone()
            return _with_votes(db, row) if row is not None else None

        return await self._run(run)

    async def get(self, request_id: str) -> ApprovalRequest | None:
        def run(db: sqlite3.Connection) -> ApprovalRequest | None:
            row = db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
            return _with_votes(db, row) if row is not None else None

        return await self._run(run)

    async def list_requests(self, status: str | None, limit: int) -> list[ApprovalRequest]:
        def run(db: sqlite3.Connection) -> list[ApprovalRequest]:
            if status is None:
                rows = db.execute("SELECT * FROM requests ORDER BY created_at DESC LIMIT ?",
                                  (limit,)).fetchall()  # fmt: skip
            else:
                rows = db.execute(
                    "SELECT * FROM requests WHERE status = ? ORDER BY created_at DESC LIMIT ?",
                    (status, limit),
                ).fetchall()
            return [_with_votes(db, row) for row in rows]

        return await self._run(run)

    async def vote(self, request_id: str, vote: Vote, judge: Judge) -> ApprovalRequest:
        def run(db: sqlite3.Connection) -> ApprovalRequest:
            row = db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
            if row is None:
                raise ApprovalError(404, f"no approval request {request_id}")
            judgement = judge(_with_votes(db, row), vote)
            db.execute(_VOTE_INSERT, vote_row(vote))
            if judgement.status is not None:
                db.execute(
                    "UPDATE requests SET status = ?, outcome_at = ?, outcome_by = ?, "
                    "outcome_detail = ? WHERE id = ?",
                    (judgement.status, vote.at, judgement.by, judgement.detail, request_id),
                )
            if judgement.grant is not None:
                _insert_grant(db, judgement.grant)
            after = db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
            return _with_votes(db, after)

        return await self._tx(run)

    async def finish(
        self, request_id: str, status: Status, now: float, *, by: str | None = None,
        detail: str | None = None, only_from: tuple[Status, ...] = ("pending",),
    ) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT status FROM requests WHERE id = ?", (request_id,)).fetchone()
            if row is None or row[0] not in only_from:
                return False
            db.execute(
                "UPDATE requests SET status = ?, outcome_at = ?, outcome_by = ?, "
                "outcome_detail = ? WHERE id = ?", (status, now, by, detail, request_id),
            )  # fmt: skip
            return True

        return await self._tx(run)

    async def grant_of(self, request_id: str) -> Grant | None:
        def run(db: sqlite3.Connection) -> Grant | None:
            row = db.execute("SELECT * FROM grants WHERE request = ?", (request_id,)).fetchone()
            return grant_from_row(row) if row is not None else None

        return await self._run(run)

    async def take_grant(
        self, subject: str, target: str, session: str, normalized: str, values_hash: str,
        rule: str, now: float,
    ) -> Grant | None:
        def run(db: sqlite3.Connection) -> Grant | None:
            row = db.execute(
                _TAKE_GRANT, (subject, target, normalized, rule, session, values_hash, now)
            ).fetchone()
            if row is None:
                return None
            grant = grant_from_row(row)
            if grant.uses_left is not None:
                db.execute("UPDATE grants SET uses_left = uses_left - 1 WHERE id = ?",
                           (grant.id,))  # fmt: skip
                if grant.uses_left == 1:
                    db.execute(
                        "UPDATE requests SET status = 'used' WHERE id = ? AND status = "
                        "'approved'", (grant.request,),
                    )  # fmt: skip
            return grant

        return await self._tx(run)

    async def fail_held(self, instance: str, now: float, detail: str) -> list[str]:
        def run(db: sqlite3.Connection) -> list[str]:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM requests WHERE instance = ? AND mode = 'hold' AND "
                "status = 'pending'", (instance,))]  # fmt: skip
            db.executemany(
                "UPDATE requests SET status = 'failed', outcome_at = ?, outcome_detail = ? "
                "WHERE id = ?", [(now, detail, i) for i in ids],
            )  # fmt: skip
            return ids

        return await self._tx(run)

    async def expire(self, now: float) -> list[str]:
        def run(db: sqlite3.Connection) -> list[str]:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM requests WHERE status = 'pending' AND expires_at <= ?", (now,))]
            db.executemany(
                "UPDATE requests SET status = 'timed_out', outcome_at = ? WHERE id = ?",
                [(now, i) for i in ids],
            )
            return ids

        return await self._tx(run)

    async def purge(self, decided_before: float, now: float) -> int:
        def run(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "UPDATE requests SET sql = NULL, parameters = NULL, earlier = NULL "
                "WHERE status <> 'pending' AND outcome_at < ? AND "
                "(sql IS NOT NULL OR parameters IS NOT NULL OR earlier IS NOT NULL)",
                (decided_before,),
            )
            db.execute("DELETE FROM grants WHERE expires_at < ?", (decided_before,))
            return cur.rowcount

        return await self._tx(run)

    def on_change(self, callback: Callable[[str], None]) -> None:
        """One gateway per SQLite file: nobody else changes it."""


def _with_votes(db: sqlite3.Connection, row: Any) -> ApprovalRequest:
    votes = tuple(
        vote_from_row(v)
        for v in db.execute("SELECT * FROM votes WHERE request = ? ORDER BY at", (row["id"],))
    )
    return request_from_row(row, votes)


def _insert_grant(db: sqlite3.Connection, grant: Grant) -> None:
    db.execute(_GRANT_INSERT, grant_row(grant))
