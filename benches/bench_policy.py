"""Micro-benchmark: analysis + decision per statement, as on a decision-cache miss.

    python -m pytest benches/bench_policy.py --benchmark-only

Each agent-style statement is analyzed (pglast parse_sql_json + orjson + the dict walker) and
judged against a role every round; the per-role memo of rules.py is warm, as in a running
gateway. "answer" adds what the control plane sends back (PostgreSQL's normalization of the
text). "answer masked" is the same PolicyEngine.decide for an identity that sees the demo
schema's PHI masked (an in-memory catalog of the EHR tables): analyze + decide + the masking
rewrite (layer 1), next to the unmasked answer for the same statement. The terminal summary
lists p50 / p99 per statement; the target is p50 < 50 us.
"""

# ruff: noqa: E501  # the statements read better on one line each

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from phigate.config import ColumnRule, PhiConfig, SecretBytes  # noqa: E402
from phigate.masking.classification import CatalogSnapshot, ColumnInfo, RelationInfo  # noqa: E402
from phigate.policy.analyze import analyze  # noqa: E402
from phigate.policy.engine import PolicyEngine  # noqa: E402
from phigate.policy.rules import decide  # noqa: E402
from policyconf import config, roleset  # noqa: E402
from rewritecat import EHR_RULES  # noqa: E402

ROUNDS = 3000

AGENT_QUERIES: dict[str, str] = {
    "point-lookup": "SELECT id, department, admitted_at FROM encounters WHERE patient_id = $1",
    "patient-by-mrn": "select id, first_name, last_name, date_of_birth from patients where mrn = 'MRN-000123'",
    "join-aggregate": (
        "SELECT e.department, count(*) AS n FROM encounters e JOIN diagnoses d ON d.encounter_id = e.id "
        "WHERE d.diagnosed_at > now() - interval '30 days' GROUP BY e.department ORDER BY n DESC LIMIT 10"
    ),
    "cte-window": (
        "WITH recent AS (SELECT patient_id, admitted_at, row_number() OVER (PARTITION BY patient_id "
        "ORDER BY admitted_at DESC) AS rn FROM encounters) SELECT p.mrn, r.admitted_at FROM recent r "
        "JOIN patients p ON p.id = r.patient_id WHERE r.rn = 1 LIMIT 50"
    ),
    "subquery-in": (
        "select id, icd10_code from diagnoses where encounter_id in (select id from encounters "
        "where department = 'Cardiology' and admitted_at >= '2024-01-01') order by diagnosed_at desc"
    ),
    "json-report": (
        "select json_build_object('mrn', p.mrn, 'meds', (select json_agg(m.name order by m.started_at) "
        "from medications m where m.patient_id = p.id)) from patients p where p.id = $1"
    ),
    "notes-search": "SELECT n.id, n.author FROM notes n WHERE n.body ILIKE '%chest pain%' LIMIT 20",
    "count": "SELECT count(*) FROM patients",
    "refused-write": "DELETE FROM notes WHERE id = 42",
    "refused-function": "SELECT pg_read_file('/etc/passwd')",
    "set-timezone": "SET TimeZone = 'UTC'",
    "begin": "BEGIN",
}

# The demo schema's shapes for an identity that sees PHI masked: every classified relation is
# spliced into a masking subquery (pseudonym, partial, year, email, free-text masks).
MASKED_QUERIES: dict[str, str] = {
    "point-lookup": "SELECT id, first_name, last_name, ssn, date_of_birth FROM patients WHERE id = $1",
    "join": (
        "SELECT p.mrn, p.last_name, e.department, e.admitted_at FROM patients p "
        "JOIN encounters e ON e.patient_id = p.id WHERE e.admitted_at > $1 ORDER BY e.admitted_at"
    ),
    "select-star": "SELECT * FROM patients",
    "cte": AGENT_QUERIES["cte-window"],
    "notes-join": (
        "SELECT n.id, n.body, p.mrn FROM notes n JOIN encounters e ON e.id = n.encounter_id "
        "JOIN patients p ON p.id = e.patient_id WHERE p.id = $1"
    ),
}

CONFIG = config()
CLINICIAN = roleset(CONFIG, "clinician")
ENGINE = PolicyEngine(CONFIG)
CLASS = CLINICIAN.identity_class

