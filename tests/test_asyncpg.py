"""asyncpg through the gateway: prepared statements, binary results, transactions and savepoints,
executemany, COPY, and cancel on timeout. asyncpg speaks the extended protocol in binary only."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from harness import asyncpg_connect

pytestmark = pytest.mark.integration

UTC = dt.UTC


def run(
    gateway: Any, token: Any, body: Callable[[asyncpg.Connection], Awaitable[Any]], **kw: Any
) -> Any:
    """asyncio.run a coroutine with a fresh gateway connection, closed afterwards."""

    async def main() -> Any:
        conn = await asyncpg_connect(gateway, token(), **kw)
        try:
            return await body(conn)
        finally:
            await conn.close(timeout=5)

    return asyncio.run(main())


async def direct_connect(pg: Any) -> asyncpg.Connection:
    """A direct (gateway-less) connection to PostgreSQL: the source of expected values."""
    return await asyncpg.connect(
        host=pg.host,
        port=pg.port,
        user=pg.superuser,
        password=pg.superuser_password,
        database=pg.ehr_database,
        ssl=False,
    )


async def usable(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("select 'still' || ' alive'") == "still alive"


# --- prepared statements -------------------------------------------------------------------------


def test_prepared_statement_reused_many_times(gateway, token):
    async def body(conn: asyncpg.Connection) -> None:
        stmt = await conn.prepare("select $1::int * 2, $2::text || '!', $3::date + 1")
        assert [a.name for a in stmt.get_attributes()] == ["?column?", "?column?", "?column?"]
        assert [p.name for p in stmt.get_parameters()] == ["int4", "text", "date"]
        for i in range(500):
            row = await stmt.fetchrow(i, f"v{i}", dt.date(2024, 1, 1))
            assert tuple(row) == (i * 2, f"v{i}!", dt.date(2024, 1, 2))
        # fetchval / fetch on the same prepared statement
        assert await stmt.fetchval(21, "x", dt.date(2000, 2, 28)) == 42
        assert len(await stmt.fetch(1, "y", dt.date(2000, 2, 28))) == 1
        await usable(conn)

    run(gateway, token, body)


def test_many_prepared_statements_and_ehr_queries(gateway, token, pg):
    async def expected() -> list[int]:
        direct = await direct_connect(pg)
        try:
            return [
                await direct.fetchval("select count(*) from encounters where patient_id = $1", pid)
                for pid in range(1, 51)
            ]
        finally:
            await direct.close()

    want = asyncio.run(expected())

    async def body(conn: asyncpg.Connection) -> list[int]:
        by_patient = await conn.prepare("select count(*) from encounters where patient_id = $1")
        stmts = [await conn.prepare(f"select $1::int + {i}") for i in range(100)]
        for i, s in enumerate(stmts):
            assert await s.fetchval(1) == 1 + i
        return [await by_patient.fetchval(pid) for pid in range(1, 51)]

    assert run(gateway, token, body) == want
    assert sum(want) > 0


def test_statement_cache_reuse_via_fetch(gateway, token):
    async def body(conn: asyncpg.Connection) -> None:
        # asyncpg prepares implicitly and caches: the same text reuses the named statement.
        for i in range(300):
            assert await conn.fetchval("select $1::bigint + 1", i) == i + 1
        await usable(conn)

    run(gateway, token, body)


# --- binary results ------------------------------------------------------------------------------


def test_binary_results_of_several_types(gateway, token):
    async def body(conn: asyncpg.Connection) -> None:
        row = await conn.fetchrow(
            """
            select 1::int2 a, 2::int4 b, 3000000000::int8 c, 1.5::float4 d, 2.25::float8 e,
                   123.456::numeric f, true g, 'txt ✓'::text h, '2024-02-29'::date i,
                   '2024-02-29 12:00:00.5+00'::timestamptz j, '12:34:56'::time k,
                   '1 day 2 hours'::interval l, '\\xdeadbeef'::bytea m,
                   '12345678-1234-5678-1234-567812345678'::uuid n, '{"k": [1, 2]}'::jsonb o,
                   array[1, null, 3]::int4[] p, array['x', 'y']::text[] q, null::int r,
                   '192.168.0.1/24'::inet s, point(1, 2) t
            """
        )
        assert row["a"] == 1 and row["b"] == 2 and row["c"] == 3_000_000_000
        assert row["d"] == 1.5 and row["e"] == 2.25 and row["f"] == Decimal("123.456")
        assert row["g"] is True and row["h"] == "txt ✓"
        assert row["i"] == dt.date(2024, 2, 29)
        assert row["j"] == dt.datetime(2024, 2, 29, 12, 0, 0, 500000, tzinfo=UTC)
        assert row["k"] == dt.time(12, 34, 56)
        assert row["l"] == dt.timedelta(days=1, hours=2)
        assert row["m"] == b"\xde\xad\xbe\xef"
        assert row["n"] == uuid.UUID("12345678-1234-5678-1234-567812345678")
        assert json.loads(row["o"]) == {"k": [1, 2]}
        assert row["p"] == [1, None, 3] and row["q"] == ["x", "y"] and row["r"] is None
        assert str(row["s"]) == "192.168.0.1/24"
        assert tuple(row["t"]) == (1.0, 2.0)

    run(gateway, token, body)


def test_binary_parameters_round_trip(gateway, token):
    values: list[tuple[str, Any]] = [
        ("int8", 2**62),
        ("numeric", Decimal("-98765432109876543210.000000001")),
        ("text", "naïve 日本語 \U0001f600"),
        ("bytea", bytes(range(256)) * 100),
        ("timestamptz", dt.datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)),
        ("date", dt.date(1, 1, 1)),
        ("interval", dt.timedelta(microseconds=1)),
        ("int4[]", [[1, 2], [3, 4]]),
        ("text[]", ["", None, "a,b", '"q"']),
        ("bool", False),
        ("uuid", uuid.UUID(int=1)),
    ]

    async def body(conn: asyncpg.Connection) -> None:
        for pgtype, value in values:
            assert await conn.fetchval(f"select $1::{pgtype}", value) == value, pgtype
            assert await conn.fetchval(f"select $1::{pgtype} is null", None) is True

    run(gateway, token, body)


def test_binary_results_match_text_for_ehr(gateway, token, pg):
    sql = (
        "select id, patient_id, admitted_at, discharged_at, department from encounters order by id"
    )

    async def direct() -> list[tuple[Any, ...]]:
        c = await direct_connect(pg)
        try:
            return [tuple(r) for r in await c.fetch(sql)]
        finally:
            await c.close()

    async def body(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await conn.fetch(sql)]

    got = run(gateway, token, body)
    assert len(got) > 0 and got == asyncio.run(direct())


def test_large_binary_result_and_parameter(gateway, token):
    async def body(conn: asyncpg.Connection) -> None:
        rows = await conn.fetch("select g, g::float8 / 3 from generate_series(1, 100000) g")
        assert len(rows) == 100_000
        assert sum(r[0] for r in rows) == 100_000 * 100_001 // 2
        blob = bytes(range(256)) * 6000  # 1.5 MB
        assert await conn.fetchval("select $1::bytea", blob) == blob

    run(gateway, token, body)


# --- transactions --------------------------------------------------------------------------------


def test_transactions_commit_rollback_and_savepoints(gateway, token):
    async def body(conn: asyncpg.Connection) -> None:
        await conn.execute("create temp table tx (id int primary key, note text)")
        async with conn.transaction():
            await conn.execute("insert into tx values (1, 'committed')")
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await conn.execute("insert into tx values (2, 'rolled back')")
                raise RuntimeError("abort")
        assert await conn.fetchval("select count(*) from tx") == 1
        assert not conn.is_in_transaction()

        async with conn.transaction():
            await conn.execute("insert into tx values (3, 'outer')")
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():  # a savepoint
                    await conn.execute("insert into tx values (4, 'inner')")
                    await conn.execute("insert into tx values (1, 'duplicate')")
            # The outer transaction is intact after the savepoint rolled back.
            async with conn.transaction():
                await conn.execute("insert into tx values (5, 'inner kept')")
            assert conn.is_in_transaction()
        assert [r["id"] for r in await conn.fetch("select id from tx order by id")] == [1, 3, 5]

        tr = conn.transaction(isolation="repeatable_read", readonly=True)
        await tr.start()
        assert await conn.fetchval("show transaction_isolation") == "repeatable read"
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("update patients set mrn = mrn where false")
        await tr.rollback()
        await usable(conn)

    run(gateway, token, body)


def test_rollback_is_visible_to_other_sessions(gateway, token):
    async def main() -> None:
        a = await asyncpg_connect(gateway, token())
        b = await asyncpg_connect(gateway, token())
        try:
            await a.execute("select pg_advisory_lock(4242)")
            assert await b.fetchval("select pg_try_advisory_lock(4242)") is False
            tr = a.transaction()
            await tr.start()
            await a.execute("select pg_advisory_unlock(4242)")
            await a.execute("select pg_advisory_xact_lock(4343)")
            assert await b.fetchval("select pg_try_advisory_lock(4343)") is False
            await tr.rollback()  # releases the transaction-level lock
            assert await b.fetchval("select pg_try_advisory_lock(4343)") is True
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


# --- executemany and COPY ------------------------------------------------------------------------


def test_executemany_1000_rows(gateway, token):
    async def body(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "create temp table em (id int, label text, at timestamptz, amount numeric)"
        )
        base = dt.datetime(2024, 1, 1, tzinfo=UTC)
        rows = [
            (i, f"label {i}", base + dt.timedelta(minutes=i), Decimal(i) / 8) for i in range(1000)
        ]
        await conn.executemany("insert into em values ($1, $2, $3, $4)", rows)
        assert await conn.fetchval("select count(*) from em") == 1000
        got = await conn.fetchrow(
            "select sum(id), sum(amount), max(at), count(distinct label) from em"
        )
        assert tuple(got) == (499_500, Decimal(499_500) / 8, base + dt.timedelta(minutes=999), 1000)

    run(gateway, token, body)


def test_executemany_error_rolls_back_batch(gateway, token):
    async def body(conn: asyncpg.Connection) -> None:
        await conn.execute("create temp table em2 (id int primary key)")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.executemany("insert into em2 values ($1)", [(i,) for i in [*range(500), 7]])
        # executemany runs atomically: nothing of the failed batch stays.
        assert await conn.fetchval("select count(*) from em2") == 0
        await usable(conn)

    run(gateway, token, body)


def test_copy_records_to_table_and_copy_from_query(gateway, token, tmp_path):
    async def body(conn: asyncpg.Connection) -> None:
        await conn.execute("create temp table cp (id int, name text, seen date, payload bytea)")
        records = [
            (
                i,
                None if i % 9 == 0 else f"n\t{i}",
                dt.date(2020, 1, 1) + dt.timedelta(days=i % 400),
                bytes([i % 256]) * (i % 50),
            )
            for i in range(20_000)
        ]
        res = await conn.copy_records_to_table("cp", records=records)
        assert res == "COPY 20000"
        got = [tuple(r) for r in await conn.fetch("select * from cp order by id")]
        assert got == records

        out = tmp_path / "cp.csv"
        res = await conn.copy_from_query(
            "select id, name from cp where id < $1 order by id", 1000, output=str(out), format="csv"
        )
        assert res == "COPY 1000"
        lines = out.read_text().splitlines()
        assert len(lines) == 1000 and lines[0] == "0," and lines[1] == "1,n\t1"

        # copy_to_table from the file we just wrote, into a second table.
        await conn.execute("create temp table cp2 (id int, name text)")
        res = await conn.copy_to_table("cp2", source=str(out), format="csv")
        assert res == "COPY 1000"
        assert (
            await conn.fetchval(
                "select count(*) from cp2 join cp using (id)"
                " where cp2.name is not distinct from cp.name"
            )
            == 1000
        )

        # copy_from_table streaming into a coroutine sink.
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(data)

        await conn.copy_from_table("cp", output=sink, columns=["id"])
        # Heap order is PostgreSQL's business (COPY fills earlier pages' free space): compare sets.
        ids = [int(x) for x in b"".join(chunks).split(b"\n")[:-1]]
        assert len(ids) == 20_000 and sorted(ids) == list(range(20_000))

    run(gateway, token, body)


# --- cancel --------------------------------------------------------------------------------------


def test_timeout_cancels_pg_sleep_and_connection_stays_usable(gateway, token):
    async def body(conn: asyncpg.Connection) -> None:
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute("select pg_sleep(30)", timeout=1)
        assert time.monotonic() - t0 < 5
        # asyncpg sent a CancelRequest with the gateway's key: the backend is free again.
        t1 = time.monotonic()
        await usable(conn)
        assert await conn.fetchval("select 40 + 2") == 42
        assert time.monotonic() - t1 < 5

    run(gateway, token, body)


def test_timeout_cancel_does_not_hit_other_connections(gateway, token):
    async def main() -> None:
        a = await asyncpg_connect(gateway, token())
        b = await asyncpg_connect(gateway, token())
        try:
            other = asyncio.ensure_future(b.fetchval("select pg_sleep(2)::text || 'done'"))
            await asyncio.sleep(0.2)
            with pytest.raises(asyncio.TimeoutError):
                await a.fetchval("select pg_sleep(30)", timeout=0.8)
            assert await other == "done"
            await usable(a)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_wait_for_cancel_of_prepared_statement(gateway, token):
    async def body(conn: asyncpg.Connection) -> None:
        stmt = await conn.prepare("select pg_sleep($1)")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(stmt.fetchval(30.0), timeout=1)
        assert await stmt.fetchval(0.0) is None  # void
        await usable(conn)

    run(gateway, token, body)


def test_errors_carry_sqlstate(gateway, token):
    async def body(conn: asyncpg.Connection) -> None:
        with pytest.raises(asyncpg.DivisionByZeroError) as exc:
            await conn.fetch("select 1/(g-500) from generate_series(1, 1000) g")
        assert exc.value.sqlstate == "22012"
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetch("select * from no_such_table_here")
        await usable(conn)

    run(gateway, token, body)


def test_listen_notify_callback(gateway, token):
    async def main() -> None:
        a = await asyncpg_connect(gateway, token())
        b = await asyncpg_connect(gateway, token())
        got: asyncio.Queue[str] = asyncio.Queue()
        try:
            await a.add_listener("apg_chan", lambda *args: got.put_nowait(args[3]))
            await b.execute("notify apg_chan, 'ping'")
            assert await asyncio.wait_for(got.get(), timeout=5) == "ping"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
