"""How search results and a session's story read on a terminal: short, in order, one record a
line, the fields that matter for each kind of record first."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from phigate.audit.index import Hit, session_of

__all__ = ["detail", "session_story", "table"]

_SHOWN_ELSEWHERE = frozenset(
    {"ts", "event", "session", "session_id", "subject", "decision", "relations", "normalized"}
)
_DETAIL_WIDTH = 70


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def _pairs(rec: dict[str, Any], skip: Iterable[str] = ()) -> str:
    skipped = _SHOWN_ELSEWHERE | set(skip)
    return " ".join(f"{k}={_value(v)}" for k, v in sorted(rec.items())
                    if k not in skipped and v is not None)  # fmt: skip


def detail(rec: dict[str, Any]) -> str:
    """What a record says beyond its time, kind, session, subject and decision."""
    event = rec.get("event")
    if event == "statement":
        # The rule and error code first: a narrow terminal cuts the end of the line.
        parts = [str(rec.get("normalized") or ""), _pairs(rec, {"cached", "protocol"})]
        if rec.get("relations"):
            parts.append("relations=" + ",".join(map(str, rec["relations"])))
        return "  ".join(p for p in parts if p)
    if event == "checkpoint":
        return f"size={rec.get('size')} root={rec.get('root')}"
    if event == "audit_key_rotated":
        return _pairs(rec)  # which keys: the point of the record
    return _pairs(rec, {"note", "range", "key"})  # long key texts say little in a table


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table(hits: Sequence[tuple[str, Hit]], show_origin: bool) -> str:
    """Search results as aligned columns (the detail column is cut to fit a terminal)."""
    header = ["TIME", "SEQ", "EVENT", "SESSION", "SUBJECT", "DECISION", "DETAIL"]
    if show_origin:
        header.insert(0, "TRAIL")
    rows = [header]
    for origin, h in hits:
        row = [
            str(h.rec.get("ts", "")), str(h.seq), str(h.rec.get("event", "")),
            session_of(h.rec) or "-", h.subject or "-", _value(h.rec.get("decision") or "-"),
            _short(detail(h.rec), _DETAIL_WIDTH),
        ]  # fmt: skip
        if show_origin:
            row.insert(0, origin)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )


def session_story(session: str, origin: str, hits: Sequence[Hit]) -> str:
    """One session in order: a header with who and where, then one line per record."""
    out: list[str] = []
    runs: dict[int, list[Hit]] = {}
    for h in hits:
        runs.setdefault(h.run, []).append(h)
    for run, records in runs.items():
        subject = next((h.subject for h in records if h.subject), None) or "unknown"
        first, last = records[0].rec.get("ts", "?"), records[-1].rec.get("ts", "?")
        out.append(
            f"session {session} of {subject} on {origin} (gateway run from seq {run}), "
            f"{first} .. {last}, {len(records)} records"
        )
        for h in records:
            rec = h.rec
            decision = rec.get("decision")
            head = f"  {rec.get('ts', '')}  #{h.seq:<8} {rec.get('event', '')}"
            if decision is not None:
                head += f" [{decision}]"
            out.append(f"{head}  {detail(rec)}".rstrip())
        out.append("")
    return "\n".join(out).rstrip("\n")
