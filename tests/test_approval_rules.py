"""Risk rules in the role config (approval, approval_relations, approval_patterns,
approval_bulk_reads, approval_row_estimate) and the decision answer's `approval` object; the
cursor fields of decisions; the authenticate answer's max_rows and approval_mode."""

# ruff: noqa: S608  # the statements are test data, never executed

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest

from maskedengine import RULES, catalog, rule
from phigate.config import PhiConfig, parse_config
from phigate.control.requests import _auth_ok
from phigate.errors import ConfigError
from phigate.identity.oidc import Identity
from phigate.policy.analyze import analyze
from phigate.policy.engine import PolicyEngine
from policyconf import BASE, config, roleset

ALL_KINDS = ["name", "ssn", "dob", "city", "email", "zip", "free_text", "mrn", "address",
             "phone", "other"]  # fmt: skip
EVERYTHING = {"relations": ["public.*"], "see_clear": ALL_KINDS}
ROLES: dict[str, Any] = {
    "free": {**EVERYTHING, "operations": ["select", "copy_to", "insert", "delete"]},
    "bulk": {**EVERYTHING, "operations": ["select", "copy_to"], "approval_bulk_reads": True,
             "bulk_read_relations": ["public.staff"], "allow": ["explain"]},
    "listed": {**EVERYTHING, "approval_relations": ["public.notes"]},
    "patterned": {**EVERYTHING, "operations": ["select", "delete", "update"],
                  "approval_patterns": ["DELETE FROM notes WHERE id = 1", "re:^update notes "]},
    "estimated": {**EVERYTHING, "operations": ["select", "copy_to"],
                  "approval_row_estimate": 10000, "approval_mode": "return",
                  "approval_timeout": "2m"},
    "estimated_high": {**EVERYTHING, "approval_row_estimate": 50000},
    "writer": {**EVERYTHING, "operations": ["select", "insert", "delete"],
               "approval": ["write"], "approval_timeout": 60},
    "masked_bulk": {"relations": ["public.*"], "approval_bulk_reads": True},
    "notes_only": {"relations": ["public.notes"], "see_clear": ALL_KINDS},
    "capped": {**EVERYTHING, "operations": ["select", "copy_to"], "max_rows": 500},
    "capped_low": {**EVERYTHING, "operations": ["select", "copy_to"], "max_rows": 100},
}  # fmt: skip


def make_engine() -> PolicyEngine:
    phi = PhiConfig(columns={("public", t, c): rule(t, c) for t, c in RULES})
    cfg = dataclasses.replace(config({"roles": ROLES}), phi=phi)
    return PolicyEngine(cfg, {"ehr": catalog()})


ENGINE = make_engine()


def decide(sql: str, *roles: str) -> dict[str, Any]:
    return ENGINE.decide(roleset(ENGINE.config, *roles).identity_class, sql)


def approval(sql: str, *roles: str) -> dict[str, Any] | None:
    answer = decide(sql, *roles)
    assert answer["action"] == "allow", answer
    return answer.get("approval")


def rule_of(sql: str, *roles: str) -> str | None:
    found = approval(sql, *roles)
    return None if found is None else str(found["rule"])


