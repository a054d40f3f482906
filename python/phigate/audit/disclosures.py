"""Accounting of disclosures (HIPAA §164.528) from the audit trail: which identities received a
person's rows, when, in which session and statement, which columns in clear and which masked,
and separately the results that may have carried them (rows of the person's relations sent
without the key that says whose they are).

Reads trail directories only (``segment-*.jsonl``, one ``{"prev","rec","seq"}`` line each); the
person is found by the keyed hash of their key value (the audit HMAC key), never by the value.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from phigate.audit.trail import LineError, list_segments, read_bodies
from phigate.errors import PhigateError

__all__ = [
    "Disclosure",
    "DisclosureError",
    "find_disclosures",
    "subject_hash",
    "trail_records",
]


class DisclosureError(PhigateError):
    """The trail cannot be read or the query is malformed."""


def subject_hash(hmac_key: bytes, value: str) -> str:
    """``h:`` and the first 32 hex digits of HMAC-SHA256(key, value as UTF-8 text): how the
    trail records a subject key (integer keys as their decimal text, whatever the wire format)."""
    return "h:" + hmac.new(hmac_key, value.encode(), hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class Disclosure:
    """One result that sent (``certain``) or may have sent the person's rows to an identity."""

    when: datetime
    identity: str | None  # the session's subject; None if its session_start is not in the logs
    session_id: int | None
    seq: int  # the trail sequence number of the result record
    relation: str
    certain: bool
    clear: tuple[str, ...] = ()
    masked: tuple[str, ...] = ()
    rows: int = 0  # possible disclosures: rows that may be this person's
    why: str = ""  # possible disclosures: "no key in the output" or "past the exact list"

    def to_json(self) -> dict[str, Any]:
        return {
            "when": _iso(self.when),
            "identity": self.identity,
            "session_id": self.session_id,
            "seq": self.seq,
            "relation": self.relation,
            "disclosure": "certain" if self.certain else "possible",
            "clear": list(self.clear),
            "masked": list(self.masked),
            "rows": self.rows,
            "why": self.why,
        }


def trail_records(dirs: Iterable[Path]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(seq, record body) of every line of every segment in ``dirs``, in file order."""
    for d in dirs:
        if not d.is_dir():
            raise DisclosureError(f"{d}: not a directory (give the audit trail directory)")
        if not list_segments(d):
            raise DisclosureError(f"{d}: no segment-*.jsonl files (is this an audit trail?)")
        try:
            yield from read_bodies(d)
        except LineError as exc:
            raise DisclosureError(str(exc)) from None


def _when(ts: Any) -> datetime | None:
    if isinstance(ts, str):
        try:
            return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC)
        except ValueError:
            return None
    if isinstance(ts, int | float) and not isinstance(ts, bool):
        return datetime.fromtimestamp(ts, UTC)
    return None


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def find_disclosures(
    records: Iterable[tuple[int, dict[str, Any]]],
    hashed: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    relations: frozenset[str] | None = None,
) -> tuple[list[Disclosure], list[Disclosure]]:
    """(certain, possible) disclosures of the person whose key hashes to ``hashed``.

    ``relations`` limits possible disclosures to those relations (the person's own relations;
    None: every subject relation). A result whose relation kept more distinct persons than the
    exact list holds, without this one among them, is a possible disclosure of it.
    """
    identities: dict[Any, str | None] = {}
    certain: list[Disclosure] = []
    possible: list[Disclosure] = []
    for seq, rec in records:
        event = rec.get("event")
        if event == "session_start":
            subject = rec.get("subject")
            identities[rec.get("session_id")] = subject if isinstance(subject, str) else None
            continue
        if event != "result":
            continue
        subjects, maybe = rec.get("subjects"), rec.get("possible")
        if not subjects and not maybe:
            continue
        when = _when(rec.get("ts"))
        if when is None or (since is not None and when < since):
            continue
        if until is not None and when > until:
            continue
        sid = rec.get("session_id")
        session = sid if isinstance(sid, int) else None
        base = Disclosure(when=when, identity=identities.get(sid), session_id=session, seq=seq,
                          relation="", certain=False)  # fmt: skip
        for relation, d in sorted((subjects or {}).items()):
            if not isinstance(d, dict):
                continue
            seen = replace(base, relation=relation, clear=tuple(d.get("clear") or ()),
                           masked=tuple(d.get("masked") or ()))  # fmt: skip
            if hashed in (d.get("h") or ()):
                certain.append(replace(seen, certain=True))
            elif int(d.get("more") or 0) > 0 and (relations is None or relation in relations):
                possible.append(replace(seen, rows=int(d["more"]), why="past the exact list"))
        for relation, rows in sorted((maybe or {}).items()):
            if relations is None or relation in relations:
                possible.append(replace(base, relation=relation, rows=int(rows),
                                        why="no key in the output"))  # fmt: skip
    return certain, possible


def format_table(items: list[Disclosure], *, certain: bool) -> str:
    """A readable table of disclosures (one line each)."""
    if certain:
        head = ("WHEN (UTC)", "IDENTITY", "SESSION", "SEQ", "RELATION", "CLEAR", "MASKED")
        rows = [(_iso(d.when)[:23], d.identity or "?", str(d.session_id or "?"), str(d.seq),
                 d.relation, ",".join(d.clear) or "-", ",".join(d.masked) or "-")
                for d in items]  # fmt: skip
    else:
        head = ("WHEN (UTC)", "IDENTITY", "SESSION", "SEQ", "RELATION", "ROWS", "WHY")
        rows = [(_iso(d.when)[:23], d.identity or "?", str(d.session_id or "?"), str(d.seq),
                 d.relation, str(d.rows), d.why) for d in items]  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    )
