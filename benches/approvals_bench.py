"""Approvals benchmark: how fast a held statement resumes after the approver's decision (one
gateway on SQLite; two gateways sharing a PostgreSQL state database, held on A and approved
through B), and what 1,000 statements held at once cost the gateway while they wait.

    make bench-approvals            # or: python benches/approvals_bench.py [--rounds N] [--held N]

Writes benches/results/<date>-<sha>-approvals.md. Targets: resume within 100 ms of the decision
(p95 of "approve call sent" → "rows at the client"), and no CPU while sessions wait.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "python"))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import gateway  # noqa: E402
import report  # noqa: E402
from pgserver import start_postgres  # noqa: E402
from procs import (  # noqa: E402
    LOOPBACK,
    Registry,
    begin_run,
    cpu_seconds,
    log,
    rss_kb,
    unprivileged_account,
)

REPO = Path(__file__).resolve().parent.parent
SVC_USER = "bench_svc"
DB = "bench"
STATE_DB = "phigate_state"
HELD_GROUP = "bench-held"
APPROVER_GROUP = "bench-approvers"
RESUME_TARGET_MS = 100.0
HELD_SQL = "SELECT count(*) FROM public.held WHERE v >= $1"


def extra_toml(workdir: Path, store: str, socket: Path, instance: str) -> str:
    me = getpass.getuser()
    return f"""
[roles.bench-held]
relations = ["public.held"]
operations = ["select"]
approval_relations = ["public.held"]
approval_timeout = "1h"

[approvals]
store = {json.dumps(store)}
instance = {json.dumps(instance)}
max_pending_per_identity = 10000

[approvals.admin_socket]
path = {json.dumps(str(socket))}
mode = "0600"
local_approvers = {{ {json.dumps(me)} = [{json.dumps(APPROVER_GROUP)}] }}

[approvers.bench]
groups = [{json.dumps(APPROVER_GROUP)}]
roles = ["bench-held"]
"""


class Admin:
    """The approver: the admin API over a gateway's unix socket (peer credentials)."""

    def __init__(self, socket: Path) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket)))

    async def pending(self) -> list[dict[str, Any]]:
        async with self.session.get("http://gateway/v1/approvals?status=pending&limit=10000") as r:
            r.raise_for_status()
            return list((await r.json())["approvals"])

    async def wait_pending(self, n: int, timeout: float = 120.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = await self.pending()
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(found)} of {n} requests pending after {timeout} s")
            await asyncio.sleep(0.01)

    async def vote(self, rid: str, verdict: str) -> None:
        url = f"http://gateway/v1/approvals/{rid}/{verdict}"
        async with self.session.post(url, json={"reason": "benchmark"}) as r:
            if r.status != 200:
                raise RuntimeError(f"{verdict} {rid}: HTTP {r.status} {await r.text()}")

    async def close(self) -> None:
        await self.session.close()


async def resume_latencies(port: int, token: str, approver: Admin, rounds: int) -> list[float]:
    """Per round: one held statement; ms from sending the approve call to the rows arriving."""
    conn = await asyncpg.connect(host=LOOPBACK, port=port, user=gateway.AGENT, password=token,
                                 database=DB, ssl=False)
    out: list[float] = []
    try:
        for i in range(rounds):
            done = asyncio.get_running_loop().create_future()

            async def run(v: int, fut: asyncio.Future[float]) -> None:
                await conn.fetchval(HELD_SQL, v)
                fut.set_result(time.perf_counter())

            task = asyncio.ensure_future(run(i, done))
            [request] = await approver.wait_pending(1)
            t0 = time.perf_counter()
            await approver.vote(request["id"], "approve")
            t1 = await asyncio.wait_for(done, 30)
            await task
            out.append((t1 - t0) * 1000.0)
    finally:
        await conn.close()
    return out


async def held_at_once(gw: gateway.Gateway, port: int, token: str, approver: Admin, n: int,
                       window: float) -> dict[str, Any]:
    """n sessions each holding a statement; the gateway's CPU and RSS while they wait."""
    conns = []
    for _ in range(n):
        conns.append(await asyncpg.connect(host=LOOPBACK, port=port, user=gateway.AGENT,
                                           password=token, database=DB, ssl=False))
    rss_before = rss_kb(gw.pid)
    tasks = [asyncio.ensure_future(c.fetchval(HELD_SQL, i)) for i, c in enumerate(conns)]
    requests = await approver.wait_pending(n, timeout=300)
    await asyncio.sleep(2.0)  # let the burst of creating them settle
    cpu0, t0 = cpu_seconds(gw.pid), time.monotonic()
    await asyncio.sleep(window)
    cpu1, t1 = cpu_seconds(gw.pid), time.monotonic()
    rss_held = rss_kb(gw.pid)
    for r in requests:
        await approver.vote(r["id"], "deny")
    for t in tasks:
        with contextlib.suppress(asyncpg.PostgresError):
            await asyncio.wait_for(t, 30)
    for c in conns:
        await c.close()
    return {"sessions": n, "window_s": t1 - t0, "cpu_s": cpu1 - cpu0,
            "cpu_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0),
            "rss_kb_before": rss_before, "rss_kb_held": rss_held}


def summary(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"n": len(s), "p50": statistics.median(s), "p95": s[int(0.95 * (len(s) - 1))],
            "max": s[-1], "mean": statistics.fmean(s)}


