"""Layer 2 of masking in the data plane, driven through a scripted control plane that lets
statements run *without* the rewrite, so clear PHI really reaches the gateway: rows must still
leave masked — in text and binary, simple and extended protocol (with and without the client's
own Describe), pipelines with errors, cursors, COPY — kinds seen in clear pass untouched, and a
new masking state reaches live sessions."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import time
from typing import Any

import asyncpg
import psycopg
import pytest

from rawpg import SYNC, bind, describe_portal, execute, msg, parse, query, tags

pytestmark = pytest.mark.integration

KEY = bytes(range(32))
SSN, NAME, MRN, EMAIL = "123-45-6789", "Zebulon", "MRN-7654321", "zeb@example.org"
DOB = dt.date(1961, 7, 4)
NOTE = "Call 555-123-4567 about SSN 123-45-6789 today"
SELECT_ALL = "select id, ssn, full_name, dob, email, mrn, note from l2_patients"


def pseudonym(value: str) -> str:
    return "psn_" + hmac.new(KEY, value.encode(), hashlib.sha256).hexdigest()[:16]


#: The row as a masked identity must receive it, whatever the format.
EXPECTED = (
    1, "***-**-6789", pseudonym(NAME), dt.date(1961, 1, 1), "***@example.org", "***",
    "Call [PHONE] about SSN [SSN] today",
)  # fmt: skip


@pytest.fixture(scope="module")
def l2_table(pg: Any) -> dict[str, Any]:
    """A table with one clear patient row, readable by the gateway's service user, and the
    layer-2 state classifying its columns by (table OID, attnum)."""
    values = ", ".join(f"'{v}'" for v in (SSN, NAME, DOB, EMAIL, MRN, NOTE))
    insert = "insert into l2_patients values (1, " + values + ");"  # noqa: S608  (constants)
    pg.psql(
        "drop table if exists l2_patients;"
        "create table l2_patients (id int, ssn text, full_name text, dob date, email text,"
        " mrn text, note text);" + insert + f"grant select on l2_patients to {pg.service_user};",
        dbname=pg.ehr_database,
    )
    oid = int(pg.psql("select 'l2_patients'::regclass::oid", dbname=pg.ehr_database).strip())
    rules = [
        [oid, 2, "ssn", "partial:4"],
        [oid, 3, "name", "pseudonym"],
        [oid, 4, "dob", "year"],
        [oid, 5, "email", "email_domain"],
        [oid, 6, "mrn", "redact"],
    ]
    return {
        "oid": oid,
        "state": {"pseudonym_key_hex": KEY.hex(), "targets": {"ehr": {"rules": rules}}},
    }


def unrewritten(protected: bool = False) -> Any:
    """Allow every statement as written (no layer-1 rewrite), flagged as the test says."""
    return lambda sql: {"protected": protected}


@pytest.fixture
def cp(scripted: Any, l2_table: dict[str, Any]) -> Any:
    return scripted(auth={"masked": True, "clear_kinds": []}, decide=unrewritten(),
                    masking=l2_table["state"])  # fmt: skip


def test_rows_are_masked_in_text_and_binary_through_psycopg(cp: Any) -> None:
    with psycopg.connect(cp.dsn, autocommit=True) as conn:
        text = conn.execute(SELECT_ALL).fetchone()
        binary = conn.cursor(binary=True).execute(SELECT_ALL).fetchone()
        # A parameter forces the extended protocol with the client's own Describe.
        param = conn.execute("select ssn, dob from l2_patients where id = %s", (1,)).fetchone()
    assert text == EXPECTED
    assert binary == EXPECTED
    assert param == ("***-**-6789", dt.date(1961, 1, 1))


def test_asyncpg_prepared_statements_without_portal_describe(cp: Any) -> None:
    """asyncpg describes a statement once and then sends Bind/Execute only: the gateway asks for
    the portal's description itself, and the client never sees that extra answer."""

    async def run() -> tuple[Any, ...]:
        conn = await asyncpg.connect(
            host=cp.host, port=cp.port, user="agent", password=cp.token, database="ehr", ssl=False
        )
        try:
            stmt = await conn.prepare(SELECT_ALL + " where id = $1")
            first = await stmt.fetchrow(1)
            again = await stmt.fetchrow(1)  # Bind/Execute only, binary results
            async with conn.transaction():
                chunks = [
                    r
                    async for r in conn.cursor(
                        "select ssn from l2_patients, generate_series(1, 5)", prefetch=2
                    )
                ]
            return first, again, chunks
        finally:
            await conn.close()

    first, again, chunks = asyncio.run(run())
    for row in (first, again):
        assert tuple(row) == EXPECTED
    assert [r[0] for r in chunks] == ["***-**-6789"] * 5  # PortalSuspended between chunks


