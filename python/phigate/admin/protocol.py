"""What the admin API needs of the approvals service: the service's interface as a Protocol, the
approval scope an approver chooses, and how the service's refusals are recognised."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal, Protocol

from phigate.approvals.model import STATUSES, Scope  # one definition: what the service binds

__all__ = ["LIST_DEFAULT", "LIST_MAX", "STATUSES", "ApprovalServiceLike", "Scope", "error_status"]

# How many requests one list returns by default, and at most (newest first).
LIST_DEFAULT = 500
LIST_MAX = 10000
# Request statuses an approver may list.


class ApprovalServiceLike(Protocol):
    """The approvals service as the admin API, the CLI's server side and webhooks use it.

    Refusals are exceptions with an ``http_status`` (int) and a user-facing message; the
    ``approver`` values are opaque tokens from ``approver_for``.
    """

    def approver_for(self, subject: str, groups: Sequence[str]) -> Any | None: ...

    async def list(
        self, approver: Any, status: str = "pending", limit: int = LIST_DEFAULT
    ) -> list[dict[str, Any]]: ...

    async def show(self, approver: Any, request_id: str) -> dict[str, Any]: ...

    async def vote(
        self, approver: Any, request_id: str, verdict: Literal["approve", "deny"],
        reason: str | None, scope: Scope,
    ) -> dict[str, Any]: ...

    def subscribe(self) -> AsyncIterator[dict[str, Any]]: ...


def error_status(exc: BaseException) -> int | None:
    """The HTTP status of an approvals refusal (the service's ApprovalError), None for anything
    else. Duck-typed so this module does not depend on the service's package."""
    status = getattr(exc, "http_status", None)
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
        return status
    return None