async def measure(a: argparse.Namespace, gws: dict[str, tuple[gateway.Gateway, Path]],
                  token: str) -> dict[str, Any]:
    single_gw, single_sock = gws["single"]
    pa_gw, pa_sock = gws["pg-a"]
    _pb_gw, pb_sock = gws["pg-b"]
    out: dict[str, Any] = {}
    single = Admin(single_sock)
    via_b = Admin(pb_sock)
    via_a = Admin(pa_sock)
    try:
        log(f"resume latency, one gateway (SQLite store), {a.rounds} rounds")
        out["single"] = summary(await resume_latencies(single_gw.port, token, single, a.rounds))
        log(f"resume latency, held on A, approved through B (PostgreSQL store), {a.rounds} rounds")

        class ViaB(Admin):
            def __init__(self) -> None:  # list on A (its requests), vote through B
                self.session = via_a.session

            async def vote(self, rid: str, verdict: str) -> None:
                await via_b.vote(rid, verdict)

        out["cross"] = summary(await resume_latencies(pa_gw.port, token, ViaB(), a.rounds))
        log(f"{a.held} sessions held at once, CPU over {a.window:g} s")
        out["held"] = await held_at_once(single_gw, single_gw.port, token, single, a.held,
                                         a.window)
    finally:
        for admin in (single, via_b, via_a):
            await admin.close()
    return out


def write_report(data: dict[str, Any], out_dir: Path, load_at_start: float) -> Path:
    git = report.git_info(REPO)
    machine = report.machine_info()
    lines = ["# phigate approvals benchmark", "",
             f"- commit `{git['sha']}`{' (dirty)' if git['dirty'] else ''}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
             f"- machine: {machine['cpu_model']}, {machine['nproc']} cores, "
             f"{machine['mem_gib']} GiB; load average {load_at_start:.2f} at start, "
             f"{machine['loadavg_at_end']} at end", "",
             "## Resume after the decision", "",
             "Time from sending the approve call (admin API over the unix socket) to the held "
             "statement's rows at the client (asyncpg), per round. Target: within "
             f"{RESUME_TARGET_MS:g} ms.", "",
             "| setup | rounds | p50 ms | p95 ms | max ms | target met (p95) |",
             "|---|---|---|---|---|---|"]
    for key, label in (("single", "one gateway, SQLite store"),
                       ("cross", "held on A, approved through B, PostgreSQL store (NOTIFY)")):
        s = data[key]
        lines.append(f"| {label} | {s['n']} | {s['p50']:.1f} | {s['p95']:.1f} | {s['max']:.1f} | "
                     f"{'yes' if s['p95'] <= RESUME_TARGET_MS else 'NO'} |")
    h = data["held"]
    lines += ["", "## Sessions held at once", "",
              f"{h['sessions']} sessions, each with a statement held for approval; the gateway "
              f"process's CPU time (all its threads, from /proc, in 10 ms ticks) over "
              f"{h['window_s']:.1f} s of waiting.", "",
              "| sessions | CPU s | CPU % of one core | RSS before kB | RSS held kB |",
              "|---|---|---|---|---|",
              f"| {h['sessions']} | {h['cpu_s']:.3f} | {h['cpu_pct']:.2f} | "
              f"{h['rss_kb_before']} | {h['rss_kb_held']} |", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{time.strftime('%Y-%m-%d')}-{git['sha']}-approvals.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50, help="held-and-approved rounds (50)")
    ap.add_argument("--held", type=int, default=1000, help="sessions held at once (1000)")
    ap.add_argument("--window", type=float, default=10.0, help="seconds of CPU measurement (10)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    load_at_start = os.getloadavg()[0]
    reg = Registry()
    workdir = begin_run(reg, "phigate-approvals-bench-")
    try:
        acct = unprivileged_account()
        pg, _ = start_postgres(reg, workdir, acct, max_connections=a.held + 100, prefer="auto")
        svc_pw = "bench-svc-pw"
        pg.create_role(SVC_USER, svc_pw)
        pg.create_database(DB, SVC_USER)
        pg.create_database(STATE_DB, SVC_USER)
        import psycopg

        with psycopg.connect(pg.dsn(DB, SVC_USER, svc_pw), autocommit=True) as c:
            c.execute("CREATE TABLE held (id int PRIMARY KEY, v int)")
            c.execute("INSERT INTO held SELECT g, g FROM generate_series(1, 1000) g")
        token, jwks = gateway.mint_token(workdir / "keys", 6 * 3600, groups=[HELD_GROUP])
        state_url = f"postgresql://{SVC_USER}:{svc_pw}@{LOOPBACK}:{pg.port}/{STATE_DB}"
        gws: dict[str, tuple[gateway.Gateway, Path]] = {}
        for name, store in (("single", str(workdir / "approvals.db")),
                            ("pg-a", state_url), ("pg-b", state_url)):
            gw = gateway.Gateway(reg, workdir, name=f"phigate-{name}")
            sock = gw.dir / "admin.sock"
            cfg = gateway.write_config(
                gw.dir, port=gw.port, jwks=jwks, pg_port=pg.port, pool_port=None, pool_db="",
                upstream_db=DB, svc_user=SVC_USER, svc_password=svc_pw,
                audit_dir=gw.dir / "trail", audit_sync="batch", workers=1,
                extra_groups={HELD_GROUP: ["bench-held"]},
                extra_toml=extra_toml(gw.dir, store, sock, name))
            gw.start(cfg)
            gws[name] = (gw, sock)
        data = asyncio.run(measure(a, gws, token))
        path = write_report(data, Path(a.out_dir), load_at_start)
        log(f"report: {path}")
        print(path.read_text())
        return 0
    finally:
        reg.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