def test_injected_describe_is_invisible_and_rows_masked(cp: Any) -> None:
    c = cp.connect()
    c.send(parse("select ssn, full_name from l2_patients", name="s1") + SYNC)
    assert tags(c.read_until()) == "1Z"
    c.send(bind(stmt="s1") + execute() + SYNC)
    out = c.read_until()
    assert tags(out) == "2DCZ"  # no RowDescription the client did not ask for
    assert SSN.encode() not in out[1].body and b"***-**-6789" in out[1].body
    assert pseudonym(NAME).encode() in out[1].body


def test_pipeline_with_errors_keeps_rows_attributed(cp: Any) -> None:
    c = cp.connect()
    c.send(
        parse("select ssn from l2_patients", name="a")
        + bind(stmt="never_prepared")  # refused by the gateway: the server skips to Sync
        + execute()
        + SYNC
        + bind(stmt="a")
        + describe_portal()
        + execute()
        + SYNC
        + query("select full_name from l2_patients; select 1/0; select ssn from l2_patients")
    )
    first = c.read_until()
    assert tags(first) == "1EZ" and first[1].sqlstate == "26000"
    second = c.read_until()
    assert tags(second) == "2TDCZ" and b"***-**-6789" in second[2].body
    third = c.read_until()
    assert tags(third) == "TDCEZ"  # a simple Query stops at its first error
    assert pseudonym(NAME).encode() in third[1].body
    assert all(
        SSN.encode() not in m.body and NAME.encode() not in m.body for m in first + second + third
    )


def test_sql_cursors_and_multi_statement_queries(cp: Any) -> None:
    with psycopg.connect(cp.dsn) as conn:
        with conn.cursor(name="server_side") as cur:  # DECLARE ... then FETCH through Execute
            cur.execute("select ssn, full_name from l2_patients")
            assert cur.fetchall() == [("***-**-6789", pseudonym(NAME))]
        conn.execute("declare c cursor for select email, mrn from l2_patients")
        assert conn.execute("fetch all from c").fetchall() == [("***@example.org", "***")]


def test_protected_statement_not_rewritten_gets_computed_columns_redacted(
    scripted: Any, l2_table: Any
) -> None:
    """If layer 1 ever missed a protected statement, expressions over clear PHI carry no
    column origin: layer 2 redacts them instead of trusting them."""
    cp = scripted(
        auth={"masked": True}, decide=unrewritten(protected=True), masking=l2_table["state"]
    )
    with psycopg.connect(cp.dsn, autocommit=True) as conn:
        row = conn.execute(
            "select upper(full_name), reverse(ssn), row(l2_patients.*)::text, id from l2_patients"
        ).fetchone()
    assert row == ("***", "***", "***", 1)


def test_kinds_seen_in_clear_pass_untouched(scripted: Any, l2_table: Any) -> None:
    cp = scripted(auth={"masked": True, "clear_kinds": ["ssn", "name"]}, decide=unrewritten(),
                  masking=l2_table["state"])  # fmt: skip
    with psycopg.connect(cp.dsn, autocommit=True) as conn:
        row = conn.execute("select ssn, full_name, email from l2_patients").fetchone()
    # The SSN is a kind this role reads: the content detectors must not tag it either.
    assert row == (SSN, NAME, "***@example.org")


def test_copy_out_is_scanned_and_binary_copy_is_refused(cp: Any) -> None:
    with psycopg.connect(cp.dsn, autocommit=True) as conn:
        with conn.cursor().copy("copy (select id, note from l2_patients) to stdout") as copy:
            data = b"".join(bytes(b) for b in copy)
        assert data == b"1\tCall [PHONE] about SSN [SSN] today\n"
    conn = psycopg.connect(cp.dsn, autocommit=True)
    binary_copy = "copy (select note from l2_patients) to stdout (format binary)"
    with pytest.raises(psycopg.Error) as err, conn.cursor().copy(binary_copy) as copy:
        for _ in copy:
            pass
    assert err.value.sqlstate == "0A000" and "binary COPY" in str(err.value)
    assert conn.closed or conn.broken
    conn.close()