# --- the analyzer's bulk-read facts ---------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "bulk"),
    [
        ("select * from patients", ["patients"]),
        ("table patients", ["patients"]),
        ("select * from patients where id = 1", []),
        ("select * from patients limit 5", []),
        ("select * from patients fetch first 5 rows only", []),
        ("select * from patients limit all", ["patients"]),
        ("select * from patients limit $1", []),
        ("select * from patients offset 5", ["patients"]),
        # One row whatever is read; collecting aggregates gather every row into one value.
        ("select count(*) from patients", []),
        ("select sum(id) / count(*)::numeric from patients", []),
        ("select string_agg(ssn, ',') from patients", ["patients"]),
        ("select string_agg(ssn, ',') from patients limit 1", ["patients"]),
        ("select json_agg(p) from patients p limit 1", ["patients"]),
        ("select city, count(*) from patients group by city", ["patients"]),
        ("select count(*) over () from patients", ["patients"]),
        # Joins: WHERE narrows every relation of its level; ON does not.
        ("select * from patients p join notes n on n.patient_id = p.id", ["patients", "notes"]),
        ("select * from patients p join notes n on n.patient_id = p.id where n.id = 3", []),
        # Subqueries in FROM are narrowed by the level reading them.
        ("select * from (select * from patients) s where s.id = 1", []),
        ("select * from (select * from patients) s", ["patients"]),
        ("select count(*) from (select * from patients) s", []),
        ("select max(x) from (select string_agg(ssn, ',') x from patients) s", ["patients"]),
        # A filter's subquery shows no row; one in the select list is a level of its own.
        ("select * from notes where patient_id in (select id from patients)", []),
        ("select * from notes n join patients p on p.id in (select 1)", ["notes", "patients"]),
        ("select (select string_agg(ssn, ',') from patients) from notes where id = 1",
         ["patients"]),
        ("select id, (select ssn from patients p where p.id = n.patient_id) from notes n "
         "where n.id = 1", []),
        # A CTE is narrowed only by what encloses the whole query.
        ("with p as (select * from patients) select * from p where id = 1", ["patients"]),
        ("with p as (select * from patients where id = 1) select * from p", []),
        ("select * from (with p as (select * from patients) select * from p) s limit 1", []),
        # Set operations: each arm, or the LIMIT of the whole.
        ("select id from patients union select id from notes", ["patients", "notes"]),
        ("select id from patients union select id from notes limit 3", []),
        ("select id from patients where id = 1 union select id from notes", ["notes"]),
        # COPY: a table has no WHERE; a query is judged as a query.
        ("copy patients to stdout", ["patients"]),
        ("copy patients (id, ssn) to stdout", ["patients"]),
        ("copy (select * from patients where id = 1) to stdout", []),
        ("copy (select * from patients) to stdout", ["patients"]),
        ("declare c cursor for select * from patients", ["patients"]),
        ("explain select * from patients", []),
        ("explain analyze select * from patients", []),
        ("create view v as select * from patients", []),
        ("explain select (select string_agg(ssn, ',') from patients)", []),
        ("create view v as select (select string_agg(ssn, ',') from patients) x", []),
        ("create table t as select * from patients", ["patients"]),
        ("insert into notes (body) select ssn from patients", ["patients"]),
        ("update notes set body = p.ssn from patients p", ["patients"]),
        ("update notes set body = p.ssn from patients p where p.id = notes.patient_id", []),
        ("delete from notes using patients p where p.id = notes.patient_id", []),
        ("delete from notes", []),  # a write, not a read
    ],
)  # fmt: skip
def test_bulk_read_facts(sql: str, bulk: list[str]) -> None:
    (facts,) = analyze(sql, schema="public")
    assert facts.fail is None
    assert [name for _, name, _ in facts.bulk_reads] == bulk


def test_bulk_read_records_the_reading_operation() -> None:
    (facts,) = analyze("copy (select * from patients) to stdout", schema="public")
    assert facts.bulk_reads == [("public", "patients", "copy_to")]


# --- cursor fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "cursor", "op"),
    [
        ("DECLARE c1 CURSOR FOR SELECT * FROM notes WHERE id = 1", "c1", "declare"),
        ('DECLARE "Big" CURSOR WITH HOLD FOR SELECT 1', "Big", "declare"),
        ("FETCH 10 FROM C1", "c1", "fetch"),
        ("FETCH ALL IN c1", "c1", "fetch"),
        ("MOVE FORWARD 5 IN c1", "c1", "move"),
        ("CLOSE c1", "c1", "close"),
        ("CLOSE ALL", None, "close_all"),
    ],
)
def test_cursor_statements_name_their_cursor(sql: str, cursor: str | None, op: str) -> None:
    answer = decide(sql, "free")
    assert answer["action"] == "allow"
    assert (answer["cursor"], answer["cursor_op"]) == (cursor, op)


def test_other_statements_carry_no_cursor() -> None:
    answer = decide("SELECT * FROM notes WHERE id = 1", "free")
    assert "cursor" not in answer and "cursor_op" not in answer


# --- each rule: what asks, what does not --------------------------------------------------


def test_bulk_reads_ask_for_phi_and_listed_relations_only() -> None:
    assert rule_of("SELECT * FROM patients", "bulk") == "bulk_read"
    assert rule_of("TABLE notes", "bulk") == "bulk_read"
    assert rule_of("COPY patients TO STDOUT", "bulk") == "bulk_read"
    assert rule_of("SELECT * FROM staff", "bulk") == "bulk_read"  # bulk_read_relations
    assert rule_of("SELECT * FROM encounters", "bulk") is None  # no PHI, not listed
    assert rule_of("SELECT * FROM patients WHERE id = $1", "bulk") is None
    assert rule_of("SELECT * FROM patients LIMIT 20", "bulk") is None
    assert rule_of("SELECT count(*) FROM patients", "bulk") is None
    assert rule_of("EXPLAIN SELECT * FROM patients", "bulk") is None
    assert rule_of("SELECT * FROM patients", "free") is None


