"""Bulk read of 20,000 PHI-shaped rows through phigate: masked identity vs unmasked identity.

The table has a patient's identifiers, an encounter code and a ~1 KB clinical note per row. Three
of its columns are classified in the gateway's `[phi.columns]`; one identity sees those kinds
masked, the other has them in `see_clear`. Two mask sets are measured in the same run, each on its
own table with the same data (masks are per column in the config): A with a keyed pseudonym on
`full_name`, B with `full_name` redacted instead. All readers go through the same gateway process,
each on one warm psycopg connection in text format, alternating, so drift of the machine hits
every reader alike.
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg
from pgbenchrun import Endpoint
from procs import run_seconds, tree_run_seconds

ROWS = 20_000
NOTE_BYTES = 1024  # target length of each note; kept under the TOAST threshold, stored inline
COLUMNS = ("id", "encounter", "ssn", "full_name", "birth_date", "note")


@dataclass(frozen=True)
class MaskSet:
    """One set of masks for the three classified columns, on its own copy of the table."""

    key: str  # "A", "B": the key in the JSON
    table: str
    label: str  # what the report's target rows say
    classified: dict[str, tuple[str, str]]  # column -> (kind, mask), for [phi.columns]

    @property
    def select_sql(self) -> str:
        return f"SELECT {', '.join(COLUMNS)} FROM {self.table}"  # noqa: S608 - constant text

    @property
    def copy_sql(self) -> str:
        return f"COPY ({self.select_sql}) TO STDOUT"


# Three classified columns, three kinds. `encounter` and `note` stay unclassified: for a masked
# identity the data plane's content detectors scan them, and neither has anything they match.
SETS: tuple[MaskSet, ...] = (
    MaskSet("A", "bench_phi", "3 masked columns incl. pseudonym",
            {"ssn": ("ssn", "partial:4"), "full_name": ("name", "pseudonym"),
             "birth_date": ("dob", "year")}),
    MaskSet("B", "bench_phi_b", "3 masked columns, no pseudonym",
            {"ssn": ("ssn", "partial:4"), "full_name": ("name", "redact"),
             "birth_date": ("dob", "year")}),
)
SETS_BY_KEY = {s.key: s for s in SETS}
TABLES = tuple(s.table for s in SETS)
CLEAR_KINDS = sorted({kind for s in SETS for kind, _ in s.classified.values()})

# Identities: subject -> (group, role). Same relations and operations; only see_clear differs.
MASKED_SUB, CLEAR_SUB = "bench-masked", "bench-clear"
IDENTITIES: dict[str, tuple[str, str]] = {
    MASKED_SUB: ("bench-phi-masked", "phi-masked"),
    CLEAR_SUB: ("bench-phi-clear", "phi-clear"),
}


def _sizes_sql(table: str) -> str:
    """The payload (every value's length as text) and the table's TOAST size (0: notes inline)."""
    return (  # built from the constants above only
        "SELECT sum(octet_length(id::text) + octet_length(encounter) + octet_length(ssn) "  # noqa: S608
        "+ octet_length(full_name) + octet_length(birth_date::text) + octet_length(note)), "
        "(SELECT coalesce(pg_relation_size(nullif(reltoastrelid, 0)), 0) FROM pg_class "
        f"WHERE oid = '{table}'::regclass) FROM {table}"
    )


# ---- data ----------------------------------------------------------------------------------

_FIRST = ("Olivia", "Liam", "Emma", "Noah", "Ava", "Elijah", "Sophia", "James", "Isabella",
          "William", "Mia", "Benjamin", "Charlotte", "Lucas", "Amelia", "Henry", "Harper",
          "Theodore", "Evelyn", "Mateo", "Abigail", "Daniel", "Emily", "Samuel", "Ella",
          "Joseph", "Grace", "David", "Chloe", "Carlos", "Maria", "Wei", "Aisha", "Dmitri")
_LAST = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
         "Rodriguez", "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson",
         "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White",
         "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson", "Nguyen", "Okafor")
_DEPTS = ("internal medicine", "cardiology", "endocrinology", "pulmonology", "nephrology",
          "family medicine", "geriatrics", "rheumatology")
_CONDITIONS = ("type 2 diabetes mellitus", "essential hypertension", "chronic kidney disease "
               "stage 3a", "heart failure with preserved ejection fraction", "asthma",
               "chronic obstructive pulmonary disease", "hypothyroidism", "atrial fibrillation",
               "hyperlipidemia", "osteoarthritis of the knee", "gout")
_SYMPTOMS = ("intermittent fatigue", "mild dyspnea on exertion", "occasional palpitations",
             "bilateral ankle swelling", "morning joint stiffness", "nocturnal cough",
             "increased thirst", "lightheadedness on standing", "reduced exercise tolerance")
_MEDS = (("metformin", 500, "twice daily"), ("lisinopril", 10, "once daily"),
         ("atorvastatin", 40, "at bedtime"), ("amlodipine", 5, "once daily"),
         ("levothyroxine", 0.075, "every morning"), ("apixaban", 5, "twice daily"),
         ("furosemide", 20, "once daily"), ("allopurinol", 100, "once daily"),
         ("empagliflozin", 10, "once daily"), ("metoprolol succinate", 50, "once daily"))
_CONTROL = ("well controlled", "suboptimally controlled", "improving", "stable",
            "worse since the last visit")
_PLANS = ("continue current regimen and repeat labs before the next visit",
          "increase the dose as tolerated and recheck electrolytes",
          "start a low-sodium diet and daily weights, call if gain exceeds the threshold",
          "refer to the dietitian and the diabetes education program",
          "order an echocardiogram and a basic metabolic panel",
          "taper the steroid over two weeks and reassess")
_FILLER = (
    "Exam: lungs clear to auscultation bilaterally, no wheezes or crackles. Heart regular rate "
    "and rhythm, no murmurs, rubs or gallops. Abdomen soft, non-tender, non-distended. No "
    "peripheral edema today. ",
    "Reviewed home readings brought to the visit; most fall within the target range with a few "
    "higher values after missed doses. ",
    "Discussed diet, regular walking and medication adherence; the patient verbalized "
    "understanding and agrees with the plan. ",
    "No chest pain, no fever or chills, no changes in bowel habits, no new rashes. Sleep is "
    "fair. Denies tobacco use; alcohol occasionally on weekends. ",
    "Medication reconciliation completed; no side effects reported other than mild nausea in "
    "the first week, now resolved. ",
)


def _note(rng: random.Random) -> str:
    """A realistic ~1 KB note: prose plus vitals, doses and lab values, but no identifier (no
    SSN-, phone-, MRN- or e-mail-shaped text, no birth keyword). None of them has what the
    detectors' built-in byte prefilter looks for (three digits, a separator, two digits; '@';
    "mrn"; a birth keyword), so for a masked identity each note costs the prefilter's one pass
    over its bytes and no regex scan."""
    med1, med2 = rng.sample(_MEDS, 2)
    parts = [
        f"Seen in the {rng.choice(_DEPTS)} clinic for follow-up of {rng.choice(_CONDITIONS)}. "
        f"Reports {rng.choice(_SYMPTOMS)} for the past {rng.randint(2, 30)} days, worse in the "
        f"{rng.choice(('morning', 'evening', 'afternoon'))}. ",
        f"Vitals: BP {rng.randint(104, 168)}/{rng.randint(58, 98)}, HR {rng.randint(52, 110)}, "
        f"RR {rng.randint(12, 22)}, temp {rng.uniform(36.1, 37.9):.1f} C, SpO2 "
        f"{rng.randint(91, 100)}% on room air, weight {rng.uniform(48, 130):.1f} kg. ",
        f"Current medications: {med1[0]} {med1[1]} mg {med1[2]}, {med2[0]} {med2[1]} mg "
        f"{med2[2]}. ",
        f"Labs this month: HbA1c {rng.uniform(5.2, 10.5):.1f}%, creatinine "
        f"{rng.uniform(0.6, 2.4):.2f} mg/dL, eGFR {rng.randint(28, 110)}, potassium "
        f"{rng.uniform(3.4, 5.6):.1f} mmol/L, LDL {rng.randint(55, 190)} mg/dL. ",
    ]
    parts += rng.sample(_FILLER, 3)
    parts.append(f"Assessment: {rng.choice(_CONDITIONS)}, {rng.choice(_CONTROL)}. "
                 f"Plan: {rng.choice(_PLANS)}. Return to clinic in {rng.randint(2, 16)} weeks "
                 "or sooner if symptoms worsen. ")
    text = "".join(parts)
    while len(text) < NOTE_BYTES:
        text += rng.choice(_FILLER)
    return text[:text.rindex(". ", 0, NOTE_BYTES) + 1]  # whole sentences, at most NOTE_BYTES


def _rows() -> list[tuple[int, str, str, str, date, str]]:
    rng = random.Random(20_000)  # the same data every run
    epoch = date(1930, 1, 1)
    span = (date(2008, 12, 31) - epoch).days
    rows = []
    for i in range(1, ROWS + 1):
        ssn = f"{rng.randint(100, 899):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        rows.append((i, f"ENC-A{i:05d}", ssn, name, epoch + timedelta(days=rng.randint(0, span)),
                     _note(rng)))
    return rows


def create_table(dsn: str) -> int:
    """Create and fill one table per mask set with the same rows (service user, directly on
    PostgreSQL); returns the payload: the summed text length of every value of one table, the MB
    figure MB/s is computed from."""
    first, *others = TABLES
    payload: set[int] = set()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=15) as c:
        for t in TABLES:
            c.execute(f"DROP TABLE IF EXISTS {t}")
        c.execute(f"CREATE TABLE {first} (id int PRIMARY KEY, encounter text NOT NULL, "
                  "ssn text NOT NULL, full_name text NOT NULL, birth_date date NOT NULL, "
                  "note text NOT NULL)")
        with c.cursor() as cur, cur.copy(f"COPY {first} ({', '.join(COLUMNS)}) FROM STDIN") as cp:
            for row in _rows():
                cp.write_row(row)
        for t in others:  # the same rows in the same physical order
            c.execute(f"CREATE TABLE {t} (LIKE {first} INCLUDING ALL)")
            c.execute(f"INSERT INTO {t} SELECT * FROM {first} ORDER BY id")  # noqa: S608
        for t in TABLES:
            c.execute(f"VACUUM ANALYZE {t}")
            sizes = c.execute(_sizes_sql(t)).fetchone()
            assert sizes is not None
            if sizes[1]:
                raise RuntimeError(f"{t} has {sizes[1]} bytes in TOAST; notes should be inline")
            payload.add(int(sizes[0]))
    if len(payload) != 1:
        raise RuntimeError(f"the tables' payloads differ: {sorted(payload)}")
    return payload.pop()


# ---- gateway configuration -----------------------------------------------------------------

def _q(s: str | Path) -> str:
    return json.dumps(str(s))  # a JSON string is a valid TOML basic string


def groups() -> dict[str, list[str]]:
    """`[groups]` entries for the two identities."""
    return {group: [role] for group, role in IDENTITIES.values()}


def config_toml(pseudonym_key: Path) -> str:
    """The `[phi]` table and the two roles (appended to the bench's gateway config)."""
    cols = "\n".join(f'"public.{s.table}.{col}" = {{ kind = {_q(kind)}, mask = {_q(mask)} }}'
                     for s in SETS for col, (kind, mask) in s.classified.items())
    relations = json.dumps([f"public.{t}" for t in TABLES])
    role_lines = []
    for sub, (_group, role) in IDENTITIES.items():
        role_lines.append(f"[roles.{role}]\nrelations = {relations}\n"
                          'operations = ["select", "copy_to"]')
        if sub == CLEAR_SUB:
            role_lines.append(f"see_clear = {json.dumps(CLEAR_KINDS)}")
        role_lines.append("")
    return (
        "\n# Masked bulk read: the same two roles but for see_clear.\n"
        + "\n".join(role_lines)
        + f"\n[phi]\npseudonym_key_file = {_q(pseudonym_key)}\n\n[phi.columns]\n{cols}\n"
    )


def describe() -> dict[str, Any]:
    """The data and config shape, for the report."""
    return {
        "tables": list(TABLES), "rows": ROWS, "note_bytes": NOTE_BYTES,
        "columns": {"id": "int", "encounter": "text 'ENC-A00001' (unclassified, no detector "
                    "matches it)", "ssn": "text '123-45-6789'",
                    "full_name": "text 'First Last'", "birth_date": "date",
                    "note": f"text, ~{NOTE_BYTES} B clinical note without identifiers "
                            "(unclassified)"},
        "sets": {s.key: {"label": s.label, "table": s.table,
                         "classified": {c: {"kind": k, "mask": m}
                                        for c, (k, m) in s.classified.items()},
                         "select": s.select_sql, "copy": s.copy_sql} for s in SETS},
        "clear_role_see_clear": CLEAR_KINDS,
        "identifier_dictionary": "on (the default): learned from full_name (kind name) and "
                                 "ssn (kind ssn, 20,000 values); the masked identity's note and "
                                 "encounter values are scanned with it and with the content "
                                 "detectors",
    }


def rewritten_sql(config_path: Path, target: str) -> dict[str, str]:
    """Per mask set, the statement layer 1 (the rewrite) makes of the SELECT for the masked
    identity. (phigate sends both the plain SELECT and its COPY form as written and the data
    plane masks what comes back, by column origin: phigate.masking.passthrough; the rewrite
    is what a read computing values from classified columns gets.)

    Read directly on PostgreSQL it shows what computing the masks in SQL costs the database.
    Uses phigate's own config loader, catalog reader and rewrite in this process, as the
    control plane would; the pseudonym key never leaves the work dir (the rewrite calls the
    functions `phigate db install` put in the database).
    """
    from phigate.config import load_config
    from phigate.masking.classification import load_catalog
    from phigate.masking.rewrite import mask_sql, rewrite

    cfg = load_config(config_path)
    roleset = cfg.roleset([IDENTITIES[MASKED_SUB][1]], target)
    if roleset is None:
        raise RuntimeError("the masked role does not apply to the target")
    catalog = load_catalog(cfg, target)
    functions = catalog.pseudonym_functions  # checked as the gateway checks them
    masks = mask_sql(cfg.phi, pseudonyms=functions is not None and functions.ready)
    out: dict[str, str] = {}
    for s in SETS:
        result = rewrite(
            s.select_sql, catalog, roleset.clear_kinds, masks, schema=cfg.targets[target].schema
        )
        if result.refuse is not None or not result.changed:
            raise RuntimeError(f"the rewrite did not mask {s.table}'s statement: "
                               f"{result.refuse or 'unchanged'}")
        out[s.key] = result.sql
    return out


# ---- measurement ---------------------------------------------------------------------------

@dataclass
class Series:
    """One reader's timings; rows/s and MB/s (clear payload MB) best and median of N."""

    select_s: list[float] = field(default_factory=list)
    copy_s: list[float] = field(default_factory=list)
    select_proxy_cpu_s: list[float] = field(default_factory=list)
    copy_proxy_cpu_s: list[float] = field(default_factory=list)
    select_pg_cpu_s: list[float] = field(default_factory=list)
    copy_pg_cpu_s: list[float] = field(default_factory=list)
    # The reader's own CPU (this thread: psycopg receiving and parsing the rows).
    select_client_cpu_s: list[float] = field(default_factory=list)
    copy_client_cpu_s: list[float] = field(default_factory=list)
    copy_bytes: int = 0

    def summary(self, payload_bytes: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for what, secs in (("select", self.select_s), ("copy", self.copy_s)):
            best, med = min(secs), statistics.median(secs)
            out[f"{what}_best_rows_s"] = ROWS / best
            out[f"{what}_median_rows_s"] = ROWS / med
            out[f"{what}_best_mb_s"] = payload_bytes / 1e6 / best
            out[f"{what}_median_mb_s"] = payload_bytes / 1e6 / med
            out[f"{what}_seconds"] = secs
        for key in ("select_proxy_cpu_s", "copy_proxy_cpu_s", "select_pg_cpu_s",
                    "copy_pg_cpu_s", "select_client_cpu_s", "copy_client_cpu_s"):
            vals: list[float] = getattr(self, key)
            out[key.replace("_cpu_s", "_cpu_ms_median")] = (
                statistics.median(vals) * 1e3 if vals else None)
        out["copy_bytes"] = self.copy_bytes
        out["repeats"] = len(self.select_s)
        return out


def _cpu(pid: int | None) -> float:
    return tree_run_seconds(pid) if pid else 0.0


class _Reader:
    def __init__(self, mask_set: str, label: str, ep: Endpoint, proxy_pid: int | None,
                 select_sql: str):
        self.mask_set, self.label, self.ep, self.proxy_pid = mask_set, label, ep, proxy_pid
        self.name = f"set {mask_set} {label}"
        self.select_sql, self.copy_sql = select_sql, f"COPY ({select_sql}) TO STDOUT"
        self.conn = psycopg.connect(host=ep.host, port=ep.port, dbname=ep.dbname, user=ep.user,
                                    password=ep.password, sslmode="disable", autocommit=True,
                                    connect_timeout=15)
        row = self.conn.execute("SELECT pg_backend_pid()").fetchone()
        self.backend_pid: int | None = int(row[0]) if row else None
        self.series = Series()

    def _pg_cpu(self) -> float:
        try:
            return run_seconds(self.backend_pid) if self.backend_pid else 0.0
        except (OSError, ValueError):
            return 0.0

    def select(self, timed: bool) -> list[tuple[Any, ...]]:
        gc.collect()
        c0, p0 = _cpu(self.proxy_pid), self._pg_cpu()
        u0, t0 = time.thread_time(), time.perf_counter()
        with self.conn.cursor() as cur:
            cur.execute(self.select_sql)
            rows = cur.fetchall()
        dt, u1 = time.perf_counter() - t0, time.thread_time()
        c1, p1 = _cpu(self.proxy_pid), self._pg_cpu()
        if len(rows) != ROWS:
            raise RuntimeError(f"{self.name}: SELECT returned {len(rows)} rows")
        if timed:
            self.series.select_s.append(dt)
            self.series.select_pg_cpu_s.append(p1 - p0)
            self.series.select_client_cpu_s.append(u1 - u0)
            if self.proxy_pid:
                self.series.select_proxy_cpu_s.append(c1 - c0)
        return rows

    def copy(self, timed: bool) -> None:
        gc.collect()
        c0, p0 = _cpu(self.proxy_pid), self._pg_cpu()
        u0, t0 = time.thread_time(), time.perf_counter()
        n = lines = 0
        with self.conn.cursor() as cur, cur.copy(self.copy_sql) as cp:
            for block in cp:
                n += len(block)
                if not timed:
                    lines += bytes(block).count(b"\n")
        dt, u1 = time.perf_counter() - t0, time.thread_time()
        c1, p1 = _cpu(self.proxy_pid), self._pg_cpu()
        if not timed and lines != ROWS:
            raise RuntimeError(f"{self.name}: COPY returned {lines} lines")
        self.series.copy_bytes = n
        if timed:
            self.series.copy_s.append(dt)
            self.series.copy_pg_cpu_s.append(p1 - p0)
            self.series.copy_client_cpu_s.append(u1 - u0)
            if self.proxy_pid:
                self.series.copy_proxy_cpu_s.append(c1 - c0)

    def close(self) -> None:
        self.conn.close()


def _check(clear: list[tuple[Any, ...]], masked: list[tuple[Any, ...]]) -> dict[str, Any]:
    """What the masked identity got, compared with the clear rows (no clear value is kept).

    Fails when a classified value arrives in clear (masking is not active) or when an
    unclassified value comes back changed (a content detector fired, so the read would measure
    more than the three masked columns)."""
    by_id = {r[0]: r for r in clear}
    n = {"ssn_unmasked": 0, "name_unmasked": 0, "dob_unmasked": 0, "encounter_changed": 0,
         "notes_changed": 0}
    for r in masked:
        c = by_id[r[0]]
        n["ssn_unmasked"] += r[2] == c[2]
        n["name_unmasked"] += r[3] == c[3]
        # `year` keeps January 1st as it is: a clear value is one that is not a January 1st.
        n["dob_unmasked"] += (r[4].month, r[4].day) != (1, 1)
        n["encounter_changed"] += r[1] != c[1]
        n["notes_changed"] += r[5] != c[5]
    if len(masked) != len(clear) or len(by_id) != len(clear):
        raise RuntimeError("the masked and unmasked reads returned different rows")
    first = masked[0]
    # Shapes only: masked values of one row (the data is synthetic anyway).
    sample = {"ssn": first[2], "full_name": first[3], "birth_date": str(first[4]),
              "encounter": first[1]}
    leaked = {k: v for k, v in n.items() if k.endswith("_unmasked") and v}
    if leaked:
        raise RuntimeError(f"the masked identity read classified values in clear: {leaked} "
                           "(masking is not active; the measurement would be meaningless)")
    changed = {k: v for k, v in n.items() if k.endswith("_changed") and v}
    if changed:
        raise RuntimeError(f"the masked identity got unclassified values changed: {changed} "
                           "(a content detector fired; the read would measure more than the "
                           "three masked columns)")
    return {"counts": n, "masked_sample": sample}


def measure(direct: Endpoint | None, clear: Endpoint, masked: Endpoint, proxy_pid: int | None,
            repeats: int, payload_bytes: int,
            rewritten: dict[str, str] | None = None) -> dict[str, Any]:
    """Per mask set (its own table), alternate the readers: unmasked and masked through phigate;
    direct, and direct with the rewritten statement. All readers of all sets take turns in one
    loop, so drift hits both sets alike; one untimed pass first warms every cache."""
    readers: list[_Reader] = []
    for ms in SETS:
        readers += [_Reader(ms.key, "unmasked", clear, proxy_pid, ms.select_sql),
                    _Reader(ms.key, "masked", masked, proxy_pid, ms.select_sql)]
        if direct is not None:
            readers.append(_Reader(ms.key, "direct", direct, None, ms.select_sql))
            if rewritten is not None and ms.key in rewritten:
                readers.append(_Reader(ms.key, "direct_rewritten", direct, None,
                                       rewritten[ms.key]))
    # The collector off while timing (collected before each read instead): 120,000 new objects
    # per fetchall would otherwise trigger collections at random points of random reads.
    gc.disable()
    try:
        checks: dict[str, dict[str, Any]] = {}
        for i in range(repeats + 1):
            # Rotate who goes first, so no reader always follows the same one.
            order = readers[i % len(readers):] + readers[:i % len(readers)]
            if i == 0:
                for ms in SETS:  # one set at a time: two sets' rows at once are ~100 MB
                    got = {r.label: r.select(timed=False) for r in order
                           if r.mask_set == ms.key}
                    checks[ms.key] = _check(got["unmasked"], got["masked"])
                    del got
            else:
                for r in order:
                    r.select(timed=True)
            for r in order:
                r.copy(timed=i > 0)
        out: dict[str, Any] = {}
        for ms in SETS:
            res: dict[str, Any] = {"label": ms.label, "table": ms.table}
            res.update({r.label: r.series.summary(payload_bytes) for r in readers
                        if r.mask_set == ms.key})
            res["check"] = checks[ms.key]
            out[ms.key] = res
        return {"sets": out}
    finally:
        gc.enable()
        for r in readers:
            r.close()
