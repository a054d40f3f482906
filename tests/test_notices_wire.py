"""What masked agents are told through real drivers: a NOTICE (SQLSTATE 01M01) naming the masked
columns of each relation a result carries, once per relation and session by default, with every
result for `masking_notices = "always"`, never for "off", a clear role or a result with no masked
column; right before the result, in the simple and the extended protocol and in pipelines.
`SHOW phigate.masking` lists the identity's masked columns for every role, in and out of
transactions, through psycopg, asyncpg and psql."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from harness import GatewayFactory, RunningGateway, asyncpg_connect, psql, psycopg_connect
from phigate.dev.demo import DEMO_PHI_COLUMNS, demo_masking, merge_config
from rawpg import SYNC, RawConn, bind, execute, parse, query, tags

pytestmark = pytest.mark.integration

GROUPS = {"agents": ["agent"], "loud": ["loud"], "quiet": ["quiet"], "clinicians": ["clinician"]}
READ = {"relations": ["public.*"], "operations": ["select"], "allow": ["prepare"]}
ROLES = {
    "agent": READ,
    "loud": {**READ, "masking_notices": "always"},
    "quiet": {**READ, "masking_notices": "off"},
    "clinician": READ,  # demo_masking gives it every kind in clear
}
HINT = "SHOW phigate.masking lists every column masked for you."
SHOW_COLUMNS = ["relation", "column_name", "kind", "mask"]
# Every masked column of the demo's patients, with the start of how its mask is explained.
PATIENTS_WORDS = [
    "mrn (pseudonym: psn_ + 16 hex digits, the same value always gives the same pseudonym, so "
    "joins and GROUP BY still work)",
    "first_name (pseudonym:", "last_name (pseudonym:",
    "ssn (partial: only the last 4 characters shown",
    "date_of_birth (year: shown as January 1 of the birth year)",
    "address (redact: every value shown as ***)", "city (redact:", "zip (zip3:",
    "phone (partial: only the last 4 characters shown", "email (email_domain:",
]  # fmt: skip
SHOW_ROWS = sorted(
    (f"{schema}.{table}", column, rule["kind"], rule["mask"])
    for schema, table, column in (k.split(".") for k in DEMO_PHI_COLUMNS)
    for rule in [DEMO_PHI_COLUMNS[f"{schema}.{table}.{column}"]]
)


@pytest.fixture(scope="module")
def gw(
    pg: Any, dev_issuer: Any, dev_cert: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("notices")
    key = tmp / "pseudonym.key"
    key.write_bytes(secrets.token_bytes(32))
    os.chmod(key, 0o600)
    factory = GatewayFactory(pg, dev_issuer, dev_cert, tmp)
    try:
        # Plaintext allowed too: the raw-protocol test reads the messages' order.
        yield factory(require_tls=False, **merge_config(
            demo_masking(key), {"groups": GROUPS, "roles": ROLES}))  # fmt: skip
    finally:
        factory.stop_all()


class Notices:
    """psycopg's notice handler: (sqlstate, message, hint) of every notice."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.seen: list[tuple[str | None, str | None, str | None]] = []
        conn.add_notice_handler(
            lambda d: self.seen.append((d.sqlstate, d.message_primary, d.message_hint))
        )

    def take(self) -> list[str]:
        """The masked relations named since the last call (checking each notice's shape)."""
        out = []
        for sqlstate, message, hint in self.seen:
            assert sqlstate == "01M01" and hint == HINT and message is not None
            prefix = "phigate masked columns of "
            assert message.startswith(prefix)
            out.append(message[len(prefix):].split(" ", 1)[0])
        self.seen.clear()
        return out


def connect(gw: RunningGateway, token: Any, group: str) -> psycopg.Connection[Any]:
    return psycopg_connect(gw, token(sub=f"notices-{group}", groups=(group,)))


def test_first_mode_tells_each_relation_once_per_session(gw: RunningGateway, token: Any) -> None:
    with connect(gw, token, "agents") as conn:
        notices = Notices(conn)
        conn.execute("SELECT * FROM patients LIMIT 2").fetchall()
        message = notices.seen[0][1]
        assert notices.take() == ["public.patients"]
        assert message is not None
        for words in PATIENTS_WORDS:
            assert words in message, words
        assert "state" not in message  # Safe Harbor keeps it: not masked
        assert message.endswith("Comparisons and searches on these columns see the masked values.")
        conn.execute("SELECT last_name FROM patients ORDER BY last_name LIMIT 2").fetchall()
        assert notices.take() == []  # the same relation again (rewritten this time)
        conn.execute("SELECT id, body FROM notes LIMIT 1").fetchall()
        assert notices.take() == ["public.notes"]
        conn.execute("SELECT * FROM notes LIMIT 1").fetchall()
        assert notices.take() == []
    # A new session is told again.
    with connect(gw, token, "agents") as conn:
        notices = Notices(conn)
        conn.execute("SELECT ssn FROM patients LIMIT 1").fetchall()
        assert notices.take() == ["public.patients"]


