"""The free-text rule through the gateway (psycopg and asyncpg): with the identifier dictionary
on, an identity that sees the demo's notes.body masked reads it whole -- plain reads, joins,
COPY -- but every statement that would let the database search, sort, group or compute on it
(and so on the patients' names the gateway hides) is refused with 42501 naming the column;
a role that sees free text in clear is unaffected, and without the dictionary the old
behaviour (layer 1 scrubs the column with the content detectors) comes back."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from harness import (
    EhrPostgres,
    GatewayFactory,
    RunningGateway,
    asyncpg_connect,
    psycopg_connect,
)
from phigate.dev.demo import DEMO_PHI_COLUMNS

pytestmark = pytest.mark.integration

COLUMN = "public.notes.body"
ROLES = {
    "groups": {"agents": ["agent"], "readers": ["reader"]},
    "roles": {
        "agent": {"relations": ["public.*"], "operations": ["select", "copy_to"]},
        "reader": {"relations": ["public.*"], "operations": ["select", "copy_to"],
                   "see_clear": ["free_text"]},
    },
}  # fmt: skip

# The oracle shapes: each would let the database find or rank a patient by name in the notes.
# {name} is a patient's last name that occurs in some notes (never in a message or test id).
ORACLES = {
    "ilike": "SELECT id FROM notes WHERE body ILIKE '%{name}%'",
    "substr": "SELECT substr(body, 1, 3) FROM notes",
    "spaced_letters": "SELECT regexp_replace(body, '(.)', '\\1 ', 'g') FROM notes",
    "order_by": "SELECT id FROM notes ORDER BY body",
    "order_by_position": "SELECT id, body FROM notes ORDER BY 2",
    "group_by": "SELECT body, count(*) FROM notes GROUP BY body",
    "distinct": "SELECT DISTINCT body FROM notes",
    "distinct_on": "SELECT DISTINCT ON (body) id FROM notes",
    "whole_row": "SELECT id FROM notes n WHERE row_to_json(n)::text ILIKE '%{name}%'",
    "whole_row_output": "SELECT n FROM notes n",
    "renamed_in_subquery": "SELECT x FROM (SELECT body AS x FROM notes) s WHERE x ILIKE '%{name}%'",
    "renamed_by_alias_list": "SELECT b FROM notes n(i, e, a, b) WHERE b ILIKE '%{name}%'",
    "union": "SELECT body FROM notes UNION SELECT 'x'",
    "intersect": "SELECT body FROM notes INTERSECT SELECT body FROM notes",
    "except": "SELECT id FROM notes EXCEPT SELECT id FROM notes WHERE body LIKE '{name}%'",
    "cte": "WITH c AS (SELECT body FROM notes) SELECT count(*) FROM c WHERE body ILIKE '%{name}%'",
    "lateral": "SELECT e.id FROM encounters e, LATERAL (SELECT body FROM notes n"
    " WHERE n.encounter_id = e.id) s WHERE s.body ILIKE '%{name}%'",
    "window": "SELECT id, lag(body) OVER (ORDER BY id) FROM notes",
    "exists": "SELECT count(*) FROM encounters e WHERE EXISTS (SELECT 1 FROM notes n"
    " WHERE n.encounter_id = e.id AND n.body ILIKE '%{name}%')",
    "join_on": "SELECT e.id FROM encounters e JOIN notes n ON n.encounter_id = e.id"
    " AND n.body ILIKE '%{name}%'",
    "copy_query": "COPY (SELECT id FROM notes WHERE body ILIKE '%{name}%') TO STDOUT",
}  # fmt: skip
PLAIN_READS = [
    "SELECT id, encounter_id, body FROM notes WHERE id <= 5",
    "SELECT * FROM notes ORDER BY id LIMIT 5",
    "SELECT n.body, e.department FROM notes n JOIN encounters e ON e.id = n.encounter_id"
    " WHERE n.id <= 5",
    "SELECT count(*), count(body) FROM notes WHERE body IS NOT NULL",
]


@dataclass(repr=False)  # the name stays out of pytest's failure output
class Name:
    value: str
    notes: int  # how many notes mention it

    def quoted_in(self, text: str) -> bool:
        return re.search(rf"\b{re.escape(self.value)}\b", text, re.IGNORECASE) is not None


@pytest.fixture(scope="module")
def name(pg: EhrPostgres) -> Name:
    """A patient's last name that occurs in some notes, and in how many (read directly)."""
    with psycopg.connect(pg.service_dsn()) as conn:
        row = conn.execute(
            "SELECT p.last_name, count(DISTINCT n.id) FROM patients p JOIN notes n"
            " ON n.body ILIKE '%' || p.last_name || '%' GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1"
        ).fetchone()
    assert row is not None and row[1] > 0
    return Name(str(row[0]), int(row[1]))


def _gateway(factory: GatewayFactory, tmp_path: Path, *, dictionary: bool) -> RunningGateway:
    key_file = tmp_path / f"pseudonym-{secrets.token_hex(4)}.key"
    key_file.write_bytes(secrets.token_bytes(32))
    key_file.chmod(0o600)
    phi: dict[str, Any] = {"columns": DEMO_PHI_COLUMNS, "pseudonym_key_file": str(key_file)}
    if not dictionary:
        phi["dictionary"] = {"enabled": False}
    return factory(phi=phi, **ROLES)


