"""What an approver sees of a request: who asked, which rule held it, the statement with its
values, the estimate, masked columns, earlier statements, votes, and what is still needed."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from phigate.approvals.model import ApprovalRequest
from phigate.approvals.rules import needed
from phigate.config.approvals import ApproverRule

__all__ = ["iso", "request_view"]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def request_view(r: ApprovalRequest, rules: Iterable[ApproverRule]) -> dict[str, Any]:
    """The approver view (JSON-ready). Holds the statement's values: only for approvers."""
    return {
        "id": r.id,
        "status": r.status,
        "created_at": iso(r.created_at),
        "expires_at": iso(r.expires_at),
        "subject": r.subject,
        "groups": list(r.groups),
        "roles": list(r.roles),
        "role": r.role,
        "target": r.target,
        "rule": r.rule,
        "reason": r.reason,
        "mode": r.mode,
        "session": r.session,
        "stmt": r.stmt,
        "instance": r.instance,
        "normalized": r.normalized,
        "sql": r.sql,  # None once purged ([approvals] keep_decided)
        "parameters": r.parameters,
        "estimate": r.estimate,
        "masked_columns": dict(r.masked_columns),
        "earlier": r.earlier,
        "votes": [
            {
                "approver": v.approver,
                "groups": list(v.approver_groups),
                "verdict": v.verdict,
                "reason": v.reason,
                "scope": v.scope.to_json(),
                "at": iso(v.at),
            }
            for v in r.votes
        ],
        "needed": needed(rules, r) if r.status == "pending" else [],
        "outcome": None if r.status == "pending" else {
            "status": r.status, "at": iso(r.outcome_at), "by": r.outcome_by,
            "detail": r.outcome_detail,
        },  # fmt: skip
    }
