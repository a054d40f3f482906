"""The identifier dictionary through the gateway: patients' names, street addresses, cities and
ZIPs written in notes reach agents tagged ([NAME], [ADDRESS], [CITY], [ZIP]) through psycopg
(text and binary), asyncpg, psql, COPY, JSON built from notes and error messages that echo a note;
clinicians read the same notes unchanged; a patient inserted after start is masked once the
dictionary has refreshed; the events say what was loaded without a single value."""

# ruff: noqa: S608  # statements name a patient on purpose (never printed)

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
import unicodedata
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from harness import GatewayFactory, asyncpg_connect, psql, psycopg_connect
from phigate.dev.demo import demo_masking, merge_config

pytestmark = pytest.mark.integration

REFRESH_SECONDS = 1.0

# A synthetic patient added while the gateway runs (made-up words, nobody's identifiers).
NEW_FIRST, NEW_LAST = "Quillonna", "Brevak-Tasmer"
NEW_ADDRESS, NEW_CITY, NEW_ZIP = "4471 Vontessa Crescent", "Port Ulvaric", "04871"


class Note(dict[str, Any]):
    """The planted note and the patient's identifiers; never shown in a failure report."""

    def __repr__(self) -> str:
        return "<note>"


def fold_tokens(text: str) -> list[str]:
    """Words as the gateway compares them: case- and accent-folded alphanumeric runs."""
    plain = "".join(
        c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c)
    ).lower()
    return re.findall(r"[^\W_]+", plain)


def contains_sequence(text: str, value: str) -> bool:
    """True if the folded words of ``value`` appear in ``text`` in a row."""
    words, seq = fold_tokens(text), fold_tokens(value)
    return any(words[i : i + len(seq)] == seq for i in range(len(words) - len(seq) + 1))


