"""psycopg 3 through the gateway: parameters, pipelines, COPY, LISTEN/NOTIFY while idle,
server-side cursors, GUCs reported by ParameterStatus, errors mid-result, large statements and
results, binary results, driver cancel."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerr
from psycopg.types.json import Json, Jsonb

from harness import psycopg_connect

pytestmark = pytest.mark.integration


@pytest.fixture
def conn(gateway, token) -> Iterator[psycopg.Connection]:
    with psycopg_connect(gateway, token()) as c:
        yield c


@pytest.fixture
def connect(gateway, token) -> Iterator[Callable[..., psycopg.Connection]]:
    opened: list[psycopg.Connection] = []

    def make(**kw: Any) -> psycopg.Connection:
        c = psycopg_connect(gateway, token(), **kw)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


def usable(c: psycopg.Connection) -> None:
    """The connection answers a fresh query correctly after whatever happened before."""
    assert c.execute("select 'still' || ' alive'").fetchone() == ("still alive",)


# --- parameters ----------------------------------------------------------------------------------

UTC = dt.UTC
PARAMS: list[tuple[str, Any, str]] = [
    ("int", 42, "integer"),
    ("bigint", 2**62 + 7, "bigint"),
    ("negative", -(2**31), "integer"),
    ("float", 1.25e-7, "double precision"),
    ("numeric", Decimal("12345678901234567890.123456789"), "numeric"),
    ("text", "plain text", "text"),
    ("unicode", "naïve café ✓ 日本語 \U0001f600", "text"),
    ("quotes", 'it\'s a "quoted" \\ backslash; drop table x; --', "text"),
    ("bool", True, "boolean"),
    ("date", dt.date(1999, 12, 31), "date"),
    (
        "timestamptz",
        dt.datetime(2024, 2, 29, 13, 45, 7, 123456, tzinfo=UTC),
        "timestamp with time zone",
    ),
    ("timestamp", dt.datetime(2001, 1, 1, 0, 0, 1), "timestamp without time zone"),
    ("time", dt.time(23, 59, 58, 999), "time without time zone"),
    ("interval", dt.timedelta(days=3, seconds=7, microseconds=5), "interval"),
    ("bytea", bytes(range(256)) * 4, "bytea"),
    ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678"), "uuid"),
    ("int_array", [1, 2, None, 4], "integer[]"),
    ("text_array", ["a", "b,c", "", None, 'd"e'], "text[]"),
    ("nested_array", [[1, 2], [3, 4]], "integer[]"),
]


@pytest.mark.parametrize("value,pgtype", [p[1:] for p in PARAMS], ids=[p[0] for p in PARAMS])
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_parameter_round_trip(conn, value, pgtype, binary):
    cur = conn.cursor(binary=binary)
    row = cur.execute(
        f"select %s::{pgtype}, pg_typeof(%s::{pgtype})::text", (value, value)
    ).fetchone()
    assert row == (value, pgtype)
    # Untyped too, where the server can infer the type from psycopg's dumper.
    if pgtype not in ("text", "integer", "integer[]", "text[]"):
        assert cur.execute("select %s", (value,)).fetchone() == (value,)


def test_json_and_jsonb_parameters(conn):
    doc = {"a": [1, 2, {"b": None}], "s": "ünï", "n": 1.5, "t": True}
    row = conn.execute(
        "select %s::json, %s, %s::jsonb -> 'a' -> 2, jsonb_typeof(%s)",
        (Json(doc), Jsonb(doc), Jsonb(doc), Jsonb(doc)),
    ).fetchone()
    assert row == (doc, doc, {"b": None}, "object")


def test_null_parameters(conn):
    row = conn.execute(
        "select %s::int is null, %s::text is null, %s::date, coalesce(%s::bytea, 'x'::bytea)",
        (None, None, None, None),
    ).fetchone()
    assert row == (True, True, None, b"x")


def test_parameters_in_where_clause_against_ehr(conn, pg):
    with psycopg.connect(pg.dsn(pg.ehr_database)) as direct:
        (expected,) = direct.execute(
            "select count(*) from encounters where admitted_at >= %s and department = any(%s)",
            (dt.datetime(2020, 1, 1, tzinfo=UTC), ["Cardiology", "Oncology"]),
        ).fetchone()
    (got,) = conn.execute(
        "select count(*) from encounters where admitted_at >= %s and department = any(%s)",
        (dt.datetime(2020, 1, 1, tzinfo=UTC), ["Cardiology", "Oncology"]),
    ).fetchone()
    assert got == expected


def test_prepared_statement_reuse(connect):
    c = connect(prepare_threshold=0)  # server-side prepare from the first execution
    for i in range(50):
        assert c.execute("select %s::int * 2, %s::text", (i, f"v{i}")).fetchone() == (
            i * 2,
            f"v{i}",
        )
    c.execute("deallocate all")
    usable(c)


# --- pipeline mode -------------------------------------------------------------------------------


def test_pipeline_several_statements(conn):
    conn.execute("create temp table pipe_ok (x int)")
    with conn.pipeline():
        curs = [conn.execute("select %s::int + 1", (i,)) for i in range(20)]
        with conn.cursor() as cur:
            cur.executemany("insert into pipe_ok values (%s)", [(i,) for i in range(100)])
        total = conn.execute("select count(*), sum(x) from pipe_ok")
    assert [c.fetchone() for c in curs] == [(i + 1,) for i in range(20)]
    assert total.fetchone() == (100, 4950)


# PostgreSQL flushes an ErrorResponse at once, and psycopg raises errors as soon as it reads
# them, even from a later execute(): the failing statement sleeps first so that every statement
# is queued before its error can arrive, whatever the timing (directly or through the gateway).
SLOW_FAILURE = "select pg_sleep(0.3), 1/floor(random())::int"


def _pipeline_with_error(c: psycopg.Connection) -> dict[str, Any]:
    """Run a pipeline whose second statement fails; report what the client observed."""
    c.execute("create temp table if not exists pipe_t (x int)")
    c.execute("truncate pipe_t")
    seen: dict[str, Any] = {}
    with pytest.raises(pgerr.DivisionByZero), c.pipeline() as p:
        first = c.execute("insert into pipe_t values (1) returning x")
        c.execute(SLOW_FAILURE)
        third = c.execute("insert into pipe_t values (3)")
        fourth = c.execute("select 4")
        try:
            p.sync()
        except psycopg.Error as exc:
            seen["sync_error"] = type(exc).__name__
        seen["first"] = first.fetchone()
        for name, cur in (("third", third), ("fourth", fourth)):
            try:
                cur.fetchone()
                seen[name] = "ok"
            except psycopg.Error as exc:
                seen[name] = type(exc).__name__
        # A statement after the aborted sync point runs normally.
        seen["after_sync"] = c.execute("select 5").fetchone()
        c.execute("select 1/0")  # and a second failure at pipeline exit
    seen["rows"] = c.execute("select count(*) from pipe_t").fetchone()
    return seen


def test_pipeline_error_in_the_middle_behaves_like_postgres(conn, pg):
    got = _pipeline_with_error(conn)
    assert got["sync_error"] == "DivisionByZero"
    assert got["third"] != "ok" and got["fourth"] != "ok"  # aborted, not silently run
    assert got["after_sync"] == (5,)
    with psycopg.connect(pg.dsn(pg.ehr_database), autocommit=True) as direct:
        assert got == _pipeline_with_error(direct)
    usable(conn)


def _pipeline_aborted(c: psycopg.Connection) -> list[str]:
    seen: list[str] = []
    try:
        with c.pipeline():
            c.execute("select 1")
            c.execute(SLOW_FAILURE)
            later = c.execute("select 2")
            try:
                later.fetchone()
                seen.append("later: ok")
            except psycopg.Error as exc:
                seen.append(f"later: {type(exc).__name__}")
            c.execute("select 3")  # queued behind the failed statement, before any Sync
    except psycopg.Error as exc:
        seen.append(f"exit: {type(exc).__name__}")
    return seen


def test_pipeline_aborted_error_type(conn, pg):
    got = _pipeline_aborted(conn)
    assert got == ["later: DivisionByZero", "exit: PipelineAborted"]
    with psycopg.connect(pg.dsn(pg.ehr_database), autocommit=True) as direct:
        assert got == _pipeline_aborted(direct)
    usable(conn)


# --- COPY ----------------------------------------------------------------------------------------


def test_copy_to_stdout_rows_match_query(conn):
    cur = conn.cursor()
    rows = []
    with cur.copy(
        "copy (select id, patient_id, department from encounters order by id) to stdout"
    ) as cp:
        cp.set_types(["int8", "int8", "text"])
        rows = list(cp.rows())
    expected = conn.execute(
        "select id, patient_id, department from encounters order by id"
    ).fetchall()
    assert rows == expected and len(rows) > 0


def test_copy_from_stdin_rows_and_blocks(conn):
    conn.execute("create temp table copy_in (id int, label text, amount numeric, seen date)")
    cur = conn.cursor()
    n = 50_000
    with cur.copy("copy copy_in (id, label, amount, seen) from stdin") as cp:
        for i in range(n):
            cp.write_row(
                (i, None if i % 10 == 0 else f"row\t{i}\n", Decimal(i) / 4, dt.date(2020, 1, 1))
            )
    assert cur.rowcount == n
    row = conn.execute(
        "select count(*), sum(id), count(label), sum(amount), count(distinct seen) from copy_in"
    ).fetchone()
    assert row == (n, n * (n - 1) // 2, n - n // 10, Decimal(n * (n - 1) // 2) / 4, 1)
    # Raw blocks, larger than any single network read.
    with cur.copy("copy copy_in (id, label) from stdin") as cp:
        cp.write("".join(f"{i}\tblock\n" for i in range(n, n + 30_000)))
    assert conn.execute("select count(*) from copy_in where label = 'block'").fetchone() == (
        30_000,
    )


def test_copy_binary_round_trip(conn):
    conn.execute("create temp table copy_bin (id int8, payload bytea, at timestamptz)")
    data = [
        (i, os.urandom(i % 300), dt.datetime(2024, 1, 1, tzinfo=UTC) + dt.timedelta(seconds=i))
        for i in range(5000)
    ]
    cur = conn.cursor()
    with cur.copy("copy copy_bin from stdin (format binary)") as cp:
        cp.set_types(["int8", "bytea", "timestamptz"])
        for r in data:
            cp.write_row(r)
    with cur.copy("copy (select * from copy_bin order by id) to stdout (format binary)") as cp:
        cp.set_types(["int8", "bytea", "timestamptz"])
        back = list(cp.rows())
    assert back == data


def test_copy_from_error_leaves_connection_usable(conn):
    conn.execute("create temp table copy_bad (id int)")
    with (
        pytest.raises(pgerr.InvalidTextRepresentation),
        conn.cursor().copy("copy copy_bad from stdin") as cp,
    ):
        cp.write("1\n2\nthree\n4\n")
    usable(conn)
    assert conn.execute("select count(*) from copy_bad").fetchone() == (0,)


def test_copy_aborted_by_client(conn):
    conn.execute("create temp table copy_abort (id int)")

    class Stop(Exception):
        pass

    with pytest.raises(Stop), conn.cursor().copy("copy copy_abort from stdin") as cp:
        cp.write_row((1,))
        raise Stop  # psycopg sends CopyFail
    usable(conn)
    assert conn.execute("select count(*) from copy_abort").fetchone() == (0,)


# --- LISTEN/NOTIFY -------------------------------------------------------------------------------


def test_notify_arrives_while_listener_is_idle(connect):
    listener, sender = connect(), connect()
    listener.execute("listen phigate_events")
    got: list[psycopg.Notify] = []

    def send_later() -> None:
        time.sleep(0.3)  # the listener is already blocked in notifies(), not in a query
        sender.execute("notify phigate_events, 'hello-1'")
        sender.execute("select pg_notify('phigate_events', 'hello-2')")

    t = threading.Thread(target=send_later)
    t.start()
    t0 = time.monotonic()
    for n in listener.notifies(timeout=5, stop_after=2):
        got.append(n)
    t.join()
    assert [(n.channel, n.payload) for n in got] == [
        ("phigate_events", "hello-1"),
        ("phigate_events", "hello-2"),
    ]
    assert time.monotonic() - t0 < 3, "notification was held back until a timeout"
    usable(listener)


def test_notify_delivered_without_polling_query(connect):
    """A notification sent while nobody reads must be waiting when the listener next looks."""
    listener, sender = connect(), connect()
    listener.execute("listen later_channel")
    sender.execute("notify later_channel, 'queued'")
    time.sleep(0.2)
    got = list(listener.notifies(timeout=3, stop_after=1))
    assert [(n.channel, n.payload) for n in got] == [("later_channel", "queued")]


def test_notify_large_payload_and_many(connect):
    listener, sender = connect(), connect()
    listener.execute("listen bulk")
    payload = "p" * 7000  # close to the 8000-byte payload limit
    with sender.transaction():
        for i in range(200):
            sender.execute("select pg_notify('bulk', %s)", (f"{i}:{payload}",))
    got = list(listener.notifies(timeout=5, stop_after=200))
    assert [n.payload.split(":")[0] for n in got] == [str(i) for i in range(200)]
    assert all(n.payload.endswith(payload) for n in got)


# --- server-side cursors -------------------------------------------------------------------------


def test_named_cursor_iterates_100k_rows(connect):
    c = connect(autocommit=False)
    with c.cursor(name="big_scan") as cur:
        cur.itersize = 5000
        cur.execute("select g, g::text from generate_series(1, 100000) g")
        count = total = 0
        for g, s in cur:
            assert s == str(g)
            count += 1
            total += g
    c.commit()
    assert (count, total) == (100_000, 100_000 * 100_001 // 2)


def test_named_cursor_fetchmany_and_scroll(connect):
    c = connect(autocommit=False)
    with c.cursor(name="pages", scrollable=True) as cur:
        cur.execute("select g from generate_series(1, 100000) g")
        seen = 0
        total = 0
        while True:
            batch = cur.fetchmany(7777)
            if not batch:
                break
            seen += len(batch)
            total += sum(r[0] for r in batch)
        assert (seen, total) == (100_000, 100_000 * 100_001 // 2)
        cur.scroll(10, mode="absolute")
        assert cur.fetchone() == (11,)
    c.rollback()
    with c.cursor(name="withhold", withhold=True) as cur:
        cur.execute("select g from generate_series(1, 1000) g")
        c.commit()  # a WITH HOLD cursor survives the commit
        assert len(cur.fetchall()) == 1000


# --- GUCs and ParameterStatus --------------------------------------------------------------------


def test_set_reports_parameter_status(connect):
    c = connect(application_name="initial-app")
    assert c.info.parameter_status("application_name") == "initial-app"
    c.execute("set TimeZone = 'Asia/Kolkata'")
    assert c.info.parameter_status("TimeZone") == "Asia/Kolkata"
    c.execute("set application_name = 'agent-run-7'")
    assert c.info.parameter_status("application_name") == "agent-run-7"
    assert c.execute("show application_name").fetchone() == ("agent-run-7",)
    # The session actually uses the zone: timestamptz output is converted server-side.
    row = c.execute("select '2024-01-01 00:00:00+00'::timestamptz::text").fetchone()
    assert row == ("2024-01-01 05:30:00+05:30",)
    c.execute("select set_config('TimeZone', 'America/New_York', false)")
    assert c.info.parameter_status("TimeZone") == "America/New_York"
    c.execute("reset application_name")
    assert c.info.parameter_status("application_name") == "initial-app"


def test_rolled_back_set_reports_old_value(connect):
    c = connect(autocommit=False)
    c.execute("set TimeZone = 'UTC'")
    c.commit()
    c.execute("set TimeZone = 'Europe/Paris'")
    assert c.info.parameter_status("TimeZone") == "Europe/Paris"
    c.rollback()
    assert c.info.parameter_status("TimeZone") == "UTC"
    c.execute("set local DateStyle = 'SQL, DMY'")
    assert c.info.parameter_status("DateStyle") == "SQL, DMY"
    c.commit()
    assert c.info.parameter_status("DateStyle") == "ISO, MDY"


def test_startup_reports_standard_parameters(conn):
    info = conn.info
    assert info.parameter_status("server_encoding") == "UTF8"
    assert info.parameter_status("client_encoding") == "UTF8"
    assert info.parameter_status("integer_datetimes") == "on"
    assert info.parameter_status("standard_conforming_strings") == "on"
    assert info.server_version >= 140000


# --- errors mid-result ---------------------------------------------------------------------------


def test_error_mid_result(conn):
    with pytest.raises(pgerr.DivisionByZero):
        conn.execute("select 1/(g-500) from generate_series(1, 1000) g").fetchall()
    usable(conn)


def test_error_mid_result_binary_and_named_cursor(connect):
    c = connect(autocommit=False)
    with pytest.raises(pgerr.DivisionByZero):
        c.cursor(binary=True).execute("select 1/(g-50000) from generate_series(1, 100000) g")
    c.rollback()
    with pytest.raises(pgerr.DivisionByZero), c.cursor(name="boom") as cur:
        cur.execute("select 1/(g-5000) from generate_series(1, 10000) g")
        for _ in cur:
            pass
    c.rollback()
    usable(c)


def test_error_in_transaction_then_rollback(connect):
    c = connect(autocommit=False)
    c.execute("select 1")
    with pytest.raises(pgerr.UniqueViolation):
        c.execute("create temp table u (x int primary key); insert into u values (1), (1)")
    with pytest.raises(pgerr.InFailedSqlTransaction):
        c.execute("select 1")
    c.rollback()
    usable(c)


def test_notice_messages_are_delivered(conn):
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    conn.execute("do $$ begin raise notice 'first %', 1; raise warning 'second'; end $$")
    assert notices == ["first 1", "second"]


# --- large statements and results ----------------------------------------------------------------


def test_statement_larger_than_1mb_literal(conn):
    big = "".join(chr(0x41 + i % 26) for i in range(1_500_000))
    row = conn.execute(f"select length('{big}'), md5('{big}'), '{big}'").fetchone()  # noqa: S608
    assert row is not None
    assert row[0] == 1_500_000
    assert row[1] == hashlib.md5(big.encode()).hexdigest()  # noqa: S324
    assert row[2] == big


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_bytea_parameter_larger_than_1mb(conn, binary):
    blob = os.urandom(1_500_000)
    row = (
        conn.cursor(binary=binary)
        .execute("select %b, length(%b), md5(%b)", (blob, blob, blob))
        .fetchone()
    )
    assert row is not None
    assert bytes(row[0]) == blob
    assert row[1] == len(blob)
    assert row[2] == hashlib.md5(blob).hexdigest()  # noqa: S324


def test_large_text_parameter_in_pipeline(conn):
    text = "ü" * 800_000  # 1.6 MB of UTF-8
    with conn.pipeline():
        a = conn.execute("select octet_length(%s)", (text,))
        b = conn.execute("select %s = repeat('ü', 800000)", (text,))
    assert a.fetchone() == (1_600_000,)
    assert b.fetchone() == (True,)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_result_of_100k_rows(conn, binary):
    rows = (
        conn.cursor(binary=binary)
        .execute("select g, g * 2::bigint, md5(g::text) from generate_series(1, 100000) g")
        .fetchall()
    )
    assert len(rows) == 100_000
    assert sum(r[0] for r in rows) == 100_000 * 100_001 // 2
    assert sum(r[1] for r in rows) == 100_000 * 100_001
    assert rows[12344][2] == hashlib.md5(b"12345").hexdigest()  # noqa: S324
    assert [r[0] for r in rows] == list(range(1, 100_001))


def test_wide_result_rows(conn):
    rows = conn.execute(
        "select g, repeat(chr(65 + g % 26), 100000) from generate_series(0, 59) g"
    ).fetchall()
    assert len(rows) == 60
    assert all(len(s) == 100_000 and s[0] == chr(65 + g % 26) for g, s in rows)


# --- binary results ------------------------------------------------------------------------------


def test_binary_results_of_many_types(conn):
    cur = conn.cursor(binary=True)
    row = cur.execute(
        """
        select 1::int2, 2::int4, 3::int8, 1.5::float4, 2.25::float8, 123.456::numeric,
               true, 'txt'::text, 'vc'::varchar, '2024-02-29'::date,
               '2024-02-29 12:00:00+00'::timestamptz, '12:34:56'::time,
               '1 day 2 hours'::interval, '\\xdeadbeef'::bytea,
               '12345678-1234-5678-1234-567812345678'::uuid,
               '{"k": [1, 2]}'::jsonb, array[1, 2, 3]::int4[], array['x', null]::text[],
               null::int
        """
    ).fetchone()
    assert row == (
        1,
        2,
        3,
        1.5,
        2.25,
        Decimal("123.456"),
        True,
        "txt",
        "vc",
        dt.date(2024, 2, 29),
        dt.datetime(2024, 2, 29, 12, tzinfo=UTC),
        dt.time(12, 34, 56),
        dt.timedelta(days=1, hours=2),
        b"\xde\xad\xbe\xef",
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        {"k": [1, 2]},
        [1, 2, 3],
        ["x", None],
        None,
    )
    assert cur.pgresult is not None and cur.pgresult.fformat(0) == 1  # really binary


def test_binary_results_from_ehr_match_text(conn):
    sql = (
        "select id, patient_id, admitted_at, discharged_at, department from encounters order by id"
    )
    text_rows = conn.cursor().execute(sql).fetchall()
    bin_rows = conn.cursor(binary=True).execute(sql).fetchall()
    assert len(bin_rows) > 0 and bin_rows == text_rows


# --- cancel --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["cancel_safe", "cancel"])
def test_driver_cancel_reaches_the_backend(connect, method):
    """cancel() is libpq's PQcancel (plaintext CancelRequest); cancel_safe() is libpq 17's
    PQcancelBlocking, which honours sslmode and sends the CancelRequest inside TLS, then waits for
    the server to close the connection. Both must report success, not just happen to work."""
    c = connect()
    bystander = connect()
    cancel_errors: list[BaseException] = []

    def do_cancel() -> None:
        try:
            getattr(c, method)()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            cancel_errors.append(exc)

    timer = threading.Timer(0.5, do_cancel)
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(pgerr.QueryCanceled):
            c.execute("select pg_sleep(30)")
    finally:
        timer.join(10)
    assert time.monotonic() - t0 < 10
    assert not cancel_errors, f"{method}() raised: {cancel_errors[0]}"
    usable(c)
    usable(bystander)
