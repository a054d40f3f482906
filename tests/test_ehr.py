"""phigate.dev.ehr: the synthetic schema loads, is deterministic, looks like real records."""

from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest

from harness import TEST_PATIENTS, TEST_SEED, EhrPostgres
from phigate.dev.ehr import EHR_TABLES, generate_ehr, load_ehr, mrn_for


def _table_digest(conn: psycopg.Connection, table: str) -> str:
    row = conn.execute(
        f"SELECT md5(string_agg(t::text, '\n' ORDER BY t.id)) FROM {table} t"  # noqa: S608
    ).fetchone()
    assert row is not None
    return str(row[0])


@pytest.fixture
def scratch_db(pg: EhrPostgres) -> Iterator[str]:
    pg.create_database("ehr_scratch")
    try:
        yield pg.dsn("ehr_scratch")
    finally:
        pg.drop_database("ehr_scratch")


def test_generation_is_deterministic_per_seed() -> None:
    a, b, c = generate_ehr(40, seed=1), generate_ehr(40, seed=1), generate_ehr(40, seed=2)
    assert a == b
    assert a.patients != c.patients


def test_patients_do_not_depend_on_total() -> None:
    small, large = generate_ehr(10, seed=3), generate_ehr(30, seed=3)
    assert small.patients == large.patients[:10]
    assert small.notes == large.notes[: len(small.notes)]


def test_identifier_formats() -> None:
    data = generate_ehr(300, seed=5)
    mrns = [p[1] for p in data.patients]
    assert len(set(mrns)) == len(mrns)
    for p in data.patients:
        assert re.fullmatch(r"MRN-\d{7}", p[1])
        # 9xx area numbers are never issued: no generated SSN belongs to anyone.
        assert re.fullmatch(r"9\d\d-\d\d-\d{4}", p[4])
        assert re.fullmatch(r"\(\d{3}\) 555-01\d\d", p[10])
        assert re.fullmatch(r"[a-z]+\.[a-z]+\d*@example\.(com|org|net)", p[11])
        assert re.fullmatch(r"\d{5}", p[9])
    assert mrn_for(1) != mrn_for(2)


def test_notes_mention_identifiers() -> None:
    data = generate_ehr(100, seed=7)
    patients = {p[0]: p for p in data.patients}
    patient_of_encounter = {e[0]: e[1] for e in data.encounters}
    with_phone = 0
    for _note_id, encounter_id, _author, body in data.notes:
        p = patients[patient_of_encounter[encounter_id]]
        mrn_digits = p[1].removeprefix("MRN-")
        assert mrn_digits in body, "every note carries the MRN in some form"
        assert p[3] in body, "every note carries the last name"
        with_phone += p[10] in body
    assert with_phone > len(data.notes) // 4


def test_counts_match_generator(pg: EhrPostgres) -> None:
    expected = generate_ehr(TEST_PATIENTS, TEST_SEED).counts()
    assert expected["patients"] == TEST_PATIENTS
    assert expected["encounters"] >= TEST_PATIENTS  # at least one visit each
    with psycopg.connect(pg.dsn(pg.ehr_database)) as conn:
        for table, n in expected.items():
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (n,), table  # noqa: S608


def test_foreign_keys_and_identity_sequences(pg: EhrPostgres) -> None:
    with psycopg.connect(pg.dsn(pg.ehr_database)) as conn:
        orphans = conn.execute(
            "SELECT count(*) FROM notes n LEFT JOIN encounters e ON e.id = n.encounter_id "
            "WHERE e.id IS NULL"
        ).fetchone()
        assert orphans == (0,)
        # COPY wrote explicit ids; an INSERT without one must not collide.
        with conn.transaction(force_rollback=True):
            row = conn.execute(
                "INSERT INTO patients (mrn, first_name, last_name, ssn, date_of_birth, address, "
                "city, state, zip, phone, email) VALUES ('MRN-TEST', 'a', 'b', 'c', '2000-01-01', "
                "'x', 'y', 'z', '00000', 'p', 'e') RETURNING id"
            ).fetchone()
            assert row == (TEST_PATIENTS + 1,)


def test_service_role_has_dml_only(pg: EhrPostgres) -> None:
    with psycopg.connect(pg.service_dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM patients").fetchone() == (TEST_PATIENTS,)
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() == (False,)
        with conn.transaction(force_rollback=True):
            conn.execute("UPDATE medications SET dose = dose WHERE id = 1")
            conn.execute("DELETE FROM notes WHERE id = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE intruder (x int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE notes")


def test_load_into_a_connection_is_reproducible(pg: EhrPostgres, scratch_db: str) -> None:
    with psycopg.connect(scratch_db) as conn:
        counts = load_ehr(conn, patients=TEST_PATIENTS, seed=TEST_SEED)
        assert counts == generate_ehr(TEST_PATIENTS, TEST_SEED).counts()
        scratch = {t: _table_digest(conn, t) for t in EHR_TABLES}
    with psycopg.connect(pg.dsn(pg.ehr_database)) as conn:
        original = {t: _table_digest(conn, t) for t in EHR_TABLES}
    assert scratch == original


def test_reload_replaces_tables(scratch_db: str) -> None:
    load_ehr(scratch_db, patients=5, seed=1)
    counts = load_ehr(scratch_db, patients=3, seed=1)
    with psycopg.connect(scratch_db) as conn:
        assert conn.execute("SELECT count(*) FROM patients").fetchone() == (3,)
    assert counts["patients"] == 3