@pytest.fixture(scope="module")
def names(pg: Any) -> frozenset[str]:
    """Every folded word of every patient's first and last name (never printed)."""
    with psycopg.connect(pg.service_dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT first_name, last_name FROM patients").fetchall()
    return frozenset(w for row in rows for v in row for w in fold_tokens(v))


@pytest.fixture(scope="module")
def patient_note(pg: Any) -> Iterator[dict[str, Any]]:
    """A note naming one existing patient in every way people write names, with the patient's
    street address, city and ZIP; removed at the end of the module."""
    with psycopg.connect(pg.service_dsn(), autocommit=True) as conn:
        pid, first, last, address, city, zip_ = conn.execute(
            "SELECT id, first_name, last_name, address, city, zip FROM patients ORDER BY id LIMIT 1"
        ).fetchone()
        enc = conn.execute(
            "SELECT id FROM encounters WHERE patient_id = %s LIMIT 1", (pid,)
        ).fetchone()[0]
        body = (
            f"{last}, {first}: full {first} {last}; lower {first.lower()} "
            f"{last.lower()}; upper {last.upper()}; lives at {address}, {city} {zip_}; "
            f"plan unchanged"
        )
        nid = conn.execute(
            "INSERT INTO notes (id, encounter_id, author, body)"
            " VALUES (990001, %s, 'Dr. Test', %s) RETURNING id",
            (enc, body),
        ).fetchone()[0]
        try:
            yield Note(id=nid, body=body, first=first, last=last, address=address, city=city,
                       zip=zip_)  # fmt: skip
        finally:
            conn.execute("DELETE FROM notes WHERE id = %s", (nid,))


@pytest.fixture(scope="module")
def gw(pg: Any, dev_issuer: Any, dev_cert: Any, tmp_path_factory: pytest.TempPathFactory,
       patient_note: Any) -> Iterator[Any]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("dictionary")
    key = tmp / "pseudonym.key"
    key.write_bytes(secrets.token_bytes(32))
    os.chmod(key, 0o600)
    demo = demo_masking(key)
    overrides = {
        "groups": {"agents": ["agent"], "clinicians": ["clinician"]},
        "roles": {"agent": {"operations": ["select", "copy_to"]}},
        "phi": {"dictionary": {"refresh_seconds": REFRESH_SECONDS}},
    }
    factory = GatewayFactory(pg, dev_issuer, dev_cert, tmp)
    try:
        yield factory(**merge_config(demo, overrides))
    finally:
        factory.stop_all()


def _agent(gw: Any, token: Any) -> psycopg.Connection[Any]:
    return psycopg_connect(gw, token(sub="agent-dictionary", groups=("agents",)))


def _assert_tagged(text: str, note: dict[str, Any]) -> None:
    for field in ("first", "last", "address", "city", "zip"):
        assert not contains_sequence(text, note[field]), f"{field} of the patient left in clear"
    assert text.count("[NAME]") == 7  # full, reversed, lower: two each; upper: the last name
    assert "[ADDRESS]" in text and "[CITY]" in text and "[ZIP]" in text
    assert text.endswith("plan unchanged"), "words around the identifiers stay"


def test_names_and_places_in_a_note_are_tagged(gw: Any, token: Any, patient_note: Any) -> None:
    sql = "SELECT body FROM notes WHERE id = %s"
    with _agent(gw, token) as conn:
        text = conn.execute(sql, (patient_note["id"],)).fetchone()[0]
        binary = conn.cursor(binary=True).execute(sql, (patient_note["id"],)).fetchone()[0]
    _assert_tagged(text, patient_note)
    assert binary == text


def test_no_patient_name_in_any_note(gw: Any, token: Any, names: frozenset[str]) -> None:
    with _agent(gw, token) as conn:
        bodies = [r[0] for r in conn.execute("SELECT body FROM notes").fetchall()]
    assert len(bodies) > 100
    leaked = {w for b in bodies for w in fold_tokens(b)} & names
    assert not leaked, f"{len(leaked)} patient name words reached an agent"
    assert sum("[NAME]" in b for b in bodies) > len(bodies) // 2


def test_clinicians_read_notes_unchanged(gw: Any, token: Any, pg: Any, patient_note: Any) -> None:
    with psycopg_connect(gw, token(sub="clin-dictionary", groups=("clinicians",))) as conn:
        body = conn.execute(
            "SELECT body FROM notes WHERE id = %s", (patient_note["id"],)
        ).fetchone()[0]
    assert body == patient_note["body"]


def test_copy_and_json_and_errors(gw: Any, token: Any, patient_note: Any) -> None:
    nid = patient_note["id"]
    with _agent(gw, token) as conn:
        sql = f"COPY (SELECT body FROM notes WHERE id = {int(nid)}) TO STDOUT"  # noqa: S608
        with conn.cursor() as cur, cur.copy(sql) as copy:
            copied = b"".join(bytes(b) for b in copy).decode()
        doc = conn.execute(
            "SELECT json_build_object('note', body) FROM notes WHERE id = %s", (nid,)
        ).fetchone()[0]
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT body::json FROM notes WHERE id = %s", (nid,))
    _assert_tagged(copied.rstrip("\n"), patient_note)
    _assert_tagged(doc["note"], patient_note)
    diag = err.value.diag
    echoed = " ".join(filter(None, (diag.message_primary, diag.message_detail, diag.context)))
    # The server quotes the note's first word, the last name ('Token "<last>" is invalid.',
    # "JSON data, line 1: <last>..."): it reaches the agent tagged.
    assert 'Token "[NAME]" is invalid' in echoed and "line 1: [NAME]" in echoed
    for field in ("first", "last", "city"):
        assert not contains_sequence(echoed, patient_note[field])


def test_asyncpg_and_psql(gw: Any, token: Any, patient_note: Any) -> None:
    tok = token(sub="agent-dictionary", groups=("agents",))

    async def read() -> str:
        conn = await asyncpg_connect(gw, tok)
        try:
            return str(await conn.fetchval("SELECT body FROM notes WHERE id = $1",
                                           patient_note["id"]))  # fmt: skip
        finally:
            await conn.close()

    _assert_tagged(asyncio.run(read()), patient_note)
    out = psql(gw, tok, f"SELECT body FROM notes WHERE id = {int(patient_note['id'])}")  # noqa: S608
    assert out.returncode == 0, out.stderr
    _assert_tagged(out.stdout.strip(), patient_note)


def test_a_new_patient_is_masked_after_the_refresh(gw: Any, token: Any, pg: Any) -> None:
    with psycopg.connect(pg.service_dsn(), autocommit=True) as admin:
        enc, = admin.execute("SELECT id FROM encounters ORDER BY id LIMIT 1").fetchone()
        pid = admin.execute(
            # An explicit id: other tests expect the id sequence where the data left it.
            "INSERT INTO patients (id, mrn, first_name, last_name, date_of_birth, ssn, address,"
            " city, state, zip, phone, email) VALUES (990001, 'MRN-9990001', %s, %s, '1970-01-01',"
            " '900-00-0001', %s, %s, 'ME', %s, '(207) 555-0100', 'new.patient@example.org')"
            " RETURNING id",
            (NEW_FIRST, NEW_LAST, NEW_ADDRESS, NEW_CITY, NEW_ZIP),
        ).fetchone()[0]
        body = f"{NEW_FIRST} {NEW_LAST} moved to {NEW_ADDRESS}, {NEW_CITY} {NEW_ZIP}."
        nid = admin.execute(
            "INSERT INTO notes (id, encounter_id, author, body) VALUES (990002, %s, 'Dr. Test', %s)"
            " RETURNING id", (enc, body),
        ).fetchone()[0]  # fmt: skip
        try:
            started = time.monotonic()
            with _agent(gw, token) as conn:
                while True:
                    row = conn.execute("SELECT body FROM notes WHERE id = %s", (nid,)).fetchone()
                    text = row[0]
                    if not contains_sequence(text, NEW_LAST):
                        break
                    assert time.monotonic() - started < 30, "the new patient was never masked"
                    time.sleep(0.2)
            waited = time.monotonic() - started
            assert text == "[NAME] [NAME] moved to [ADDRESS], [CITY] [ZIP]."
            # PostgreSQL publishes an idle session's table statistics within 10 s of its commit;
            # the next refresh after that reads the table.
            assert waited < REFRESH_SECONDS + 10 + 3
        finally:
            admin.execute("DELETE FROM notes WHERE id = %s", (nid,))
            admin.execute("DELETE FROM patients WHERE id = %s", (pid,))


def test_events_report_the_dictionary_without_values(gw: Any, patient_note: Any) -> None:
    events = gw.events()
    loaded = [e for e in events if e.get("event") == "dictionary" and e.get("mode") == "full"]
    assert loaded and loaded[0]["entries"] > 400 and loaded[0]["values"] > 400
    text = gw.trail_text().lower()
    for field in ("first", "last", "address", "city"):
        assert patient_note[field].lower() not in text


def test_a_column_named_like_a_patient_is_not_logged(
    gw: Any, token: Any, patient_note: Any
) -> None:
    """A made-up column the analyzer cannot tell from a real one (encounters is not classified,
    so the catalog does not list its columns) is logged as a placeholder when the dictionary
    knows the word; the server's error reaches the agent with the name tagged."""
    last = patient_note["last"]
    marker = "SELECT department FROM encounters LIMIT 1"
    with _agent(gw, token) as conn:
        quoted, folded = f'SELECT "{last}" FROM encounters', f"SELECT e.{last} FROM encounters e"
        for sql in (quoted, folded):
            with pytest.raises(psycopg.errors.UndefinedColumn) as err:
                conn.execute(sql)
            primary = err.value.diag.message_primary or ""
            assert not contains_sequence(primary, last) and "[NAME]" in primary
        conn.execute(marker)  # a real column stays named
    # The events sink writes in batches: wait for the marker statement's event.
    deadline = time.monotonic() + 10
    while True:
        statements = [e for e in gw.events() if e.get("event") == "statement"]
        logged = " ".join(e.get("normalized") or "" for e in statements)
        if "department" in logged or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not contains_sequence(logged, last)
    assert "department" in logged and "encounters" in logged


def test_an_identifier_table_the_gateway_cannot_read_refuses_masked_identities(
    pg: Any, gateway_factory: Any, token: Any, tmp_path: Any
) -> None:
    """The dictionary must read every identifier column: if the service user lacks SELECT on
    one, masked identities are refused (58000) rather than served without those names; the
    `catalog` event tells the operator what to grant, and granting it recovers by itself."""
    admin_dsn = pg.dsn(pg.ehr_database)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE dict_hidden_names (id int, name text)")
    try:
        key = tmp_path / "pseudonym.key"
        key.write_bytes(secrets.token_bytes(32))
        os.chmod(key, 0o600)
        demo = demo_masking(key)
        demo["phi"]["columns"]["public.dict_hidden_names.name"] = {"kind": "name", "mask": "redact"}
        gw = gateway_factory(**merge_config(demo, {"groups": {"agents": ["agent"]}}))
        tok = token(sub="agent-hidden", groups=("agents",))
        with psycopg_connect(gw, tok) as conn, pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT id FROM notes LIMIT 1")
        assert err.value.sqlstate == "58000"
        assert "retrying" in (err.value.diag.message_primary or "")
        deadline = time.monotonic() + 10
        while not any(e.get("event") == "catalog" for e in gw.events()):
            assert time.monotonic() < deadline, "no catalog event"
            time.sleep(0.2)
        failed = [e for e in gw.events() if e.get("event") == "catalog"]
        assert "lacks SELECT on public.dict_hidden_names; grant it" in failed[0]["error"]
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f"GRANT SELECT ON dict_hidden_names TO {pg.service_user}")
        deadline = time.monotonic() + 30
        while True:
            with psycopg_connect(gw, tok) as conn:
                try:
                    conn.execute("SELECT id FROM notes LIMIT 1")
                    break
                except psycopg.Error as exc:
                    assert exc.sqlstate == "58000"
            assert time.monotonic() < deadline, "the retry never picked up the grant"
            time.sleep(0.5)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute("DROP TABLE IF EXISTS dict_hidden_names")
