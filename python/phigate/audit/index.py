"""The search index: a rebuildable SQLite file next to the trail (or anywhere) over the fields a
search needs, updated incrementally, pointing back at each record's bytes in its segment."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from phigate.audit.trail import Segment, iter_lines, list_segments, segment_name
from phigate.errors import PhigateError

__all__ = ["INDEX_FILE", "Hit", "Index", "IndexError_", "Query"]

INDEX_FILE = "index.sqlite3"
_VERSION = "1"
_BATCH = 20_000  # rows per executemany: bounded memory, few round trips

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE segments(first_seq INTEGER PRIMARY KEY, indexed_bytes INTEGER NOT NULL,
                      next_line INTEGER NOT NULL);
CREATE TABLE records(seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, event TEXT NOT NULL,
                     session TEXT, run INTEGER NOT NULL, subject TEXT, decision TEXT, rule TEXT,
                     sqlstate TEXT, segment INTEGER NOT NULL, offset INTEGER NOT NULL,
                     length INTEGER NOT NULL);
CREATE TABLE relations(relation TEXT NOT NULL, seq INTEGER NOT NULL,
                       PRIMARY KEY(relation, seq)) WITHOUT ROWID;
CREATE INDEX records_ts ON records(ts);
CREATE INDEX records_session ON records(session, seq);
CREATE INDEX records_subject ON records(subject, ts);
CREATE INDEX records_event ON records(event, ts);
CREATE INDEX records_decision ON records(decision, ts);
CREATE INDEX records_rule ON records(rule, ts);
CREATE INDEX records_sqlstate ON records(sqlstate, ts);
"""


class IndexError_(PhigateError):  # noqa: N801 - IndexError is a builtin
    """The index cannot be opened, built or trusted; the message says what to do."""


@dataclass(frozen=True)
class Query:
    since: str | None = None  # ts >= since (RFC 3339 UTC, the trail's own form)
    until: str | None = None  # ts < until
    subject: str | None = None
    session: str | None = None
    relation: str | None = None
    decision: str | None = None
    rule: str | None = None
    sqlstate: str | None = None
    event: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class Hit:
    seq: int
    run: int  # seq of the audit_open that started the gateway run this record belongs to
    subject: str | None
    line: bytes  # the record's line as stored
    rec: dict[str, Any]


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def session_of(rec: dict[str, Any]) -> str | None:
    """The session a record belongs to: producers name it "session" or "session_id"."""
    return _text(rec.get("session", rec.get("session_id")))


