"""The events log an operator reads: sessions, statements (with cache use), results and the
data plane's counters, in order, normalized, and never with the token or literal values."""

from __future__ import annotations

import pytest

from harness import psycopg_connect

pytestmark = pytest.mark.integration


def test_events_trace_a_session_without_secrets_or_literals(gateway_factory, token):
    gw = gateway_factory()
    tok = token(sub="events-agent")
    with psycopg_connect(gw, tok) as conn:
        for mrn in ("MRN-7001", "MRN-7002"):
            # Literals on purpose (not parameters): the log must show neither of them.
            conn.execute("select count(*) from patients where mrn = '" + mrn + "'").fetchone()  # noqa: S608
    gw.stop()
    events = gw.events()
    kinds = [e["event"] for e in events]
    assert kinds[0] == "gateway_start" and "session_end" in kinds
    assert kinds[-2:] == ["stats", "gateway_stop"]
    (start,) = [e for e in events if e["event"] == "session_start"]
    assert start["subject"] == "events-agent" and start["tls"] == "TLSv1.3"
    assert start["target"] == "ehr"
    stmts = [
        e for e in events if e["event"] == "statement" and "patients" in (e["normalized"] or "")
    ]
    assert [s["cached"] for s in stmts] == [False, True]  # same shape, other literal: cache hit
    assert all(s["decision"] == "allow" and "$1" in s["normalized"] for s in stmts)
    results = [e for e in events if e["event"] == "result"]
    assert results and all(r["sqlstate"] is None and r["bytes"] > 0 for r in results)
    stats = events[-2]
    assert (
        stats["cache_hits"] >= 1 and stats["sessions_total"] == 1 and stats["sessions_active"] == 0
    )
    raw = gw.trail_text()
    assert tok not in raw and tok.split(".")[2] not in raw
    assert "MRN-7001" not in raw and "MRN-7002" not in raw
