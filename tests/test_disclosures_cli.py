"""`phigate audit disclosures` over hand-made trail segments: a person's disclosures as a table
and as JSON lines, time bounds, possible disclosures listed apart, and errors for what is not a
trail or not a key."""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from phigate.audit.disclosures import subject_hash
from phigate.cli import audit_disclosures
from phigate.errors import PhigateError

KEY = bytes(range(32))


def h(value: str) -> str:
    return subject_hash(KEY, value)


def result(
    ts: str, session: int, subjects: dict[str, Any], possible: dict[str, int]
) -> dict[str, Any]:
    return {"event": "result", "ts": ts, "session_id": session, "subjects": subjects,
            "possible": possible}  # fmt: skip


RECORDS = [
    {"event": "session_start", "ts": "2026-03-01T09:00:00.000000Z", "session_id": 1,
     "subject": "agent-a"},
    {"event": "session_start", "ts": "2026-03-01T09:00:00.000000Z", "session_id": 2,
     "subject": "agent-b"},
    result("2026-03-01T09:00:01.000000Z", 1, {"public.patients": {
        "clear": ["id", "last_name"], "h": [h("123"), h("124")], "masked": ["ssn"],
        "more": 0}}, {}),
    result("2026-03-02T10:00:00.000000Z", 2, {"public.encounters": {
        "clear": ["patient_id", "reason"], "h": [h("123")], "masked": [], "more": 0}},
        {"public.patients": 4}),
    result("2026-03-03T11:00:00.000000Z", 1, {"public.patients": {
        "clear": ["id"], "h": [h("1")], "masked": [], "more": 99}}, {}),
    result("2026-03-04T12:00:00.000000Z", 2, {}, {}),
]  # fmt: skip


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    d = tmp_path / "trail"
    d.mkdir()
    # Two segments: records are read across them in order.
    lines = [json.dumps({"prev": "0" * 64, "rec": r, "seq": n}, sort_keys=True)
             for n, r in enumerate(RECORDS)]  # fmt: skip
    (d / "segment-000000000000.jsonl").write_text("".join(f"{x}\n" for x in lines[:3]))
    (d / "segment-000000000003.jsonl").write_text("".join(f"{x}\n" for x in lines[3:]))
    return d


def cli(tmp: Path, *argv: str) -> int:
    key = tmp / "hmac.key"
    key.write_text(base64.b64encode(KEY).decode() + "\n")
    parser = argparse.ArgumentParser()
    audit_disclosures.add_parsers(parser.add_subparsers())
    args = parser.parse_args(["disclosures", "--hmac-key", str(key), *argv])
    code: int = args.run(args)
    return code


def test_table_lists_certain_then_possible(trail: Path, tmp_path: Path, capsys: Any) -> None:
    assert cli(tmp_path, "--subject", "public.patients=123", "--log", str(trail)) == 0
    out = capsys.readouterr().out
    certain, possible = out.split("Possible disclosures")
    assert f"Disclosures of public.patients {h('123')}: 2" in certain
    lines = certain.splitlines()
    assert "IDENTITY" in lines[1] and "MASKED" in lines[1]
    assert lines[2].split() == ["2026-03-01T09:00:01.000", "agent-a", "1", "2", "public.patients",
                                "id,last_name", "ssn"]  # fmt: skip
    assert lines[3].split() == ["2026-03-02T10:00:00.000", "agent-b", "2", "3",
                                "public.encounters", "patient_id,reason", "-"]  # fmt: skip
    assert "123" not in out.replace(h("123"), "")  # the key value itself is never printed
    # Possible: rows of patients without the key, and a result whose exact list was full.
    assert ": 2\n" in possible
    assert "public.patients  4     no key in the output" in possible
    assert "public.patients  99    past the exact list" in possible


def test_json_lines_and_time_bounds(trail: Path, tmp_path: Path, capsys: Any) -> None:
    cli(tmp_path, "--subject", "public.patients=123", "--log", str(trail), "--json",
        "--from", "2026-03-02", "--to", "2026-03-02T23:59:59Z")  # fmt: skip
    found = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    seen = [(d["disclosure"], d["relation"], d["identity"], d["seq"], d["rows"]) for d in found]
    assert seen == [
        ("certain", "public.encounters", "agent-b", 3, 0),
        ("possible", "public.patients", "agent-b", 3, 4),
    ]
    assert found[0]["when"] == "2026-03-02T10:00:00.000000Z" and found[0]["hash"] == h("123")


def test_someone_never_disclosed_has_only_possible_disclosures(
    trail: Path, tmp_path: Path, capsys: Any
) -> None:
    cli(tmp_path, "--subject", "public.patients=777", "--log", str(trail), "--json")
    found = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {d["disclosure"] for d in found} == {"possible"} and len(found) == 2


def test_errors(trail: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cli(tmp_path, "--subject", "patients", "--log", str(trail))
    with pytest.raises(PhigateError, match="no segment"):
        cli(tmp_path, "--subject", "public.patients=1", "--log", str(tmp_path))
    (trail / "segment-000000000009.jsonl").write_text("not json\n")
    with pytest.raises(PhigateError, match="line 1: not an audit record"):
        cli(tmp_path, "--subject", "public.patients=1", "--log", str(trail))
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("short\n")
    parser = argparse.ArgumentParser()
    audit_disclosures.add_parsers(parser.add_subparsers())
    args = parser.parse_args(["disclosures", "--hmac-key", str(bad_key), "--subject",
                              "public.patients=1", "--log", str(trail)])  # fmt: skip
    with pytest.raises(PhigateError, match="audit HMAC key"):
        args.run(args)
