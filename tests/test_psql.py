"""psql through the gateway: simple queries on the EHR schema, \\copy out and in, Ctrl-C cancel.

Expected values come from a direct connection to PostgreSQL, so the tests check that the gateway
relays exactly what the server says. Assertions compare counts and digests, never PHI-like values.
"""

from __future__ import annotations

import csv
import hashlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from harness import psql, psql_command

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def direct(pg) -> Iterator[psycopg.Connection]:
    """A direct (gateway-less) connection to the EHR database: the source of expected values."""
    with psycopg.connect(pg.dsn(pg.ehr_database), autocommit=True) as conn:
        yield conn


def one(direct: psycopg.Connection, sql: str) -> str:
    row = direct.execute(sql).fetchone()
    assert row is not None
    return "" if row[0] is None else str(row[0])


def ok(proc: subprocess.CompletedProcess[str]) -> list[str]:
    # stderr is shown on failure: psql error text, never result rows.
    assert proc.returncode == 0, f"psql exited {proc.returncode}: {proc.stderr.strip()}"
    return proc.stdout.splitlines()


# --- simple queries ------------------------------------------------------------------------------


def test_select_constant(gateway, token):
    assert ok(psql(gateway, token(), "select 41 + 1")) == ["42"]


@pytest.mark.parametrize("table", ["patients", "encounters", "diagnoses", "medications", "notes"])
def test_table_counts_match_postgres(gateway, token, direct, table):
    expected = one(direct, f"select count(*) from {table}")  # noqa: S608
    assert int(expected) > 0
    assert ok(psql(gateway, token(), f"select count(*) from {table}")) == [expected]  # noqa: S608


def test_aggregates_and_joins_match_postgres(gateway, token, direct):
    queries = [
        "select count(distinct patient_id) from encounters",
        "select count(*) from encounters e join diagnoses d on d.encounter_id = e.id",
        "select min(date_of_birth)::text || '/' || max(date_of_birth)::text from patients",
        # Digests stand in for the rows themselves: equal digests, equal bytes.
        "select md5(string_agg(p::text, E'\\n' order by p.id)) from patients p",
        "select md5(string_agg(n.body, '|' order by n.id)) from notes n",
        "select count(*) filter (where ended_at is null) from medications",
    ]
    for sql in queries:
        got = ok(psql(gateway, token(), sql))
        assert got == [one(direct, sql)], f"mismatch for query #{queries.index(sql)}"


def test_grouped_result_rows(gateway, token, direct):
    sql = "select department, count(*) from encounters group by 1 order by 1"
    expected = [f"{d}|{n}" for d, n in direct.execute(sql).fetchall()]
    got = ok(psql(gateway, token(), sql))
    assert len(got) == len(expected) and got == expected


def test_multiple_statements_in_one_script(gateway, token, tmp_path):
    script = tmp_path / "script.sql"
    script.write_text(
        "create temp table t(x int);\n"
        "insert into t select generate_series(1, 1000);\n"
        "select count(*), sum(x) from t;\n"
        "begin; delete from t where x > 10; rollback;\n"
        "select count(*) from t;\n"
    )
    assert ok(psql(gateway, token(), file=script)) == [
        "CREATE TABLE",
        "INSERT 0 1000",
        "1000|500500",
        "BEGIN",
        "DELETE 990",
        "ROLLBACK",
        "1000",
    ]


def test_sql_error_is_reported_and_exit_status_set(gateway, token):
    proc = psql(gateway, token(), "select 1/0")
    assert proc.returncode != 0
    assert "division by zero" in proc.stderr


def test_psql_meta_commands(gateway, token):
    # \dt runs catalog queries through the gateway; the service role sees the five tables.
    lines = ok(psql(gateway, token(), r"\dt public.*"))
    names = {line.split("|")[1] for line in lines if line.count("|") >= 3}
    assert {"patients", "encounters", "diagnoses", "medications", "notes"} <= names


# --- \copy out and in ----------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_copy_out_query_to_file(gateway, token, direct, tmp_path):
    out = tmp_path / "encounters.csv"
    sql = "select id, patient_id, department, admitted_at from encounters order by id"
    proc = psql(gateway, token(), rf"\copy ({sql}) to '{out}' with (format csv, header)")
    ok(proc)
    # The same COPY straight from PostgreSQL yields the same bytes.
    want = bytearray()
    with direct.cursor().copy(f"copy ({sql}) to stdout with (format csv, header)") as cp:
        for chunk in cp:
            want += chunk
    assert out.read_bytes() == bytes(want)
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "patient_id", "department", "admitted_at"]
    assert len(rows) - 1 == int(one(direct, "select count(*) from encounters"))


