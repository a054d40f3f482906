"""Bulk read of 20,000 rows x 1 KB with psycopg (text format), best of N, as MB/s."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from pgbenchrun import Endpoint

BULK_ROWS = 20_000
ROW_BYTES = 1024  # repeat(md5, 32): 1 KB of text, under the TOAST threshold so stored inline


def create_table(dsn: str) -> None:
    """Create and fill the bulk table (as the service user, directly on PostgreSQL)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=15) as c:
        c.execute("DROP TABLE IF EXISTS bench_bulk")
        c.execute("CREATE TABLE bench_bulk (id int PRIMARY KEY, payload text NOT NULL)")
        c.execute("INSERT INTO bench_bulk SELECT i, repeat(md5(i::text), 32) "
                  "FROM generate_series(1, %s) AS i", (BULK_ROWS,))
        c.execute("VACUUM ANALYZE bench_bulk")


@dataclass
class BulkResult:
    """MB/s is payload megabytes (10^6 B of the 1 KB column) per second; best and median of N."""

    select_best_mb_s: float
    select_median_mb_s: float
    copy_best_mb_s: float
    copy_median_mb_s: float
    repeats: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(ep: Endpoint, repeats: int) -> BulkResult:
    """Time `SELECT *` fetched as Python rows, and `COPY TO STDOUT`, on one warm connection."""
    payload_mb = BULK_ROWS * ROW_BYTES / 1e6
    sel: list[float] = []
    cpy: list[float] = []
    with psycopg.connect(host=ep.host, port=ep.port, dbname=ep.dbname, user=ep.user,
                         password=ep.password, sslmode="disable", autocommit=True,
                         connect_timeout=15) as c:
        # One untimed pass of each warms PG's buffers and the gateway's decision cache.
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            with c.cursor() as cur:
                cur.execute("SELECT id, payload FROM bench_bulk")
                rows = cur.fetchall()
            dt = time.perf_counter() - t0
            if len(rows) != BULK_ROWS:
                raise RuntimeError(f"bulk read via {ep.name} returned {len(rows)} rows")
            if i:
                sel.append(payload_mb / dt)
            t0 = time.perf_counter()
            n = 0
            with c.cursor() as cur, cur.copy("COPY bench_bulk TO STDOUT") as cp:
                for block in cp:
                    n += len(block)
            dt = time.perf_counter() - t0
            if n < BULK_ROWS * ROW_BYTES:
                raise RuntimeError(f"bulk COPY via {ep.name} returned only {n} bytes")
            if i:
                cpy.append(payload_mb / dt)
    sel.sort()
    cpy.sort()
    return BulkResult(select_best_mb_s=sel[-1], select_median_mb_s=sel[len(sel) // 2],
                      copy_best_mb_s=cpy[-1], copy_median_mb_s=cpy[len(cpy) // 2],
                      repeats=repeats)
