"""The masking rewrite (phigate.masking.rewrite) on its own: an in-memory catalog, no server."""

# ruff: noqa: S608  # the statements are test data, never executed

from __future__ import annotations

import dataclasses
import secrets

import pytest
from pglast import parser

import layer2ref
import policyconf
from phigate.config import ColumnRule, PhiConfig, SecretBytes
from phigate.masking.classification import CatalogSnapshot, ColumnInfo, RelationInfo
from phigate.masking.mask_sql import _PARTIAL_KEEP
from phigate.masking.pseudonym_db import FunctionsState, pads
from phigate.masking.rewrite import (
    MaskSQL,
    RewriteResult,
    mask_expression,
    mask_sql,
    postgres_regex,
    rewrite,
)
from phigate.policy.engine import PolicyEngine
from rewritecat import DATE, INT4, INT8, NUMERIC, TEXT, TSTZ, Column, MemCatalog, Relation, Rule

# The masks of a target whose pseudonym functions were found installed with the gateway's key.
KEY = mask_sql(pseudonyms=True)
SSN_LITERAL = "123-45-6789"


def _catalog() -> MemCatalog:
    cat = MemCatalog()
    cat.add(
        "public",
        "patients",
        [("id", INT8), ("mrn", TEXT), ("ssn", TEXT), ("date_of_birth", DATE), ("city", TEXT)],
        {"ssn": ("ssn", "redact"), "date_of_birth": ("dob", "year")},
    )
    cat.add("public", "encounters", [("id", INT8), ("patient_id", INT8), ("reason", TEXT)])
    cat.add("clinic", "Visits", [("id", INT8), ("note", TEXT)], {"note": ("free_text", "null")})
    cat.add("public", "people", [("id", INT8), ("mrn", TEXT)], {"mrn": ("mrn", "pseudonym")})
    cat.relations[("public", "v_unclear")] = Relation(
        (Column("x", TEXT, "text", Rule("ssn", "redact")),), refuse_reason="mapping unclear"
    )
    return cat


CAT = _catalog()
P = (
    '(SELECT "id", "mrn", CASE WHEN "ssn" IS NULL THEN NULL ELSE CAST(\'***\' AS text) END '
    'AS "ssn", CASE WHEN pg_catalog.isfinite("date_of_birth") THEN CAST(pg_catalog.make_date('
    'CAST(EXTRACT(year FROM "date_of_birth") AS integer), 1, 1) AS date) ELSE "date_of_birth" '
    'END AS "date_of_birth", "city" FROM "public"."patients")'
)
P_ONLY = P.replace('FROM "public"', 'FROM ONLY "public"')
V = '(SELECT "id", CAST(NULL AS text) AS "note" FROM "clinic"."Visits")'


def rw(sql: str, clear: frozenset[str] = frozenset(), key: MaskSQL | None = KEY) -> RewriteResult:
    r = rewrite(sql, CAT, clear, key, schema="public")
    if r.refuse is None:
        parser.parse_sql_json(r.sql)  # every rewritten statement is valid SQL
    else:
        assert r.sql == sql and not r.changed
    return r


def ok(sql: str, expected: str) -> None:
    r = rw(sql)
    assert r.refuse is None
    assert r.sql == expected
    assert r.changed is (expected != sql)


def refused(sql: str, *words: str) -> str:
    r = rw(sql)
    assert r.refuse is not None, r.sql
    assert SSN_LITERAL not in r.refuse  # reasons never echo literal values
    for w in words:
        assert w in r.refuse
    return r.refuse


# --- splicing keeps everything else byte-identical -------------------------------------------


def test_alias_literals_params_comments_kept() -> None:
    sql = (
        "SELECT  p.ssn , $1::text /* c */ FROM patients   p  -- tail\n"
        f"WHERE p.ssn = '{SSN_LITERAL}' AND p.id = $2"
    )
    ok(
        sql,
        "SELECT  p.ssn , $1::text /* c */ FROM " + P + "   p  -- tail\n"
        f"WHERE p.ssn = '{SSN_LITERAL}' AND p.id = $2",
    )


def test_no_alias_gets_table_name_and_as_alias_kept() -> None:
    ok(
        "select patients.ssn from public.patients where patients.id = 1",
        f'select patients.ssn from {P} AS "patients" where patients.id = 1',
    )
    ok("SELECT x.* FROM patients AS x(a, b)", f"SELECT x.* FROM {P} AS x(a, b)")


