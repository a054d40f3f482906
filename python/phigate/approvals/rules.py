"""Who may approve what: [approvers.*] rules matched against a request, quorum (N distinct
approvers; "all": one from each group), and the requester never voting on its own request."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from phigate.approvals.model import ApprovalError, ApprovalRequest
from phigate.config.approvals import ApproverRule
from phigate.config.model import _APPROVAL_GROUPS

__all__ = ["Approver", "applicable", "approver_for", "check_voter", "decided", "needed"]


@dataclass(frozen=True)
class Approver:
    """An identity that matches at least one approver rule (through its groups)."""

    subject: str
    groups: tuple[str, ...]
    rules: tuple[str, ...]  # names of the ApproverRules its groups match


def approver_for(
    rules: Iterable[ApproverRule], subject: str, groups: Sequence[str]
) -> Approver | None:
    """The approver this identity is, or None when no rule admits any of its groups."""
    mine = set(groups)
    names = tuple(r.name for r in rules if r.groups & mine)
    if not names:
        return None
    return Approver(subject=subject, groups=tuple(groups), rules=names)


def _rule_matches(listed: frozenset[str], rule: str) -> bool:
    # "write" in an approver rule covers a request held by "delete" (the role's shorthand
    # expanded); the reverse does not hold: an approver for deletes cannot approve any write.
    if "*" in listed or rule in listed:
        return True
    return any(rule in _APPROVAL_GROUPS.get(name, ()) for name in listed)


def covers(
    rule: ApproverRule, role: str | None, roles: Sequence[str], risk: str, target: str | None
) -> bool:
    """Whether ``rule`` governs a request of ``role`` (or, without one, any of ``roles``)
    held by risk rule ``risk`` on ``target``."""
    if "*" not in rule.roles:
        wanted = (role,) if role is not None else tuple(roles)
        if not any(r in rule.roles for r in wanted):
            return False
    if "*" not in rule.targets and (target is None or target not in rule.targets):
        return False
    return _rule_matches(rule.rules, risk)


def applicable(rules: Iterable[ApproverRule], request: Any) -> list[ApproverRule]:
    """The approver rules that govern ``request`` (an ApprovalRequest or anything with
    role, roles, rule, target)."""
    return [r for r in rules if covers(r, request.role, request.roles, request.rule,
                                       request.target)]  # fmt: skip


def check_voter(
    rules: Iterable[ApproverRule], approver: Approver, request: ApprovalRequest
) -> list[ApproverRule]:
    """The rules under which ``approver`` may vote on ``request``; raises ApprovalError 403."""
    if approver.subject == request.subject:
        raise ApprovalError(403, f"you requested {request.id} yourself; another approver must "
                            "decide it")  # fmt: skip
    mine = set(approver.groups)
    allowed = [r for r in applicable(rules, request) if r.groups & mine]
    if not allowed:
        raise ApprovalError(403, f"none of your approver groups may decide request "
                            f"{request.id} (role {request.role or '-'}, rule {request.rule}); "
                            "see the [approvers] rules in the gateway config")  # fmt: skip
    return allowed


def _approvals_under(rule: ApproverRule, request: ApprovalRequest) -> dict[str, set[str]]:
    """Approving subjects under ``rule`` and the rule's groups each was a member of."""
    out: dict[str, set[str]] = {}
    for v in request.votes:
        if v.verdict != "approve" or v.approver == request.subject:
            continue
        groups = rule.groups & set(v.approver_groups)
        if groups:
            out.setdefault(v.approver, set()).update(groups)
    return out


def satisfied(rule: ApproverRule, request: ApprovalRequest) -> bool:
    approvals = _approvals_under(rule, request)
    if len(approvals) < rule.quorum:
        return False
    if rule.require == "all":
        seen = set().union(*approvals.values()) if approvals else set()
        return rule.groups <= seen
    return True


def decided(
    rules: Iterable[ApproverRule], request: ApprovalRequest
) -> tuple[str, str | None] | None:
    """("denied", by) after one deny by an authorized approver, ("approved", rule name) once
    some governing rule is satisfied, else None (still pending)."""
    governing = applicable(rules, request)
    for v in request.votes:
        if v.verdict == "deny" and any(r.groups & set(v.approver_groups) for r in governing):
            return "denied", v.approver
    for rule in governing:
        if satisfied(rule, request):
            return "approved", rule.name
    return None


def needed(rules: Iterable[ApproverRule], request: ApprovalRequest) -> list[dict[str, Any]]:
    """For the approver view: per governing rule, approvals so far and what is missing."""
    out = []
    for rule in applicable(rules, request):
        approvals = _approvals_under(rule, request)
        seen = set().union(*approvals.values()) if approvals else set()
        missing_groups = sorted(rule.groups - seen) if rule.require == "all" else []
        out.append({
            "rule": rule.name, "quorum": rule.quorum, "require": rule.require,
            "groups": sorted(rule.groups), "approvals": len(approvals),
            "missing": max(0, rule.quorum - len(approvals)), "missing_groups": missing_groups,
            "satisfied": satisfied(rule, request),
        })  # fmt: skip
    return out
