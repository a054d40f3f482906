"""Just-in-time approvals: risky statements held until approvers decide (docs/approvals.md)."""

from phigate.approvals.model import ApprovalError, ApprovalRequest, Grant, Scope, Vote
from phigate.approvals.rules import Approver
from phigate.approvals.service import ApprovalService, instance_name, make_store

__all__ = [
    "ApprovalError",
    "ApprovalRequest",
    "ApprovalService",
    "Approver",
    "Grant",
    "Scope",
    "Vote",
    "instance_name",
    "make_store",
]