def test_bulk_reads_of_masked_identities_ask_after_masking() -> None:
    answer = decide("SELECT * FROM patients", "masked_bulk")
    assert answer["action"] == "allow"
    assert answer["origins"] == [16400]  # masked by the data plane, as without the rule
    assert answer["approval"]["rule"] == "bulk_read"
    # Refused by masking: never asks.
    refused = decide("UPDATE patients SET ssn = 'x'", "masked_bulk")
    assert refused["action"] == "deny" and "approval" not in refused


def test_relation_rule_asks_for_any_statement_naming_it() -> None:
    assert rule_of("SELECT body FROM notes WHERE id = 7", "listed") == "relation"
    assert rule_of("SELECT 1 FROM patients p JOIN notes n ON n.patient_id = p.id", "listed") == (
        "relation")  # fmt: skip
    assert rule_of("SELECT * FROM patients WHERE id = 1", "listed") is None


def test_pattern_rule_matches_normalized_statements() -> None:
    assert rule_of("DELETE FROM notes WHERE id = 1", "patterned") == "pattern"
    # Literals, case, spacing, comments and a trailing semicolon do not matter.
    assert rule_of("delete  from NOTES where id = 42; -- cleanup", "patterned") == "pattern"
    assert rule_of("DELETE FROM notes WHERE id = $1", "patterned") == "pattern"
    # Compared whole: another statement shape is not it.
    assert rule_of("DELETE FROM notes WHERE id = 1 OR id = 2", "patterned") is None
    # A message is matched statement by statement too.
    assert rule_of("SELECT 1; DELETE FROM notes WHERE id = 1", "patterned") == "pattern"
    # re: searches the normalized text, case-insensitively.
    assert rule_of("UPDATE notes SET body = 'x' WHERE id = 3", "patterned") == "pattern"
    assert rule_of("update notes set body = 'x'", "patterned") == "pattern"
    assert rule_of("UPDATE patients SET city = 'x' WHERE id = 3", "patterned") is None
    found = approval("DELETE FROM notes WHERE id = 9", "patterned")
    assert found is not None and "approval_patterns entry 1" in found["reason"]


def test_row_estimate_rule_asks_reads_with_the_threshold() -> None:
    found = approval("SELECT * FROM notes WHERE author = $1", "estimated")
    assert found == {
        "rule": "row_estimate", "role": "estimated", "mode": "return", "timeout_ms": 120_000,
        "row_estimate_over": 10000,
        "reason": 'reading more than 10000 rows (planner estimate) needs approval '
                  '(rule: row_estimate of role "estimated")',
    }  # fmt: skip
    assert rule_of("DECLARE c CURSOR FOR SELECT * FROM notes", "estimated") == "row_estimate"
    assert rule_of("COPY (SELECT id FROM notes) TO STDOUT", "estimated") == "row_estimate"
    assert rule_of("SELECT 1", "estimated") is None  # reads no relation
    assert rule_of("SELECT count(*) FROM pg_catalog.pg_class", "estimated") is None


def test_operation_rule_asks_writes_not_reads() -> None:
    found = approval("INSERT INTO notes (body) VALUES ('x')", "writer")
    assert found == {
        "rule": "write", "role": "writer", "mode": "hold", "timeout_ms": 60_000,
        "reason": 'INSERT on public.notes needs approval (rule: write of role "writer")',
    }  # fmt: skip
    assert rule_of("SELECT * FROM notes", "writer") is None


def test_refused_statements_never_ask() -> None:
    answer = decide("DELETE FROM notes WHERE id = 1", "bulk")  # bulk may not delete
    assert answer["action"] == "deny" and "approval" not in answer
    answer = decide("SELECT * FROM notes", "notes_only", "listed")
    assert answer["action"] == "allow"  # notes_only grants it without asking


# --- several roles ------------------------------------------------------------------------