def test_no_notice_without_masked_columns_in_the_result(gw: RunningGateway, token: Any) -> None:
    with connect(gw, token, "agents") as conn:
        notices = Notices(conn)
        conn.execute("SELECT id, state FROM patients LIMIT 2").fetchall()
        conn.execute("SELECT count(*) FROM patients").fetchall()
        conn.execute("SELECT id, department FROM encounters LIMIT 2").fetchall()
        assert notices.take() == []
        # A statement that fails before its result has no notice, and does not use up the
        # relation's: the next result gets it.
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT ssn FROM patients WHERE id = 1 / 0")
        assert notices.take() == []
        conn.execute("SELECT ssn FROM patients LIMIT 1").fetchall()
        assert notices.take() == ["public.patients"]


def test_always_mode_tells_with_every_result(gw: RunningGateway, token: Any) -> None:
    with connect(gw, token, "loud") as conn:
        notices = Notices(conn)
        for _ in range(2):
            conn.execute("SELECT * FROM patients LIMIT 1").fetchall()
        conn.execute("SELECT p.ssn, n.body FROM patients p JOIN encounters e ON e.patient_id = "
                     "p.id JOIN notes n ON n.encounter_id = e.id LIMIT 1").fetchall()  # fmt: skip
        assert notices.take() == ["public.patients", "public.patients", "public.patients",
                                  "public.notes"]  # fmt: skip


def test_off_mode_and_clear_roles_are_never_told(gw: RunningGateway, token: Any) -> None:
    for group in ("quiet", "clinicians"):
        with connect(gw, token, group) as conn:
            notices = Notices(conn)
            conn.execute("SELECT * FROM patients LIMIT 1").fetchall()
            conn.execute("SELECT body FROM notes LIMIT 1").fetchall()
            assert notices.seen == [], group


def test_pipelined_statements_each_get_their_relations_notice(
    gw: RunningGateway, token: Any
) -> None:
    with connect(gw, token, "agents") as conn:
        notices = Notices(conn)
        with conn.pipeline():
            cursors = [conn.execute(sql) for sql in (
                "SELECT id FROM patients LIMIT 1", "SELECT last_name FROM patients LIMIT 1",
                "SELECT body FROM notes LIMIT 1", "SELECT * FROM patients LIMIT 1",
            )]  # fmt: skip
        assert [len(c.fetchall()) for c in cursors] == [1, 1, 1, 1]
        assert notices.take() == ["public.patients", "public.notes"]


def test_the_notice_comes_right_before_its_result(gw: RunningGateway, token: Any) -> None:
    raw = RawConn(gw.host, gw.port)
    try:
        assert raw.login(token(sub="notices-raw", groups=("agents",)))[-1].tag == "Z"
        # Extended protocol, pipelined: a statement without masked columns, then one failing
        # before its result (at Bind or Execute: either way no result, no notice).
        raw.send(
            parse("SELECT id FROM patients LIMIT 1") + bind() + execute()
            + parse("SELECT ssn FROM patients WHERE id = 1 / 0") + bind() + execute() + SYNC
        )  # fmt: skip
        first = tags(raw.read_until("Z"))
        assert first in ("12DC1EZ", "12DC12EZ"), first
        # Two executions of a statement reading masked columns: the notice before the first
        # one's rows only.
        raw.send(parse("SELECT ssn FROM patients LIMIT 1", "s") + bind("", "s") + execute()
                 + bind("", "s") + execute() + SYNC)  # fmt: skip
        assert tags(raw.read_until("Z")) == "12NDC2DCZ"
        # A simple Query with two statements: the notice before the first result.
        raw.send(query("SELECT 1; SELECT body FROM notes LIMIT 1"))
        got = raw.read_until("Z")
        assert tags(got) == "NTDCTDCZ"
        assert got[0].fields()["C"] == "01M01" and got[0].fields()["S"] == "NOTICE"
        assert got[0].fields()["V"] == "NOTICE"
        assert got[0].fields()["M"].startswith("phigate masked columns of public.notes ")
    finally:
        raw.close()