def test_quoted_and_qualified_names() -> None:
    ok('SELECT * FROM clinic."Visits" v', f"SELECT * FROM {V} v")
    ok('SELECT * FROM "clinic" . "Visits"', f'SELECT * FROM {V} AS "Visits"')
    ok('SELECT 1 FROM "patients"', f'SELECT 1 FROM {P} AS "patients"')


def test_unqualified_names_follow_the_pinned_schema() -> None:
    # A target pinned to "clinic": its sessions read clinic's tables when names are unqualified.
    r = rewrite('SELECT note FROM "Visits" WHERE id = 1', CAT, frozenset(), KEY, schema="clinic")
    assert r.sql == f'SELECT note FROM {V} AS "Visits" WHERE id = 1'
    assert r.masked_columns == ["clinic.Visits.note"]
    sql = "SELECT ssn FROM patients"  # clinic.patients: not the protected public.patients
    r = rewrite(sql, CAT, frozenset(), KEY, schema="clinic")
    assert r.sql is sql and not r.changed
    r = rewrite("SELECT ssn FROM public.patients", CAT, frozenset(), KEY, schema="clinic")
    assert r.masked_columns == ["public.patients.ssn", "public.patients.date_of_birth"]
    sql = 'WITH "Visits" AS (SELECT 1 AS note) SELECT note FROM "Visits"'  # a CTE still shadows
    r = rewrite(sql, CAT, frozenset(), KEY, schema="clinic")
    assert r.sql is sql and not r.changed


def test_unprotected_or_clear_is_untouched() -> None:
    sql = "SELECT * FROM encounters e WHERE e.reason = $1"
    r = rw(sql)
    assert r.sql is sql and not r.changed and r.masked_columns == []
    sql = "SELECT * FROM patients"
    r = rw(sql, clear=frozenset({"ssn", "dob"}))
    assert r.sql is sql and not r.changed
    r = rw(sql, clear=frozenset({"ssn"}))
    assert r.changed and r.masked_columns == ["public.patients.date_of_birth"]
    assert '"ssn",' in r.sql


def test_masked_columns_listed() -> None:
    r = rw('SELECT * FROM patients, clinic."Visits"')
    assert r.masked_columns == [
        "public.patients.ssn",
        "public.patients.date_of_birth",
        "clinic.Visits.note",
    ]


def test_multibyte_text_before_reference() -> None:
    ok("SELECT 'héllo €', p.ssn FROM patients p", f"SELECT 'héllo €', p.ssn FROM {P} p")


def test_only_star_and_table_shorthand() -> None:
    ok("SELECT * FROM ONLY patients p", f"SELECT * FROM {P_ONLY} p")
    ok("SELECT * FROM ONLY (patients)", f'SELECT * FROM {P_ONLY} AS "patients"')
    ok("SELECT * FROM patients * p", f"SELECT * FROM {P} p")
    ok("TABLE patients", f'SELECT * FROM {P} AS "patients"')
    ok(
        "SELECT 1 FROM (TABLE public.patients ORDER BY 1) t",
        f'SELECT 1 FROM (SELECT * FROM {P} AS "patients" ORDER BY 1) t',
    )


# --- every place a relation can be read -------------------------------------------------------


def test_joins_subqueries_lateral() -> None:
    ok(
        "SELECT e.id FROM encounters e JOIN (patients p JOIN encounters x ON x.id = p.id) "
        "ON p.id = e.patient_id, LATERAL (SELECT q.ssn FROM patients q WHERE q.id = e.id) l "
        "WHERE EXISTS (SELECT 1 FROM patients WHERE ssn = $1) "
        "AND e.patient_id IN (SELECT id FROM public.patients z)",
        f"SELECT e.id FROM encounters e JOIN ({P} p JOIN encounters x ON x.id = p.id) "
        f"ON p.id = e.patient_id, LATERAL (SELECT q.ssn FROM {P} q WHERE q.id = e.id) l "
        f'WHERE EXISTS (SELECT 1 FROM {P} AS "patients" WHERE ssn = $1) '
        f"AND e.patient_id IN (SELECT id FROM {P} z)",
    )


