"""Machine/version facts, the target checks, and the Markdown + JSON report of a benchmark run."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

SYSTEMS = ("direct", "pgbouncer", "phigate")
TPS_RATIO_TARGET = 0.9
BULK_RATIO_TARGET = 0.9
MASKED_RATIO_TARGET = 0.8  # masked bulk read throughput / the same read unmasked
RSS_TARGET_KB = 16.0
AUDIT_SYNCS = ("off", "batch", "write", "statement")
AUDIT_BATCH_TARGET = 0.95  # audit part: sync = batch TPS / trail off TPS, every cell
ALL_PARTS = 6


def _cmd(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (cp.stdout or cp.stderr).strip()
    return out.splitlines()[0] if out and cp.returncode == 0 else "?"


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, memory, kernel: enough to tell whether two reports are comparable."""
    cpu = "?"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else "?"
    except OSError:
        pass
    mem_kb = 0
    try:
        m2 = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
        mem_kb = int(m2.group(1)) if m2 else 0
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "mem_gib": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_end": round(os.getloadavg()[0], 2)}


def git_info(repo: Path) -> dict[str, Any]:
    """Short sha (or 'nocommit' before the first commit) and whether the tree is dirty."""
    sha = _cmd(["git", "rev-parse", "--short", "HEAD"], cwd=repo)
    if sha == "?" or not re.fullmatch(r"[0-9a-f]{4,40}", sha):
        sha = "nocommit"
    try:
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                                    text=True, timeout=30, cwd=repo).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        dirty = True
    return {"sha": sha, "dirty": dirty}


def rustc_version() -> str:
    return _cmd(["rustc", "--version"])


# ---- formatting -----------------------------------------------------------------------------