def test_asyncpg_extended_protocol_and_prepared_statements(gw: RunningGateway, token: Any) -> None:
    async def run(group: str) -> list[str]:
        seen: list[str] = []
        conn = await asyncpg_connect(gw, token(sub=f"notices-async-{group}", groups=(group,)))
        conn.add_log_listener(lambda _c, m: seen.append(f"{m.sqlstate} {m.message.split()[4]}"))
        try:
            await conn.fetch("SELECT * FROM patients LIMIT 1")
            await conn.fetch("SELECT id, state FROM patients LIMIT 1")
            stmt = await conn.prepare("SELECT ssn FROM patients WHERE id > $1 LIMIT 1")
            for _ in range(2):
                await stmt.fetch(0)
            async with conn.transaction():
                await conn.fetch("SELECT body FROM notes LIMIT 1")
            await asyncio.sleep(0.05)  # log listeners are called soon after, not during
        finally:
            await conn.close()
        return seen

    assert asyncio.run(run("agents")) == ["01M01 public.patients", "01M01 public.notes"]
    assert asyncio.run(run("loud")) == ["01M01 public.patients"] * 3 + ["01M01 public.notes"]
    assert asyncio.run(run("quiet")) == []


# --- SHOW phigate.masking ---------------------------------------------------------------------


def test_show_masking_through_psycopg(gw: RunningGateway, token: Any) -> None:
    with connect(gw, token, "agents") as conn:
        cur = conn.execute("SHOW phigate.masking")
        assert [d.name for d in cur.description or ()] == SHOW_COLUMNS
        assert cur.fetchall() == SHOW_ROWS
        with conn.transaction():
            assert conn.execute("show PHIGATE.masking").fetchall() == SHOW_ROWS
        # The extended protocol (a prepared statement) and the binary format.
        assert conn.execute("SHOW phigate.masking", prepare=True).fetchall() == SHOW_ROWS
        assert conn.cursor(binary=True).execute("SHOW phigate.masking").fetchall() == SHOW_ROWS
        with pytest.raises(psycopg.errors.UndefinedObject) as exc:
            conn.execute("SHOW phigate.secret")
        assert exc.value.diag.message_hint is not None
        assert "SHOW phigate.masking" in exc.value.diag.message_hint
    with connect(gw, token, "clinicians") as conn:
        cur = conn.execute("SHOW phigate.masking")
        assert cur.fetchall() == []
        assert [d.name for d in cur.description or ()] == SHOW_COLUMNS


def test_show_masking_through_asyncpg(gw: RunningGateway, token: Any) -> None:
    async def run(group: str) -> list[tuple[str, ...]]:
        conn = await asyncpg_connect(gw, token(sub=f"show-async-{group}", groups=(group,)))
        try:
            async with conn.transaction():
                rows = await conn.fetch("SHOW phigate.masking")
            assert rows == await conn.fetch("SHOW phigate.masking")
            return [tuple(r) for r in rows]
        finally:
            await conn.close()

    assert asyncio.run(run("agents")) == SHOW_ROWS
    assert asyncio.run(run("clinicians")) == []


def test_show_masking_and_notices_through_psql(gw: RunningGateway, token: Any) -> None:
    proc = psql(gw, token(sub="show-psql", groups=("agents",)), "SHOW phigate.masking")
    assert proc.returncode == 0, proc.stderr
    assert [tuple(line.split("|")) for line in proc.stdout.splitlines()] == SHOW_ROWS
    proc = psql(gw, token(sub="notice-psql", groups=("agents",)),
                "SELECT ssn FROM patients LIMIT 1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "NOTICE:  phigate masked columns of public.patients for this session:" in proc.stderr
    assert f"HINT:  {HINT}" in proc.stderr
    proc = psql(gw, token(sub="show-psql-clear", groups=("clinicians",)), "SHOW phigate.masking")
    assert (proc.returncode, proc.stdout) == (0, "")


def test_show_masking_among_other_statements_is_refused(gw: RunningGateway, token: Any) -> None:
    """Sent with other statements in one simple Query it cannot be answered as its own result:
    0A000, with a hint saying to send it alone; the session goes on."""
    with connect(gw, token, "agents") as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as exc:
            conn.execute("SHOW phigate.masking; SELECT 1")
        assert exc.value.diag.message_hint is not None
        assert conn.execute("SHOW phigate.masking").fetchall() == SHOW_ROWS