def test_ctes_and_shadowing() -> None:
    ok(
        "WITH a AS (SELECT * FROM patients), patients AS (SELECT 1 AS one) "
        "SELECT * FROM a, patients, public.patients q",
        f'WITH a AS (SELECT * FROM {P} AS "patients"), patients AS (SELECT 1 AS one) '
        f"SELECT * FROM a, patients, {P} q",
    )
    # The CTE's own name inside a non-recursive body is the table.
    ok(
        "WITH patients AS (SELECT * FROM patients) SELECT * FROM patients",
        f'WITH patients AS (SELECT * FROM {P} AS "patients") SELECT * FROM patients',
    )
    ok(
        "WITH RECURSIVE r AS (SELECT id FROM patients UNION ALL SELECT id + 1 FROM r) "
        "SELECT (SELECT count(*) FROM r)",
        f'WITH RECURSIVE r AS (SELECT id FROM {P} AS "patients" UNION ALL SELECT id + 1 '
        "FROM r) SELECT (SELECT count(*) FROM r)",
    )


def test_set_operations_values_whole_row() -> None:
    ok(
        "SELECT ssn FROM patients UNION SELECT reason FROM encounters "
        "EXCEPT (SELECT p::text FROM patients p) ORDER BY 1",
        f'SELECT ssn FROM {P} AS "patients" UNION SELECT reason FROM encounters '
        f"EXCEPT (SELECT p::text FROM {P} p) ORDER BY 1",
    )
    ok(
        "SELECT row_to_json(patients) FROM patients",
        f'SELECT row_to_json(patients) FROM {P} AS "patients"',
    )


def test_multiple_statements() -> None:
    ok(
        "SELECT 1; SELECT * FROM patients;\nSELECT 2",
        f'SELECT 1; SELECT * FROM {P} AS "patients";\nSELECT 2',
    )


def test_copy_forms() -> None:
    ok(
        "COPY patients TO STDOUT",
        f'COPY (SELECT * FROM {P} AS "patients") TO STDOUT',
    )
    ok(
        "COPY public.patients (id, ssn) TO STDOUT WITH (FORMAT csv, HEADER)",
        f'COPY (SELECT "id", "ssn" FROM {P} AS "patients") TO STDOUT WITH (FORMAT csv, HEADER)',
    )
    ok(
        "COPY (SELECT ssn FROM patients WHERE id < $1) TO STDOUT CSV",
        f'COPY (SELECT ssn FROM {P} AS "patients" WHERE id < $1) TO STDOUT CSV',
    )
    ok(
        "COPY (TABLE patients) TO STDOUT",
        f'COPY (SELECT * FROM {P} AS "patients") TO STDOUT',
    )
    ok(
        'COPY "patients" ("ssn") TO STDOUT (DELIMITER \'|\')',
        f'COPY (SELECT "ssn" FROM {P} AS "patients") TO STDOUT (DELIMITER \'|\')',
    )
    ok("COPY encounters TO STDOUT", "COPY encounters TO STDOUT")
    ok("COPY patients (id, ssn) FROM STDIN", "COPY patients (id, ssn) FROM STDIN")
    refused("COPY BINARY patients TO STDOUT", "old COPY syntax")


def test_cursors_prepare_explain() -> None:
    ok(
        "DECLARE c CURSOR WITH HOLD FOR SELECT ssn FROM patients ORDER BY ssn",
        f'DECLARE c CURSOR WITH HOLD FOR SELECT ssn FROM {P} AS "patients" ORDER BY ssn',
    )
    ok(
        "PREPARE s (text) AS SELECT * FROM patients p WHERE p.ssn = $1",
        f"PREPARE s (text) AS SELECT * FROM {P} p WHERE p.ssn = $1",
    )
    ok("EXPLAIN SELECT * FROM patients p", f"EXPLAIN SELECT * FROM {P} p")
    # A plan of a pseudonymized relation shows a function call, never key material.
    r = rw("EXPLAIN SELECT * FROM people")
    assert r.refuse is None and r.changed and "phigate.pseudonym(" in r.sql


def test_reads_inside_writes_are_masked() -> None:
    ok(
        "UPDATE encounters e SET reason = 'x' FROM patients p "
        f"WHERE p.id = e.patient_id AND p.ssn = '{SSN_LITERAL}' RETURNING e.id, p.ssn",
        f"UPDATE encounters e SET reason = 'x' FROM {P} p "
        f"WHERE p.id = e.patient_id AND p.ssn = '{SSN_LITERAL}' RETURNING e.id, p.ssn",
    )
    ok(
        "DELETE FROM encounters WHERE patient_id IN (SELECT id FROM patients WHERE ssn = $1)",
        f'DELETE FROM encounters WHERE patient_id IN (SELECT id FROM {P} AS "patients" '
        "WHERE ssn = $1)",
    )
    ok(
        "WITH gone AS (DELETE FROM encounters USING patients p WHERE p.id = patient_id "
        "RETURNING p.ssn) SELECT * FROM gone",
        f"WITH gone AS (DELETE FROM encounters USING {P} p WHERE p.id = patient_id "
        "RETURNING p.ssn) SELECT * FROM gone",
    )