def _f(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _cell(res: dict[str, Any], sysname: str, key: str) -> float | None:
    r = res.get(sysname)
    if not r or "error" in r:
        return None
    v = r.get(key)
    return float(v) if v is not None else None


def _paired(res: dict[str, Any], what: str) -> float | None:
    """The median over the passes of the masked read's rows/s over the unmasked read's in the
    same pass (every reader reads once per pass): drift of the machine slower than a pass
    largely cancels out, where the best of each reader can come from different passes."""
    u, m = res.get("unmasked") or {}, res.get("masked") or {}
    us, ms = u.get(f"{what}_seconds") or [], m.get(f"{what}_seconds") or []
    if not us or len(us) != len(ms) or not all(ms):
        return None
    return statistics.median(a / b for a, b in zip(us, ms, strict=True))


def _errnote(res: dict[str, Any], sysname: str) -> str:
    r = res.get(sysname)
    if r is None:
        return "not run"
    return "error" if "error" in r else ""


def _mask_sets(mk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The masked read's mask sets as (key, results); labels come from the shape when the
    measurement failed. An older report (one set, readers at the top level) is set A."""
    sets = mk.get("sets")
    if isinstance(sets, dict) and sets:
        return list(sets.items())
    shape_sets = mk.get("shape", {}).get("sets")
    if isinstance(shape_sets, dict) and shape_sets:
        return [(k, {"label": v.get("label"), "table": v.get("table")})
                for k, v in shape_sets.items()]
    return [("A", mk)] if mk else []


def evaluate_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance targets, each met / not met / not measured (met=None)."""
    out: list[dict[str, Any]] = []
    for row in data.get("pgbench", []):
        res = row["results"]
        r = _ratio(_cell(res, "phigate", "tps"), _cell(res, "pgbouncer", "tps"))
        out.append({"target": f"-S {row['mode']} c={row['clients']}: TPS >= 0.9x PgBouncer",
                    "value": r, "unit": "x", "met": None if r is None else r >= TPS_RATIO_TARGET})
    # Parts skipped on purpose (--skip, --only) get no target row; failed ones: "not measured".
    ran = set(data.get("meta", {}).get("settings", {}).get("parts", ("bulk", "rss")))
    bulk = data.get("bulk", {})
    r = _ratio(_cell(bulk, "phigate", "select_best_mb_s"),
               _cell(bulk, "pgbouncer", "select_best_mb_s"))
    if "bulk" in ran:
        out.append({"target": "bulk read MB/s >= 0.9x PgBouncer", "value": r, "unit": "x",
                    "met": None if r is None else r >= BULK_RATIO_TARGET})
    mk = data.get("masking") or {}
    if "masking" in ran:
        for key, res in _mask_sets(mk):
            what = res.get("label") or f"set {key}"
            for label, cell in (("SELECT", "select_best_rows_s"), ("COPY", "copy_best_rows_s")):
                r = _ratio(_cell(res, "masked", cell), _cell(res, "unmasked", cell))
                out.append({"target": f"masked bulk read ({label}), set {key}: {what}: >= "
                                      f"{MASKED_RATIO_TARGET}x unmasked",
                            "value": r, "unit": "x", "mask_set": key,
                            "met": None if r is None else r >= MASKED_RATIO_TARGET})
    if "audit" in ran:
        rows = (data.get("audit") or {}).get("rows") or [{"mode": "all", "clients": "all",
                                                           "results": {}}]
        for row in rows:
            r = _ratio(_cell(row["results"], "batch", "tps"), _cell(row["results"], "off", "tps"))
            out.append({"target": f"audit -S {row['mode']} c={row['clients']}: sync=batch TPS >= "
                                  f"{AUDIT_BATCH_TARGET}x trail off",
                        "value": r, "unit": "x",
                        "met": None if r is None else r >= AUDIT_BATCH_TARGET})
    rss_rows = [x for x in data.get("rss", []) if x.get("system") == "phigate"]
    for x in rss_rows:
        v = x.get("per_conn_kb")
        out.append({"target": f"RSS per idle connection < 16 kB at {x['n']:,} "
                              f"(upstream {x['upstream']})",
                    "value": v, "unit": "kB", "met": None if v is None else v < RSS_TARGET_KB})
    if not rss_rows and "rss" in ran:
        out.append({"target": "RSS per idle connection < 16 kB", "value": None, "unit": "kB",
                    "met": None})
    return out


def _mark(met: bool | None) -> str:
    return {True: "**met**", False: "**NOT met**", None: "not measured"}[met]


def render_markdown(data: dict[str, Any]) -> str:
    """The whole report as Markdown (also printed to stdout)."""
    meta = data["meta"]
    m, v = meta["machine"], meta["versions"]
    L: list[str] = []
    L.append(f"# phigate benchmark — {meta['date']} — {v['phigate_git']}")
    L.append("")
    L.append(f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB RAM, "
             f"Linux {m['kernel']}, load average {m.get('loadavg_at_start', 0):.2f} at start, "
             f"{m.get('loadavg_at_end', 0):.2f} at end")
    L.append(f"- PostgreSQL: {v['postgres']} (started by: {v['pg_starter']}); "
             f"PgBouncer: {v['pgbouncer']}; phigate: git {v['phigate_git']}, "
             f"native {v['phigate_native']}; {v['rustc']}; Python {m['python']}; "
             f"psycopg {v['psycopg']}")
    s = meta["settings"]
    parts = s.get("parts", ("pgbench", "bulk"))
    pgb = (f"pgbench -S, {s['duration_s']} s per run, scale {s['scale']}, warm-up "
           f"{s['warmup_s']} s per mode and system; -S matrix run {s.get('repeat', 1)}x "
           "(median-TPS run shown); " if "pgbench" in parts else "")
    bulk_n = f"bulk best of {s['bulk_repeats']}; " if "bulk" in parts else ""
    masked_n = f"masked read best of {s['masking_repeats']}; " if "masking" in parts else ""
    audit_n = (f"audit part: pgbench -S {s['duration_s']} s per run, warm-up {s['warmup_s']} s "
               f"per mode and gateway, run {s.get('repeat', 1)}x (median-TPS run shown); "
               if "audit" in parts else "")
    main_sync = (f", audit sync={s.get('audit_sync', 'batch')}"
                 if set(parts) - {"audit"} else "")
    L.append(f"- settings: {pgb}{bulk_n}{masked_n}{audit_n}"
             f"phigate workers={s['workers']}{main_sync}; "
             f"TLS off on every leg; "
             f"PgBouncer pool_mode=session, auth SCRAM; PostgreSQL auth SCRAM")
    if "parts" in s and len(parts) < ALL_PARTS:
        L.append(f"- parts run: {', '.join(parts)}")
    if "pgbench" in parts:
        L.append("- latency: p50/p99 from pgbench per-transaction logs (`--log`), i.e. what the "
                 "client measured per transaction; \"added\" = phigate p50 minus the other's "
                 "p50")
    L.append("")

    if data.get("pgbench"):
        L.append("## pgbench -S (TPS)")
        L.append("")
        L.append("| mode | clients | direct | pgbouncer | phigate | phigate/pgbouncer "
                 "| phigate/direct | proxy CPU µs/txn (pgb / phigate) |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in data.get("pgbench", []):
            res = row["results"]
            t = {k: _cell(res, k, "tps") for k in SYSTEMS}
            cells = [_f(t[k]) if t[k] is not None else (_errnote(res, k) or "–") for k in SYSTEMS]
            L.append(f"| {row['mode']} | {row['clients']} | " + " | ".join(cells) + " | "
                     f"{_f(_ratio(t['phigate'], t['pgbouncer']), 2)} | "
                     f"{_f(_ratio(t['phigate'], t['direct']), 2)} | "
                     f"{_f(_cell(res, 'pgbouncer', 'proxy_cpu_us_per_txn'), 1)} / "
                     f"{_f(_cell(res, 'phigate', 'proxy_cpu_us_per_txn'), 1)} |")
        L.append("")
        L.append("## pgbench -S latency (ms, p50 / p99)")
        L.append("")
        L.append("| mode | clients | direct | pgbouncer | phigate | added p50 vs direct |"
                 " added p50 vs pgbouncer |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for row in data.get("pgbench", []):
            res = row["results"]

            def lat(k: str, res: dict[str, Any] = res) -> str:
                p50, p99 = _cell(res, k, "p50_ms"), _cell(res, k, "p99_ms")
                return f"{_f(p50, 3)} / {_f(p99, 3)}" if p50 is not None else (
                    _errnote(res, k) or "–")

            p = {k: _cell(res, k, "p50_ms") for k in SYSTEMS}
            add_d, add_b = _diff(p["phigate"], p["direct"]), _diff(p["phigate"], p["pgbouncer"])
            L.append(f"| {row['mode']} | {row['clients']} | {lat('direct')} | {lat('pgbouncer')} | "
                     f"{lat('phigate')} | {_f(add_d, 3)} | {_f(add_b, 3)} |")
        L.append("")

    if data.get("connect"):
        L.append("## Connection setup (`pgbench -C -S -M simple`: one new connection per "
                 "transaction)")
        L.append("")
        L.append("| clients | direct conn/s | pgbouncer conn/s | phigate conn/s | "
                 "phigate/pgbouncer | phigate/direct | avg connect ms (d / pgb / phigate) |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|")
        for row in data["connect"]:
            res = row["results"]
            c = {k: _cell(res, k, "tps") for k in SYSTEMS}
            ct = " / ".join(_f(_cell(res, k, "conn_time_ms"), 2) for k in SYSTEMS)
            L.append(f"| {row['clients']} | " + " | ".join(
                _f(c[k]) if c[k] is not None else (_errnote(res, k) or "–") for k in SYSTEMS)
                + f" | {_f(_ratio(c['phigate'], c['pgbouncer']), 2)} | "
                f"{_f(_ratio(c['phigate'], c['direct']), 2)} | {ct} |")
        L.append("")

    if data.get("bulk"):
        b = data["bulk"]
        L.append(f"## Bulk read: {b.get('rows', 20000):,} rows × 1 KB, psycopg text format "
                 "(payload MB/s, best of N; median in parentheses)")
        L.append("")
        L.append("| fetch | direct | pgbouncer | phigate | phigate/pgbouncer | phigate/direct |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for label, best, med in (("SELECT * → fetchall()", "select_best_mb_s",
                                  "select_median_mb_s"),
                                 ("COPY TO STDOUT", "copy_best_mb_s", "copy_median_mb_s")):
            vals = {k: _cell(b, k, best) for k in SYSTEMS}
            cells = [f"{_f(vals[k], 1)} ({_f(_cell(b, k, med), 1)})" if vals[k] is not None
                     else (_errnote(b, k) or "–") for k in SYSTEMS]
            L.append(f"| {label} | " + " | ".join(cells) + " | "
                     f"{_f(_ratio(vals['phigate'], vals['pgbouncer']), 2)} | "
                     f"{_f(_ratio(vals['phigate'], vals['direct']), 2)} |")
        L.append("")

    if data.get("masking"):
        L.extend(_masking_section(data["masking"]))

    if data.get("rss"):
        L.append("## RSS per idle authenticated connection")
        L.append("")
        L.append("| system | connections | upstream | opened | RSS before kB | RSS with conns kB |"
                 " kB per connection |")
        L.append("|---|---:|---|---:|---:|---:|---:|")
        for x in data["rss"]:
            L.append(f"| {x['system']} | {x['n']:,} | {x['upstream']} | {x.get('opened', 0):,} | "
                     f"{_f(x.get('rss_before_kb'))} | {_f(x.get('rss_after_kb'))} | "
                     f"{_f(x.get('per_conn_kb'), 2)} |")
        L.append("")

    if data.get("audit"):
        L.extend(_audit_section(data["audit"]))

    L.append("## Targets")
    L.append("")
    L.append("| target | measured | result |")
    L.append("|---|---:|---|")
    for t in data.get("targets", []):
        unit = t["unit"] if t["value"] is not None else ""
        L.append(f"| {t['target']} | {_f(t['value'], 2)} {unit} | {_mark(t['met'])} |")
    L.append("")

    if meta.get("notes"):
        L.append("## Notes")
        L.append("")
        L.extend(f"- {n}" for n in meta["notes"])
        L.append("")
    errs = data.get("errors", [])
    if errs:
        L.append("## Errors")
        L.append("")
        L.extend(f"- {e}" for e in errs)
        L.append("")
    return "\n".join(L)


def _audit_section(au: dict[str, Any]) -> list[str]:
    """The audit part: TPS, latency and proxy CPU per sync mode, ratios, and the trails."""
    L = ["## Audit trail: pgbench -S through phigate, trail off / batch / write / statement", "",
         "One gateway process per mode (workers=1), each with its own trail directory; the "
         "modes take turns within each cell. \"off\" = records formatted, then dropped (see "
         "Notes).", ""]
    rows = au.get("rows", [])
    L.append("| mode | clients | off | batch | write | statement | batch/off | write/off | "
             "statement/off | write/batch |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        res = row["results"]
        t = {k: _cell(res, k, "tps") for k in AUDIT_SYNCS}
        cells = [_f(t[k]) if t[k] is not None else (_errnote(res, k) or "–")
                 for k in AUDIT_SYNCS]
        L.append(f"| {row['mode']} | {row['clients']} | " + " | ".join(cells) + " | "
                 + " | ".join(_f(_ratio(t[k], t["off"]), 3) for k in AUDIT_SYNCS[1:])
                 + f" | {_f(_ratio(t['write'], t['batch']), 3)} |")
    wb = au.get("write_vs_batch", {})
    if wb.get("geomean") is not None:
        L.append("")
        L.append(f"write/batch over all cells (geometric mean): **{wb['geomean']:.3f}**")
    if any(len(v) > 1 for row in rows for v in row.get("runs", {}).values()):
        L.append("")
        L.append("Every run's TPS (in run order):")
        L.append("")
        L.append("| mode | clients | " + " | ".join(AUDIT_SYNCS) + " |")
        L.append("|---|---:|" + "---|" * len(AUDIT_SYNCS))
        for row in rows:
            L.append(f"| {row['mode']} | {row['clients']} | " + " | ".join(
                ", ".join(_f(x) for x in row["runs"].get(k, [])) for k in AUDIT_SYNCS) + " |")
    L.append("")
    L.append("Latency p50 / p99 (ms) and proxy CPU per transaction (µs, the gateway's process):")
    L.append("")
    L.append("| mode | clients | " + " | ".join(AUDIT_SYNCS) + " |")
    L.append("|---|---:|" + "---:|" * len(AUDIT_SYNCS))
    for row in rows:
        res = row["results"]
        cells = [f"{_f(_cell(res, k, 'p50_ms'), 3)} / {_f(_cell(res, k, 'p99_ms'), 3)}; "
                 f"{_f(_cell(res, k, 'proxy_cpu_us_per_txn'), 1)} µs" for k in AUDIT_SYNCS]
        L.append(f"| {row['mode']} | {row['clients']} | " + " | ".join(cells) + " |")
    L.append("")
    trails = au.get("trails", {})
    if trails:
        L.append("Trails after the run (the gateways stopped cleanly first), each checked with "
                 "`python -m phigate.cli audit verify --log DIR --pubkey FILE`:")
        L.append("")
        L.append("| sync | trail bytes | records | statement records | bytes/statement | "
                 "records/statement | verify | verify records/s |")
        L.append("|---|---:|---:|---:|---:|---:|---|---:|")
        for k in AUDIT_SYNCS:
            t = trails.get(k)
            if t is None:
                continue
            if "verify" not in t:
                L.append(f"| {k} | – | – | – | {_f(t.get('bytes_per_statement'))} (formatted, "
                         f"dropped) | – | no trail | – |")
                continue
            v = t["verify"]
            L.append(f"| {k} | {_f(t['trail_bytes'])} | {_f(t['records'])} | "
                     f"{_f(t['statement_records'])} | {_f(t.get('bytes_per_statement'))} | "
                     f"{_f(t.get('records_per_statement'), 2)} | "
                     f"{'OK' if v['ok'] else '**FAILED**'} | {_f(v.get('records_per_s'))} |")
        L.append("")
    return L


def _masking_section(mk: dict[str, Any]) -> list[str]:
    shape = mk.get("shape", {})
    rows = shape.get("rows", 20000)
    shape_sets: dict[str, Any] = shape.get("sets", {})
    L = [f"## Masked bulk read: {rows:,} PHI-shaped rows through phigate, masked vs unmasked "
         "identity", ""]
    L.append(f"Tables {', '.join(f'`{t}`' for t in shape.get('tables', []))}, the same rows in "
             "each: id int, encounter text (`ENC-A00001`), ssn text, full_name text, "
             f"birth_date date, note text (~{shape.get('note_bytes', 1024)} B clinical note, no "
             f"identifiers); {_f(mk.get('payload_bytes', 0) / 1e6, 2)} MB of values as text per "
             "table. `encounter` and `note` are not classified and no content detector matches "
             "them. The unmasked identity's role has `see_clear = "
             f"{json.dumps(shape.get('clear_role_see_clear', []))}`, the masked one's has none; "
             "otherwise the roles are the same, and every reader goes through the same gateway "
             "process, each on one warm psycopg connection, text format, all readers of both "
             "sets alternating. Rows/s, best of N (median in parentheses).")
    L.append("")
    L.append("| mask set | table | classified (kind/mask) |")
    L.append("|---|---|---|")
    for key, ss in shape_sets.items():
        cls = ", ".join(f"`{c}` {r['kind']}/{r['mask']}"
                        for c, r in ss.get("classified", {}).items())
        L.append(f"| {key}: {ss.get('label', '')} | `{ss.get('table', '')}` | {cls} |")
    L.append("")
    if "error" in mk:
        L.append(f"Not measured: {mk['error'].splitlines()[0] if mk['error'] else 'error'}")
        L.append("")
        return L
    sets = _mask_sets(mk)
    labels = ("direct", "direct_rewritten", "unmasked", "masked")
    L.append("| mask set | fetch | direct | direct, rewritten SQL | phigate unmasked | "
             "phigate masked | **masked/unmasked** | paired | rewritten/direct | "
             "unmasked/direct |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, res in sets:
        for label, what in (("SELECT … → fetchall()", "select"),
                            ("COPY (SELECT …) TO STDOUT", "copy")):
            v = {k: _cell(res, k, f"{what}_best_rows_s") for k in labels}
            cells = [f"{_f(v[k])} ({_f(_cell(res, k, f'{what}_median_rows_s'))})"
                     if v[k] is not None else "–" for k in labels]
            L.append(f"| {key}: {res.get('label', '')} | {label} | " + " | ".join(cells) + " | "
                     f"**{_f(_ratio(v['masked'], v['unmasked']), 2)}** | "
                     f"{_f(_paired(res, what), 2)} | "
                     f"{_f(_ratio(v['direct_rewritten'], v['direct']), 2)} | "
                     f"{_f(_ratio(v['unmasked'], v['direct']), 2)} |")
    L.append("")
    L.append("masked/unmasked is the best masked read over the best unmasked read (the target's "
             "measure); \"paired\" is the median over the passes of the masked read's rows/s "
             "over the unmasked read's of the same pass, which largely cancels drift of a shared "
             "machine between passes.")
    L.append("")
    L.append("The same, as MB/s of the clear payload (best):")
    L.append("")
    L.append("| mask set | fetch | direct | direct, rewritten SQL | phigate unmasked | "
             "phigate masked |")
    L.append("|---|---|---:|---:|---:|---:|")
    for key, res in sets:
        for label, what in (("SELECT", "select"), ("COPY", "copy")):
            L.append(f"| {key} | {label} | "
                     + " | ".join(_f(_cell(res, k, f"{what}_best_mb_s"), 1) for k in labels)
                     + " |")
    L.append("")
    L.append("CPU per read, median ms (gateway process tree / the reader's PostgreSQL backend / "
             "the reader itself; the first two are the scheduler run time of live threads, "
             "/proc/PID/task/*/schedstat, the reader's is its thread's CPU time). The last "
             "column is the unmasked read's total CPU over the masked read's: where the three "
             "share the machine's cores and keep them busy, masked/unmasked cannot be much "
             "above it.")
    L.append("")
    L.append("| mask set | fetch | direct | direct, rewritten SQL | phigate unmasked | "
             "phigate masked | total CPU unmasked/masked |")
    L.append("|---|---|---:|---:|---:|---:|---:|")
    for key, res in sets:
        for label, what in (("SELECT", "select"), ("COPY", "copy")):
            cells, totals = [], {}
            for k in labels:
                px = _cell(res, k, f"{what}_proxy_cpu_ms_median")
                pg = _cell(res, k, f"{what}_pg_cpu_ms_median")
                cl = _cell(res, k, f"{what}_client_cpu_ms_median")
                if k in ("direct", "direct_rewritten"):
                    cells.append(f"– / {_f(pg, 0)} / {_f(cl, 0)}")
                else:
                    cells.append(f"{_f(px, 1)} / {_f(pg, 1)} / {_f(cl, 1)}")
                    if px is not None and pg is not None and cl is not None:
                        totals[k] = px + pg + cl
            bound = _ratio(totals.get("unmasked"), totals.get("masked"))
            L.append(f"| {key} | {label} | " + " | ".join(cells) + f" | {_f(bound, 2)} |")
    L.append("")
    if any(res.get("direct_rewritten") for _, res in sets):
        L.append("\"direct, rewritten SQL\" runs, directly on PostgreSQL, the statement "
                 "phigate's layer-1 rewrite makes of this read for the masked identity (asked of "
                 "phigate's policy engine; phigate itself sends these plain reads as written and "
                 "masks what comes back in the data plane): rewritten/direct is what computing "
                 "the masks in SQL would cost the database; masked/unmasked is what the gateway "
                 "does per row.")
        L.append("")
    for key, res in sets:
        chk = res.get("check", {})
        if not chk:
            continue
        c, smp = chk.get("counts", {}), chk.get("masked_sample", {})
        L.append(f"Set {key}, what the masked identity received (first pass, {rows:,} rows): "
                 f"classified values in clear: ssn {c.get('ssn_unmasked')}, full_name "
                 f"{c.get('name_unmasked')}, birth_date {c.get('dob_unmasked')}; unclassified "
                 f"values changed: encounter {c.get('encounter_changed')}, note "
                 f"{c.get('notes_changed')}. First row as masked: ssn `{smp.get('ssn')}`, "
                 f"full_name `{smp.get('full_name')}`, birth_date `{smp.get('birth_date')}`, "
                 f"encounter `{smp.get('encounter')}`.")
        L.append("")
    return L


def write(data: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write <date>-<shortsha>.md and .json into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{data['meta']['date']}-{data['meta']['versions']['phigate_git']}"
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md.write_text(render_markdown(data))
    js.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return md, js
