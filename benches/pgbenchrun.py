"""Runs the wheel's pgbench against one endpoint and parses TPS and per-transaction latency logs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from procs import LOOPBACK, tree_cpu_seconds


@dataclass(frozen=True)
class Endpoint:
    """Where a client connects: the same shape for direct, PgBouncer and phigate."""

    name: str
    port: int
    dbname: str
    user: str
    password: str
    host: str = LOOPBACK

    def env(self) -> dict[str, str]:
        # The password goes through the environment so it never shows in `ps`.
        return dict(os.environ, PGPASSWORD=self.password, PGSSLMODE="disable",
                    PGCONNECT_TIMEOUT="15", PGAPPNAME="phigate-bench")

    def args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", self.user]


@dataclass
class BenchResult:
    """One pgbench run. Latencies in ms; p50/p99 from per-transaction logs (None if not logged)."""

    tps: float
    transactions: int
    failed: int
    duration_s: float
    latency_avg_ms: float | None
    p50_ms: float | None
    p99_ms: float | None
    conn_time_ms: float | None
    proxy_cpu_us_per_txn: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_RE_TPS = re.compile(r"^tps = ([0-9.]+)", re.M)
_RE_TX = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_RE_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_RE_LAT = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_RE_CONN = re.compile(r"^average connection time = ([0-9.]+) ms", re.M)


def _percentiles(log_dir: Path) -> tuple[float | None, float | None]:
    """p50 and p99 in ms from pgbench --log files (column 3 is the latency in microseconds)."""
    lat: list[int] = []
    for f in log_dir.iterdir():
        with open(f) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lat.append(int(parts[2]))
    if not lat:
        return None, None
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] / 1000.0

    return pct(0.50), pct(0.99)


def init_db(pgbench: Path, ep: Endpoint, scale: int, timeout: float) -> None:
    """pgbench -i (tables, data, vacuum, primary keys) directly against PostgreSQL."""
    cp = subprocess.run([str(pgbench), *ep.args(), "-i", "-q", "-s", str(scale), ep.dbname],
                        env=ep.env(), capture_output=True, text=True, timeout=timeout)
    if cp.returncode != 0:
        raise RuntimeError(f"pgbench -i failed:\n{cp.stderr[-3000:]}")


def run_pgbench(pgbench: Path, ep: Endpoint, *, mode: str, clients: int, threads: int,
                duration: int, connect_each: bool = False, latency_log: bool = True,
                proxy_pid: int | None = None) -> BenchResult:
    """Run `pgbench -S` for `duration` seconds; bounded by a timeout well past the duration."""
    tmp = Path(tempfile.mkdtemp(prefix="pgbench-log-"))
    try:
        cmd = [str(pgbench), *ep.args(), "-n", "-S", "-M", mode, "-c", str(clients),
               "-j", str(threads), "-T", str(duration)]
        if connect_each:
            cmd.append("-C")
        if latency_log:
            cmd += ["--log", f"--log-prefix={tmp / 'tx'}"]
        cmd.append(ep.dbname)
        cpu0 = tree_cpu_seconds(proxy_pid) if proxy_pid else None
        cp = subprocess.run(cmd, env=ep.env(), capture_output=True, text=True, cwd=tmp,
                            timeout=duration + 120)
        cpu1 = tree_cpu_seconds(proxy_pid) if proxy_pid else None
        out = cp.stdout + cp.stderr
        m_tps, m_tx = _RE_TPS.search(out), _RE_TX.search(out)
        if cp.returncode != 0 or not m_tps or not m_tx:
            raise RuntimeError(f"pgbench against {ep.name} failed ({cp.returncode}):\n"
                               f"{' '.join(cmd)}\n{out[-3000:]}")
        m_f, m_lat, m_conn = _RE_FAILED.search(out), _RE_LAT.search(out), _RE_CONN.search(out)
        txns = int(m_tx.group(1))
        p50, p99 = _percentiles(tmp) if latency_log else (None, None)
        cpu_per = None
        if cpu0 is not None and cpu1 is not None and txns > 0:
            cpu_per = (cpu1 - cpu0) / txns * 1e6
        return BenchResult(
            tps=float(m_tps.group(1)), transactions=txns,
            failed=int(m_f.group(1)) if m_f else 0, duration_s=float(duration),
            latency_avg_ms=float(m_lat.group(1)) if m_lat else None, p50_ms=p50, p99_ms=p99,
            conn_time_ms=float(m_conn.group(1)) if m_conn else None, proxy_cpu_us_per_txn=cpu_per,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