class Index:
    """One trail's index. ``update()`` catches up with the segment files; queries read it."""

    def __init__(self, trail_dir: Path, index_file: Path | None = None) -> None:
        self.trail_dir = trail_dir
        self.path = index_file or trail_dir / INDEX_FILE
        try:
            self.db = sqlite3.connect(self.path)
        except sqlite3.Error as exc:
            raise IndexError_(
                f"cannot open the index {self.path}: {exc} (pass --index FILE somewhere writable)"
            ) from None
        self.db.execute("PRAGMA synchronous=OFF")  # rebuildable: a crash costs a rebuild only
        self.db.execute("PRAGMA temp_store=MEMORY")

    def close(self) -> None:
        self.db.close()

    # --- building ---------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _first_line_digest(self, segments: list[Segment]) -> str:
        if not segments:
            return ""
        with segments[0].path.open("rb") as f:
            return hashlib.sha256(f.readline()).hexdigest()

    def _reset(self, digest: str) -> None:
        tables = [
            r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        for t in tables:
            self.db.execute(f'DROP TABLE "{t}"')
        self.db.executescript(_SCHEMA)
        self.db.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [("version", _VERSION), ("first_line", digest), ("run", "0")],
        )

    def update(self, rebuild: bool = False) -> int:
        """Index what was appended since the last update; rebuilds when the trail no longer
        matches what was indexed (a segment shrank or went, or another trail is there).
        Returns the number of records added."""
        segments = list_segments(self.trail_dir)
        digest = self._first_line_digest(segments)
        try:
            stale = rebuild or self._meta("version") != _VERSION
            stale = stale or self._meta("first_line") != digest
            done = {} if stale else dict(self._segments_done())
        except sqlite3.DatabaseError:
            stale, done = True, {}
        present = {s.first_seq: s for s in segments}
        if any(first not in present or present[first].path.stat().st_size < size
               for first, (size, _) in done.items()):  # fmt: skip
            stale, done = True, {}
        try:
            with self.db:
                if stale:
                    self._reset(digest)
                return self._add(segments, done)
        except sqlite3.Error as exc:
            raise IndexError_(f"cannot write the index {self.path}: {exc}") from None

    def _segments_done(self) -> Iterator[tuple[int, tuple[int, int]]]:
        for first, size, nxt in self.db.execute("SELECT * FROM segments"):
            yield int(first), (int(size), int(nxt))

    def _add(self, segments: list[Segment], done: dict[int, tuple[int, int]]) -> int:
        run = int(self._meta("run") or 0)
        subjects: dict[str, str | None] = {}  # session -> subject, for records that omit it
        rows: list[tuple[Any, ...]] = []
        rels: list[tuple[str, int]] = []
        added = 0
        for seg in segments:
            size, next_line = done.get(seg.first_seq, (0, 1))
            if seg.path.stat().st_size == size:
                continue
            end = size
            for line in iter_lines(seg, size, next_line):
                if not line.complete:
                    break  # being written: index it next time
                try:
                    obj = orjson.loads(line.data)
                    rec, seq = obj["rec"], int(obj["seq"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise IndexError_(
                        f"{seg.name} line {line.number} is not a record; run "
                        "`phigate audit verify` on the trail"
                    ) from None
                event = str(rec.get("event"))
                if event == "audit_open":
                    run = seq
                    subjects.clear()  # session ids start over with each gateway run
                session = session_of(rec)
                subject = _text(rec.get("subject"))
                if session is not None:
                    if subject is not None:
                        subjects[session] = subject
                    elif session in subjects:
                        subject = subjects[session]
                    else:
                        subject = subjects[session] = self._subject(session, run)
                rows.append((
                    seq, str(rec.get("ts")), event, session, run, subject,
                    _text(rec.get("decision")), _text(rec.get("rule")),
                    _text(rec.get("sqlstate")), seg.first_seq, line.offset, len(line.data),
                ))  # fmt: skip
                for rel in rec.get("relations") or ():
                    if isinstance(rel, str):
                        rels.append((rel, seq))
                        if "." in rel:  # "patients" finds "public.patients" too
                            rels.append((rel.rsplit(".", 1)[1], seq))
                end = line.offset + len(line.data) + 1
                next_line = line.number + 1
                if len(rows) >= _BATCH:
                    added += self._flush(rows, rels)
            added += self._flush(rows, rels)
            self.db.execute(
                "INSERT OR REPLACE INTO segments VALUES (?, ?, ?)", (seg.first_seq, end, next_line)
            )
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'run'", (str(run),))
        return added

    def _subject(self, session: str, run: int) -> str | None:
        row = self.db.execute(
            "SELECT subject FROM records WHERE session = ? AND run = ? AND subject IS NOT NULL "
            "ORDER BY seq LIMIT 1",
            (session, run),
        ).fetchone()
        return None if row is None else str(row[0])

    def _flush(self, rows: list[tuple[Any, ...]], rels: list[tuple[str, int]]) -> int:
        n = len(rows)
        self.db.executemany("INSERT OR REPLACE INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        self.db.executemany("INSERT OR IGNORE INTO relations VALUES (?, ?)", rels)
        rows.clear()
        rels.clear()
        return n

    # --- querying ---------------------------------------------------------------------------
    def search(self, q: Query) -> Iterator[Hit]:
        where, params = [], []
        for column, value in (
            ("subject", q.subject), ("session", q.session), ("decision", q.decision),
            ("rule", q.rule), ("sqlstate", q.sqlstate), ("event", q.event),
        ):  # fmt: skip
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if q.since is not None:
            where.append("ts >= ?")
            params.append(q.since)
        if q.until is not None:
            where.append("ts < ?")
            params.append(q.until)
        if q.relation is not None:
            where.append("seq IN (SELECT seq FROM relations WHERE relation = ?)")
            params.append(q.relation)
        sql = "SELECT seq, run, subject, segment, offset, length FROM records"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq"
        if q.limit is not None:
            sql += f" LIMIT {int(q.limit)}"
        with contextlib.ExitStack() as files:
            open_files: dict[int, Any] = {}
            for seq, run, subject, segment, offset, length in self.db.execute(sql, params):
                f = open_files.get(segment)
                if f is None:
                    path = self.trail_dir / segment_name(segment)
                    f = open_files[segment] = files.enter_context(path.open("rb"))
                f.seek(offset)
                line = f.read(length)
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    obj = {}
                if obj.get("seq") != seq:
                    raise IndexError_(
                        f"the index {self.path} does not match the trail any more; run the "
                        "search again with --reindex"
                    )
                yield Hit(seq, run, subject, line, obj["rec"])
