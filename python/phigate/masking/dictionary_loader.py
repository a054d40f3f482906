"""Feed the identifier dictionary: read the distinct values of classified identifier columns
through the gateway's own connection and hand them to the data plane batch by batch.

Why the database is the dictionary: names, street addresses and towns have no shape a pattern
could find in a note, but the gateway knows every patient's name — it is in the classified
columns. The data plane keeps each value only as keyed hashes of its folded words (the key is
made when the gateway starts) and tags matching word sequences in text that leaves for a
masked identity. Python holds the clear values of one batch at a time and never logs them.

Refreshing: at start and on reload every column is read again into a new dictionary. Between
reloads, every ``refresh_seconds`` the gateway asks PostgreSQL's statistics which of those
tables changed (inserted, updated or deleted rows since the last read) and reads only those
again, adding their values to the dictionary in force. Values of deleted rows stay until the
next full read: they were a patient's identifiers, so masking them a while longer is right.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from phigate.config import Config
from phigate.masking.mask_sql import _ident

__all__ = [
    "BATCH_ROWS",
    "BuilderLike",
    "IdentifierLoad",
    "dictionary_columns",
    "new_builder",
    "read_identifiers",
    "changed_tables",
    "load_identifiers",
    "refresh_identifiers",
    "relation_signatures",
]

log = logging.getLogger(__name__)

#: Values handed to the data plane per call: bounds the clear values Python holds at once.
BATCH_ROWS = 10_000


class BuilderLike(Protocol):
    """The data plane's dictionary builder (``phigate._native.DictionaryBuilder``)."""

    def add(self, kind: str, values: list[str | None]) -> int: ...

    def __len__(self) -> int: ...


@dataclass
class IdentifierLoad:
    """One read of a target's identifier columns: the builder holding their hashes (taken by
    ``Engine.set_dictionary``), and what the next refresh compares against."""

    builder: BuilderLike | None
    columns: int  # columns read
    values: int  # distinct values read (before tokenizing)
    seconds: float
    #: (schema, table) -> change counter from the statistics; None: always read again.
    signatures: Mapping[tuple[str, str], int | None] = field(default_factory=dict)

    def take(self) -> BuilderLike | None:
        """The builder, once: the engine consumes it."""
        b, self.builder = self.builder, None
        return b

    def summary(self) -> dict[str, Any]:
        """What events and logs say about the read (counts only, never a value)."""
        return {"columns": self.columns, "values": self.values,
                "duration_us": round(self.seconds * 1_000_000)}  # fmt: skip


def new_builder(config: Config) -> BuilderLike:
    """An empty builder with the configured stop words and minimum token length."""
    from phigate import _native

    d = config.phi.dictionary
    builder: BuilderLike = _native.DictionaryBuilder(sorted(d.stop_words), d.min_chars)
    return builder


def dictionary_columns(config: Config) -> list[tuple[str, str, str, str]]:
    """(schema, table, column, kind) of every classified column the dictionary learns, sorted."""
    d = config.phi.dictionary
    if not d.enabled:
        return []
    columns = config.phi.columns.items()
    return sorted((s, t, c, rule.kind) for (s, t, c), rule in columns if rule.kind in d.kinds)


def relation_signatures(
    cur: Any, relations: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], int | None]:
    """A change counter per table from pg_stat_all_tables (rows inserted + updated + deleted
    since the statistics were reset); None where there is none (a partitioned parent, or
    statistics off), which makes every refresh read that table."""
    rels = sorted(set(relations))
    if not rels:
        return {}
    # Without track_counts the counters never move: every refresh must read every table.
    cur.execute("SELECT pg_catalog.current_setting('track_counts')::bool")
    row = cur.fetchone()
    if not (row and row[0]):
        return dict.fromkeys(rels)
    cur.execute(
        "SELECT n.nspname, c.relname, c.relkind::text,"
        " s.n_tup_ins + s.n_tup_upd + s.n_tup_del"
        " FROM pg_catalog.pg_class c"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " LEFT JOIN pg_catalog.pg_stat_all_tables s ON s.relid = c.oid"
        " WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
        ([s for s, _ in rels], [t for _, t in rels]),
    )
    out: dict[tuple[str, str], int | None] = dict.fromkeys(rels)
    for schema, name, relkind, changes in cur.fetchall():
        out[(schema, name)] = int(changes) if relkind == "r" and changes is not None else None
    return out