@pytest.fixture
def gw(gateway_factory: GatewayFactory, tmp_path: Path) -> Iterator[RunningGateway]:
    yield _gateway(gateway_factory, tmp_path, dictionary=True)


def _run(conn: psycopg.Connection[Any], sql: str) -> Any:
    with conn.cursor() as cur:
        if sql.startswith("COPY"):
            with cur.copy(sql) as copy:
                return b"".join(bytes(b) for b in copy)
        return cur.execute(sql).fetchall()


def test_plain_reads_of_the_column_work(gw: RunningGateway, token: Any) -> None:
    with psycopg_connect(gw, token(groups=("agents",))) as conn:
        for sql in PLAIN_READS:
            rows = _run(conn, sql)
            assert rows and all(v is not None for row in rows for v in row), sql
        total = conn.execute("SELECT count(*) FROM notes").fetchone()[0]
        assert len(_run(conn, "COPY notes TO STDOUT").splitlines()) == total
        assert len(_run(conn, "COPY (SELECT id, body FROM notes) TO STDOUT").splitlines()) == total


@pytest.mark.parametrize("shape", list(ORACLES))
def test_each_oracle_shape_is_refused_psycopg(
    gw: RunningGateway, token: Any, name: Name, shape: str
) -> None:
    with psycopg_connect(gw, token(groups=("agents",))) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            _run(conn, ORACLES[shape].format(name=name.value))
        assert err.value.sqlstate == "42501"
        message = err.value.diag.message_primary or ""
        hint = err.value.diag.message_hint or ""
        assert message.startswith(f"{COLUMN} is free text"), shape
        assert message.endswith("(rule: masking)") and "filter the rows in your program" in hint
        assert not name.quoted_in(message + hint), "the value is never quoted"
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session stays usable


def test_the_oracle_shapes_are_refused_asyncpg(gw: RunningGateway, token: Any, name: Name) -> None:
    async def main() -> list[str]:
        conn = await asyncpg_connect(gw, token(groups=("agents",)))
        refused = []
        try:
            for shape, sql in ORACLES.items():
                if sql.startswith("COPY"):
                    continue
                try:
                    await conn.fetch(sql.format(name=name.value))
                except asyncpg.exceptions.InsufficientPrivilegeError as exc:
                    if str(exc).startswith(f"{COLUMN} is free text"):
                        refused.append(shape)
            rows = await conn.fetch("SELECT id, body FROM notes WHERE id <= $1", 5)
            assert len(rows) == 5
            # A parameter changes nothing: the database would still search the names.
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.fetch("SELECT id FROM notes WHERE body ILIKE $1", f"%{name.value}%")
        finally:
            await conn.close(timeout=5)
        return refused

    refused = asyncio.run(main())
    assert refused == [s for s in ORACLES if not ORACLES[s].startswith("COPY")]


def test_a_refusal_by_position_is_not_reused_for_another_position(
    gw: RunningGateway, token: Any
) -> None:
    # ORDER BY 1 and ORDER BY 2 differ only in a number, which the decision cache's normalized
    # text replaces: each must be judged for its own text, in either order. (The texts of the
    # two rounds differ, so the second cannot reuse the first's exact entries.)
    for first, rows in ((1, 3), (2, 4)):
        with psycopg_connect(gw, token(groups=("agents",))) as conn:
            for k in (first, 3 - first):
                sql = f"SELECT id, body FROM notes WHERE id <= {rows} ORDER BY {k}"  # noqa: S608
                if k == 1:
                    assert len(conn.execute(sql).fetchall()) == rows
                else:
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute(sql)


def test_a_role_seeing_free_text_in_clear_is_unaffected(
    gw: RunningGateway, token: Any, name: Name
) -> None:
    with psycopg_connect(gw, token(groups=("readers",))) as conn:
        assert len(conn.execute(ORACLES["ilike"].format(name=name.value)).fetchall()) == name.notes
        assert conn.execute(ORACLES["order_by"]).fetchall()
        # notes holds no column this role sees masked: an aggregate over it is not redacted.
        counted = conn.execute("SELECT count(*) FROM notes").fetchone()[0]
        listed = len(conn.execute("SELECT id FROM notes").fetchall())
    assert counted == listed > 0


def test_without_the_dictionary_layer_1_masks_as_before(
    gateway_factory: GatewayFactory, tmp_path: Path, token: Any, name: Name
) -> None:
    old = _gateway(gateway_factory, tmp_path, dictionary=False)
    with psycopg_connect(old, token(groups=("agents",))) as conn:
        # Layer 1 scrubs the column with the content detectors only; names are not among
        # them (the plain read shows them too), so a search for one runs and finds the notes.
        assert len(conn.execute(ORACLES["ilike"].format(name=name.value)).fetchall()) == name.notes
        assert conn.execute(ORACLES["cte"].format(name=name.value)).fetchone()[0] == name.notes
        assert conn.execute(ORACLES["order_by_position"]).fetchall()