def test_writes_to_protected_target_without_masked_reads_pass() -> None:
    for sql in (
        "UPDATE patients SET city = $1 WHERE id = $2",
        "UPDATE patients p SET ssn = $1 WHERE p.id = 3 RETURNING p.id, p.city",
        "DELETE FROM patients WHERE id = 5 RETURNING id",
        "INSERT INTO patients (mrn, ssn) VALUES ($1, $2) RETURNING id",
        "INSERT INTO patients (mrn, ssn) VALUES ('a', 'b') ON CONFLICT (mrn) "
        "DO UPDATE SET ssn = excluded.ssn",
        "UPDATE patients p SET city = 'x' FROM encounters e WHERE e.patient_id = p.id",
    ):
        ok(sql, sql)
    # A subquery over the target table reads a masked copy of it: its predicates see masks.
    ok(
        "UPDATE patients SET city = 'x' WHERE id IN (SELECT id FROM patients q "
        "WHERE q.ssn LIKE '1%')",
        f"UPDATE patients SET city = 'x' WHERE id IN (SELECT id FROM {P} q WHERE q.ssn LIKE '1%')",
    )


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "word"),
    [
        (f"UPDATE patients SET city = 'x' WHERE ssn = '{SSN_LITERAL}'", "WHERE"),
        ("UPDATE patients p SET city = 'x' WHERE p.date_of_birth < now()", "WHERE"),
        ("UPDATE patients p SET city = 'x' WHERE p::text LIKE '%1%'", "WHERE"),
        ("DELETE FROM patients p WHERE id = 1 RETURNING *", "RETURNING"),
        ("DELETE FROM patients WHERE id = 1 RETURNING ssn", "RETURNING"),
        ("UPDATE patients SET city = ssn WHERE id = 1", "SET"),
        ("UPDATE patients SET city = 'x' WHERE id = 1 RETURNING patients.*", "RETURNING"),
        (
            "UPDATE patients p SET city = 'x' WHERE id IN (SELECT e.patient_id FROM "
            "encounters e WHERE e.reason = p.ssn)",
            "WHERE",
        ),
        ("UPDATE encounters e SET reason = p.ssn FROM patients p WHERE p.id = e.patient_id", "SET"),
        ("UPDATE encounters SET reason = (SELECT ssn FROM patients LIMIT 1)", "SET"),
        ("INSERT INTO encounters (reason) SELECT ssn FROM patients", "INSERT ... SELECT"),
        ("INSERT INTO patients (mrn) VALUES ('a') RETURNING ssn", "RETURNING"),
        (
            "INSERT INTO patients (mrn) VALUES ('a') ON CONFLICT (mrn) DO UPDATE "
            "SET city = patients.ssn",
            "ON CONFLICT",
        ),
        (
            "INSERT INTO patients (mrn) VALUES ('a') ON CONFLICT (mrn) DO UPDATE "
            f"SET city = 'x' WHERE ssn = '{SSN_LITERAL}'",
            "ON CONFLICT",
        ),
        (
            "MERGE INTO patients t USING encounters s ON t.id = s.id "
            "WHEN MATCHED THEN UPDATE SET city = 'x'",
            "MERGE",
        ),
        (
            "MERGE INTO encounters t USING patients s ON t.id = s.id "
            "WHEN MATCHED THEN UPDATE SET reason = s.ssn",
            "MERGE",
        ),
        ("SELECT * FROM patients FOR UPDATE", "row-locking"),
        ("SELECT * FROM patients p, encounters e FOR SHARE OF p", "row-locking"),
        ("SELECT * FROM patients TABLESAMPLE SYSTEM (10)", "TABLESAMPLE"),
        ("SELECT query_to_xml('select ssn from patients', true, true, '')", "query_to_xml"),
        ("SELECT table_to_xml('patients'::regclass, true, true, '')", "table_to_xml"),
        ("DO $$ BEGIN PERFORM 1; END $$", "DO"),
        ("CREATE FUNCTION f() RETURNS text LANGUAGE sql AS 'select ssn from patients'", "DO"),
        ("CREATE VIEW v AS SELECT * FROM patients", "views"),
        ("CREATE TABLE t AS SELECT ssn FROM patients", "tables"),
        ("CREATE MATERIALIZED VIEW m AS SELECT ssn FROM patients", "materialized"),
        ("SELECT * INTO TEMP t FROM patients", "SELECT INTO"),
        ("CREATE INDEX ON patients (ssn)", "public.patients"),
        (f"ALTER TABLE patients ADD CHECK (ssn <> '{SSN_LITERAL}')", "public.patients"),
        ("SELECT * FROM people", "phigate's functions"),  # refused without them: see below
        ("SELECT * FROM v_unclear", "mapping unclear"),
        ("SELECT * FROM db.public.patients", "three-part"),
        ("SELECT * FROM patients WHERE", "parse"),
    ],
)
def test_refusals(sql: str, word: str) -> None:
    key = None if "people" in sql else KEY
    r = rewrite(sql, CAT, frozenset(), key, schema="public")
    assert r.refuse is not None, r.sql
    assert word in r.refuse
    assert SSN_LITERAL not in r.refuse
    assert r.sql == sql and not r.changed


