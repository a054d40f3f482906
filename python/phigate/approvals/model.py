"""Approval requests, votes, grants and their statuses, as the store keeps them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DECIDED",
    "STATUSES",
    "ApprovalError",
    "ApprovalRequest",
    "Grant",
    "Scope",
    "Status",
    "Vote",
    "values_hash",
]

Status = Literal["pending", "approved", "denied", "timed_out", "withdrawn", "failed", "used"]
#: pending: waiting for approvers; approved: a grant exists (uses left); used: its grant is used
#: up; denied / timed_out / withdrawn (cancel, disconnect) / failed (the holding gateway stopped).
STATUSES: tuple[Status, ...] = (
    "pending", "approved", "denied", "timed_out", "withdrawn", "failed", "used",
)  # fmt: skip
DECIDED: frozenset[str] = frozenset(STATUSES) - {"pending"}

Verdict = Literal["approve", "deny"]


class ApprovalError(Exception):
    """A refused approver action; ``http_status`` is what the admin API answers (400, 403,
    404, 409), the message tells the approver what to do. Never holds statement values."""

    def __init__(self, http_status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message


@dataclass(frozen=True)
class Scope:
    """What an approval binds beyond the statement: this session or any session of the
    identity, the exact values or the statement shape only (any values), how many executions
    (None: unlimited within the window), and the window (None: `[approvals] grant_valid_for`)."""

    session: Literal["this", "any"] = "this"
    shape_only: bool = False
    executions: int | None = 1
    valid_for_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "shape_only": self.shape_only,
            "executions": self.executions,
            # Whole seconds: audit records hold integers, never floats.
            "valid_for_s": None if self.valid_for_s is None else round(self.valid_for_s),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> Scope:
        doc = doc or {}
        return cls(
            session="any" if doc.get("session") == "any" else "this",
            shape_only=bool(doc.get("shape_only", False)),
            executions=doc.get("executions", 1),
            valid_for_s=doc.get("valid_for_s"),
        )

    def narrowest(self, other: Scope) -> Scope:
        """What two approvers both agreed to (quorum: the grant is never wider than a vote)."""

        def least(a: float | None, b: float | None) -> float | None:
            return b if a is None else a if b is None else min(a, b)

        executions = least(self.executions, other.executions)
        return Scope(
            session="any" if self.session == other.session == "any" else "this",
            shape_only=self.shape_only and other.shape_only,
            executions=int(executions) if executions is not None else None,
            valid_for_s=least(self.valid_for_s, other.valid_for_s),
        )


@dataclass(frozen=True)
class Vote:
    request: str
    approver: str  # the approver's subject
    approver_groups: tuple[str, ...]
    verdict: Verdict
    reason: str | None  # clear, for approvers; the audit trail keeps a keyed hash
    scope: Scope
    at: float  # epoch seconds


@dataclass(frozen=True)
class Grant:
    """An approval as it is checked at each execution. ``session`` None: any session of the
    subject; ``values_hash`` None: any values (shape only); ``uses_left`` None: unlimited
    until ``expires_at``."""

    id: str
    request: str
    subject: str
    #: The target (database) it was approved on: the same text elsewhere is another statement.
    target: str
    session: str | None
    normalized: str
    values_hash: str | None
    rule: str
    uses_left: int | None
    expires_at: float
    created_at: float


@dataclass(frozen=True)
class ApprovalRequest:
    """One statement execution waiting for (or decided by) approvers. ``sql``, ``parameters``
    and ``earlier`` hold values in clear for approvers and are purged once decided long
    enough ago; the audit trail only ever gets the hashes."""

    id: str
    created_at: float
    expires_at: float
    instance: str  # the gateway holding it (hold mode) or that created it (return mode)
    session: str
    stmt: int | None
    subject: str
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    role: str | None  # the role whose risk rule it is (None: a max_rows cut)
    target: str | None
    rule: str
    reason: str
    mode: Literal["hold", "return"]
    normalized: str
    sql: str | None
    parameters: list[Any] | None
    literal_hashes: Any
    parameter_hashes: Any
    values_hash: str
    estimate: int | None
    masked_columns: dict[str, str]
    earlier: list[str] | None
    status: Status = "pending"
    outcome_at: float | None = None
    outcome_by: str | None = None
    outcome_detail: str | None = None
    votes: tuple[Vote, ...] = field(default=())


def values_hash(literal_hashes: Any, parameter_hashes: Any, fallback: str | None = None) -> str:
    """What binds an approval to the exact values: SHA-256 over the keyed hashes of the
    literals and the bound parameters (already keyed, so this reveals nothing). ``fallback``
    (a keyed hash of the whole text) stands in for literals the lexer could not split."""
    literals = literal_hashes if literal_hashes is not None else {"text": fallback}
    doc = json.dumps([literals, parameter_hashes], separators=(",", ":"), sort_keys=True)
    return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()
