"""The control plane's masking notices and SHOW phigate.masking, decision by decision: which
statements carry a 01M01 notice for which relation, its words for every mask, the per-role
`masking_notices` modes, and the constant statement SHOW phigate.masking becomes."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pglast import parser as pg_parser

import policyconf
from phigate.config import MASKS, ColumnRule, Config, PhiConfig, parse_config
from phigate.errors import ConfigError
from phigate.masking.classification import CatalogSnapshot, ColumnInfo, RelationInfo
from phigate.masking.mask_descriptions import describe_mask
from phigate.masking.pseudonym_db import FunctionsState
from phigate.policy.engine import PolicyEngine
from phigate.policy.notices import masked_columns_message
from rewritecat import DATE, INT8, TEXT

RELATIONS = {"relations": ["public.*"]}
ROLES: dict[str, Any] = {
    "agent": {**RELATIONS, "allow": ["explain"], "operations": ["select", "copy_to"]},
    "loud": {**RELATIONS, "masking_notices": "always"},
    "quiet": {**RELATIONS, "masking_notices": "off"},
    "first": {**RELATIONS, "masking_notices": "first"},
    "clinician": {**RELATIONS, "see_clear": ["name", "ssn", "dob", "free_text"]},
    "names": {**RELATIONS, "see_clear": ["name"]},
    "narrow": {"relations": ["public.patients"],
               "columns": {"public.patients": ["id", "ssn", "state"]}},
}  # fmt: skip

_RULES = {
    ("patients", "last_name"): ("name", "pseudonym", None),
    ("patients", "ssn"): ("ssn", "partial", 4),
    ("patients", "date_of_birth"): ("dob", "year", None),
    ("notes", "body"): ("free_text", "free_text", None),
}


def _rule(table: str, column: str) -> ColumnRule:
    kind, mask, keep = _RULES[(table, column)]
    return ColumnRule("public", table, column, kind, mask, keep, f"public.{table}.{column}")


def _col(table: str, name: str, attnum: int, oid: int, tname: str) -> ColumnInfo:
    rule = _rule(table, name) if (table, name) in _RULES else None
    return ColumnInfo(name, attnum, oid, tname, -1, False, rule)


PATIENTS = RelationInfo(16500, "public", "patients", "r", "configured", (
    _col("patients", "id", 1, INT8, "bigint"),
    _col("patients", "last_name", 2, TEXT, "text"),
    _col("patients", "ssn", 3, TEXT, "text"),
    _col("patients", "date_of_birth", 4, DATE, "date"),
    _col("patients", "state", 5, TEXT, "text"),
))  # fmt: skip
NOTES = RelationInfo(16510, "public", "notes", "r", "configured", (
    _col("notes", "id", 1, INT8, "bigint"),
    _col("notes", "patient_id", 2, INT8, "bigint"),
    _col("notes", "body", 3, TEXT, "text"),
))  # fmt: skip
ENCOUNTERS_OID = 16520  # not protected: the catalog does not list it

PATIENTS_MESSAGE = (
    "phigate masked columns of public.patients for this session: last_name (pseudonym: psn_ + "
    "16 hex digits, the same value always gives the same pseudonym, so joins and GROUP BY still "
    "work), ssn (partial: only the last 4 characters shown, other letters and digits replaced "
    "by *), date_of_birth (year: shown as January 1 of the birth year). Comparisons and "
    "searches on these columns see the masked values."
)
HINT = "SHOW phigate.masking lists every column masked for you."


@pytest.fixture(scope="module")
def cfg() -> Config:
    base = policyconf.config({"roles": ROLES})
    phi = PhiConfig(columns={(r.schema, r.table, r.column): r for r in (
        _rule(t, c) for t, c in _RULES)})  # fmt: skip
    return dataclasses.replace(base, phi=phi)


@pytest.fixture(scope="module")
def engine(cfg: Config) -> PolicyEngine:
    snap = CatalogSnapshot.from_relations("ehr", 180000, [PATIENTS, NOTES])
    ready = FunctionsState(True, "installed, key matches")
    return PolicyEngine(cfg, {"ehr": dataclasses.replace(snap, pseudonym_functions=ready)})


def decide(engine: PolicyEngine, sql: str, *roles: str) -> dict[str, Any]:
    answer = engine.decide(policyconf.roleset(engine.config, *roles).identity_class, sql)
    assert answer["action"] == "allow", answer
    return answer


def keys(answer: dict[str, Any]) -> list[str | None]:
    return [n["key"] for n in answer.get("notices", [])]


# --- which statements carry a notice ----------------------------------------------------------


def test_a_plain_read_of_masked_columns_carries_the_relations_notice(engine: PolicyEngine) -> None:
    answer = decide(engine, "SELECT id, last_name FROM patients", "agent")
    assert "origins" in answer  # the data plane masks it alone
    assert answer["notices"] == [
        {"key": "public.patients", "code": "01M01", "message": PATIENTS_MESSAGE, "hint": HINT}
    ]


@pytest.mark.parametrize("sql", [
    "SELECT * FROM patients",
    "SELECT p FROM patients p",
    "SELECT upper(ssn) FROM patients ORDER BY 1",
    "SELECT x FROM (SELECT date_of_birth AS x FROM patients) s",
    "WITH w AS (SELECT last_name FROM patients) SELECT * FROM w",
    "COPY patients TO STDOUT",
    "COPY (SELECT ssn FROM patients) TO STDOUT",
    "DECLARE c CURSOR FOR SELECT ssn FROM patients",
])  # fmt: skip
def test_every_way_a_result_carries_a_masked_column(engine: PolicyEngine, sql: str) -> None:
    assert keys(decide(engine, sql, "agent")) == ["public.patients"]


@pytest.mark.parametrize("sql", [
    "SELECT id, state FROM patients",
    "SELECT count(*) FROM patients",
    "SELECT id FROM patients ORDER BY last_name",  # ordered by masked values, none shown
    "SELECT 1",
    "EXPLAIN SELECT * FROM patients",  # a plan, not the rows
    "SHOW TimeZone",
])  # fmt: skip
def test_no_notice_when_the_result_carries_no_masked_column(
    engine: PolicyEngine, sql: str
) -> None:
    assert "notices" not in decide(engine, sql, "agent"), sql


def test_each_relation_gets_its_own_notice_in_statement_order(engine: PolicyEngine) -> None:
    sql = "SELECT n.body, p.ssn FROM notes n JOIN patients p ON p.id = n.patient_id"
    answer = decide(engine, sql, "agent")
    assert keys(answer) == ["public.notes", "public.patients"]
    assert answer["notices"][0]["message"] == (
        "phigate masked columns of public.notes for this session: body (free_text: identifiers "
        "in the text (SSNs, phone numbers, emails, MRNs, dates of birth, and the names, "
        "addresses, cities and ZIPs of the people in the database) replaced by tags like "
        "[NAME], [SSN]; read the column whole, phigate refuses searching, sorting or "
        "computing on it). Comparisons and searches on these columns see the masked values."
    )
    # Several statements in one message: each relation once.
    both = decide(engine, "SELECT ssn FROM patients; SELECT * FROM patients; TABLE notes", "agent")
    assert keys(both) == ["public.patients", "public.notes"]


def test_a_relation_whose_masked_columns_are_clear_for_the_identity(engine: PolicyEngine) -> None:
    # The clinician sees every kind in clear: no rewrite, no notice.
    assert "notices" not in decide(engine, "SELECT * FROM patients", "clinician")
    # Names in clear: the notice lists only what stays masked.
    answer = decide(engine, "SELECT * FROM patients", "names")
    message = answer["notices"][0]["message"]
    assert "last_name" not in message and "ssn (partial" in message
    assert "notices" not in decide(engine, "SELECT last_name FROM patients", "names")


# --- modes ------------------------------------------------------------------------------------


def test_modes_and_how_roles_combine(cfg: Config, engine: PolicyEngine) -> None:
    sql = "SELECT ssn FROM patients"
    assert keys(decide(engine, sql, "first")) == ["public.patients"]
    assert keys(decide(engine, sql, "loud")) == [None]  # with every result
    assert "notices" not in decide(engine, sql, "quiet")
    # An identity holding several roles: "always" wins, "off" only if every role says off.
    assert policyconf.roleset(cfg, "loud", "quiet").masking_notices == "always"
    assert policyconf.roleset(cfg, "quiet", "agent").masking_notices == "first"
    assert policyconf.roleset(cfg, "quiet").masking_notices == "off"
    assert keys(decide(engine, sql, "quiet", "agent")) == ["public.patients"]
    # "off" silences the comparison notice (01M02) too: such clients want no notices at all.
    compare = "SELECT id FROM patients WHERE last_name = 'Smith'"
    assert [n["code"] for n in decide(engine, compare, "first")["notices"]] == ["01M02"]
    assert "notices" not in decide(engine, compare, "quiet")


def test_masking_notices_config_errors_name_file_and_key() -> None:
    with pytest.raises(ConfigError) as exc:
        policyconf.config({"roles": {"r": {"masking_notices": "sometimes"}}})
    assert exc.value.key == "roles.r.masking_notices"
    assert "'first', 'always', 'off'" in str(exc.value) and "'sometimes'" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        policyconf.config({"roles": {"r": {"masking_notices": True}}})
    assert exc.value.key == "roles.r.masking_notices"
    data = dict(policyconf.BASE, roles={"r": {"masking_notice": "off"}})
    with pytest.raises(ConfigError, match="did you mean 'masking_notices'"):
        parse_config(data)


# --- the words for every mask -----------------------------------------------------------------


@pytest.mark.parametrize(("mask", "oid", "kind", "words"), [
    ("redact", TEXT, "address", "redact: every value shown as ***"),
    ("redact", DATE, "dob", "redact: every value shown as 1900-01-01"),
    ("redact", INT8, "other", "redact: every value replaced by the same placeholder of the "
     "column's type"),
    ("null", TEXT, "other", "null: always shown as NULL"),
    ("partial:4", TEXT, "ssn", "partial: only the last 4 characters shown, other letters and "
     "digits replaced by *"),
    ("partial:1", TEXT, "ssn", "partial: only the last character shown, other letters and "
     "digits replaced by *"),
    ("year", DATE, "dob", "year: shown as January 1 of the birth year"),
    ("year", DATE, "other", "year: shown as January 1 of the year"),
    ("email_domain", TEXT, "email", "email_domain: only the domain shown, as ***@example.org"),
    ("pseudonym", TEXT, "name", "pseudonym: psn_ + 16 hex digits, the same value always gives "
     "the same pseudonym, so joins and GROUP BY still work"),
    ("pseudonym", INT8, "mrn", "pseudonym: a number computed from the value, the same value "
     "always gives the same pseudonym, so joins and GROUP BY still work"),
    ("free_text", TEXT, "free_text", "free_text: identifiers found in the text (SSNs, phone "
     "numbers, emails, MRNs, dates of birth) replaced by tags like [SSN], [PHONE]"),
    ("zip3", TEXT, "zip", "zip3: only the first 3 digits of the ZIP code shown, as 021**; 000** "
     "for sparsely populated areas"),
])  # fmt: skip
def test_every_mask_is_explained(mask: str, oid: int, kind: str, words: str) -> None:
    col = ColumnInfo("c", 1, oid, "x", -1, False, None)
    assert describe_mask(col, mask, kind) == words


def test_the_explanations_cover_every_mask() -> None:
    col = ColumnInfo("c", 1, TEXT, "text", -1, False, None)
    for mask in MASKS:
        spec = "partial:2" if mask == "partial" else mask
        assert describe_mask(col, spec, "other").startswith(f"{mask}: ")


# --- SHOW phigate.masking ---------------------------------------------------------------------


def show_rows(engine: PolicyEngine, *roles: str, sql: str = "SHOW phigate.masking") -> list[Any]:
    """The rows the constant statement of the decision yields, read from its parse tree."""
    answer = decide(engine, sql, *roles)
    assert answer["cache"] == "exact" and answer["protected"] is False
    assert "notices" not in answer
    tree = pg_parser.parse_sql(answer["rewrite"])
    select = tree[0].stmt.fromClause[0].subquery
    alias = tree[0].stmt.fromClause[0].alias
    assert [c.sval for c in alias.colnames] == ["relation", "column_name", "kind", "mask"]
    if select.valuesLists is None or tree[0].stmt.whereClause is not None:
        return []
    return [tuple(v.val.sval for v in row) for row in select.valuesLists]


def test_show_masking_lists_the_identitys_masked_columns(engine: PolicyEngine) -> None:
    assert show_rows(engine, "agent") == [
        ("public.notes", "body", "free_text", "free_text"),
        ("public.patients", "date_of_birth", "dob", "year"),
        ("public.patients", "last_name", "name", "pseudonym"),
        ("public.patients", "ssn", "ssn", "partial:4"),
    ]
    assert show_rows(engine, "names") == [
        ("public.notes", "body", "free_text", "free_text"),
        ("public.patients", "date_of_birth", "dob", "year"),
        ("public.patients", "ssn", "ssn", "partial:4"),
    ]
    # Only relations and columns the roles may use at all.
    assert show_rows(engine, "narrow") == [("public.patients", "ssn", "ssn", "partial:4")]
    assert show_rows(engine, "clinician") == []


@pytest.mark.parametrize("sql", [
    "show phigate.masking", "SHOW PHIGATE.MASKING", 'SHOW "phigate"."masking"',
    'SHOW "phigate.masking"', "SHOW phigate.masking;",
])  # fmt: skip
def test_show_masking_spellings(engine: PolicyEngine, sql: str) -> None:
    assert len(show_rows(engine, "narrow", sql=sql)) == 1


def test_show_masking_refusals(engine: PolicyEngine) -> None:
    klass = policyconf.roleset(engine.config, "agent").identity_class
    other = engine.decide(klass, "SHOW phigate.key")
    assert (other["action"], other["sqlstate"]) == ("deny", "42704")
    assert other["message"].startswith('unrecognized configuration parameter "phigate.key"')
    assert "SHOW phigate.masking" in other["hint"]
    alone = engine.decide(klass, "SHOW phigate.masking; SELECT 1")
    assert (alone["action"], alone["sqlstate"]) == ("deny", "0A000")
    # Any other SHOW is what it always was.
    assert "rewrite" not in decide(engine, "SHOW search_path", "agent")


def test_show_masking_quotes_names_and_without_a_catalog(cfg: Config) -> None:
    odd = RelationInfo(16600, "public", "Odd'Rel", "r", "configured", (
        ColumnInfo("back\\slash", 1, TEXT, "text", -1, False, _rule("patients", "ssn")),
    ))  # fmt: skip
    engine = PolicyEngine(cfg, {"ehr": CatalogSnapshot.from_relations("ehr", 180000, [odd])})
    assert show_rows(engine, "agent") == [('public."Odd\'Rel"', "back\\slash", "ssn", "partial:4")]
    # A masked identity without the target's catalog is refused as for any statement; one that
    # sees every kind in clear gets its (empty) answer.
    engine = PolicyEngine(cfg, {"ehr": None})
    klass = policyconf.roleset(cfg, "agent").identity_class
    assert engine.decide(klass, "SHOW phigate.masking")["sqlstate"] == "58000"
    assert show_rows(engine, "clinician") == []


def test_a_relation_with_many_masked_columns_ends_its_list_with_a_count() -> None:
    rule = _rule("patients", "ssn")
    wide = RelationInfo(16700, "public", "wide", "r", "configured", tuple(
        ColumnInfo(f"c{i}", i, TEXT, "text", -1, False, rule) for i in range(1, 101)))  # fmt: skip
    message = masked_columns_message(wide, frozenset())
    assert message is not None
    # Whole explanations only, well under the 4000 bytes the data plane cuts a field at.
    assert len(message.encode()) < 3500
    assert "c1 (partial: only the last 4 characters shown" in message
    listed = message.count("(partial:")
    assert 10 < listed < 100
    assert f"and {100 - listed} more (SHOW phigate.masking lists them)." in message