@pytest.mark.parametrize("masks", [None, mask_sql(), mask_sql(pseudonyms=False)])
def test_pseudonyms_without_the_functions_are_refused_for_the_operator(
    masks: MaskSQL | None,
) -> None:
    # Never the key in the statement instead: refused with 58000 (the operator's to fix), and
    # only statements that need a pseudonym in SQL.
    r = rewrite("SELECT * FROM people WHERE id > 1", CAT, frozenset(), masks, schema="public")
    assert r.refuse is not None and r.sqlstate == "58000"
    assert r.hint is not None and "phigate db install" in r.hint
    ok_too = rewrite(
        "SELECT * FROM patients WHERE id > 1", CAT, frozenset(), masks, schema="public"
    )
    assert ok_too.refuse is None and ok_too.changed
    seen = rewrite(
        "SELECT * FROM people WHERE id > 1", CAT, frozenset({"mrn"}), masks, schema="public"
    )
    assert seen.refuse is None


def test_writes_and_utility_on_unprotected_pass() -> None:
    for sql in (
        "LOCK TABLE patients",
        "TRUNCATE patients",
        "VACUUM patients",
        "CREATE TABLE t (a int)",
        "SELECT * FROM encounters FOR UPDATE",
        "SET search_path = public",
        "EXECUTE s (1)",
    ):
        ok(sql, sql)


# --- masks ------------------------------------------------------------------------------------
# What each mask computes is checked on PostgreSQL against a model of layer 2 in
# test_rewrite_pg.py; here: the SQL's shape, and the parts that are plain Python.


def _col(name: str, oid: int, tname: str) -> Column:
    return Column(name, oid, tname)


def _kept(const: str) -> str:
    return f'CASE WHEN "c" IS NULL THEN NULL ELSE {const} END'  # redact keeps NULL, as layer 2


@pytest.mark.parametrize(
    ("oid", "tname", "spec", "expected"),
    [
        (TEXT, "text", "redact", _kept("CAST('***' AS text)")),
        (INT8, "bigint", "redact", _kept("CAST(0 AS bigint)")),
        (NUMERIC, "numeric(10,2)", "redact", _kept("CAST(0 AS numeric(10,2))")),
        (DATE, "date", "redact", _kept("CAST('1900-01-01' AS date)")),
        (650, "cidr", "redact", _kept("CAST('0.0.0.0/0' AS cidr)")),  # layer 2's placeholder
        (829, "macaddr", "redact", _kept("CAST('00:00:00:00:00:00' AS macaddr)")),
        (TSTZ, "timestamp with time zone", "null", "CAST(NULL AS timestamp with time zone)"),
        (
            TSTZ,
            "timestamp with time zone",
            "year",
            'CASE WHEN pg_catalog.isfinite("c") THEN CAST(pg_catalog.make_date(CAST(EXTRACT('
            'year FROM "c") AS integer), 1, 1) AS timestamp with time zone) ELSE "c" END',
        ),
        (
            TEXT,
            "text",
            "email_domain",
            "CAST(CASE WHEN \"c\" IS NULL THEN NULL ELSE '***' || COALESCE(pg_catalog.substring("
            "CAST(\"c\" AS text), '@[^@]*$'), '') END AS text)",
        ),
        (INT4, "integer", "partial:2", _kept("CAST(0 AS integer)")),  # text-only mask: redact
        (TEXT, "text", "year", _kept("CAST('***' AS text)")),
        (1000, "text[]", "redact", _kept("CAST('{}' AS text[])")),
        (600, "point", "redact", "CAST(NULL AS point)"),
    ],
)
def test_mask_expressions(oid: int, tname: str, spec: str, expected: str) -> None:
    assert mask_expression(_col("c", oid, tname), spec, KEY) == expected