def test_new_masking_state_reaches_a_live_session(scripted: Any, l2_table: Any) -> None:
    cp = scripted(auth={"masked": True}, decide=unrewritten(), masking={"targets": {}})
    with psycopg.connect(cp.dsn, autocommit=True) as conn:
        assert conn.execute("select full_name from l2_patients").fetchone() == (NAME,)
        cp.set_masking(l2_table["state"])
        assert conn.execute("select full_name from l2_patients").fetchone() == (pseudonym(NAME),)


def test_configured_patterns_scrub_rows_and_notices(scripted: Any, l2_table: Any) -> None:
    state = {
        **l2_table["state"],
        "mrn_pattern": "H[0-9]{6}",
        "extra_patterns": {"NHS": "NHS[0-9]{10}"},
    }
    cp = scripted(auth={"masked": True}, decide=unrewritten(), masking=state)
    c = cp.connect()
    c.send(query("do $$ begin raise notice 'chart H123456 / NHS0123456789'; end $$; "
                 "select 'chart H654321' as v"))  # fmt: skip
    out = c.read_until()
    notice = next(m for m in out if m.tag == "N")
    assert notice.fields()["M"] == "chart [MRN] / [NHS]"
    row = next(m for m in out if m.tag == "D")
    assert b"chart [MRN]" in row.body and b"H654321" not in row.body


def test_refused_function_call_keeps_results_attributed(cp: Any) -> None:
    """A refused FunctionCall is answered like a failed one; the rows of the next statement are
    still matched to their description and masked."""
    c = cp.connect()
    c.send(msg(b"F", b"\0\0\0\1" + b"\0\0" + b"\0\0" + b"\0\0"))
    assert tags(c.read_until()) == "EZ"
    c.send(query("select ssn from l2_patients"))
    out = c.read_until()
    assert tags(out) == "TDCZ" and b"***-**-6789" in out[1].body


def test_protected_copy_not_masked_at_the_source_closes_the_session(
    scripted: Any, l2_table: Any
) -> None:
    """A COPY the control plane marks as reading protected data but did not rewrite has no
    column origins to mask by: the data plane refuses it rather than guess."""
    cp = scripted(auth={"masked": True}, decide=unrewritten(protected=True),
                  masking=l2_table["state"])  # fmt: skip
    conn = psycopg.connect(cp.dsn, autocommit=True)
    with (
        pytest.raises(psycopg.Error) as err,
        conn.cursor().copy("copy (select ssn from l2_patients) to stdout") as copy,
    ):
        for _ in copy:
            pass
    assert err.value.sqlstate == "42501" and "not masked at the source" in str(err.value)
    assert conn.closed or conn.broken
    conn.close()


def test_withheld_error_details_are_logged_only_as_keyed_hashes(
    scripted: Any, l2_table: Any
) -> None:
    """A constraint detail that echoes a value is withheld from a masked identity; the event
    that records it holds a keyed hash, not the value nor a plain SHA-256 of it (which could be
    reversed by hashing every possible SSN)."""
    cp = scripted(auth={"masked": True}, decide=unrewritten(), masking=l2_table["state"])
    c = cp.connect()
    detail = "Key (v)=(987-65-4329) already exists."
    c.send(query("create temp table scrub_probe (v text unique); "
                 "insert into scrub_probe values ('987-65-4329'), ('987-65-4329')"))  # fmt: skip
    out = c.read_until()
    err = next(m for m in out if m.tag == "E").fields()
    assert err["C"] == "23505" and "987-65-4329" not in err.get("D", "")
    deadline = time.monotonic() + 5
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not any(e["event"] == "message_scrubbed" for e in events):
        events += [json.loads(line) for line in cp.engine.take_events().splitlines() if line]
        time.sleep(0.02)
    scrubbed = next(e for e in events if e["event"] == "message_scrubbed")
    assert scrubbed["detail_hmac"].startswith("h:") and len(scrubbed["detail_hmac"]) == 34
    text = json.dumps(events)
    assert "987-65-4329" not in text and "987654329" not in text
    assert hashlib.sha256(detail.encode()).hexdigest() not in text