# (name, type OID, format_type) per column of the demo schema (phigate.dev.ehr.SCHEMA_SQL).
_TEXT, _INT8, _DATE, _TSTZ = (25, "text"), (20, "bigint"), (1082, "date"), (1184, "timestamp with time zone")  # fmt: skip
EHR_COLUMNS: dict[str, list[tuple[str, tuple[int, str]]]] = {
    "patients": [("id", _INT8), ("mrn", _TEXT), ("first_name", _TEXT), ("last_name", _TEXT),
                 ("ssn", _TEXT), ("date_of_birth", _DATE), ("address", _TEXT), ("city", _TEXT),
                 ("state", _TEXT), ("zip", _TEXT), ("phone", _TEXT), ("email", _TEXT),
                 ("created_at", _TSTZ)],
    "encounters": [("id", _INT8), ("patient_id", _INT8), ("admitted_at", _TSTZ),
                   ("discharged_at", _TSTZ), ("department", _TEXT), ("reason", _TEXT)],
    "notes": [("id", _INT8), ("encounter_id", _INT8), ("author", _TEXT), ("body", _TEXT)],
}  # fmt: skip


def _masked_engine() -> PolicyEngine:
    rules = {
        ("public", t, c): ColumnRule(
            "public",
            t,
            c,
            kind,
            mask.partition(":")[0],
            int(mask[8:]) if mask.startswith("partial:") else None,
            f'phi.columns."public.{t}.{c}"',
        )  # fmt: skip
        for t, cols in EHR_RULES.items()
        for c, (kind, mask) in cols.items()
    }
    phi = PhiConfig(columns=MappingProxyType(rules), pseudonym_key=SecretBytes(b"k" * 32))
    relations = [
        RelationInfo(
            16400 + i,
            "public",
            table,
            "r",
            "configured",
            tuple(
                ColumnInfo(name, n, oid, tname, -1, True, rules.get(("public", table, name)))
                for n, (name, (oid, tname)) in enumerate(cols, 1)
            ),
        )  # fmt: skip
        for i, (table, cols) in enumerate(EHR_COLUMNS.items())
    ]
    catalog = CatalogSnapshot.from_relations("ehr", 180000, relations)
    return PolicyEngine(dataclasses.replace(CONFIG, phi=phi), {"ehr": catalog})


MASKED_ENGINE = _masked_engine()
RESULTS: list[tuple[str, str, float, float]] = []


def _record(benchmark: Any, what: str, name: str) -> None:
    data = sorted(benchmark.stats.stats.data)
    p50 = data[len(data) // 2] * 1e6
    p99 = data[min(len(data) - 1, int(len(data) * 0.99))] * 1e6
    benchmark.extra_info.update({"p50_us": round(p50, 1), "p99_us": round(p99, 1)})
    RESULTS.append((what, name, p50, p99))


@pytest.mark.parametrize("name", list(AGENT_QUERIES))
def test_analyze_and_decide(benchmark: Any, name: str) -> None:
    sql = AGENT_QUERIES[name]
    decide(analyze(sql, schema="public"), CLINICIAN)  # warm the role's memo, as a gateway has it
    benchmark.pedantic(
        lambda: decide(analyze(sql, schema="public"), CLINICIAN), rounds=ROUNDS, iterations=1
    )
    _record(benchmark, "analyze+decide", name)


@pytest.mark.parametrize("name", list(AGENT_QUERIES))
def test_full_answer(benchmark: Any, name: str) -> None:
    sql = AGENT_QUERIES[name]
    ENGINE.decide(CLASS, sql)
    benchmark.pedantic(lambda: ENGINE.decide(CLASS, sql), rounds=ROUNDS, iterations=1)
    _record(benchmark, "answer (+normalize)", name)


@pytest.mark.parametrize("name", list(MASKED_QUERIES))
@pytest.mark.parametrize("masked", [False, True], ids=["clear", "masked"])
def test_masked_answer(benchmark: Any, name: str, masked: bool) -> None:
    sql = MASKED_QUERIES[name]
    engine = MASKED_ENGINE if masked else ENGINE
    answer = engine.decide(CLASS, sql)
    # A masked answer either carries the rewrite or, for a plain read, the table OIDs the data
    # plane masks by column origin (phigate.masking.passthrough).
    masked_answer = "rewrite" in answer or "origins" in answer
    assert answer["action"] == "allow" and masked_answer is masked, answer
    benchmark.pedantic(lambda: engine.decide(CLASS, sql), rounds=ROUNDS, iterations=1)
    _record(benchmark, "answer masked (+rewrite)" if masked else "answer (same, clear)", name)


def pytest_terminal_summary_lines() -> list[str]:
    lines = [f"{'what':26} {'statement':18} {'p50 us':>8} {'p99 us':>8}"]
    for what, name, p50, p99 in RESULTS:
        lines.append(f"{what:26} {name:18} {p50:8.1f} {p99:8.1f}")
    return lines