def test_partial_expression_shape() -> None:
    e = mask_expression(_col("c", 1043, "character varying(20)"), "partial:4", KEY)
    cut = (
        'CASE WHEN pg_catalog.char_length(CAST("c" AS text)) > 4 THEN '
        'pg_catalog.char_length(CAST("c" AS text)) - 4 ELSE '
        'pg_catalog.char_length(CAST("c" AS text)) END'
    )
    head = f'pg_catalog.substr(CAST("c" AS text), 1, {cut})'
    tail = f'pg_catalog.substr(CAST("c" AS text), {cut} + 1)'
    # ASCII values take translate() (cheap); others the regexp with the long keep class.
    assert e.startswith(
        'CAST(CASE WHEN pg_catalog.octet_length(CAST("c" AS text)) = '
        'pg_catalog.char_length(CAST("c" AS text)) THEN '
        f"pg_catalog.translate({head}, '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        "abcdefghijklmnopqrstuvwxyz', "
    )
    assert f"ELSE pg_catalog.regexp_replace({head}, " in e
    assert e.endswith(f" || {tail} END AS character varying(20))")
    assert e.count("regexp_replace") == 1  # the long pattern once per column
    # bpchar through its output function: a cast to text would drop the blanks layer 2 sees.
    e = mask_expression(_col("c", 1042, "character(12)"), "partial:4", KEY)
    assert 'pg_catalog.textin(pg_catalog.bpcharout("c"))' in e and 'CAST("c" AS text)' not in e


def test_pseudonym_and_free_text_expressions() -> None:
    e = mask_expression(_col("c", TEXT, "text"), "pseudonym", KEY)
    # Length and prefix before the regexp: AND stops at the first false.
    assert e.startswith(
        "CAST(CASE WHEN pg_catalog.octet_length(CAST(\"c\" AS text)) = 20 AND "
        "pg_catalog.left(CAST(\"c\" AS text), 4) = 'psn_' AND "
        "CAST(\"c\" AS text) ~ '^psn_[0-9a-f]{16}$' THEN "
    )
    assert e.endswith(' ELSE phigate.pseudonym(CAST("c" AS text)) END AS text)')
    e = mask_expression(_col("c", INT8, "bigint"), "pseudonym", KEY)
    assert e == 'CAST(phigate.pseudonym_int(CAST("c" AS text), 15) AS bigint)'
    e = mask_expression(_col("c", TEXT, "text"), "free_text", KEY)
    for tag in ("[SSN]", "[MRN]", "[PHONE]", "[EMAIL]", "[DOB]"):
        assert tag in e


