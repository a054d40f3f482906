"""The approval a statement needs, judged last (after policy and masking allowed it): the rule
per access that rules.py found (`approval`, `approval_relations`, `approval_bulk_reads`), else
a role's `approval_patterns`, else its `approval_row_estimate`; and the decision answer's
`approval` object the data plane passes back when it asks the control plane.

Several roles: a statement needs approval by a statement-wide rule (pattern, row estimate)
unless the roles that would not ask could run all of it without asking -- the same "every role
that grants it would ask" rule rules.py applies to each access.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from phigate.config import RoleConfig, RoleSet
from phigate.policy.analyze import Facts
from phigate.policy.patterns import matches, normalized_texts
from phigate.policy.rules import _CATALOG_SCHEMAS, Ask, Decision, _Judge, ask, judge_roles

__all__ = ["approval_answer", "statement_ask"]

#: Statements whose rows the row-estimate rule counts: reads that return rows.
_READ_KINDS = frozenset({"select", "copy_to", "declare_cursor"})


def approval_answer(
    facts: list[Facts],
    roleset: RoleSet,
    decision: Decision,
    sql: str,
    protected: frozenset[tuple[str, str]],
) -> dict[str, Any] | None:
    """The decision answer's `approval` object for an allowed statement, or None."""
    found = decision.ask or statement_ask(facts, roleset, sql, protected)
    if found is None:
        return None
    answer: dict[str, Any] = {
        "rule": found.rule,
        "role": found.role.name,
        "reason": found.reason,
        # The identity's: an agent one of whose roles cannot wait is never held.
        "mode": roleset.approval_mode,
        "timeout_ms": round(found.role.approval_timeout * 1000),
    }
    if found.row_estimate_over is not None:
        answer["row_estimate_over"] = found.row_estimate_over
    return answer


def statement_ask(
    facts: list[Facts], roleset: RoleSet, sql: str, protected: frozenset[tuple[str, str]]
) -> Ask | None:
    """The statement-wide rules of an allowed statement no per-access rule asked for."""
    roles = roleset.roles
    if any(r.approval_patterns for r in roles):
        texts = normalized_texts(sql, facts)
        asking = [(r, n) for r in roles if (n := _first_match(r, texts)) is not None]
        asked = {r for r, _ in asking}
        if asking and not _runs_freely(
            [r for r in roles if r not in asked], facts, protected, roles
        ):
            role, number = asking[0]
            return ask("pattern", role, f"a statement matching approval_patterns entry {number}")
    if any(r.approval_row_estimate is not None for r in roles) and _reads_rows(facts):
        found = _estimate_ask(facts, roles, protected)
        if found is not None:
            return found
    return _uncut_copy_ask(facts, roleset)


def _uncut_copy_ask(facts: list[Facts], roleset: RoleSet) -> Ask | None:
    """COPY … TO sends its rows as COPY data, which the data plane does not cut at max_rows: with
    a row cap in force (the role set's), it waits for a person instead."""
    cap = roleset.max_rows
    if cap is None or not any(f.copy_direction == "to" for f in facts):
        return None
    role = next(r for r in roleset.roles if r.max_rows == cap)
    return ask("copy_to", role, f"COPY ... TO, which max_rows = {cap} cannot cut,")


def _first_match(role: RoleConfig, texts: Sequence[str]) -> int | None:
    for p in role.approval_patterns:
        if matches(p, texts):
            return p.number
    return None


def _estimate_ask(
    facts: list[Facts], roles: tuple[RoleConfig, ...], protected: frozenset[tuple[str, str]]
) -> Ask | None:
    """Hold if the planner estimates more rows than T, the largest threshold such that the
    roles with no threshold or one of at least T could run the statement without asking."""
    if _runs_freely([r for r in roles if r.approval_row_estimate is None], facts, protected, roles):
        return None
    thresholds = sorted(
        {r.approval_row_estimate for r in roles if r.approval_row_estimate is not None},
        reverse=True,
    )
    for t in thresholds:
        able = [r for r in roles if r.approval_row_estimate is None or r.approval_row_estimate >= t]
        if _runs_freely(able, facts, protected, roles):
            role = next(r for r in roles if r.approval_row_estimate == t)
            return ask("row_estimate", role, f"reading more than {t} rows (planner estimate)", t)
    return None  # not reached: all roles together run it (the decision asked nothing)


def _runs_freely(
    subset: list[RoleConfig],
    facts: list[Facts],
    protected: frozenset[tuple[str, str]],
    roles: tuple[RoleConfig, ...],
) -> bool:
    """Whether ``subset`` of the roles alone allows every statement without asking."""
    if not subset:
        return False
    if len(subset) == len(roles):
        return True  # the decision already judged all of them: allowed, nothing asked
    d = judge_roles(_Judge(tuple(subset), protected), facts)
    return d.action == "allow" and d.ask is None


def _reads_rows(facts: list[Facts]) -> bool:
    return any(
        f.kind in _READ_KINDS
        and any(
            op in ("select", "copy_to") and s not in _CATALOG_SCHEMAS for s, _, op in f.relations
        )
        for f in facts
    )
