"""The [roles.*] and [groups] sections, and PostgreSQL-style folding of the names they hold."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from types import MappingProxyType

from phigate.config.durations import parse_duration
from phigate.config.model import (
    _APPROVAL_GROUPS,
    _RESERVED_WHY,
    ALLOW_CLASSES,
    APPROVAL_CLASSES,
    APPROVAL_MODES,
    MASKING_NOTICES,
    NEVER_RELATIONS,
    OPERATIONS,
    PHI_KINDS,
    RESERVED_SCHEMA,
    RoleConfig,
    TargetConfig,
)
from phigate.config.table import _kind, _Table

_ROLE_KEYS = frozenset({
    "targets", "relations", "columns", "operations", "functions", "allow", "approval", "db_role",
    "see_clear", "masking_notices", "approval_relations", "approval_patterns",
    "approval_bulk_reads", "bulk_read_relations", "approval_row_estimate", "approval_mode",
    "approval_timeout", "max_rows",
})  # fmt: skip

#: Bounds of the numeric risk keys: a row count PostgreSQL can hold, a wait of at most a week.
_MAX_ROWS = 2**62
_MAX_APPROVAL_TIMEOUT = 7 * 86400.0

_ROLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")

_NAMEDATALEN = 64

# --- roles ----------------------------------------------------------------------------------


def read_quoted(text: str, i: int) -> tuple[str, int] | None:
    """The double-quoted identifier starting at ``text[i]`` (``""`` inside is one quote) and the
    index after its closing quote; None if it is not closed."""
    j, buf, n = i + 1, [], len(text)
    while True:
        k = text.find('"', j)
        if k < 0:
            return None
        buf.append(text[j:k])
        if k + 1 < n and text[k + 1] == '"':
            buf.append('"')
            j = k + 2
            continue
        return "".join(buf), k + 1


def fold_name(text: str, *, allow_star: bool = False) -> tuple[str, ...]:
    """Split a dotted SQL name and fold it like PostgreSQL: unquoted parts lower-cased (ASCII
    only, as the server does), quoted parts kept with "" unescaped, all truncated to 63 bytes.

    ``public.Patients`` -> ("public", "patients"); ``public."Patients"`` -> ("public",
    "Patients"). With ``allow_star`` a last part ``*`` is kept as "*". Raises ValueError.
    """
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == '"':
            quoted = read_quoted(text, i)
            if quoted is None:
                raise ValueError("unterminated quoted identifier")
            part, i = quoted
            if not part:
                raise ValueError("zero-length quoted identifier")
        else:
            j = i
            while j < n and text[j] not in '."' and not text[j].isspace():
                j += 1
            raw = text[i:j]
            i = j
            if raw == "*" and allow_star:
                part = "*"
            elif not raw or not (raw[0].isalpha() or raw[0] == "_") or not all(
                c.isalnum() or c in "_$" for c in raw
            ):
                raise ValueError(f"{raw or 'an empty name'!r} is not an identifier")
            else:
                part = raw.translate(_ASCII_LOWER)
        parts.append(_truncate_identifier(part))
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            break
        if text[i] != "." or parts[-1] == "*":
            raise ValueError(f"unexpected {text[i]!r}")
        i += 1
    return tuple(parts)

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

def _truncate_identifier(name: str) -> str:
    raw = name.encode("utf-8")
    if len(raw) < _NAMEDATALEN:
        return name
    return raw[: _NAMEDATALEN - 1].decode("utf-8", errors="ignore")

def _qualified(t: _Table, key: str, text: str, *, allow_star: bool) -> tuple[str, str]:
    try:
        parts = fold_name(text, allow_star=allow_star)
    except ValueError as exc:
        t.fail(key, f"{text!r}: {exc}")
    if len(parts) != 2:
        example = "public.patients" + (' or "public.*"' if allow_star else "")
        t.fail(key, f"{text!r} must be schema-qualified, e.g. {example}")
    return parts[0], parts[1]

def _roles(t: _Table, targets: Mapping[str, TargetConfig]) -> dict[str, RoleConfig]:
    roles: dict[str, RoleConfig] = {}
    for name in t.data:
        if not _ROLE_NAME.fullmatch(name):
            t.fail(name, "role names use 1-63 of A-Z a-z 0-9 _ . - (they appear in messages)")
        roles[name] = _role(name, t.table(name, required=True, allowed=_ROLE_KEYS), targets)
    return roles

def _names(
    t: _Table, key: str, allowed: tuple[str, ...], default: tuple[str, ...]
) -> frozenset[str]:
    values = t.string_list(key, default)
    for v in values:
        if v not in allowed:
            near = difflib.get_close_matches(v, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            t.fail(key, f"unknown {key} entry {v!r}{hint}; use {', '.join(allowed)}")
    return frozenset(values)

def _role(name: str, t: _Table, targets: Mapping[str, TargetConfig]) -> RoleConfig:
    role_targets: frozenset[str] | None = None
    if "targets" in t.data:
        listed = t.string_list("targets", ())
        for target in listed:
            if target not in targets:
                t.fail("targets", f"{target!r} is not a configured target ([targets.{target}])")
        role_targets = frozenset(listed)

    relations: set[tuple[str, str]] = set()
    schemas: set[str] = set()
    for text in t.string_list("relations", ()):
        schema, rel = _qualified(t, "relations", text, allow_star=True)
        if schema == RESERVED_SCHEMA:
            t.fail("relations", f"{text!r}: {_RESERVED_WHY}")
        if (schema, rel) in NEVER_RELATIONS:
            t.fail("relations", f"{text!r} is never allowed through the gateway")
        if rel == "*":
            if schema == "pg_catalog":
                t.fail("relations", '"pg_catalog.*" is not allowed; use allow = ["catalog"]')
            schemas.add(schema)
        else:
            relations.add((schema, rel))

    columns: dict[tuple[str, str], frozenset[str]] = {}
    raw_columns = t.data.get("columns", {})
    if not isinstance(raw_columns, Mapping):
        t.fail("columns", f"must be a table of relation = [columns], not {_kind(raw_columns)}")
    for rel_text, cols in raw_columns.items():
        key = f"columns.{rel_text}"
        schema, rel = _qualified(t, key, rel_text, allow_star=False)
        if not (schema in schemas or (schema, rel) in relations):
            t.fail(key, f"{rel_text!r} is not one of this role's relations")
        if not isinstance(cols, list) or not cols:
            t.fail(key, "must be a non-empty list of column names")
        folded: set[str] = set()
        for col in cols:
            if not isinstance(col, str) or not col:
                t.fail(key, "must be a list of non-empty column names")
            try:
                parts = fold_name(col)
            except ValueError as exc:
                t.fail(key, f"{col!r}: {exc}")
            if len(parts) != 1:
                t.fail(key, f"{col!r} is a column name, write it without a relation")
            folded.add(parts[0])
        if (schema, rel) in columns:
            t.fail(key, "lists the same relation twice (after folding names)")
        columns[(schema, rel)] = frozenset(folded)

    operations = _names(t, "operations", OPERATIONS, ("select",))
    allow = _names(t, "allow", ALLOW_CLASSES, ())

    functions: set[tuple[str, str]] = set()
    for text in t.string_list("functions", ()):
        schema, fn = _qualified(t, "functions", text, allow_star=False)
        if schema == RESERVED_SCHEMA:
            t.fail("functions", f"{text!r}: {_RESERVED_WHY}")
        from phigate.policy.functions import never_reason  # late: policy imports this module

        reason = never_reason(fn)
        if reason is not None:
            t.fail("functions", f"{text!r} is never allowed: {reason}")
        functions.add((schema, fn))

    approval: dict[str, str] = {}
    for cls in sorted(_names(t, "approval", APPROVAL_CLASSES, ())):
        expanded = _APPROVAL_GROUPS.get(cls, frozenset({cls}))
        granted = expanded & (operations | allow)
        if not granted:
            t.fail(
                "approval",
                f"{cls!r} needs approval but the role does not grant it; add it to "
                + ("allow" if cls in ALLOW_CLASSES else "operations"),
            )
        for g in granted:
            approval.setdefault(g, cls)

    db_role = t.opt_string("db_role")
    if db_role is not None and len(db_role.encode("utf-8")) >= _NAMEDATALEN:
        t.fail("db_role", "must be at most 63 bytes (a PostgreSQL role name)")
    see_clear = _names(t, "see_clear", PHI_KINDS, ())
    masking_notices = t.string("masking_notices", "first")
    if masking_notices not in MASKING_NOTICES:
        t.fail("masking_notices", f"must be one of {', '.join(map(repr, MASKING_NOTICES))}, "
               f"not {masking_notices!r}")

    role = RoleConfig(
        name=name,
        targets=role_targets,
        relations=frozenset(relations),
        schemas=frozenset(schemas),
        columns=MappingProxyType(columns),
        operations=operations,
        functions=frozenset(functions),
        allow=allow,
        approval=MappingProxyType(approval),
        db_role=db_role,
        see_clear=see_clear,
        masking_notices=masking_notices,
    )
    return _with_risk_rules(t, role)


def _with_risk_rules(t: _Table, role: RoleConfig) -> RoleConfig:
    """``role`` with the approval keys besides `approval`, and `max_rows`
    (docs/approval-rules.md)."""
    from phigate.policy.patterns import compile_pattern  # late: policy imports this module

    def listed(key: str) -> tuple[frozenset[tuple[str, str]], frozenset[str]]:
        exact: set[tuple[str, str]] = set()
        whole: set[str] = set()
        for text in t.string_list(key, ()):
            schema, rel = _qualified(t, key, text, allow_star=True)
            if rel == "*":
                if schema not in role.schemas and not any(s == schema for s, _ in role.relations):
                    t.fail(key, f"{text!r}: the role lists no relation in schema {schema!r}")
                whole.add(schema)
            elif not role.covers(schema, rel):
                t.fail(key, f"{text!r} is not one of this role's relations")
            else:
                exact.add((schema, rel))
        return frozenset(exact), frozenset(whole)

    approval_relations, approval_schemas = listed("approval_relations")
    patterns = []
    for number, text in enumerate(t.string_list("approval_patterns", ()), 1):
        try:
            patterns.append(compile_pattern(text, number))
        except ValueError as exc:
            t.fail("approval_patterns", f"entry {number} {exc}")
    bulk_reads = t.boolean("approval_bulk_reads", False)
    bulk_relations, bulk_schemas = listed("bulk_read_relations")
    if (bulk_relations or bulk_schemas) and not bulk_reads:
        t.fail("bulk_read_relations", "has no effect without approval_bulk_reads = true")
    estimate = None
    if "approval_row_estimate" in t.data:
        estimate = t.integer("approval_row_estimate", 0, 1, _MAX_ROWS)
    mode = t.string("approval_mode", "hold")
    if mode not in APPROVAL_MODES:
        t.fail("approval_mode", f"must be one of {', '.join(map(repr, APPROVAL_MODES))}, "
               f"not {mode!r}")  # fmt: skip
    max_rows = t.integer("max_rows", 0, 1, _MAX_ROWS) if "max_rows" in t.data else None
    return dataclasses.replace(
        role,
        approval_relations=approval_relations,
        approval_schemas=approval_schemas,
        approval_patterns=tuple(patterns),
        approval_bulk_reads=bulk_reads,
        bulk_read_relations=bulk_relations,
        bulk_read_schemas=bulk_schemas,
        approval_row_estimate=estimate,
        approval_mode=mode,
        approval_timeout=parse_duration(t, "approval_timeout", "15m", 1.0, _MAX_APPROVAL_TIMEOUT),
        max_rows=max_rows,
    )

def _groups(t: _Table, roles: Mapping[str, RoleConfig]) -> dict[str, tuple[str, ...]]:
    groups: dict[str, tuple[str, ...]] = {}
    for group in t.data:
        if not group or "\x00" in group:
            t.fail(group, "group names must be non-empty")
        names = t.string_list(group, ())
        for role in names:
            if role not in roles:
                near = difflib.get_close_matches(role, sorted(roles), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                t.fail(group, f"role {role!r} is not defined as [roles.{role}]{hint}")
        db_roles = {roles[r].db_role for r in names}
        if len(db_roles) > 1:
            t.fail(group, "maps to roles with different db_role values; a session runs as one")
        groups[group] = tuple(dict.fromkeys(names))
    return groups

