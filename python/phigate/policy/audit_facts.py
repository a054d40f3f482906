"""What a statement record says of a decision besides allow/deny: the statement kind, the
relations and columns it reads and writes, the rule that decided, and which columns the
masking rewrite or layer 2 masks with which mask. Names only, never values; the data plane
caches these with the decision and repeats them for every statement the decision is reused for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from phigate.config import RoleSet
from phigate.masking.classification import CatalogSnapshot
from phigate.policy.facts import Facts
from phigate.policy.rules import Decision, allow_rule, deny_rule

__all__ = ["audit_facts"]

_SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
# A name the record may show as written: what an unquoted identifier folds to. A quoted name
# with spaces or capitals ("Jane Doe") is the shape a patient's name takes.
_PLAIN = re.compile(r"[a-z_][a-z0-9_$]{0,62}")


def audit_facts(
    facts: list[Facts],
    decision: Decision,
    answer: dict[str, Any],
    roleset: RoleSet | None,
    catalog: CatalogSnapshot | None,
    clear_kinds: frozenset[str],
    names: frozenset[str],
    phi_in_text: Callable[[str], bool] | None,
    *,
    masking_catalog: CatalogSnapshot | None = None,
) -> dict[str, Any]:
    """The ``audit`` object of a decision answer.

    ``names`` are the identifiers the normalized text may show (catalog_names of an allowed
    statement); a refused statement may name anything (a made-up table named like a patient),
    so its relations and columns are listed only when they are system catalog relations or
    relations the PHI catalog knows exist. ``masking_catalog`` is the catalog when this
    identity sees some PHI masked (None: nothing is masked for it)."""
    allowed = answer.get("action") == "allow"

    def plain(name: str) -> bool:
        return name in names and _PLAIN.fullmatch(name) is not None and (
            phi_in_text is None or not phi_in_text(name)
        )

    def shown(schema: str, name: str) -> bool:
        if schema in _SYSTEM_SCHEMAS and _PLAIN.fullmatch(name) is not None:
            return True
        if catalog is not None and catalog.relation(schema, name) is not None:
            return True
        return allowed and plain(schema) and plain(name)

    def column_shown(schema: str, name: str, column: str) -> bool:
        rel = catalog.relation(schema, name) if catalog is not None else None
        if rel is not None:
            return column == "*" or rel.column(column) is not None
        return allowed and (column == "*" or plain(column)) and shown(schema, name)

    relations: set[str] = set()
    read: set[str] = set()
    written: set[str] = set()
    for f in facts:
        for schema, name, _ in f.relations:
            if shown(schema, name):
                relations.add(f"{schema}.{name}")
        for use in f.columns:
            for schema, name in use.candidates:
                if shown(schema, name) and column_shown(schema, name, use.column):
                    (written if use.write is not None else read).add(
                        f"{schema}.{name}.{use.column}"
                    )
    kinds = {f.kind for f in facts}
    kind = kinds.pop() if len(kinds) == 1 else ("multiple" if kinds else None)
    return {
        "kind": kind,
        "rule": _rule(facts, decision, answer, roleset),
        "relations": sorted(relations),
        "columns_read": sorted(read),
        "columns_written": sorted(written),
        "masking": _masking(facts, answer, masking_catalog, clear_kinds),
    }


def _rule(
    facts: list[Facts], decision: Decision, answer: dict[str, Any], roleset: RoleSet | None
) -> str:
    if decision.action != "allow":
        return deny_rule(decision)
    if answer.get("action") != "allow":
        # The policy allowed it; the masking layer refused (or the target is gone).
        return str(answer.get("audit_rule") or "masking")
    assert roleset is not None  # decide() allows nothing without a role
    return allow_rule(facts, roleset)


def _masking(
    facts: list[Facts],
    answer: dict[str, Any],
    catalog: CatalogSnapshot | None,
    clear_kinds: frozenset[str],
) -> dict[str, Any]:
    """Who masks the statement's protected columns and with which masks: the rewrite (in
    SQL, at the source) or layer 2 (the data plane, by column origin); the columns are the
    masked ones the statement refers to."""
    if answer.get("action") != "allow" or catalog is None:
        return {"by": None, "columns": {}}
    columns: dict[str, str] = {}
    for f in facts:
        for use in f.columns:
            if use.write is not None:
                continue
            for schema, name in use.candidates:
                rel = catalog.relation(schema, name)
                if rel is None:
                    continue
                for col in rel.masked_columns(clear_kinds):
                    if use.column in ("*", col.name) and col.rule is not None:
                        columns[f"{schema}.{name}.{col.name}"] = col.rule.mask_spec
    if answer.get("rewrite") is not None:
        by: str | None = "rewrite"
    elif columns or answer.get("origins") is not None:
        by = "layer2"
    else:
        by = None
    return {"by": by, "columns": columns if by is not None else {}}