@pytest.mark.parametrize(
    ("tname", "bits"),
    [("smallint", 12), ("integer", 28), ("bigint", 60), ("numeric", 60), ("numeric(10,2)", 24),
     ("numeric(6,0)", 16), ("numeric(30,2)", 60)],
)  # fmt: skip
def test_integer_pseudonym_fits_the_type(tname: str, bits: int) -> None:
    oid = {"smallint": 21, "integer": INT4, "bigint": INT8}.get(tname, NUMERIC)
    e = mask_expression(_col("c", oid, tname), "pseudonym", KEY)
    assert e == f'CAST(phigate.pseudonym_int(CAST("c" AS text), {bits // 4}) AS {tname})'
    assert 16 ** (bits // 4) <= 2**63  # a bigint holds it; numeric(p,s) holds < 10^(p-s)
    if tname.startswith("numeric("):
        p, s = (int(x) for x in tname[8:-1].split(","))
        assert 16 ** (bits // 4) <= 10 ** (p - s)


def test_integer_pseudonym_without_room_is_redacted() -> None:
    for masks in (KEY, None):  # a constant: needs no pseudonym functions either
        assert mask_expression(_col("c", NUMERIC, "numeric(3,3)"), "pseudonym", masks) == _kept(
            "CAST(0 AS numeric(3,3))"
        )


class _Phi:
    def __init__(self, mrn_pattern: str | None = None, **extra: str) -> None:
        self.mrn_pattern = mrn_pattern
        self.extra_patterns = extra


SPECS = ("redact", "null", "partial:0", "partial:4", "year", "email_domain", "pseudonym",
         "free_text")  # fmt: skip
TYPES = [(TEXT, "text"), (1043, "character varying(40)"), (1042, "character(24)"), (19, "name"),
         (INT4, "integer"), (INT8, "bigint"), (NUMERIC, "numeric(10,2)"), (DATE, "date"),
         (1114, "timestamp without time zone"), (TSTZ, "timestamp with time zone"),
         (16, "boolean"), (3802, "jsonb"), (1009, "text[]")]  # fmt: skip


def test_masks_hold_no_backslash_and_only_ascii() -> None:
    # The statement must mean the same whatever standard_conforming_strings and the client
    # encoding say: no backslash (E'' or not) and no byte above 0x7f anywhere.
    configured = mask_sql(
        _Phi(r"\bH\d{6}\b", insurance=r"INS-[A-Z]{3}\d{4}", badge=r"(?i)émp~!#%&`@;:=\.\d+"),
        pseudonyms=True,
    )
    assert configured.free_text is not None
    for masks in (KEY, configured, None):
        for oid, tname in TYPES:
            for spec in SPECS:
                if spec == "pseudonym" and masks is None:
                    continue
                e = mask_expression(_col("c", oid, tname), spec, masks)
                assert "\\" not in e and e.isascii(), (spec, tname)
                parser.parse_sql_json(f"SELECT {e} FROM t")  # valid SQL


def test_default_masks_have_no_pseudonyms() -> None:
    # Fail closed: whoever builds masks without knowing the target's functions gets none.
    assert not mask_sql().pseudonyms and mask_sql().free_text is not None


def test_partial_keep_set_is_the_complement_of_rust_alphanumerics() -> None:
    blocks = [(0x0001, 0x052F), (0x2000, 0x206F), (0x20A0, 0x20CF), (0x3000, 0x303F)]
    keep = {cp for a, b in _PARTIAL_KEEP for cp in range(a, b + 1)}
    assert all(any(a <= cp <= b for a, b in blocks) for cp in keep)
    for a, b in blocks:
        for cp in range(a, b + 1):
            assert (cp in keep) is not layer2ref.is_alphanumeric(chr(cp)), hex(cp)


@pytest.mark.parametrize(
    ("pattern", "are", "flags"),
    [
        ("MRN-[0-9]{7}", "MRN-[0-9]{7}", ""),
        (r"MRN-\d{7}", r"MRN-\d{7}", ""),
        (r"\bH\d{6}\b", r"\yH\d{6}\y", ""),
        (r"(?i)emp-\d{6}", r"emp-\d{6}", "i"),
        (r"(?P<ins>INS)-(?:[A-Z]{3})", "(INS)-(?:[A-Z]{3})", ""),
        ("a.b", "a[^\\n]b", ""),  # Rust's '.' stops at a newline, ARE's does not
        ("(?s)a.b", "a.b", ""),
        (r"[\w.\-\]]+", "[\\w.\\u002d\\u005d]+", ""),
        ("[^]a-c]", "[^]a-c]", ""),
        ("[[:alpha:]_][[:digit:]]*", "[[:alpha:]_][[:digit:]]*", ""),
        ("x{,3}y{2,}z{4}?", "x{0,3}y{2,}z{4}?", ""),
        ("é+|中", "\\u00e9+|\\u4e2d", ""),
        (r"\x41\u{1F600}\$", "\\u0041\\U0001f600\\$", ""),
        (r"^a+?\A\z$", "^a+?\\A\\Z$", ""),
    ],
)
def test_postgres_regex(pattern: str, are: str, flags: str) -> None:
    assert postgres_regex(pattern) == (are, flags)


@pytest.mark.parametrize(
    "pattern",
    [r"\p{L}", "(?=x)", "(?<!x)y", r"(\w)\1", "[a&&b]", "[a--b]", "[[a]]", "a{1000}", "a(?i)b",
     "(?i:a)", "(?m)^x", "a*+", "[[:foo:]]", "*a", "[a-", r"\Q", r"\xZZ", "", "(?i)"],
)  # fmt: skip
def test_postgres_regex_refuses(pattern: str) -> None:
    with pytest.raises(ValueError):
        postgres_regex(pattern)


def test_configured_detectors() -> None:
    m = mask_sql(_Phi(r"\bH\d{6}\b", insurance=r"INS-[A-Z]{3}\d{4}"))
    assert m.free_text is not None and m.problem is None
    tags = [t for _, t, _ in m.free_text]
    assert tags == ["'[EMAIL]'", "'[MRN]'", "'[MRN]'", "'[SSN]'", "'[PHONE]'", "'[DOB]'",
                    "'[INSURANCE]'"]  # fmt: skip
    # The configured MRN pattern, not the default, backslashes spelled as chr(92).
    assert m.free_text[1][0] == "pg_catalog.replace('~yH~d{6}~y', '~', pg_catalog.chr(92))"
    default = mask_sql()
    assert default.free_text is not None
    assert default.free_text[1][0] == "'(?<![0-9])MRN-[0-9]{7}(?![0-9])'"


def test_untranslatable_pattern_redacts_free_text() -> None:
    m = mask_sql(_Phi(None, nhs=r"\p{N}{10}"), pseudonyms=True)
    assert m.free_text is None and m.problem is not None and "nhs" in m.problem
    col = _col("c", TEXT, "text")
    assert mask_expression(col, "free_text", m) == _kept("CAST('***' AS text)")
    assert "psn_" in mask_expression(col, "pseudonym", m)  # the other masks are unaffected


def test_engine_hands_the_phi_config_to_the_rewrite() -> None:
    cfg = policyconf.config()
    phi = PhiConfig(mrn_pattern=r"H\d{6}", extra_patterns={"insurance": r"INS-\d{4}"})
    engine = PolicyEngine(dataclasses.replace(cfg, phi=phi))
    masks = engine._mask_sql  # noqa: SLF001  # what every rewrite of this engine starts from
    assert not masks.pseudonyms  # per target, from its catalog
    assert masks.free_text is not None
    assert any("H~d{6}" in p for p, _, _ in masks.free_text)
    assert any(t == "'[INSURANCE]'" for _, t, _ in masks.free_text)


def _engine(functions: FunctionsState | None) -> tuple[PolicyEngine, bytes, str]:
    """An engine whose `clinician` role sees names pseudonymized, with a random key and a
    catalog whose pseudonym functions are in the given state."""
    key = secrets.token_bytes(32)
    rule = ColumnRule("public", "patients", "first_name", "name", "pseudonym", None, "k")
    phi = PhiConfig(
        columns={("public", "patients", "first_name"): rule}, pseudonym_key=SecretBytes(key)
    )
    cfg = dataclasses.replace(policyconf.config(), phi=phi)
    cols = (
        ColumnInfo("id", 1, INT8, "bigint", -1, True, None),
        ColumnInfo("first_name", 2, TEXT, "text", -1, False, rule),
    )
    rel = RelationInfo(16500, "public", "patients", "r", "configured", cols)
    snap = dataclasses.replace(
        CatalogSnapshot.from_relations("ehr", 180000, [rel]), pseudonym_functions=functions
    )
    engine = PolicyEngine(cfg, {"ehr": snap})
    return engine, key, policyconf.roleset(cfg, "clinician").identity_class


def test_engine_sends_no_key_material_and_refuses_without_the_functions() -> None:
    computed = "SELECT first_name FROM patients ORDER BY first_name"
    engine, key, klass = _engine(FunctionsState(True, "installed, key matches"))
    answer = engine.decide(klass, computed)
    assert answer["action"] == "allow" and "phigate.pseudonym(" in answer["rewrite"]
    ipad, opad = pads(key)
    for secret in (key, ipad[:32], opad[:32]):
        for form in (secret.hex(), secret.hex().upper()):
            assert form[:24] not in answer["rewrite"]
    for state in (None, FunctionsState(False, "phigate's pseudonym functions are not installed")):
        engine, _, klass = _engine(state)
        answer = engine.decide(klass, computed)
        assert (answer["action"], answer["sqlstate"]) == ("deny", "58000")
        assert "phigate db install" in answer["hint"] and "rewrite" not in answer
        # Plain reads are masked by the data plane alone and need no functions.
        plain = engine.decide(klass, "SELECT id, first_name FROM patients")
        assert plain["action"] == "allow" and plain["origins"] == [16500]
