"""Hostile-connection memory driver: rounds of hostile clients against one gateway, reporting its
RSS and glibc's own heap accounting after each round, to tell a leak from allocator retention.

    python benches/hostile_rss.py                       # 6 rounds x 10,000 (~4.5 min, 2 cores)
    python benches/hostile_rss.py --malloc-arena-max 2  # the same with glibc's arena cap
    python benches/hostile_rss.py --trim-each-round     # malloc_trim(0) after every round
    python benches/hostile_rss.py --heaptrack           # the gateway under heaptrack (slow)

A leak grows the heap in use (live allocations) with every round; retention grows RSS while the
heap in use stays flat, and malloc_trim(0) gives the memory back. The gateway runs through
benches/heapprobe.py, which answers SIGUSR1 with mallinfo2/malloc_info and VmRSS (SIGUSR2: after
malloc_trim(0)). Writes benches/results/<date>-<sha>-hostile-rss[-LABEL].md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "python"))

import gateway  # noqa: E402
import hostile  # noqa: E402
import report  # noqa: E402
from pgserver import start_postgres  # noqa: E402
from procs import Registry, begin_run, log, tree_pids, unprivileged_account  # noqa: E402

HERE = Path(__file__).resolve().parent
SVC_USER, DB, TABLE = "hostile_svc", "bench", "hostile_people"
MB = 1024 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=10_000, help="connections per round")
    ap.add_argument("--concurrency", type=int, default=48, help="connections in flight")
    ap.add_argument("--slowloris", type=int, default=500,
                    help="connections opened at once at the end of each round, held ~1 s")
    ap.add_argument("--warmup", type=int, default=1_000,
                    help="hostile connections before the baseline is taken")
    ap.add_argument("--workers", type=int, default=2, help="gateway I/O threads (default 2)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds to wait after a round once the gateway's sockets are closed")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="leave glibc's dynamic mmap/trim thresholds on (phigate serve fixes them "
                    "unless the environment sets malloc options: this sets GLIBC_TUNABLES=)")
    ap.add_argument("--malloc-arena-max", type=int, metavar="N",
                    help="run the gateway with MALLOC_ARENA_MAX=N")
    ap.add_argument("--malloc-trim-threshold", type=int, metavar="BYTES",
                    help="run the gateway with MALLOC_TRIM_THRESHOLD_=BYTES")
    ap.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                    help="run the gateway with MALLOC_MMAP_THRESHOLD_=BYTES")
    ap.add_argument("--trim-each-round", action="store_true",
                    help="also probe after malloc_trim(0) after every round (not just the last)")
    ap.add_argument("--heaptrack", action="store_true",
                    help="run the gateway under heaptrack; its summary goes into the report")
    ap.add_argument("--label", default="", help="suffix for the result files, e.g. arena2")
    ap.add_argument("--no-save", action="store_true", help="print only, write no result files")
    ap.add_argument("--keep-work", action="store_true", help="keep the temp dir and logs")
    a = ap.parse_args(argv)
    if a.heaptrack and not shutil.which("heaptrack"):
        ap.error("heaptrack is not installed (apt-get install heaptrack)")
    return a


class Probe:
    """Asks the gateway process for its heap numbers (benches/heapprobe.py) and waits for them."""

    def __init__(self, out: Path, pid: int):
        self.out, self.pid = out, pid

    def take(self, trim: bool = False, timeout: float = 30.0) -> dict[str, Any]:
        before = self._lines()
        os.kill(self.pid, signal.SIGUSR2 if trim else signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self._lines()
            if len(lines) > len(before):
                return lines[-1]
            time.sleep(0.05)
        raise TimeoutError("the gateway did not answer the heap probe")

    def _lines(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(x) for x in self.out.read_text().splitlines() if x.strip()]


def socket_fds(pid: int) -> int:
    n = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    n += 1
    return n


def wait_quiet(pid: int, baseline: int, settle: float, timeout: float = 60.0) -> int:
    """Wait until the gateway holds no more sockets than when idle, then ``settle`` seconds."""
    deadline = time.monotonic() + timeout
    while socket_fds(pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(settle)
    return socket_fds(pid)


def create_table(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, full_name text, ssn text)")
        c.execute(f"INSERT INTO {TABLE} SELECT i, 'Person ' || i, "  # noqa: S608
                  "lpad((900000000 + i)::text, 9, '0') FROM generate_series(1, 500) i")


def phi_toml(key: Path) -> str:
    return (f"\n[phi]\npseudonym_key_file = {json.dumps(str(key))}\n\n[phi.columns]\n"
            f'"public.{TABLE}.ssn" = {{ kind = "ssn", mask = "partial:4" }}\n'
            f'"public.{TABLE}.full_name" = {{ kind = "name", mask = "pseudonym" }}\n')


def gateway_pid(root: int) -> int:
    """The Python process running heapprobe.py (under heaptrack it is a child of the script)."""
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if Path(cmd[0].decode()).name.startswith("python") and any(
                    c.endswith(b"heapprobe.py") for c in cmd):
                return pid
    raise RuntimeError("no heapprobe.py process under the gateway")


def row(label: str, conns: int, secs: float | None, p: dict[str, Any], fds: int,
        tally: hostile.Tally | None = None) -> dict[str, Any]:
    arenas = p["arenas"]
    return {
        "step": label, "connections": conns, "seconds": round(secs, 1) if secs else None,
        "rss_mb": round(p["rss_kb"] / 1024, 1),
        "heap_in_use_mb": round(p["heap_in_use"] / MB, 1),
        "heap_free_held_mb": round(p["heap_free_held"] / MB, 1),
        "heap_from_system_mb": round(p["heap_from_system"] / MB, 1),
        "arenas": len(arenas), "python_blocks": p["python_blocks"], "threads": p["threads"],
        "rss_brk_heap_mb": round(p["brk_heap_kb"] / 1024, 1),
        "rss_anon_mb": round(p["anon_kb"] / 1024, 1),
        "rss_file_mb": round(p["file_kb"] / 1024, 1),
        "socket_fds": fds,
        "rss_before_trim_mb": (round(p["rss_before_trim_kb"] / 1024, 1)
                               if p.get("rss_before_trim_kb") else None),
        "arena_detail_mb": [(round(x["system"] / MB, 1), round(x["free"] / MB, 1))
                            for x in arenas],
        "outcomes": ({f"{k}:{o}": n for (k, o), n in sorted(tally.outcomes.items())}
                     if tally else None),
    }


def run(a: argparse.Namespace, reg: Registry, workdir: Path) -> dict[str, Any]:
    acct = unprivileged_account()
    pg, starter = start_postgres(reg, workdir, acct, max(200, a.concurrency * 2 + 50), "auto")
    svc_pw = os.urandom(12).hex()
    pg.create_role(SVC_USER, svc_pw)
    pg.create_database(DB, SVC_USER)
    create_table(pg.dsn(DB, SVC_USER, svc_pw))

    from phigate.dev.certs import make_dev_cert

    gw = gateway.Gateway(reg, workdir)
    certs = make_dev_cert(gw.dir / "tls", ["localhost", "127.0.0.1"])
    token, jwks = gateway.mint_token(gw.dir / "keys", ttl_seconds=6 * 3600)
    key = gw.dir / "pseudonym.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    cfg = gateway.write_config(
        gw.dir, port=gw.port, jwks=jwks, pg_port=pg.port, pool_port=None, pool_db="",
        upstream_db=DB, svc_user=SVC_USER, svc_password=svc_pw,
        audit_dir=gw.dir / "audit", audit_sync="batch", workers=a.workers,
        extra_toml=phi_toml(key), tls=(Path(certs.cert), Path(certs.key)))
    probe_out = gw.dir / "heap.jsonl"
    command = [sys.executable, str(HERE / "heapprobe.py"), str(probe_out), str(cfg)]
    heaptrack_out = gw.dir / "heaptrack"
    if a.heaptrack:
        command = ["heaptrack", "-o", str(heaptrack_out), *command]
    env: dict[str, str] = {}
    if a.glibc_defaults:
        env["GLIBC_TUNABLES"] = ""
    if a.malloc_arena_max:
        env["MALLOC_ARENA_MAX"] = str(a.malloc_arena_max)
    if a.malloc_trim_threshold is not None:
        env["MALLOC_TRIM_THRESHOLD_"] = str(a.malloc_trim_threshold)
    if a.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    gw.start(cfg, command=command, env=env)
    pid = gateway_pid(gw.pid)
    # Under heaptrack the spawned process is a shell script that may end before the gateway.
    reg.on_cleanup("gateway", lambda: _stop(pid))
    probe = Probe(probe_out, pid)

    target = hostile.Target("127.0.0.1", gw.port, gateway.AGENT, DB, token, TABLE)
    _smoke(target)
    idle_fds = socket_fds(pid)
    rows: list[dict[str, Any]] = []
    p = probe.take()
    rows.append(row("started", 0, None, p, idle_fds))
    log(f"gateway pid {pid}: RSS {p['rss_kb'] / 1024:.1f} MB at start")

    total = 0

    def one_round(label: str, n: int, seed: int) -> None:
        nonlocal total
        t0 = time.monotonic()
        tally = asyncio.run(hostile.run_round(target, n, a.concurrency, seed,
                                              slowloris_conns=a.slowloris))
        secs = time.monotonic() - t0
        total += n
        fds = wait_quiet(pid, idle_fds, a.settle)
        p = probe.take()
        rows.append(row(label, total, secs, p, fds, tally))
        r = rows[-1]
        log(f"{label}: {n:,} connections in {secs:.0f}s ({n / secs:.0f}/s); RSS {r['rss_mb']} MB, "
            f"heap in use {r['heap_in_use_mb']} MB, held free {r['heap_free_held_mb']} MB, "
            f"{r['arenas']} arenas, sockets {fds}")
        if a.trim_each_round:
            t = probe.take(trim=True)
            rows.append(row(f"{label} + malloc_trim", total, None, t, socket_fds(pid)))
            log(f"  after malloc_trim(0): RSS {rows[-1]['rss_mb']} MB; arenas (MB from "
                f"system, free) {rows[-1]['arena_detail_mb']}")

    if a.warmup:
        one_round("warm-up", a.warmup, 1)
    for i in range(1, a.rounds + 1):
        one_round(f"round {i}", a.per_round, 100 + i)
    if not a.trim_each_round:
        t = probe.take(trim=True)
        rows.append(row("after malloc_trim(0)", total, None, t, socket_fds(pid)))
        log(f"after malloc_trim(0): RSS {rows[-1]['rss_mb']} MB "
            f"(was {rows[-1]['rss_before_trim_mb']} MB)")
    _smoke(target)  # it still serves a well-behaved client
    heap_summary = None
    if a.heaptrack:
        os.kill(pid, signal.SIGTERM)
        assert gw.proc is not None
        gw.proc.wait(timeout=120)
        heap_summary = _heaptrack_summary(heaptrack_out)
    return {"rows": rows, "pg_starter": starter, "heaptrack": heap_summary,
            "gateway_log_tail": gw.log_tail(15)}


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL after 40 s (the gateway drains for up to 30 s)."""
    for sig, wait in ((signal.SIGTERM, 40.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)


def _smoke(t: hostile.Target) -> None:
    import psycopg

    with psycopg.connect(host=t.host, port=t.port, dbname=t.database, user=t.user,
                         password=t.token, sslmode="disable", connect_timeout=10) as c:
        ssn = c.execute(f"SELECT ssn FROM {TABLE} WHERE id = 1").fetchone()  # noqa: S608
    if ssn is None or not str(ssn[0]).startswith("*"):
        raise RuntimeError("smoke query through the gateway was not masked")


def _heaptrack_summary(prefix: Path) -> dict[str, Any]:
    """heaptrack_print's totals, and the leaks (not freed at exit) by whose code allocated them:
    a per-connection leak in the data plane would show as _native frames with thousands of
    calls."""
    import subprocess

    files = sorted(prefix.parent.glob(prefix.name + "*.zst")) or sorted(
        prefix.parent.glob(prefix.name + "*.gz"))
    if not files:
        return {"error": "no heaptrack output"}
    cp = subprocess.run(
        ["heaptrack_print", "--print-leaks", "1", "--print-peaks", "0", "--print-allocators",
         "0", "--print-temporary", "0", "-n", "100000", "-s", "1000", str(files[-1])],
        capture_output=True, text=True, timeout=900)
    lines = cp.stdout.splitlines()
    totals = [ln for ln in lines if ln.startswith(("total runtime", "calls to allocation",
                                                  "temporary memory", "peak heap", "peak RSS",
                                                  "total memory leaked"))]
    # Each leak site is "<size> leaked over <n> calls from" and the allocating function, then
    # its backtraces, each "<size> leaked over <n> calls from:" and its frames. n counts every
    # allocation the site or backtrace made over the run, not only the leaked ones.
    sites: list[tuple[str, list[str], list[list[str]]]] = []
    for ln in lines:
        if " leaked over " in ln:
            if not ln.rstrip().endswith(":"):
                sites.append((ln, [], []))
            elif sites:
                sites[-1][2].append([ln])
        elif sites:
            (sites[-1][2][-1] if sites[-1][2] else sites[-1][1]).append(ln)
    native_bytes, native = 0.0, []
    for head, frames, traces in sites:
        own = any("_native.abi3.so" in f for f in frames)
        for trace in traces or [[head, *frames]]:
            if own or any("_native.abi3.so" in f for f in trace[1:]):
                native_bytes += _bytes(trace[0].split(" leaked over ")[0])
                names = [f.strip() for f in trace[1:] if f.strip() and not
                         f.strip().startswith(("at ", "in "))]
                native.append(f"{trace[0].strip()} {' <- '.join(names[:4])}")
    return {"file": str(files[-1]), "totals": totals,
            "leaked_from_native_bytes": native_bytes, "native_leak_sites": native[:25]}


def _bytes(text: str) -> float:
    units = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9}
    text = text.strip()
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    rounds = [r for r in rows if r["step"].startswith("round") and "trim" not in r["step"]]
    base = next((r for r in rows if r["step"] == "warm-up"), rows[0])
    if len(rounds) < 2:
        return ["(too few rounds for a verdict)"]
    first, last = rounds[0], rounds[-1]
    conns = last["connections"] - first["connections"]
    heap_growth = last["heap_in_use_mb"] - first["heap_in_use_mb"]
    rss_growth = last["rss_mb"] - base["rss_mb"]
    out = [
        f"RSS: {base['rss_mb']} MB after the warm-up -> {last['rss_mb']} MB after "
        f"{last['connections']:,} connections (+{rss_growth:.1f} MB).",
        f"Heap in use (live allocations, glibc's count): {first['heap_in_use_mb']} MB after "
        f"round 1 -> {last['heap_in_use_mb']} MB after round {len(rounds)} "
        f"({heap_growth:+.1f} MB over {conns:,} connections, "
        f"{heap_growth * MB / max(conns, 1):+.0f} bytes per connection).",
        f"Held free by the allocator after the last round: {last['heap_free_held_mb']} MB in "
        f"{last['arenas']} arenas.",
    ]
    out.append("Per arena after the last round (MB from the system / of it free): "
               + ", ".join(f"{s} / {f}" for s, f in last["arena_detail_mb"]) + ".")
    trims = [r for r in rows if "trim" in r["step"]]
    if trims:
        t = trims[-1]
        out.append(f"malloc_trim(0): RSS {t['rss_before_trim_mb']} MB -> {t['rss_mb']} MB "
                   f"(anonymous mappings {t['rss_anon_mb']} MB resident, "
                   f"{rows[0]['rss_anon_mb']} MB at start).")
    return out