def test_copy_round_trip_through_temp_table(gateway, token, direct, tmp_path):
    exported = tmp_path / "meds.txt"
    reexported = tmp_path / "meds-again.txt"
    cols = "id, patient_id, name, dose, started_at, ended_at"
    script = tmp_path / "roundtrip.sql"
    script.write_text(
        f"\\copy (select {cols} from medications order by id) to '{exported}'\n"  # noqa: S608
        "create temp table meds_copy (like medications);\n"
        f"\\copy meds_copy ({cols}) from '{exported}'\n"
        "select count(*) from meds_copy;\n"
        # Every row came back identical: the anti-join in both directions is empty.
        f"select count(*) from ((select {cols} from medications except all "
        f"select {cols} from meds_copy) union all (select {cols} from meds_copy except all "
        f"select {cols} from medications)) d;\n"
        f"\\copy (select {cols} from meds_copy order by id) to '{reexported}'\n"
    )
    lines = ok(psql(gateway, token(), file=script))
    n = one(direct, "select count(*) from medications")
    assert lines == [f"COPY {n}", "CREATE TABLE", f"COPY {n}", n, "0", f"COPY {n}"]
    assert _digest(exported) == _digest(reexported)


def test_copy_in_from_generated_file_with_nulls_and_escapes(gateway, token, tmp_path):
    src = tmp_path / "in.csv"
    rows = 20_000
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        for i in range(1, rows + 1):
            w.writerow([i, "" if i % 7 == 0 else f'line {i}, with "quotes"\nand newline'])
    script = tmp_path / "copyin.sql"
    script.write_text(
        "create temp table scratch (id int primary key, txt text);\n"
        f"\\copy scratch from '{src}' with (format csv)\n"
        "select count(*), sum(id), count(txt),"
        " count(*) filter (where txt like '%\"quotes\"%') from scratch;\n"
    )
    lines = ok(psql(gateway, token(), file=script))
    with_text = rows - rows // 7
    assert lines[-1] == f"{rows}|{rows * (rows + 1) // 2}|{with_text}|{with_text}"


def test_copy_in_bad_data_fails_cleanly(gateway, token, tmp_path):
    src = tmp_path / "bad.txt"
    src.write_text("1\n2\nnot-a-number\n4\n")
    script = tmp_path / "bad.sql"
    script.write_text(f"create temp table scratch (id int);\n\\copy scratch from '{src}'\n")
    proc = psql(gateway, token(), file=script)
    assert proc.returncode != 0
    assert "invalid input syntax for type integer" in proc.stderr
    # The session survived the failed COPY (psql ON_ERROR_STOP stops, a new run works).
    assert ok(psql(gateway, token(), "select 1")) == ["1"]


# --- Ctrl-C --------------------------------------------------------------------------------------


def test_ctrl_c_cancels_pg_sleep(gateway, token):
    argv, env = psql_command(gateway, token(), "select pg_sleep(30)")
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(1.0)  # connected and waiting on the sleep
        assert proc.poll() is None, f"psql ended early: {proc.communicate()[1].strip()}"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "canceling statement due to user request" in err, err.strip()
    assert proc.returncode != 0
    assert elapsed < 10


def test_ctrl_c_cancels_only_that_session(gateway, token):
    """Two psql sessions sleeping: Ctrl-C to one leaves the other to finish normally."""
    argv_a, env_a = psql_command(gateway, token(), "select pg_sleep(2), 'done'")
    argv_b, env_b = psql_command(gateway, token(), "select pg_sleep(30)")
    a = subprocess.Popen(
        argv_a, env=env_a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    b = subprocess.Popen(
        argv_b, env=env_b, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(1.0)
        b.send_signal(signal.SIGINT)
        _, err_b = b.communicate(timeout=10)
        out_a, err_a = a.communicate(timeout=10)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "canceling statement due to user request" in err_b
    assert a.returncode == 0, err_a.strip()
    assert out_a.strip() == "|done"
