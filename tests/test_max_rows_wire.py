"""max_rows through real drivers: a result longer than the role's cap is cut with 54000 after
exactly the cap's rows (simple and extended protocol, portals read in parts, server-side and SQL
cursors counted across their FETCHes), a transaction that saw the cut never commits as if nothing
failed, results under the cap are untouched, and the control plane hears of each cut."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from harness import asyncpg_connect, psql, psycopg_connect
from rawpg import RawConn, execute, msg, query

pytestmark = pytest.mark.integration

CAP = 5
ROWS = 40
SELECT = "select id, label from mr_items order by id"
FILTERED = "select id, label from mr_items where id > {} order by id"
UUID_IN_HINT = re.compile(r"approve request ([0-9a-f-]{36}),")

#: Both kinds of identity: the default test role sees PHI masked; "clear" sees every kind.
IDENTITIES = {"masked": ("clinicians",), "clear": ("clear",)}


class CutRecorder:
    """The native engine, recording each max_rows_exceeded request it hands the control plane."""

    def __init__(self, config_json: str) -> None:
        from phigate import _native

        self._engine = _native.Engine(config_json)
        self.cuts: list[dict[str, Any]] = []

    def take_requests(self) -> list[Any]:
        requests = self._engine.take_requests()
        self.cuts.extend(dict(r.payload) for r in requests if r.kind == "max_rows_exceeded")
        return requests

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@pytest.fixture(scope="module")
def items(pg: Any) -> None:
    setup = (
        "drop table if exists mr_items, mr_log;"  # noqa: S608  (constants)
        "create table mr_items (id int primary key, label text);"
        f"insert into mr_items select g, 'item ' || g from generate_series(1, {ROWS}) g;"
        "create table mr_log (tag text);"
        f"grant select on mr_items to {pg.service_user};"
        f"grant select, insert on mr_log to {pg.service_user};"
    )
    pg.psql(setup, dbname=pg.ehr_database)


@pytest.fixture
def capped(gateway_factory: Any, items: None) -> Iterator[tuple[Any, CutRecorder]]:
    recorders: list[CutRecorder] = []

    def engine(config_json: str) -> CutRecorder:
        recorders.append(CutRecorder(config_json))
        return recorders[0]

    gw = gateway_factory(
        engine_factory=engine,
        groups={"clear": ["clear-readers"]},
        roles={
            "gateway-tests": {"max_rows": CAP},
            "clear-readers": {
                "relations": ["public.*"],
                "operations": ["select", "insert"],
                "allow": ["catalog"],
                "see_clear": ["ssn", "mrn", "name", "dob", "address", "city", "zip", "phone",
                              "email", "free_text", "other"],
                "max_rows": CAP,
            },
        },
    )  # fmt: skip
    yield gw, recorders[0]


def logged(pg: Any, tag: str) -> int:
    query = f"select count(*) from mr_log where tag = '{tag}'"  # noqa: S608  (test tags)
    out = pg.psql(query, dbname=pg.ehr_database)
    return int(out.strip())


def assert_cut(exc: BaseException) -> str:
    """The error a cut result ends with; returns the approval request id its hint names."""
    diag = exc.diag if isinstance(exc, psycopg.Error) else None
    code = diag.sqlstate if diag is not None else getattr(exc, "sqlstate", None)
    message = diag.message_primary if diag is not None else str(getattr(exc, "message", exc))
    hint = diag.message_hint if diag is not None else getattr(exc, "hint", None)
    assert code == "54000"
    assert message == (
        f"result cut after {CAP} rows: your role allows at most {CAP} rows per result (max_rows)"
    )
    found = UUID_IN_HINT.search(hint or "")
    assert found, hint
    return str(uuid.UUID(found.group(1)))


def wait_for_cuts(recorder: CutRecorder, n: int) -> list[dict[str, Any]]:
    for _ in range(200):
        if len(recorder.cuts) >= n:
            break
        asyncio.run(asyncio.sleep(0.02))
    return recorder.cuts


@pytest.mark.parametrize("who", sorted(IDENTITIES))
def test_extended_protocol_cut_in_a_transaction_commits_nothing(
    capped: Any, token: Any, pg: Any, who: str
) -> None:
    gw, recorder = capped
    tag = f"ext-{who}"
    with psycopg_connect(gw, token(groups=IDENTITIES[who]), autocommit=False) as c:
        c.execute("insert into mr_log values (%s)", (tag,))
        cur = c.cursor()
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as err:
            cur.execute(FILTERED.format("%s"), (0,))
        request = assert_cut(err.value)
        # The transaction failed as PostgreSQL would have failed it.
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("select 1")
        c.rollback()
        # A result under the cap is untouched, and the session goes on.
        rows = c.execute(SELECT + " limit %s", (CAP,)).fetchall()
        assert rows == [(i, f"item {i}") for i in range(1, CAP + 1)]
    assert logged(pg, tag) == 0
    cut = next(r for r in wait_for_cuts(recorder, 1) if r["request"] == request)
    assert cut["rows_sent"] == CAP and cut["protocol"] == "extended"
    assert cut["sql"] == FILTERED.format("$1")
    assert cut["parameters"] == [{"format": 0, "value": "0"}] or cut["parameters"][0]["format"] == 1
    assert cut["parameter_hashes"] is not None and cut["session"] and cut["stmt"] >= 1


def test_extended_cut_then_commit_rolls_back_the_transaction(
    capped: Any, token: Any, pg: Any
) -> None:
    gw, _ = capped
    with psycopg_connect(gw, token(), autocommit=False) as c:
        c.execute("insert into mr_log values ('ext-commit')")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            c.execute(SELECT)
        c.commit()  # PostgreSQL answers ROLLBACK: the transaction had failed
    assert logged(pg, "ext-commit") == 0


@pytest.mark.parametrize("who", sorted(IDENTITIES))
def test_simple_protocol_cut_with_psql_commits_nothing(
    capped: Any, token: Any, pg: Any, who: str
) -> None:
    gw, recorder = capped
    tag = f"simple-{who}"
    script = (
        "begin;\n"
        f"insert into mr_log values ('{tag}');\n"
        f"{SELECT};\n"
        "commit;\n"
        f"select count(*) from mr_items where id <= {CAP};\n"
    )
    r = psql(gw, token(groups=IDENTITIES[who]), input=script, args=["-v", "ON_ERROR_STOP=0"])
    assert f"result cut after {CAP} rows" in r.stderr, r.stderr
    # The rows before the cut were not printed as a result (psql discards an errored result).
    assert "item 6" not in r.stdout
    assert logged(pg, tag) == 0
    assert r.stdout.strip().splitlines()[-1].strip() == str(CAP)
    cuts = [c for c in wait_for_cuts(recorder, 1) if c["protocol"] == "simple"]
    assert cuts and cuts[-1]["sql"] == SELECT + ";" and cuts[-1]["parameters"] is None


def test_server_side_cursor_counts_across_fetches(capped: Any, token: Any, pg: Any) -> None:
    gw, _ = capped
    with psycopg_connect(gw, token(), autocommit=False) as c:
        c.execute("insert into mr_log values ('named')")
        cur = c.cursor(name="mr_named")
        cur.execute(SELECT)
        assert [r[0] for r in cur.fetchmany(3)] == [1, 2, 3]
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as err:
            cur.fetchmany(3)  # rows 4 and 5 are within the cap, the sixth is not
        assert_cut(err.value)
        c.rollback()
    assert logged(pg, "named") == 0


def test_sql_declare_and_fetch_count_across_the_cursor(capped: Any, token: Any) -> None:
    gw, _ = capped
    with psycopg_connect(gw, token(), autocommit=False) as c:
        c.execute(f"declare mr_sql cursor for {SELECT}")
        assert len(c.execute("fetch 4 from mr_sql").fetchall()) == 4
        c.execute("move 10 in mr_sql")  # skipped rows are not sent, so not counted
        assert [r[0] for r in c.execute("fetch 1 from mr_sql").fetchall()] == [15]
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            c.execute("fetch 2 from mr_sql")
        c.rollback()
        # DECLARE again: a new cursor's count starts at 0.
        c.execute(f"declare mr_sql cursor for {SELECT}")
        assert len(c.execute("fetch 5 from mr_sql").fetchall()) == CAP
        c.rollback()


def test_asyncpg_prepared_fetch_and_portal_cursor(capped: Any, token: Any, pg: Any) -> None:
    gw, _ = capped

    async def run() -> None:
        conn = await asyncpg_connect(gw, token())
        try:
            stmt = await conn.prepare(SELECT)
            with pytest.raises(asyncpg.exceptions.ProgramLimitExceededError) as err:
                await stmt.fetch()
            assert_cut(err.value)
            under = await conn.prepare(SELECT + " limit $1")
            assert [r["id"] for r in await under.fetch(CAP)] == list(range(1, CAP + 1))
            # A portal read two rows per Execute is counted across its Executes.
            seen: list[int] = []
            with pytest.raises(asyncpg.exceptions.ProgramLimitExceededError):
                async with conn.transaction():
                    await conn.execute("insert into mr_log values ('asyncpg')")
                    async for row in conn.cursor(SELECT, prefetch=2):
                        seen.append(row["id"])
            assert seen == [1, 2, 3, 4]  # rows 5 came with the cut's Execute, which failed
            assert await conn.fetchval("select 1") == 1
        finally:
            await conn.close()

    asyncio.run(run())
    assert logged(pg, "asyncpg") == 0


def test_a_huge_result_is_stopped_and_the_session_goes_on(capped: Any, token: Any) -> None:
    gw, _ = capped
    with psycopg_connect(gw, token()) as c:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as err:
            c.execute("select g from generate_series(1, 50000000) g")
        assert_cut(err.value)
        # The cancel sent upstream for the cut never reaches a later statement.
        for i in range(20):
            assert c.execute("select %s::int", (i,)).fetchone() == (i,)
        assert c.execute("select count(*) from generate_series(1, 1000)").fetchone() == (1000,)


def test_executes_on_a_sql_cursors_portal_count_across_the_cursor(
    capped: Any, token: Any
) -> None:
    # A SQL cursor is also a protocol portal: Executes on it by name are its FETCHes, and
    # cannot start the count over.
    gw, _ = capped
    c = RawConn(gw.host, gw.port)
    c.start_tls(str(gw.ca_file), alpn=["postgresql"])
    out = c.login(token(groups=IDENTITIES["clear"]))
    assert out[-1].tag == "Z", [m.fields() for m in out if m.tag == "E"]
    for sql in ("begin", "declare c cursor for " + SELECT):
        c.send(query(sql))
        assert not [m for m in c.read_until("Z") if m.tag == "E"]
    rows, errors = 0, []
    for _ in range(4):  # 4 x 3 rows asked, the cap is 5
        c.send(execute("c", 3) + msg(b"S"))
        out = c.read_until("Z")
        rows += sum(1 for m in out if m.tag == "D")
        errors += [m.sqlstate for m in out if m.tag == "E"]
    assert rows == CAP
    assert errors and errors[0] == "54000"
    c.close()


def test_cursor_statements_beside_others_are_refused_under_a_cap(capped: Any, token: Any) -> None:
    gw, _ = capped
    out = psql(gw, token(groups=IDENTITIES["clear"]),
               "declare c cursor with hold for " + SELECT + "; fetch 10 c")  # fmt: skip
    assert out.returncode != 0
    assert "must each be sent as a statement of its own" in out.stderr
    assert "0A000" in psql(gw, token(groups=IDENTITIES["clear"]), "fetch 1 c; select 1",
                           args=["-v", "VERBOSITY=verbose"]).stderr  # fmt: skip


def test_copy_to_under_a_cap_without_approvals_is_refused(capped: Any, token: Any) -> None:
    # COPY data is not counted against max_rows, so it needs an approval; this gateway has no
    # [approvals], so it is refused, and says how to enable them.
    gw, _ = capped
    with psycopg_connect(gw, token(groups=IDENTITIES["masked"])) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err, \
                conn.cursor().copy("copy mr_items to stdout") as copy:
            list(copy)
        assert "approvals are not enabled" in (err.value.diag.message_primary or "")
        assert "[approvals]" in (err.value.diag.message_hint or "")
