"""The audit part: pgbench -S through phigate with the audit trail off, sync = batch, write and
statement, one gateway process per mode, cells interleaved; then every trail is verified with
`phigate audit verify`."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gateway
import pgbenchrun
from pgbenchrun import Endpoint
from procs import Registry, log

# "off" is the baseline (benches/gateway_noaudit.py): records formatted, then dropped.
SYNCS = ("off", "batch", "write", "statement")
MODES = ("simple", "prepared")
CLIENT_SETS = ((1, 1), (8, 2))
BATCH_RATIO_TARGET = 0.95  # batch TPS / off TPS, every cell
NOAUDIT = Path(__file__).resolve().parent / "gateway_noaudit.py"
_DROPPED = re.compile(r"gateway_noaudit: (\d+) record bytes formatted and dropped")
_RATE = re.compile(r"in ([0-9.]+) s \(([0-9,]+) records/s\)")


@dataclass
class Measured:
    """One gateway of the part: its sync mode, process, endpoint and trail."""

    sync: str
    gw: gateway.Gateway
    ep: Endpoint
    trail: Path | None
    pubkey: Path | None
    transactions: int = 0  # every pgbench transaction sent to it (warm-up included)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)


def start(reg: Registry, workdir: Path, *, pg_port: int, db: str, svc_user: str, svc_pw: str,
          workers: int) -> list[Measured]:
    """One gateway process per mode, each with its own trail dir, keys and token."""
    out = []
    for sync in SYNCS:
        gw = gateway.Gateway(reg, workdir, name=f"phigate-audit-{sync}")
        token, jwks = gateway.mint_token(gw.dir / "keys", ttl_seconds=6 * 3600)
        trail = None if sync == "off" else gw.dir / "trail"
        cfg = gateway.write_config(
            gw.dir, port=gw.port, jwks=jwks, pg_port=pg_port, pool_port=None, pool_db="",
            upstream_db=db, svc_user=svc_user, svc_password=svc_pw, audit_dir=trail,
            audit_sync="batch" if sync == "off" else sync, workers=workers)
        command = [sys.executable, str(NOAUDIT), str(cfg)] if sync == "off" else None
        gw.start(cfg, command=command)
        ep = Endpoint(f"phigate:{sync}", gw.port, "bench", gateway.AGENT, token)
        out.append(Measured(sync, gw, ep, trail, gw.dir / "audit.pub" if trail else None))
    return out


def warmup(pgbench: Path, gws: list[Measured], seconds: int) -> None:
    """Decision caches and PostgreSQL's buffers warm for every protocol mode."""
    for mode in MODES:
        for m in gws:
            try:
                r = pgbenchrun.run_pgbench(pgbench, m.ep, mode=mode, clients=8, threads=2,
                                           duration=seconds, latency_log=False)
                m.transactions += r.transactions
            except Exception as e:  # noqa: BLE001 - the measured run reports it
                log(f"audit warm-up {mode} via {m.ep.name} failed: {str(e).splitlines()[0]}")


