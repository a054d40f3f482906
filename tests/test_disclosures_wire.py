"""Accounting of disclosures through the gateway: every result sent to an identity records the
keyed hashes of the subject keys in its rows (psycopg text and asyncpg binary alike), the columns
it showed in clear and masked, rows of subject relations sent without their key as possible
disclosures, and past `disclosures_exact_max` a count; `phigate audit disclosures` finds a
person's disclosures in that record."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from harness import asyncpg_connect, psycopg_connect, token_subject
from phigate.audit.disclosures import subject_hash
from phigate.audit.keys import write_keys
from phigate.cli import audit_disclosures

pytestmark = pytest.mark.integration

SUBJECTS = {"public.patients": "id", "public.encounters": "patient_id"}
PHI = {
    "subjects": SUBJECTS,
    "columns": {
        "public.patients.ssn": {"kind": "ssn", "mask": "partial:4"},
        "public.patients.first_name": {"kind": "name", "mask": "redact"},
    },
}
# billing sees every classified kind in clear; clinicians see them masked.
CLEAR_ROLE = {
    "groups": {"billing": ["sees-all"]},
    "roles": {"sees-all": {"relations": ["public.*"], "see_clear": ["ssn", "name"]}},
}


def audit_section(tmp: Path, **extra: Any) -> tuple[dict[str, Any], bytes]:
    keys = tmp / "audit-keys"
    signer, _, hmac_file = write_keys(keys, "phigate.test/gw")
    trail = tmp / "trail"
    trail.mkdir()
    section = {"dir": str(trail), "signing_key": str(signer), "hmac_key": str(hmac_file), **extra}
    return section, base64.b64decode(hmac_file.read_text())


@pytest.fixture
def accounted(gateway_factory, tmp_path):
    """A gateway recording disclosures, and the trail's HMAC key."""

    def make(**audit: Any) -> tuple[Any, bytes]:
        section, key = audit_section(tmp_path, **audit)
        return gateway_factory(phi=PHI, audit=section, **CLEAR_ROLE), key

    return make


def results(gw: Any, want: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The result events that recorded subjects (waits for the event sink to write them)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in gw.events() if e.get("event") == "result"
                 and (e.get("subjects") or e.get("possible"))]  # fmt: skip
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def patients_hashes(key: bytes, ids: list[int]) -> list[str]:
    return sorted(subject_hash(key, str(i)) for i in ids)


def test_a_patient_read_directly_is_a_disclosure_with_its_clear_columns(accounted, token):
    gw, key = accounted()
    tok = token(sub="agent-direct", groups=("billing",))
    with psycopg_connect(gw, tok) as conn:
        rows = conn.execute("SELECT * FROM patients WHERE id = %s", (17,)).fetchall()
    assert len(rows) == 1
    (rec,) = results(gw)
    p = rec["subjects"]["public.patients"]
    assert p["h"] == patients_hashes(key, [17])
    assert p["more"] == 0 and p["masked"] == []
    assert {"id", "ssn", "first_name", "last_name"} <= set(p["clear"])
    assert rec["possible"] == {}


def test_a_join_discloses_through_the_encounters_key(accounted, token):
    gw, key = accounted()
    with psycopg_connect(gw, token(groups=("billing",))) as conn:
        rows = conn.execute(
            "SELECT e.patient_id, e.reason, p.last_name FROM encounters e "
            "JOIN patients p ON p.id = e.patient_id WHERE e.patient_id = %s", (23,)
        ).fetchall()
    assert rows
    (rec,) = results(gw)
    e = rec["subjects"]["public.encounters"]
    assert e["h"] == patients_hashes(key, [23])
    assert e["clear"] == ["patient_id", "reason"]
    # patients.last_name left without patients.id: every row possibly any patient.
    assert rec["possible"] == {"public.patients": len(rows)}


def test_masked_columns_are_still_a_disclosure_of_the_subject(accounted, token):
    gw, key = accounted()
    with psycopg_connect(gw, token(groups=("clinicians",))) as conn:
        (row,) = conn.execute(
            "SELECT id, ssn, first_name, last_name FROM patients WHERE id = %s", (31,)
        ).fetchall()
    assert row[0] == 31 and row[2] != "" and row[1].startswith("***")
    (rec,) = results(gw)
    p = rec["subjects"]["public.patients"]
    assert p["h"] == patients_hashes(key, [31])
    assert (p["clear"], p["masked"]) == (["id", "last_name"], ["first_name", "ssn"])


