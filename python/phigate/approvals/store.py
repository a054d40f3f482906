"""What a state store (SQLite or PostgreSQL) offers the approval service, and the row shapes
both keep. Every change that must be atomic (the pending limit, a vote and its outcome, using
a grant) is one store call."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from phigate.approvals.model import ApprovalRequest, Grant, Scope, Status, Vote

__all__ = [
    "REQUEST_COLUMNS",
    "ApprovalStore",
    "Judgement",
    "Judge",
    "grant_from_row",
    "grant_row",
    "insert_sql",
    "request_from_row",
    "request_row",
    "vote_from_row",
    "vote_row",
]

#: The requests table's columns, in the order both stores use them.
REQUEST_COLUMNS: tuple[str, ...] = (
    "id", "created_at", "expires_at", "instance", "session", "stmt", "subject", "groups",
    "roles", "role", "target", "rule", "reason", "mode", "normalized", "sql", "parameters",
    "literal_hashes", "parameter_hashes", "values_hash", "estimate", "masked_columns", "earlier",
    "status", "outcome_at", "outcome_by", "outcome_detail",
)  # fmt: skip
#: Columns holding JSON documents.
JSON_COLUMNS = frozenset({
    "groups", "roles", "parameters", "literal_hashes", "parameter_hashes", "masked_columns",
    "earlier",
})  # fmt: skip
GRANT_COLUMNS: tuple[str, ...] = (
    "id", "request", "subject", "target", "session", "normalized", "values_hash", "rule",
    "uses_left", "expires_at", "created_at",
)  # fmt: skip
VOTE_COLUMNS: tuple[str, ...] = (
    "request", "approver", "approver_groups", "verdict", "reason", "scope", "at",
)  # fmt: skip


@dataclass(frozen=True)
class Judgement:
    """What a vote comes to, decided inside the store's transaction: the new status (None:
    still pending), who or which rule decided, and the grant an approval makes."""

    status: Status | None
    by: str | None = None
    detail: str | None = None
    grant: Grant | None = None


#: Called with the request (votes so far included) and the new vote, inside the transaction;
#: raises ApprovalError to refuse the vote (nothing is written then).
Judge = Callable[[ApprovalRequest, Vote], Judgement]


class ApprovalStore(Protocol):
    #: The store as messages may name it (a path, or a URL without credentials).
    where: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def create(self, request: ApprovalRequest, max_pending: int, now: float) -> bool:
        """Insert ``request`` unless its subject already has ``max_pending`` pending requests
        that have not expired (False then); atomic across gateways."""
        ...

    async def find_pending(
        self, subject: str, session: str, normalized: str, values_hash: str, rule: str,
        now: float,
    ) -> ApprovalRequest | None:
        """A pending return-mode request for this very execution (an agent retrying before
        anyone decided gets the same request, not a new one)."""
        ...

    async def get(self, request_id: str) -> ApprovalRequest | None: ...

    async def list_requests(self, status: str | None, limit: int) -> list[ApprovalRequest]:
        """Newest first; ``status`` None: every status."""
        ...

    async def vote(self, request_id: str, vote: Vote, judge: Judge) -> ApprovalRequest:
        """Record ``vote`` and what ``judge`` says it comes to, in one transaction; the
        request as it is afterwards. Raises ApprovalError(404) for an unknown id."""
        ...

    async def finish(
        self, request_id: str, status: Status, now: float, *, by: str | None = None,
        detail: str | None = None, only_from: tuple[Status, ...] = ("pending",),
    ) -> bool:
        """Move a request to ``status`` if it is in one of ``only_from`` (False otherwise)."""
        ...

    async def grant_of(self, request_id: str) -> Grant | None:
        """The grant an approval of ``request_id`` made, if any."""
        ...

    async def take_grant(
        self, subject: str, target: str, session: str, normalized: str, values_hash: str,
        rule: str, now: float,
    ) -> Grant | None:
        """Use one execution of a grant matching this execution (exact values before shape
        only, this session before any session), atomically; None when none matches."""
        ...

    async def fail_held(self, instance: str, now: float, detail: str) -> list[str]:
        """Mark pending hold-mode requests of ``instance`` failed (it restarted): their ids."""
        ...

    async def expire(self, now: float) -> list[str]:
        """Mark pending requests past their expiry timed_out: their ids."""
        ...

    async def purge(self, decided_before: float, now: float) -> int:
        """Clear statement text, values and earlier statements of requests decided before
        ``decided_before``; delete grants expired before it. The number of requests cleared."""
        ...

    def on_change(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(request_id)`` when another gateway changes a request (PostgreSQL
        LISTEN/NOTIFY), ``callback("")`` when changes may have been missed (the listening
        connection was lost); the SQLite store has no other gateway and never calls it."""
        ...


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


def _load(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def request_row(r: ApprovalRequest) -> tuple[Any, ...]:
    """The request as a row of REQUEST_COLUMNS (JSON columns as text)."""
    return tuple(
        _dump(getattr(r, c)) if c in JSON_COLUMNS else getattr(r, c) for c in REQUEST_COLUMNS
    )


def request_from_row(row: Mapping[str, Any], votes: tuple[Vote, ...] = ()) -> ApprovalRequest:
    doc = {c: (_load(row[c]) if c in JSON_COLUMNS else row[c]) for c in REQUEST_COLUMNS}
    doc["groups"] = tuple(doc["groups"] or ())
    doc["roles"] = tuple(doc["roles"] or ())
    doc["masked_columns"] = doc["masked_columns"] or {}
    return ApprovalRequest(**doc, votes=votes)


def vote_row(v: Vote) -> tuple[Any, ...]:
    return (v.request, v.approver, _dump(list(v.approver_groups)), v.verdict, v.reason,
            _dump(v.scope.to_json()), v.at)  # fmt: skip


def vote_from_row(row: Mapping[str, Any]) -> Vote:
    return Vote(
        request=row["request"],
        approver=row["approver"],
        approver_groups=tuple(_load(row["approver_groups"]) or ()),
        verdict="deny" if row["verdict"] == "deny" else "approve",
        reason=row["reason"],
        scope=Scope.from_json(_load(row["scope"])),
        at=float(row["at"]),
    )


def grant_row(g: Grant) -> tuple[Any, ...]:
    return tuple(getattr(g, c) for c in GRANT_COLUMNS)


def grant_from_row(row: Mapping[str, Any]) -> Grant:
    return Grant(**{c: row[c] for c in GRANT_COLUMNS})


def insert_sql(table: str, columns: tuple[str, ...], placeholder: str) -> str:
    """``INSERT INTO table (columns) VALUES (…)`` with the driver's placeholder ("?" for
    sqlite3, "%s" for psycopg); table and columns are this module's constants, never input."""
    marks = ", ".join(placeholder for _ in columns)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"  # noqa: S608