def test_several_roles_ask_only_when_every_granting_role_asks() -> None:
    # "free" grants the same reads and writes without asking.
    for sql in ("SELECT * FROM patients", "SELECT body FROM notes WHERE id = 1",
                "INSERT INTO notes (body) VALUES ('x')", "SELECT * FROM notes WHERE id = 2"):
        for other in ("bulk", "listed", "writer", "estimated"):
            assert rule_of(sql, "free", other) is None, (sql, other)
    # A role that cannot run the statement does not lift another's rule.
    assert rule_of("SELECT * FROM patients", "bulk", "notes_only") == "bulk_read"
    assert rule_of("SELECT * FROM notes WHERE id = 1", "listed", "notes_only") is None
    assert rule_of("DELETE FROM notes WHERE id = 1", "patterned", "notes_only") == "pattern"
    # Two asking roles: the first by name is named.
    found = approval("SELECT * FROM notes", "bulk", "listed")
    assert found is not None and found["role"] == "bulk"


def test_row_estimate_of_several_roles_is_the_largest_that_suffices() -> None:
    found = approval("SELECT * FROM notes WHERE id > 5", "estimated", "estimated_high")
    assert found is not None and found["row_estimate_over"] == 50000
    assert found["role"] == "estimated_high"
    assert found["mode"] == "return"  # the identity's: one of its roles cannot wait


def test_decision_answer_shape() -> None:
    answer = decide("SELECT * FROM patients", "bulk")
    assert answer["action"] == "allow"
    assert answer["cache"] == "normalized"
    assert answer["approval"] == {
        "rule": "bulk_read", "role": "bulk", "mode": "hold", "timeout_ms": 900_000,
        "reason": 'SELECT on public.patients reading every row (no WHERE or LIMIT) needs '
                  'approval (rule: bulk_read of role "bulk")',
    }  # fmt: skip
    assert answer["audit"]["rule"].startswith("role:bulk allow")


def test_reasons_hold_no_literal_values() -> None:
    secret = "Jane-Doe-1970-123-45-6789"  # noqa: S105  # a PHI-like literal, not a password
    for sql, role in (
        (f"DELETE FROM notes WHERE id = 1 AND body = '{secret}'", "writer"),
        (f"SELECT * FROM notes WHERE body = '{secret}'", "listed"),
        (f"UPDATE notes SET body = '{secret}'", "patterned"),
        (f"SELECT * FROM notes WHERE body = '{secret}'", "estimated"),
    ):
        found = approval(sql, role)
        assert found is not None and secret not in repr(found), (sql, role)


# --- config -------------------------------------------------------------------------------


def role_config(**keys: Any) -> Any:
    return config({"roles": {"r": {"relations": ["public.*"], **keys}}}).roles["r"]


def test_role_keys_parse() -> None:
    r = role_config(
        approval_relations=["public.Notes", "public.*"],
        approval_patterns=["select 1", "re:^DELETE "],
        approval_bulk_reads=True, bulk_read_relations=["public.staff"],
        approval_row_estimate=5000, approval_mode="return", approval_timeout="90s",
        max_rows=1000,
    )  # fmt: skip
    assert r.approval_relations == {("public", "notes")} and r.approval_schemas == {"public"}
    assert [p.number for p in r.approval_patterns] == [1, 2]
    assert r.approval_patterns[0].normalized == "select $1"
    assert r.approval_bulk_reads and r.bulk_read_relations == {("public", "staff")}
    assert (r.approval_row_estimate, r.approval_mode, r.approval_timeout, r.max_rows) == (
        5000, "return", 90.0, 1000)  # fmt: skip
    d = role_config()
    assert (d.approval_mode, d.approval_timeout, d.max_rows, d.asks_approval) == (
        "hold", 900.0, None, None)  # fmt: skip


