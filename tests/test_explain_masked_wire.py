"""Plain EXPLAIN for masked identities through the gateway: a role with allow = ["explain"] gets
plans of its statements, in text and JSON, with no clear PHI value and no pseudonym key
material in them; EXPLAIN ANALYZE and EXPLAIN (VERBOSE) stay refused, and so does EXPLAIN for
a role without "explain"."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import EhrPostgres, GatewayFactory, RunningGateway, psycopg_connect
from phigate.dev.demo import DEMO_PHI_COLUMNS
from test_pseudonym_functions import assert_clean

pytestmark = pytest.mark.integration

# The demo's classification, plus a pseudonymized join key so joins go through the rewrite.
PHI = {
    **{k: v for k, v in DEMO_PHI_COLUMNS.items() if k.startswith("public.patients.")},
    "public.encounters.patient_id": {"kind": "other", "mask": "pseudonym"},
}
CLASSIFIED = ["mrn", "first_name", "last_name", "ssn", "date_of_birth", "address", "city", "zip",
              "phone", "email"]  # fmt: skip
# Statements an agent may want a plan of: every one reads masked columns.
PLANNED = [
    "EXPLAIN SELECT count(*) FROM patients",
    "EXPLAIN SELECT * FROM patients WHERE last_name = 'X'",
    "EXPLAIN SELECT p.first_name, e.department FROM patients p "
    "JOIN encounters e ON e.patient_id = p.id WHERE p.ssn LIKE '%1234'",
    "EXPLAIN (COSTS OFF) SELECT mrn, count(*) FROM patients GROUP BY mrn ORDER BY 2 DESC",
    # Options spelled off in every way PostgreSQL reads as off leave a plain plan.
    "EXPLAIN (ANALYZE off, VERBOSE false) SELECT first_name FROM patients WHERE zip = 'X'",
    "EXPLAIN (ANALYZE 0, VERBOSE 'OFF') SELECT email FROM patients WHERE city = 'X'",
    "EXPLAIN (FORMAT JSON) SELECT p.last_name, e.reason FROM patients p "
    "JOIN encounters e ON e.patient_id = p.id WHERE p.mrn = 'X'",
]
REFUSED_FORMS = [
    "EXPLAIN ANALYZE SELECT count(*) FROM patients",
    "EXPLAIN (ANALYZE) SELECT * FROM patients WHERE last_name = 'X'",
    "EXPLAIN (VERBOSE) SELECT count(*) FROM patients",
    "EXPLAIN (VERBOSE, FORMAT JSON) SELECT first_name FROM patients",
    "EXPLAIN (ANALYZE, VERBOSE) SELECT p.id FROM patients p JOIN encounters e "
    "ON e.patient_id = p.id",
    # Every spelling PostgreSQL reads as on, and a later "off" that does not undo an earlier on.
    "EXPLAIN (ANALYZE 1) SELECT count(*) FROM patients",
    "EXPLAIN (ANALYZE 'ON') SELECT count(*) FROM patients",
    "EXPLAIN (ANALYZE TRUE, FORMAT JSON) SELECT count(*) FROM patients",
    "EXPLAIN (ANALYZE on, ANALYZE off) SELECT count(*) FROM patients",
    "EXPLAIN (VERBOSE 1) SELECT first_name FROM patients",
    "EXPLAIN (VERBOSE 'true') SELECT first_name FROM patients",
]


@pytest.fixture(scope="module")
def clear(pg: EhrPostgres) -> set[str]:
    """Every clear value of a classified column, read directly from PostgreSQL (never printed).
    Values shorter than 4 characters are left out: they match plan words by chance."""
    with psycopg.connect(pg.service_dsn()) as conn:
        cols = ", ".join(f"{c}::text" for c in CLASSIFIED)
        rows = conn.execute(f"SELECT {cols} FROM patients").fetchall()  # noqa: S608
    return {v for row in rows for v in row if len(v) >= 4}


@pytest.fixture
def key(tmp_path: Path) -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def gw(gateway_factory: GatewayFactory, tmp_path: Path, key: bytes) -> Iterator[RunningGateway]:
    key_file = tmp_path / "pseudonym.key"
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    yield gateway_factory(
        phi={"columns": PHI, "pseudonym_key_file": str(key_file)},
        groups={"planners": ["planner"], "readers": ["reader"]},
        roles={
            "planner": {"relations": ["public.*"], "operations": ["select"], "allow": ["explain"]},
            "reader": {"relations": ["public.*"], "operations": ["select"]},
        },
    )  # fmt: skip


def plan_text(rows: list[tuple[Any, ...]]) -> str:
    """The plan as one string, whatever the format (JSON arrives as a parsed value)."""
    return "\n".join(v if isinstance(v, str) else json.dumps(v) for row in rows for v in row)


def leaked_values(plan: str, clear: set[str]) -> int:
    """How many clear values occur in the plan as a whole word (a count, never the values)."""
    return sum(
        1 for v in clear
        if re.search(r"(?<![\w@.-])" + re.escape(v) + r"(?![\w@.-])", plan) is not None
    )  # fmt: skip


def test_the_leak_check_finds_a_clear_value(clear: set[str]) -> None:
    value = next(iter(sorted(clear)))
    assert leaked_values(f"Filter: (last_name = '{value}'::text)", clear) == 1
    assert leaked_values("Seq Scan on patients  (cost=0.00..1.40 rows=40 width=8)", clear) == 0


def test_plain_explain_works_for_a_masked_role(
    gw: RunningGateway, token: Any, clear: set[str], key: bytes
) -> None:
    with psycopg_connect(gw, token(groups=("planners",))) as conn:
        for sql in PLANNED:
            plan = plan_text(conn.execute(sql).fetchall())
            assert "patients" in plan, sql
            assert leaked_values(plan, clear) == 0, f"clear PHI in the plan of: {sql}"
            assert_clean(f"the plan of: {sql}", plan, [key])
        # The plan is the masked statement's: masked columns are read through the pseudonym
        # function, which holds the key inside the database.
        plan = plan_text(conn.execute(PLANNED[1]).fetchall())
        assert "pseudonym" in plan
        doc = conn.execute(PLANNED[-1]).fetchone()[0]
        assert isinstance(doc, list) and "Plan" in doc[0]
        # The session still works after plans.
        assert conn.execute("SELECT count(*) FROM patients").fetchone()[0] >= 1


def test_explain_analyze_and_verbose_stay_refused(gw: RunningGateway, token: Any) -> None:
    with psycopg_connect(gw, token(groups=("planners",))) as conn:
        conn.autocommit = True
        for sql in REFUSED_FORMS:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                conn.execute(sql)
            assert err.value.sqlstate == "42501", sql
            message = err.value.diag.message_primary or ""
            assert "EXPLAIN ANALYZE and EXPLAIN VERBOSE are refused" in message, sql
            assert "(rule: masking)" in message, sql
        assert conn.execute("EXPLAIN SELECT count(*) FROM patients").fetchall()


def test_explain_needs_the_explain_class(gw: RunningGateway, token: Any) -> None:
    with psycopg_connect(gw, token(groups=("readers",))) as conn:
        conn.autocommit = True
        for sql in (PLANNED[0], PLANNED[-1]):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                conn.execute(sql)
            message = err.value.diag.message_primary or ""
            assert "EXPLAIN is not allowed" in message and "(rule:" in message, sql
            assert '"explain"' in (err.value.diag.message_hint or ""), sql
        assert conn.execute("SELECT count(*) FROM patients").fetchone()[0] >= 1
