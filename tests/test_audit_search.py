"""`phigate audit search` and `show` as an investigator uses them: filters, the table and JSON a
user reads, a session's story in order, and an index that catches up as the trail grows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from audit_writer import TrailWriter
from phigate.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["audit", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def trail(tmp_path: Path) -> TrailWriter:
    w = TrailWriter(tmp_path / "trail")
    w.open()
    w.session("s-1", "agent-a")  # seq 1..6
    w.append({"event": "session_start", "session_id": 7, "subject": "agent-b"})  # seq 7
    w.append({"event": "statement", "session_id": 7, "decision": "deny", "rule": "no-notes",
              "sqlstate": "42501", "relations": ["clinical.notes", "public.patients"],
              "normalized": "select body from clinical.notes"}, tick=3600)  # fmt: skip
    w.append({"event": "session_end", "session_id": 7})
    w.checkpoint()
    return w


def test_search_filters_by_decision_and_shows_a_table(capsys, trail):
    code, out, _ = run(capsys, "search", "--log", str(trail.dir), "--decision", "deny")
    assert code == 0
    header, row = out.strip().split("\n")
    assert header.split() == ["TIME", "SEQ", "EVENT", "SESSION", "SUBJECT", "DECISION", "DETAIL"]
    assert row.split()[1:6] == ["8", "statement", "7", "agent-b", "deny"]
    assert "select body from clinical.notes" in row and "rule=no-notes" in row


@pytest.mark.parametrize(
    ("args", "seqs"),
    [
        (["--subject", "agent-a", "--event", "statement"], [2, 4]),  # subject from session_start
        (["--session", "7"], [7, 8, 9]),  # session_id as a number
        (["--session", "s-1", "--event", "result"], [3, 5]),
        (["--relation", "notes"], [8]),  # the table alone finds schema.table
        (["--relation", "public.patients", "--subject", "agent-b"], [8]),
        (["--sqlstate", "42501"], [8]),
        (["--rule", "no-notes"], [8]),
        (["--from", "2026-12-06T15:30:00Z"], [8, 9, 10]),
        (["--to", "2026-12-06T15:30:00Z", "--event", "session_start"], [1, 7]),
        (["--from", "2026-12-06", "--to", "2026-12-06", "--event", "checkpoint"], [10]),
        (["--to", "2026-12-05"], []),
    ],
)
def test_search_filters(capsys, trail, args, seqs):
    code, out, err = run(capsys, "search", "--log", str(trail.dir), "--json", *args)
    assert code == 0, err
    found = [json.loads(line) for line in out.splitlines()]
    assert [r["seq"] for r in found] == seqs
    if not seqs:
        assert "no records match" in err


def test_search_json_carries_the_record_and_its_seq(capsys, trail):
    code, out, _ = run(capsys, "search", "--log", str(trail.dir), "--json", "--rule", "no-notes")
    (hit,) = [json.loads(line) for line in out.splitlines()]
    assert hit["seq"] == 8 and hit["origin"] == trail.origin
    assert hit["rec"]["decision"] == "deny" and hit["rec"]["session_id"] == 7


def test_search_limit_says_there_is_more(capsys, trail):
    code, out, err = run(capsys, "search", "--log", str(trail.dir), "--json", "--limit", "2")
    assert [json.loads(x)["seq"] for x in out.splitlines()] == [0, 1]
    assert "first 2 shown" in err


def test_the_index_catches_up_as_the_trail_grows(capsys, trail, tmp_path):
    index = tmp_path / "elsewhere.sqlite3"
    run(capsys, "search", "--log", str(trail.dir), "--index", str(index), "--event", "x")
    assert index.is_file() and not (trail.dir / "index.sqlite3").exists()
    trail.new_segment()
    trail.session("s-2", "agent-a", statements=1)  # seq 11..14 in a new segment
    _, out, _ = run(capsys, "search", "--log", str(trail.dir), "--index", str(index), "--json",
                    "--subject", "agent-a", "--event", "session_start")  # fmt: skip
    assert [json.loads(x)["seq"] for x in out.splitlines()] == [1, 11]


def test_a_rewritten_trail_is_reindexed(capsys, trail, tmp_path):
    run(capsys, "search", "--log", str(trail.dir), "--event", "x")
    for p in trail.dir.glob("segment-*"):
        p.unlink()
    w = TrailWriter(trail.dir)
    w.open()
    w.session("s-9", "agent-z", statements=1)
    _, out, _ = run(capsys, "search", "--log", str(trail.dir), "--json", "--event", "session_start")
    assert [json.loads(x)["rec"]["subject"] for x in out.splitlines()] == ["agent-z"]


def test_show_tells_a_session_in_order(capsys, trail):
    code, out, _ = run(capsys, "show", "--log", str(trail.dir), "s-1")
    assert code == 0
    lines = out.strip().split("\n")
    assert lines[0].startswith(f"session s-1 of agent-a on {trail.origin}")
    assert "6 records" in lines[0]
    events = [line.split()[2] for line in lines[1:]]
    assert events == ["session_start", "statement", "result", "statement", "result", "session_end"]
    assert "[allow]" in lines[2] and "select * from patients where id = $1" in lines[2]
    assert "rows=1" in lines[3]


def test_show_an_unknown_session(capsys, trail):
    code, _, err = run(capsys, "show", "--log", str(trail.dir), "s-404")
    assert code == 1 and "no records of session s-404" in err


def test_search_across_several_trails(capsys, trail, tmp_path):
    other = TrailWriter(tmp_path / "other", None)
    other.origin = "gw.test/other"
    other.open()
    other.session("s-1", "agent-a", statements=1)
    code, out, _ = run(capsys, "search", "--log", str(trail.dir), "--log", str(other.dir),
                       "--event", "session_start", "--subject", "agent-a")  # fmt: skip
    rows = out.strip().split("\n")
    assert rows[0].split()[0] == "TRAIL" and len(rows) == 3
    assert {r.split()[0] for r in rows[1:]} == {trail.origin, "gw.test/other"}