def markdown(a: argparse.Namespace, res: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# Hostile-connection RSS — {meta['date']} ({meta['sha']}"
             f"{', dirty' if meta['dirty'] else ''}){' — ' + a.label if a.label else ''}", "",
             f"`python benches/hostile_rss.py {' '.join(meta['argv'])}`; gateway workers "
             f"{a.workers}, concurrency {a.concurrency}; environment: "
             f"{meta['env'] or 'none (phigate serve fixes the trim/mmap thresholds)'}; "
             f"load average at start {meta['load']:.2f}.", "",
             "| step | connections | s | RSS MB | RSS brk / anon / files MB | heap in use MB "
             "| held free MB | from system MB | arenas | Python blocks |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['step']} | {r['connections']:,} | {r['seconds'] or ''} | "
                     f"{r['rss_mb']} | {r['rss_brk_heap_mb']} / {r['rss_anon_mb']} / "
                     f"{r['rss_file_mb']} | {r['heap_in_use_mb']} | {r['heap_free_held_mb']} | "
                     f"{r['heap_from_system_mb']} | {r['arenas']} | {r['python_blocks']:,} |")
    lines += ["", *[f"- {v}" for v in verdict(res["rows"])], ""]
    last = [r for r in res["rows"] if r["outcomes"]][-1]
    lines += ["Outcomes of the last round (kind:outcome count):", "",
              "```", *(f"{k} {n}" for k, n in last["outcomes"].items()), "```", ""]
    ht = res.get("heaptrack")
    if ht:
        lines += ["heaptrack (whole run, until the gateway exited):", "", "```",
                  *ht.get("totals", []), "```", "",
                  f"Not freed at exit with a `_native` (data plane) frame on the stack: "
                  f"{ht.get('leaked_from_native_bytes', 0):,.0f} bytes in all "
                  f"(a per-connection leak would scale with the connections; \"calls\" counts "
                  f"every allocation of that backtrace over the run):", ""]
        if ht.get("native_leak_sites"):
            lines += ["```", *ht["native_leak_sites"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    reg = Registry(keep_dirs=a.keep_work)

    workdir = begin_run(reg, "phigate-hostile-")
    load = os.getloadavg()[0]
    log(f"work dir {workdir}; {a.rounds} rounds x {a.per_round:,} hostile connections")
    try:
        res = run(a, reg, workdir)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        reg.cleanup()
    gi = report.git_info(gateway.REPO)
    env = " ".join(f"{k}={v}" for k, v in (("GLIBC_TUNABLES", "" if a.glibc_defaults else None),
                                           ("MALLOC_ARENA_MAX", a.malloc_arena_max),
                                           ("MALLOC_TRIM_THRESHOLD_", a.malloc_trim_threshold),
                                           ("MALLOC_MMAP_THRESHOLD_", a.malloc_mmap_threshold))
                   if v is not None)
    meta = {"date": time.strftime("%Y-%m-%d"), "sha": gi["sha"], "dirty": gi["dirty"],
            "argv": sys.argv[1:] if argv is None else argv, "env": env, "load": load}
    md = markdown(a, res, meta)
    print(md)
    if not a.no_save:
        out = gateway.REPO / "benches" / "results"
        stem = f"{meta['date']}-{meta['sha']}-hostile-rss" + (f"-{a.label}" if a.label else "")
        (out / f"{stem}.md").write_text(md + "\n")
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, **res}, indent=1) + "\n")
        log(f"wrote benches/results/{stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
