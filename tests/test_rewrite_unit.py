"""The masking rewrite (phigate.policy.rewrite) on its own: an in-memory catalog, no server."""

# ruff: noqa: S608  # the statements are test data, never executed

from __future__ import annotations

import pytest
from pglast import parser

from phigate.policy.rewrite import RewriteResult, mask_expression, pseudonym_key_sql, rewrite
from rewritecat import DATE, INT4, INT8, NUMERIC, TEXT, TSTZ, Column, MemCatalog, Relation, Rule

KEY = "'k3y'"
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
    '(SELECT "id", "mrn", CAST(\'***\' AS text) AS "ssn", CAST(pg_catalog.make_date('
    'CAST(EXTRACT(year FROM "date_of_birth") AS integer), 1, 1) AS date) AS "date_of_birth", '
    '"city" FROM "public"."patients")'
)
P_ONLY = P.replace('FROM "public"', 'FROM ONLY "public"')
V = '(SELECT "id", CAST(NULL AS text) AS "note" FROM "clinic"."Visits")'


def rw(sql: str, clear: frozenset[str] = frozenset(), key: str | None = KEY) -> RewriteResult:
    r = rewrite(sql, CAT, clear, key)
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
    refused("EXPLAIN SELECT * FROM people", "pseudonym key")


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
        ("SELECT * FROM people", "pseudonym key"),  # refused only without a key: see below
        ("SELECT * FROM v_unclear", "mapping unclear"),
        ("SELECT * FROM db.public.patients", "three-part"),
        ("SELECT * FROM patients WHERE", "parse"),
    ],
)
def test_refusals(sql: str, word: str) -> None:
    key = None if "people" in sql else KEY
    r = rewrite(sql, CAT, frozenset(), key)
    assert r.refuse is not None, r.sql
    assert word in r.refuse
    assert SSN_LITERAL not in r.refuse
    assert r.sql == sql and not r.changed


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


def _col(name: str, oid: int, tname: str) -> Column:
    return Column(name, oid, tname)


@pytest.mark.parametrize(
    ("oid", "tname", "spec", "expected"),
    [
        (TEXT, "text", "redact", "CAST('***' AS text)"),
        (INT8, "bigint", "redact", "CAST(0 AS bigint)"),
        (NUMERIC, "numeric(10,2)", "redact", "CAST(0 AS numeric(10,2))"),
        (DATE, "date", "redact", "CAST('1900-01-01' AS date)"),
        (TSTZ, "timestamp with time zone", "null", "CAST(NULL AS timestamp with time zone)"),
        (
            1043,
            "character varying(20)",
            "partial:4",
            'CAST(CASE WHEN "c" IS NULL THEN NULL ELSE \'***\' || pg_catalog.right(CAST("c" AS '
            "text), 4) END AS character varying(20))",
        ),
        (
            TSTZ,
            "timestamp with time zone",
            "year",
            'CAST(pg_catalog.make_date(CAST(EXTRACT(year FROM "c") AS integer), 1, 1) AS '
            "timestamp with time zone)",
        ),
        (
            TEXT,
            "text",
            "email_domain",
            "CAST('***@' || pg_catalog.split_part(CAST(\"c\" AS text), '@', 2) AS text)",
        ),
        (INT4, "integer", "partial:2", "CAST(0 AS integer)"),  # text-only mask: redact
        (TEXT, "text", "year", "CAST('***' AS text)"),
        (1000, "text[]", "redact", "CAST('{}' AS text[])"),
        (600, "point", "redact", "CAST(NULL AS point)"),
    ],
)
def test_mask_expressions(oid: int, tname: str, spec: str, expected: str) -> None:
    assert mask_expression(_col("c", oid, tname), spec, KEY) == expected


def test_pseudonym_and_free_text_expressions() -> None:
    e = mask_expression(_col("c", TEXT, "text"), "pseudonym", KEY)
    assert e.startswith("CAST('psn_' || pg_catalog.left(pg_catalog.encode(pg_catalog.sha256(")
    assert f'{KEY} || CAST("c" AS text)' in e
    e = mask_expression(_col("c", INT8, "bigint"), "pseudonym", KEY)
    assert "AS bit(60)) AS bigint) AS bigint)" in e
    e = mask_expression(_col("c", TEXT, "text"), "free_text", KEY)
    for tag in ("[SSN]", "[MRN]", "[PHONE]", "[EMAIL]", "[DATE]"):
        assert tag in e
    assert "\\" not in e  # means the same whatever standard_conforming_strings says


def test_pseudonym_key_sql() -> None:
    assert pseudonym_key_sql(b"\x00'\\k") == "'00275c6b'"
    with pytest.raises(ValueError):
        pseudonym_key_sql(b"")