@pytest.mark.parametrize(
    ("keys", "key", "text"),
    [
        ({"approval_patterns": ["DELETE FROM"]}, "approval_patterns", "entry 1"),
        ({"approval_patterns": ["select 1", "re:(unclosed"]}, "approval_patterns",
         "entry 2 is not a valid regular expression"),
        ({"approval_patterns": ["re:  "]}, "approval_patterns", "matches every statement"),
        ({"approval_patterns": "select 1"}, "approval_patterns", "list of strings"),
        ({"approval_relations": ["notes"]}, "approval_relations", "schema-qualified"),
        ({"approval_relations": ["other.notes"]}, "approval_relations",
         "not one of this role's relations"),
        ({"approval_bulk_reads": "yes"}, "approval_bulk_reads", "true or false"),
        ({"bulk_read_relations": ["public.staff"]}, "bulk_read_relations",
         "approval_bulk_reads = true"),
        ({"approval_row_estimate": 0}, "approval_row_estimate", "between 1"),
        ({"approval_row_estimate": "10k"}, "approval_row_estimate", "integer"),
        ({"approval_mode": "wait"}, "approval_mode", "'hold', 'return'"),
        ({"approval_timeout": "soon"}, "approval_timeout", "not a duration"),
        ({"approval_timeout": "30d"}, "approval_timeout", "between"),
        ({"max_rows": -1}, "max_rows", "between 1"),
        ({"max_rows": True}, "max_rows", "integer"),
        ({"approval_modes": "hold"}, "approval_modes", "did you mean 'approval_mode'"),
    ],
)  # fmt: skip
def test_role_key_errors_name_the_key(keys: dict[str, Any], key: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        role_config(**keys)
    assert info.value.key == f"roles.r.{key}", info.value
    assert text in info.value.message, info.value
    assert info.value.file == "<string>"


@pytest.mark.parametrize(
    "keys",
    [
        {"operations": ["select", "insert"], "approval": ["write"]},
        {"approval_relations": ["public.notes"]},
        {"approval_patterns": ["select 1"]},
        {"approval_bulk_reads": True},
        {"approval_row_estimate": 10},
    ],
)
def test_approval_keys_need_an_approvals_section(keys: dict[str, Any]) -> None:
    data = {k: v for k, v in BASE.items() if k != "approvals"}
    data["roles"] = {"r": {"relations": ["public.*"], **keys}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == f"roles.r.{next(k for k in keys if k != 'operations')}"
    assert "add an [approvals] section" in info.value.message
    assert "docs/approvals.md" in info.value.message


def test_caps_and_modes_need_no_approvals_section() -> None:
    data = {k: v for k, v in BASE.items() if k != "approvals"}
    data["roles"] = {"r": {"relations": ["public.*"], "max_rows": 10, "approval_mode": "return"}}
    assert parse_config(data).roles["r"].max_rows == 10


# --- the authenticate answer ----------------------------------------------------------------


def auth_answer(*roles: str) -> dict[str, Any]:
    cfg = dataclasses.replace(ENGINE.config, groups={f"g-{r}": (r,) for r in roles})
    identity = Identity("agent-7", tuple(f"g-{r}" for r in roles), None)
    return _auth_ok(identity, cfg, "ehr")


def test_auth_answer_carries_the_smallest_cap_and_the_waiting_mode() -> None:
    assert (auth_answer("free")["max_rows"], auth_answer("free")["approval_mode"]) == (None, "hold")
    assert auth_answer("capped", "free")["max_rows"] == 500  # no cap does not lift a cap
    assert auth_answer("capped", "capped_low")["max_rows"] == 100
    assert auth_answer("estimated", "free")["approval_mode"] == "return"
    # Stand-in configs without these properties answer the defaults.
    bare = SimpleNamespace(
        roles_for=lambda groups, target=None: SimpleNamespace(identity_class="x", db_role=None),
        identity=SimpleNamespace(close_on_expiry=True),
    )
    answer = _auth_ok(Identity("a", ("g",), None), bare, "ehr")  # type: ignore[arg-type]
    assert (answer["max_rows"], answer["approval_mode"]) == (None, "hold")


def test_copy_to_under_a_row_cap_needs_approval_since_the_cap_cannot_cut_it() -> None:
    # COPY data is not counted against max_rows: with a cap, COPY TO waits for a person.
    found = approval("COPY patients TO STDOUT", "capped")
    assert found is not None and found["rule"] == "copy_to" and found["role"] == "capped"
    assert "max_rows = 500" in found["reason"]
    narrow = "COPY (SELECT id FROM patients WHERE id = 1) TO STDOUT"
    assert rule_of(narrow, "capped", "capped_low") == "copy_to"
    both = approval("COPY patients TO STDOUT", "capped", "capped_low")
    assert both is not None and "max_rows = 100" in both["reason"]
    # Without a cap COPY TO is a plain read; rows of a capped SELECT are cut, not held.
    assert approval("COPY patients TO STDOUT", "free") is None
    assert approval("SELECT * FROM patients", "capped") is None

