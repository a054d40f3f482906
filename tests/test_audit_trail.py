"""The audit trail as an operator and an auditor see it, through real drivers: every record
canonical, numbered and chained; signed checkpoints in the log, in `checkpoint`, in the copy
directory and on the checkpoint command's stdin; segment rotation; a restart (also after a
torn write) continuing the chain and the tree; key rotation; sync = "statement" and "write"
putting a statement's record in the file before the database sees the statement."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest

from audit_check import check_trail
from harness import AUDIT_ORIGIN, psycopg_connect, session_audit_keys
from phigate.audit.keys import write_keys

pytestmark = pytest.mark.integration


def pub() -> Path:
    return session_audit_keys() / "audit.pub"


def run_statements(gw: Any, tok: str, n: int) -> None:
    with psycopg_connect(gw, tok) as conn:
        for i in range(n):
            conn.execute("select %s::int + 1", (i,)).fetchone()


def test_every_record_is_canonical_chained_and_checkpointed(gateway_factory, token):
    gw = gateway_factory()
    run_statements(gw, token(sub="trail-agent"), 5)
    gw.stop()
    checked = check_trail(gw.audit_dir, [pub()], AUDIT_ORIGIN)
    events = [r["event"] for r in checked.records]
    assert events[0] == "audit_open" and events[-2:] == ["audit_close", "checkpoint"]
    assert checked.records[0]["key"] == pub().read_text().strip()
    assert events.count("statement") >= 5 and "session_start" in events
    # The latest note is `checkpoint`, and it covers every record before the last one.
    assert (gw.audit_dir / "checkpoint").read_text() == checked.checkpoints[-1]["note"]
    assert checked.checkpoints[-1]["size"] == len(checked.records) - 1


def test_checkpoint_copy_dir_and_command_get_the_note(gateway_factory, token, tmp_path):
    copy = tmp_path / "worm"
    copy.mkdir()
    received = tmp_path / "pushed-note"
    command = [sys.executable, "-c",
               f"import sys; open({str(received)!r}, 'w').write(sys.stdin.read())"]  # fmt: skip
    gw = gateway_factory(audit={"checkpoint_copy_dir": str(copy), "checkpoint_command": command})
    run_statements(gw, token(sub="trail-agent"), 3)
    gw.stop()
    checked = check_trail(gw.audit_dir, [pub()], AUDIT_ORIGIN)
    last = checked.checkpoints[-1]["note"]
    assert (copy / "checkpoint").read_text() == last
    assert received.read_text() == last  # the run for the final checkpoint finished on stop


def test_segments_rotate_right_after_checkpoints(gateway_factory, token):
    gw = gateway_factory(audit={"segment_max_bytes": 65536, "checkpoint_every": 50})
    run_statements(gw, token(sub="trail-agent"), 600)
    gw.stop()
    checked = check_trail(gw.audit_dir, [pub()], AUDIT_ORIGIN)
    assert len(checked.segments) >= 3
    for seg in checked.segments[:-1]:
        last = json.loads(seg.read_text().splitlines()[-1])
        assert last["rec"]["event"] == "checkpoint", f"{seg.name} does not end with a checkpoint"


def test_a_restart_continues_the_chain_and_sets_a_torn_tail_aside(
    gateway_factory, token, tmp_path
):
    trail = tmp_path / "trail"
    trail.mkdir()
    gw = gateway_factory(audit={"dir": str(trail)})
    run_statements(gw, token(sub="trail-agent"), 3)
    gw.stop()
    first = check_trail(trail, [pub()], AUDIT_ORIGIN)
    # A write cut short by a crash: half a line at the end of the last segment.
    torn = b'{"prev":"' + b"0" * 64 + b'","rec":{"event":"statem'
    with open(first.segments[-1], "ab") as f:
        f.write(torn)

    gw = gateway_factory(audit={"dir": str(trail)})
    run_statements(gw, token(sub="trail-agent"), 2)
    gw.stop()
    second = check_trail(trail, [pub()], AUDIT_ORIGIN)
    assert second.records[: len(first.records)] == first.records
    reopened = second.records[len(first.records)]
    assert reopened["event"] == "audit_open"
    assert reopened["recovered"]["bytes"] == len(torn)
    assert reopened["recovered"]["segment"] == first.segments[-1].name
    aside = list(trail.glob("segment-*.jsonl.torn-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == torn
    assert [r["event"] for r in second.records].count("statement") >= 5


def test_key_rotation_dual_signs_and_an_unknown_key_refuses_to_start(
    gateway_factory, token, tmp_path
):
    trail = tmp_path / "trail"
    trail.mkdir()
    gw = gateway_factory(audit={"dir": str(trail)})
    run_statements(gw, token(sub="trail-agent"), 1)
    gw.stop()

    new_keys = tmp_path / "new-keys"
    write_keys(new_keys, AUDIT_ORIGIN)
    old_key = str(session_audit_keys() / "audit.key")
    gw = gateway_factory(audit={"dir": str(trail), "signing_key": str(new_keys / "audit.key"),
                                "previous_signing_key": old_key})  # fmt: skip
    run_statements(gw, token(sub="trail-agent"), 1)
    gw.stop()
    checked = check_trail(trail, [pub(), new_keys / "audit.pub"], AUDIT_ORIGIN)
    events = [r["event"] for r in checked.records]
    rotated = events.index("audit_key_rotated")
    assert checked.records[rotated]["old_key"] == pub().read_text().strip()
    assert checked.records[rotated]["new_key"] == (new_keys / "audit.pub").read_text().strip()
    dual = next(i for i, r in enumerate(checked.checkpoints) if len(checked.signers[i]) == 2)
    assert checked.checkpoints[dual]["size"] > [
        i for i, e in enumerate(events) if e == "audit_key_rotated"][0]  # fmt: skip
    assert all(len(s) == 1 for s in checked.signers[dual + 1 :])

    stranger = tmp_path / "stranger-keys"
    write_keys(stranger, AUDIT_ORIGIN)
    with pytest.raises(RuntimeError) as refused:
        gateway_factory(audit={"dir": str(trail), "signing_key": str(stranger / "audit.key")})
    assert "set previous_signing_key" in str(refused.value)
    assert type(refused.value).__name__ == "AuditError"


@pytest.mark.parametrize("sync", ["statement", "write"])
def test_awaiting_sync_modes_write_the_record_before_the_database_runs_it(
    gateway_factory, token, pg, sync
):
    # The trail where PostgreSQL's own user can read it, so a trigger can look at it while
    # the statement runs inside the database.
    trail = Path(tempfile.mkdtemp(prefix="phigate-sync-trail-"))
    os.chmod(trail, 0o755)  # noqa: S103 - PostgreSQL runs as another user
    gw = gateway_factory(audit={"dir": str(trail), "sync": sync})
    assert gw.thread.gateway.engine.audit_status()["sync"] == sync
    segment = trail / "segment-000000000000.jsonl"
    os.chmod(segment, 0o644)  # noqa: S103
    with psycopg.connect(pg.dsn(pg.ehr_database), autocommit=True) as admin:
        admin.execute("drop table if exists audit_probe_t")
        admin.execute("create table audit_probe_t (v int, seen boolean)")
        admin.execute(f"grant insert, select on audit_probe_t to {pg.service_user}")
        admin.execute(f"""
            create or replace function audit_probe_f() returns trigger language plpgsql
            security definer as $$ begin
              new.seen := position('audit_probe_t' in pg_read_file('{segment}')) > 0;
              return new;
            end $$""")  # fmt: skip
        admin.execute("create trigger audit_probe before insert on audit_probe_t "
                      "for each row execute function audit_probe_f()")  # fmt: skip
        try:
            with psycopg_connect(gw, token(sub="sync-agent")) as conn:
                conn.execute("insert into audit_probe_t (v) values (1)")
            seen = admin.execute("select seen from audit_probe_t").fetchall()
        finally:
            admin.execute("drop table audit_probe_t")
            admin.execute("drop function audit_probe_f()")
    gw.stop()
    assert seen == [(True,)], "the database ran the statement before its record was written"
    check_trail(trail, [pub()], AUDIT_ORIGIN)
