"""The masking rewrite against the real EHR database: original vs rewritten statements.

No gateway here: statements go straight to PostgreSQL (the service role), once as written and
once rewritten, and the rewritten results must keep the shape and types of the originals
while no classified value comes back in clear.
"""

# ruff: noqa: S608  # statements are built from values read back from the test database

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from harness import EhrPostgres
from phigate.policy.rewrite import RewriteResult, rewrite
from rewritecat import EHR_RULES, MemCatalog, catalog_from_db

pytestmark = pytest.mark.integration

KEY = "'rewrite-test-key-0123456789abcdef'"


@pytest.fixture(scope="module")
def conn(pg: EhrPostgres) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg.service_dsn(), autocommit=True) as c:
        yield c


@pytest.fixture(scope="module")
def catalog(conn: psycopg.Connection[Any]) -> MemCatalog:
    return catalog_from_db(conn, EHR_RULES)


@pytest.fixture(scope="module")
def clear(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Clear values straight from the database: what must never come back rewritten."""
    rows = conn.execute("SELECT ssn, mrn, phone, email, address FROM patients").fetchall()
    canaries: set[str] = set()
    for ssn, mrn, phone, email, address in rows:
        canaries.update((ssn, mrn, mrn.removeprefix("MRN-"), phone, email, address))
    return {"rows": rows, "canaries": canaries}


def rw(sql: str, catalog: MemCatalog) -> RewriteResult:
    r = rewrite(sql, catalog, frozenset(), KEY)
    assert r.refuse is None, r.refuse
    assert r.changed
    return r


def _texts(rows: list[tuple[Any, ...]]) -> Iterator[str]:
    for row in rows:
        for v in row:
            if v is None:
                continue
            if isinstance(v, bytes | bytearray | memoryview):
                yield bytes(v).decode("utf-8", "replace")
            else:
                yield str(v)


def assert_no_canary(rows: list[tuple[Any, ...]], canaries: set[str]) -> None:
    leaked = 0
    for text in _texts(rows):
        for c in canaries:
            if c in text:
                leaked += 1
    assert leaked == 0, f"{leaked} classified values came back in clear"  # no values in output


def run(
    conn: psycopg.Connection[Any], sql: str, binary: bool = False
) -> tuple[list[tuple[str, int]], list[tuple[Any, ...]]]:
    with conn.cursor(binary=binary) as cur:
        cur.execute(sql)
        assert cur.description is not None
        desc = [(d.name, d.type_code) for d in cur.description]
        return desc, cur.fetchall()


SHAPE_STATEMENTS = [
    "SELECT * FROM patients",
    "SELECT * FROM notes ORDER BY id",
    "TABLE patients",
    "SELECT p.*, e.reason FROM patients p JOIN encounters e ON e.patient_id = p.id",
    "WITH x AS (SELECT * FROM patients) SELECT ssn, mrn, email, date_of_birth FROM x",
    "SELECT ssn FROM patients UNION ALL SELECT reason FROM encounters",
    "SELECT e.id, l.* FROM encounters e, LATERAL (SELECT ssn, phone, last_name "
    "FROM patients p WHERE p.id = e.patient_id) l",
    "SELECT upper(ssn), ssn::bytea, md5(mrn), length(email), date_of_birth + 1 FROM patients",
    "SELECT json_agg(p) FROM patients p",
    "SELECT (SELECT max(ssn) FROM patients), count(*) FROM encounters",
    "SELECT * FROM public.patients WHERE id IN (SELECT patient_id FROM encounters) ORDER BY ssn",
    "SELECT first_name || ' ' || last_name AS n, array_agg(phone) FROM patients GROUP BY 1",
]


@pytest.mark.parametrize("sql", SHAPE_STATEMENTS)
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_same_shape_no_clear_values(
    conn: psycopg.Connection[Any],
    catalog: MemCatalog,
    clear: dict[str, Any],
    sql: str,
    binary: bool,
) -> None:
    desc0, rows0 = run(conn, sql, binary)
    assert any(c in t for t in _texts(rows0) for c in clear["canaries"])  # the test can fail
    r = rw(sql, catalog)
    desc1, rows1 = run(conn, r.sql, binary)
    assert desc1 == desc0  # names, order and types
    if "GROUP BY" not in sql:  # grouping sees masked values: groups may merge
        assert len(rows1) == len(rows0)
    assert_no_canary(rows1, clear["canaries"])


def test_whole_row_reference_is_masked(
    conn: psycopg.Connection[Any], catalog: MemCatalog, clear: dict[str, Any]
) -> None:
    # A whole-row reference to the masking subquery is an anonymous record, no longer the
    # table's row type: the one place where the rewrite changes a result column's type.
    sql = "SELECT p, p::text AS t FROM patients p"
    desc0, _ = run(conn, sql)
    desc1, rows = run(conn, rw(sql, catalog).sql)
    assert [d[0] for d in desc1] == [d[0] for d in desc0]
    assert desc1[0][1] == 2249 and desc1[1] == desc0[1]  # record; text
    assert_no_canary(rows, clear["canaries"])


def test_masks_applied(conn: psycopg.Connection[Any], catalog: MemCatalog) -> None:
    sql = (
        "SELECT id, mrn, first_name, last_name, ssn, date_of_birth, address, phone, email "
        "FROM patients ORDER BY id"
    )
    _, clear_rows = run(conn, sql)
    _, rows = run(conn, rw(sql, catalog).sql)
    pseudonyms = set()
    for c, m in zip(clear_rows, rows, strict=True):
        assert m[0] == c[0]
        assert m[1].startswith("psn_") and len(m[1]) == 20
        pseudonyms.add(m[1])
        assert m[2] == "***"
        assert m[3] == "***" + c[3][-2:]
        assert m[4] == "***" + c[4][-4:]
        assert m[5] == dt.date(c[5].year, 1, 1)
        assert m[6] is None
        assert m[7] == "***"
        assert m[8] == "***@" + c[8].split("@", 1)[1]
    assert len(pseudonyms) == len(rows)  # distinct MRNs, distinct pseudonyms
    # Stable: the same input gives the same pseudonym, so joins on it still work.
    _, again = run(conn, rw("SELECT mrn FROM patients ORDER BY id", catalog).sql)
    assert [m[1] for m in rows] == [a[0] for a in again]


def test_free_text_scrubbed(
    conn: psycopg.Connection[Any], catalog: MemCatalog, clear: dict[str, Any]
) -> None:
    sql = "SELECT body FROM notes ORDER BY id"
    _, clear_rows = run(conn, sql)
    _, rows = run(conn, rw(sql, catalog).sql)
    assert any("[PHONE]" in b for (b,) in rows)
    assert any("[MRN]" in b for (b,) in rows)
    assert_no_canary(rows, clear["canaries"])
    assert len(rows) == len(clear_rows)


def test_predicates_on_masked_columns_find_nothing(
    conn: psycopg.Connection[Any], catalog: MemCatalog, clear: dict[str, Any]
) -> None:
    ssn, mrn, phone, email, _ = clear["rows"][0]
    for sql in (
        f"SELECT id FROM patients WHERE ssn = '{ssn}'",
        f"SELECT id FROM patients p WHERE p.mrn = '{mrn}' OR p.email = '{email}'",
        f"SELECT count(*) FILTER (WHERE phone = '{phone}') AS n FROM patients HAVING true",
        f"SELECT x.id FROM (VALUES (1), (2)) x(id) WHERE EXISTS (SELECT 1 FROM patients p "
        f"WHERE p.ssn LIKE '{ssn[:6]}%')",
    ):
        _, rows0 = run(conn, sql)
        assert rows0 and rows0 != [(0,)]
        _, rows1 = run(conn, rw(sql, catalog).sql)
        assert rows1 in ([], [(0,)])


def test_parameters_are_kept(
    conn: psycopg.Connection[Any], catalog: MemCatalog, clear: dict[str, Any]
) -> None:
    ssn = clear["rows"][0][0]
    sql = "SELECT id FROM patients p WHERE p.ssn = $1 AND p.id > $2"
    r = rw(sql, catalog)
    assert r.sql.endswith(" p WHERE p.ssn = $1 AND p.id > $2")
    pgconn = conn.pgconn
    res0 = pgconn.exec_params(sql.encode(), [ssn.encode(), b"0"])
    res1 = pgconn.exec_params(r.sql.encode(), [ssn.encode(), b"0"])
    assert res0.ntuples == 1 and res1.ntuples == 0


def test_joins_still_work(conn: psycopg.Connection[Any], catalog: MemCatalog) -> None:
    for sql in (
        "SELECT p.id, e.id FROM patients p JOIN encounters e ON e.patient_id = p.id ORDER BY 1, 2",
        "SELECT p.id, m.name FROM patients p LEFT JOIN medications m USING (id) ORDER BY 1, 2",
        "SELECT count(*) FROM patients a JOIN patients b ON a.mrn = b.mrn",
        "SELECT d.icd10_code, count(DISTINCT p.id) FROM diagnoses d "
        "JOIN encounters e ON e.id = d.encounter_id JOIN patients p ON p.id = e.patient_id "
        "GROUP BY 1 ORDER BY 1",
    ):
        _, rows0 = run(conn, sql)
        _, rows1 = run(conn, rw(sql, catalog).sql)
        assert rows1 == rows0


def _copy(conn: psycopg.Connection[Any], sql: str) -> str:
    out = bytearray()
    with conn.cursor() as cur, cur.copy(sql) as copy:
        for chunk in copy:
            out += chunk
    return out.decode()


@pytest.mark.parametrize(
    "sql",
    [
        "COPY patients TO STDOUT",
        "COPY public.patients (id, ssn, email) TO STDOUT WITH (FORMAT csv, HEADER)",
        "COPY (SELECT p.ssn, n.body FROM patients p JOIN encounters e ON e.patient_id = p.id "
        "JOIN notes n ON n.encounter_id = e.id) TO STDOUT",
    ],
)
def test_copy_is_masked(
    conn: psycopg.Connection[Any], catalog: MemCatalog, clear: dict[str, Any], sql: str
) -> None:
    original = _copy(conn, sql)
    masked = _copy(conn, rw(sql, catalog).sql)
    assert masked.count("\n") == original.count("\n")
    assert any(c in original for c in clear["canaries"])
    assert_no_canary([(masked,)], clear["canaries"])
    if "HEADER" in sql:
        assert masked.splitlines()[0] == original.splitlines()[0] == "id,ssn,email"


def test_cursor_is_masked(
    conn: psycopg.Connection[Any], catalog: MemCatalog, clear: dict[str, Any]
) -> None:
    sql = "DECLARE c CURSOR FOR SELECT * FROM patients p ORDER BY p.id"
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(rw(sql, catalog).sql)
        cur.execute("FETCH 50 FROM c")
        rows = cur.fetchall()
        cur.execute("CLOSE c")
    assert len(rows) == 50
    assert_no_canary(rows, clear["canaries"])


def test_read_side_of_writes(
    conn: psycopg.Connection[Any], catalog: MemCatalog, clear: dict[str, Any]
) -> None:
    ssn = clear["rows"][0][0]
    sql = (
        "UPDATE encounters e SET reason = e.reason FROM patients p "
        f"WHERE p.id = e.patient_id AND p.ssn = '{ssn}' RETURNING e.id, p.ssn, p.mrn"
    )
    r = rw(sql, catalog)

    class Rollback(Exception):
        pass

    for text, expect_rows in ((sql, True), (r.sql, False)):
        with pytest.raises(Rollback), conn.transaction(), conn.cursor() as cur:
            cur.execute(text)
            assert (cur.rowcount > 0) is expect_rows
            raise Rollback
    # Without a predicate on a masked column the write finds its rows, RETURNING is masked.
    sql = (
        "DELETE FROM medications m USING patients p WHERE p.id = m.patient_id AND p.id < 20 "
        "RETURNING m.id, p.ssn, p.email"
    )
    for text in (sql, rw(sql, catalog).sql):
        with pytest.raises(Rollback), conn.transaction(), conn.cursor() as cur:
            cur.execute(text)
            rows = cur.fetchall()
            assert rows
            if text != sql:
                assert_no_canary(rows, clear["canaries"])
            raise Rollback


def test_refused_write_never_reaches_the_server(
    conn: psycopg.Connection[Any], catalog: MemCatalog
) -> None:
    r = rewrite("DELETE FROM patients WHERE ssn LIKE '9%' RETURNING ssn", catalog, (), KEY)
    assert r.refuse is not None and "WHERE" in r.refuse