def test_rows_without_the_key_are_possible_disclosures(accounted, token):
    gw, _ = accounted()
    with psycopg_connect(gw, token(groups=("billing",))) as conn:
        conn.execute("SELECT last_name, city FROM patients WHERE id < %s", (6,)).fetchall()
        (count,) = conn.execute("SELECT count(*) FROM encounters").fetchone()
    assert count > 0
    recs = results(gw, want=2)
    assert [r["possible"] for r in recs] == [{"public.patients": 5}, {"public.encounters": 1}]
    assert all(r["subjects"] == {} for r in recs)


def test_past_the_exact_max_rows_are_counted_not_dropped(accounted, token, tmp_path, capsys):
    gw, key = accounted(disclosures_exact_max=50)
    with psycopg_connect(gw, token(sub="agent-bulk", groups=("billing",))) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM patients").fetchall()]
    assert len(ids) > 50
    (rec,) = results(gw)
    p = rec["subjects"]["public.patients"]
    assert len(p["h"]) == 50 and len(p["h"]) + p["more"] == len(ids)
    assert set(p["h"]) <= set(patients_hashes(key, ids))
    # A patient past the list is reported as a possible disclosure, never as none.
    missing = next(i for i in ids if subject_hash(key, str(i)) not in p["h"])
    listed = next(i for i in ids if subject_hash(key, str(i)) in p["h"])
    trail = segments_from_events(gw, tmp_path)
    found = run_cli(trail, key, tmp_path, f"public.patients={missing}", capsys)
    assert [(d["disclosure"], d["why"], d["identity"]) for d in found] == [
        ("possible", "past the exact list", "agent-bulk")
    ]
    found = run_cli(trail, key, tmp_path, f"public.patients={listed}", capsys)
    assert [(d["disclosure"], d["relation"]) for d in found] == [("certain", "public.patients")]


def test_binary_results_hash_like_text(accounted, token, tmp_path, capsys):
    gw, key = accounted()
    tok = token(sub="agent-binary", groups=("billing",))

    async def read() -> tuple[Any, Any]:
        conn = await asyncpg_connect(gw, tok)
        try:
            p = await conn.fetch("SELECT id, last_name FROM patients WHERE id = $1", 41)
            e = await conn.fetch("SELECT patient_id, department FROM encounters "
                                 "WHERE patient_id = $1", 41)  # fmt: skip
            return p, e
        finally:
            await conn.close()

    p, e = asyncio.run(read())
    assert p and e
    recs = results(gw, want=2)
    seen = {rel: d["h"] for r in recs for rel, d in r["subjects"].items()}
    assert seen == {rel: patients_hashes(key, [41]) for rel in SUBJECTS}
    trail = segments_from_events(gw, tmp_path)
    found = run_cli(trail, key, tmp_path, "public.patients=41", capsys)
    assert {(d["relation"], d["identity"], d["disclosure"]) for d in found} == {
        ("public.patients", token_subject(tok), "certain"),
        ("public.encounters", token_subject(tok), "certain"),
    }
    assert run_cli(trail, key, tmp_path, "public.patients=42", capsys) == []


# --- the CLI over a trail made of the gateway's records ---------------------------------------


def segments_from_events(gw: Any, tmp: Path) -> Path:
    """The gateway's records as an audit trail directory (until the trail writer writes one)."""
    gw.stop()
    trail = tmp / "made-trail"
    trail.mkdir(exist_ok=True)
    lines = [json.dumps({"prev": "0" * 64, "rec": e, "seq": n}, sort_keys=True)
             for n, e in enumerate(gw.events())]  # fmt: skip
    (trail / "segment-000000000000.jsonl").write_text("".join(f"{x}\n" for x in lines))
    return trail


def run_cli(trail: Path, key: bytes, tmp: Path, subject: str, capsys: Any) -> list[dict[str, Any]]:
    key_file = tmp / "hmac.key"
    key_file.write_text(base64.b64encode(key).decode() + "\n")
    parser = argparse.ArgumentParser()
    audit_disclosures.add_parsers(parser.add_subparsers())
    capsys.readouterr()
    args = parser.parse_args(["disclosures", "--subject", subject, "--log", str(trail),
                              "--hmac-key", str(key_file), "--json"])  # fmt: skip
    assert args.run(args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]