def read_identifiers(
    conn: Any,
    columns: Iterable[tuple[str, str, str, str]],
    builder: BuilderLike,
) -> tuple[int, int]:
    """Stream the distinct non-null values of ``columns`` into ``builder``; returns (columns
    read, values read). ``conn`` is the gateway's own psycopg connection, inside a read-only
    transaction; a server-side cursor keeps one batch in memory at a time."""
    ncols = nvalues = 0
    for schema, table, column, kind in columns:
        ncols += 1
        # Names from the config, quoted as identifiers.
        col, rel = _ident(column), f"{_ident(schema)}.{_ident(table)}"
        sql = f"SELECT DISTINCT {col}::text FROM {rel} WHERE {col} IS NOT NULL"  # noqa: S608
        with conn.cursor(name=f"phigate_dictionary_{ncols}") as cur:
            cur.itersize = BATCH_ROWS
            try:
                cur.execute(sql)
            except Exception as exc:
                if getattr(exc, "sqlstate", None) != "42501":
                    raise
                from phigate.masking.classification import CatalogError

                # The catalog read fails with this reason (masked identities are refused
                # until it succeeds): a dictionary without the column would miss its names.
                raise CatalogError(
                    f"the identifier dictionary cannot read {schema}.{table}.{column} (kind "
                    f"{kind!r}): the service user lacks SELECT on {schema}.{table}; grant it, "
                    f"or leave {kind!r} out of [phi.dictionary] kinds"
                ) from None
            while True:
                rows = cur.fetchmany(BATCH_ROWS)
                if not rows:
                    break
                nvalues += len(rows)
                builder.add(kind, [r[0] for r in rows])
                del rows
    return ncols, nvalues


def load_identifiers(
    conn: Any,
    config: Config,
    builder: BuilderLike | None = None,
    before: Mapping[tuple[str, str], int | None] | None = None,
) -> IdentifierLoad | None:
    """Read the identifier columns into ``builder`` (a new one when None): all of them, or with
    ``before`` (the signatures of the last read) only those of tables that changed since. None
    when the dictionary is off or nothing is classified for it."""
    columns = dictionary_columns(config)
    if not columns:
        return None
    started = time.monotonic()
    with conn.cursor() as cur:
        signatures = relation_signatures(cur, {(s, t) for s, t, _, _ in columns})
    if before is not None:
        changed = changed_tables(before, signatures)
        columns = [c for c in columns if (c[0], c[1]) in changed]
    b = builder if builder is not None else new_builder(config)
    ncols, nvalues = read_identifiers(conn, columns, b)
    return IdentifierLoad(
        builder=b, columns=ncols, values=nvalues, seconds=time.monotonic() - started,
        signatures=signatures,
    )  # fmt: skip


def refresh_identifiers(
    config: Config,
    target_name: str,
    before: Mapping[tuple[str, str], int | None],
    builder: BuilderLike,
) -> IdentifierLoad | None:
    """One periodic refresh of ``target_name`` (blocking: run it in a thread): the values of
    tables changed since ``before`` added to ``builder`` (which starts from the dictionary in
    force). Raises CatalogError when the database cannot be read."""
    from phigate.masking.classification import read_only_transaction

    with read_only_transaction(config, target_name, "the identifier dictionary") as conn:
        return load_identifiers(conn, config, builder, before)


def changed_tables(
    before: Mapping[tuple[str, str], int | None], now: Mapping[tuple[str, str], int | None]
) -> frozenset[tuple[str, str]]:
    """Tables to read again: their counter moved, or it is unknown on either side."""
    return frozenset(
        rel for rel, n in now.items() if n is None or before.get(rel) is None or before[rel] != n
    )