def measure(pgbench: Path, gws: list[Measured], *, repeat: int, duration: int,
            latency_log: bool, errors: list[str]) -> list[dict[str, Any]]:
    """Every cell for every mode; modes take turns within a cell and the first one rotates from
    cell to cell and repeat to repeat, so the machine's drift hits all modes alike. With
    repeat N each cell keeps its median-TPS run."""
    cells = [(mode, c, t) for mode in MODES for c, t in CLIENT_SETS]
    for rep in range(repeat):
        for i, (mode, clients, threads) in enumerate(cells):
            k = (rep + i) % len(gws)
            for m in gws[k:] + gws[:k]:
                m.runs.setdefault((mode, clients), []).append(
                    _one(pgbench, m, mode, clients, threads, duration, latency_log, errors,
                         f" #{rep + 1}" if repeat > 1 else ""))
    rows = []
    for mode, clients, threads in cells:
        row: dict[str, Any] = {"mode": mode, "clients": clients, "threads": threads,
                               "results": {}, "runs": {}}
        for m in gws:
            runs = m.runs[(mode, clients)]
            ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["tps"])
            row["results"][m.sync] = ok[len(ok) // 2] if ok else runs[-1]
            row["runs"][m.sync] = [r.get("tps") for r in runs]
        rows.append(row)
    return rows


def _one(pgbench: Path, m: Measured, mode: str, clients: int, threads: int, duration: int,
         latency_log: bool, errors: list[str], rep: str) -> dict[str, Any]:
    tag = f"audit -S {mode:<8} c={clients} {m.sync:<9}{rep}"
    if not m.gw.alive():
        errors.append(f"audit -S {mode} c={clients} sync={m.sync}: gateway exited; tail:\n"
                      f"```\n{m.gw.log_tail(10)}\n```")
        return {"error": "gateway exited"}
    try:
        r = pgbenchrun.run_pgbench(pgbench, m.ep, mode=mode, clients=clients, threads=threads,
                                   duration=duration, latency_log=latency_log,
                                   proxy_pid=m.gw.pid)
    except Exception as e:  # noqa: BLE001 - one bad cell must not sink the run
        errors.append(f"audit -S {mode} c={clients} sync={m.sync}: {str(e).splitlines()[0]}")
        log(f"{tag} FAILED: {e}")
        return {"error": str(e)[-1500:]}
    m.transactions += r.transactions
    nan = float("nan")
    log(f"{tag} {r.tps:>9,.0f} tps  p50 {r.p50_ms if r.p50_ms is not None else nan:.3f} ms"
        f"  p99 {r.p99_ms if r.p99_ms is not None else nan:.3f} ms  proxy CPU "
        f"{r.proxy_cpu_us_per_txn if r.proxy_cpu_us_per_txn is not None else nan:.1f} µs/txn"
        + (f"  failed {r.failed}" if r.failed else ""))
    return r.as_dict()


def finish(gws: list[Measured], errors: list[str]) -> dict[str, Any]:
    """Stops every gateway (a trail is closed with a final checkpoint), then per trail: bytes,
    records, statement records, and `phigate audit verify` (a failure is a bench error)."""
    out: dict[str, Any] = {}
    for m in gws:
        code = m.gw.stop()
        if code != 0:
            errors.append(f"audit: the sync={m.sync} gateway exited with {code} on SIGTERM")
        if m.trail is None:
            found = _DROPPED.search(m.gw.log_tail(20))
            dropped = int(found.group(1)) if found else None
            out[m.sync] = {"record_bytes_dropped": dropped, "transactions": m.transactions,
                           "bytes_per_statement": (dropped / m.transactions
                                                   if dropped and m.transactions else None)}
            continue
        out[m.sync] = _trail_facts(m, errors)
    return out


def _trail_facts(m: Measured, errors: list[str]) -> dict[str, Any]:
    assert m.trail is not None and m.pubkey is not None
    size = records = statements = 0
    for seg in sorted(m.trail.glob("segment-*.jsonl")):
        size += seg.stat().st_size
        with open(seg, "rb") as f:
            while chunk := f.read(1 << 22):
                records += chunk.count(b"\n")
                statements += chunk.count(b'"event":"statement"')
    facts: dict[str, Any] = {
        "trail_bytes": size, "records": records, "statement_records": statements,
        "transactions": m.transactions,
        "bytes_per_statement": size / statements if statements else None,
        "records_per_statement": records / statements if statements else None,
    }
    argv = [sys.executable, "-m", "phigate.cli", "audit", "verify", "--log", str(m.trail),
            "--pubkey", str(m.pubkey)]
    t0 = time.monotonic()
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=3600,
                        env=gateway._env(), cwd=gateway.REPO)
    wall = time.monotonic() - t0
    text = (cp.stdout + cp.stderr).strip()
    rate = _RATE.search(text)
    facts["verify"] = {
        "ok": cp.returncode == 0, "exit_code": cp.returncode, "wall_s": round(wall, 1),
        "seconds": float(rate.group(1)) if rate else None,
        "records_per_s": float(rate.group(2).replace(",", "")) if rate else None,
        "output": text[-800:],
    }
    if cp.returncode != 0:
        errors.append(f"audit: `phigate audit verify` failed on the sync={m.sync} trail "
                      f"({cp.returncode}): {text.splitlines()[-1] if text else '?'}")
    log(f"audit trail sync={m.sync}: {size:,} bytes, {records:,} records, {statements:,} "
        f"statement records = {facts['bytes_per_statement'] or float('nan'):.0f} bytes/statement;"
        f" verify {'OK' if cp.returncode == 0 else 'FAILED'}"
        + (f" at {facts['verify']['records_per_s']:,.0f} records/s" if rate else ""))
    return facts


def write_vs_batch(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """write TPS / batch TPS per cell and their geometric mean."""
    per: dict[str, float] = {}
    for row in rows:
        w, b = (row["results"].get(s, {}).get("tps") for s in ("write", "batch"))
        if w and b:
            per[f"{row['mode']} c={row['clients']}"] = w / b
    geo = None
    if per:
        prod = 1.0
        for v in per.values():
            prod *= v
        geo = prod ** (1 / len(per))
    return {"per_cell": per, "geomean": geo}


def run_part(reg: Registry, workdir: Path, pgbench: Path, *, pg_port: int, db: str,
             svc_user: str, svc_pw: str, workers: int, warmup_s: int, repeat: int,
             duration: int, latency_log: bool, errors: list[str]) -> dict[str, Any]:
    gws = start(reg, workdir, pg_port=pg_port, db=db, svc_user=svc_user, svc_pw=svc_pw,
                workers=workers)
    if warmup_s > 0:
        warmup(pgbench, gws, warmup_s)
        log("audit warm-up done")
    rows = measure(pgbench, gws, repeat=repeat, duration=duration, latency_log=latency_log,
                   errors=errors)
    trails = finish(gws, errors)
    wb = write_vs_batch(rows)
    if wb["geomean"] is not None:
        log(f"audit: write/batch TPS geometric mean {wb['geomean']:.3f} "
            + ", ".join(f"{k} {v:.3f}" for k, v in wb["per_cell"].items()))
    return {"syncs": list(SYNCS), "rows": rows, "trails": trails, "write_vs_batch": wb}
