"""A policy engine for masked identities without files or a database: a small EHR catalog
(patients with masked identifiers, notes with a free_text body), an agent role that sees PHI
masked and a reader role that sees free text in clear (tests of the free-text rule and of the
01M02 notices)."""

from __future__ import annotations

import dataclasses
from typing import Any

from phigate.config import ColumnRule, DictionaryConfig, PhiConfig
from phigate.masking.classification import CatalogSnapshot, ColumnInfo, RelationInfo
from phigate.masking.pseudonym_db import FunctionsState
from phigate.policy.engine import PolicyEngine
from policyconf import config, roleset

TEXT, INT8, DATE = 25, 20, 1082
_TYPES = {TEXT: "text", INT8: "bigint", DATE: "date"}

# (table, column) -> (kind, mask as configured)
RULES = {
    ("patients", "last_name"): ("name", "pseudonym"),
    ("patients", "ssn"): ("ssn", "partial:4"),
    ("patients", "date_of_birth"): ("dob", "year"),
    ("patients", "city"): ("city", "redact"),
    ("patients", "email"): ("email", "email_domain"),
    ("patients", "zip"): ("zip", "zip3"),
    ("notes", "body"): ("free_text", "free_text"),
}
TABLES = {
    "patients": [("id", INT8), ("last_name", TEXT), ("ssn", TEXT), ("date_of_birth", DATE),
                 ("city", TEXT), ("email", TEXT), ("zip", TEXT)],
    "notes": [("id", INT8), ("patient_id", INT8), ("author", TEXT), ("body", TEXT)],
    "staff": [("id", INT8), ("last_name", TEXT)],  # protected by nothing: not in the catalog
}  # fmt: skip
ROLES = {
    "groups": {"agents": ["agent"], "readers": ["reader"], "clinicians": ["clinician"]},
    "roles": {
        "agent": {"relations": ["public.*"], "operations": ["select", "copy_to"]},
        "reader": {"relations": ["public.*"], "see_clear": ["free_text"]},
        "clinician": {"relations": ["public.*"], "see_clear": ["name", "ssn", "dob", "city",
                                                              "email", "zip", "free_text"]},
    },
}  # fmt: skip


def rule(table: str, column: str) -> ColumnRule:
    kind, mask = RULES[(table, column)]
    name, _, keep = mask.partition(":")
    return ColumnRule("public", table, column, kind, name, int(keep) if keep else None,
                      f'phi.columns."public.{table}.{column}"')  # fmt: skip


def catalog() -> CatalogSnapshot:
    rels = []
    for oid, table in enumerate(("patients", "notes"), 16400):
        cols = tuple(
            ColumnInfo(c, n, t, _TYPES[t], -1, False,
                       rule(table, c) if (table, c) in RULES else None)
            for n, (c, t) in enumerate(TABLES[table], 1)
        )  # fmt: skip
        rels.append(RelationInfo(oid, "public", table, "r", "configured", cols))
    snap = CatalogSnapshot.from_relations("ehr", 180000, rels)
    return dataclasses.replace(snap, pseudonym_functions=FunctionsState(True, "ready"))


def engine(*, dictionary: bool = True, kinds: frozenset[str] | None = None) -> PolicyEngine:
    phi = PhiConfig(
        columns={("public", t, c): rule(t, c) for t, c in RULES},
        dictionary=DictionaryConfig(enabled=dictionary, **({"kinds": kinds} if kinds else {})),
    )
    cfg = dataclasses.replace(config(ROLES), phi=phi)
    return PolicyEngine(cfg, {"ehr": catalog()})


def decide(eng: PolicyEngine, role: str, sql: str) -> dict[str, Any]:
    return eng.decide(roleset(eng.config, role).identity_class, sql)
