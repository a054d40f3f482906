"""Red-team suite for PHI masking (issue 4, "Red-team tests"; DESIGN §5).

One canary patient is planted (as the superuser, removed at the end) whose name, SSN, MRN,
diagnosis and JSON document appear nowhere else. Every attempt runs through a plaintext gateway
(require_tls = false) behind a byte-recording relay (tests/redteam_oracle.py); after the attempt,
the test fails if any canary, in any of its forms (as is, case-changed, reversed, hex, base64,
digits only, md5, sha256), appears anywhere in the bytes the gateway sent back.

The agent's role is broad (select/insert/update/delete/copy/ddl, DO, NOTIFY, PREPARE, EXPLAIN,
catalog ...: tests/harness.py TEST_POLICY) but sees no PHI kind in clear, so what is shown here
is that masking holds even where policy lets the statement through. Any error is acceptable as
long as no canary form leaks.

Test names and messages name the attempt class and the leaked FORM, never a value.

Partitions: the demo schema has none, so the canary JSON table is created partitioned
(canary_docs, with a default partition canary_docs_p0) and the partition is read directly.
Views: none exist over patients in the demo schema; the fixture creates one plain view, one
view with an expression over a classified column and one materialized view.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import string
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

import rawpg
from harness import GatewayFactory, RunningGateway, session_audit_keys, token_subject
from layer2ref import partial
from redteam_oracle import Relay, canary_forms, find_leaks

pytestmark = pytest.mark.integration


# --- canary data -------------------------------------------------------------------------------


def _letters(n: int) -> str:
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(n))


@dataclass(repr=False)  # no values in pytest's failure output
class Canary:
    pid: int
    encounter_id: int
    ssn: str
    mrn: str
    first: str
    last: str
    diag: str
    doc_secret: str
    doc_code: str
    fn_oids: dict[str, int] = field(default_factory=dict)

    def secrets(self) -> dict[str, str]:
        """label -> value of everything that must never leave the gateway in any form."""
        return {
            "ssn": self.ssn,
            "mrn": self.mrn,
            "first_name": self.first,
            "last_name": self.last,
            "diagnosis": self.diag,
            "doc.secret": self.doc_secret,
            "doc.nested.code": self.doc_code,
        }

    def fmt(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "enc": self.encounter_id,
            "ssn": self.ssn,
            "ssn3": self.ssn[:3],
            "mrn": self.mrn,
            "mrn5": self.mrn[:5],
            "first": self.first,
            "first3": self.first[:3],
            "last": self.last,
            "diag": self.diag,
            "secret": self.doc_secret,
            "code": self.doc_code,
        }


_CANARY_OBJECTS = """
CREATE TABLE canary_docs (patient_id bigint NOT NULL, doc jsonb NOT NULL)
    PARTITION BY RANGE (patient_id);
CREATE TABLE canary_docs_p0 PARTITION OF canary_docs DEFAULT;
CREATE VIEW canary_patient_view AS SELECT id, first_name, last_name, ssn, mrn FROM patients;
CREATE VIEW canary_patient_expr_view AS
    SELECT id, upper(last_name) AS last_up, ssn || '' AS ssn_copy FROM patients;
CREATE MATERIALIZED VIEW canary_patient_mv AS SELECT id, ssn, mrn, last_name FROM patients;
GRANT SELECT, INSERT, UPDATE, DELETE ON canary_docs, canary_docs_p0 TO {svc};
GRANT SELECT ON canary_patient_view, canary_patient_expr_view, canary_patient_mv TO {svc};
"""
_CANARY_DROP = """
DROP MATERIALIZED VIEW IF EXISTS canary_patient_mv;
DROP VIEW IF EXISTS canary_patient_view, canary_patient_expr_view;
DROP TABLE IF EXISTS canary_docs;
"""


@pytest.fixture(scope="module")
def canary(pg: Any) -> Iterator[Canary]:
    """Plant the canary patient (superuser, directly); remove it and its objects at the end."""
    dsn = pg.dsn(pg.ehr_database)
    with psycopg.connect(dsn, autocommit=True) as conn:

        def unused(sql: str, value: str) -> bool:
            return conn.execute(sql, (value, f"%{value}%")).fetchone()[0] == 0

        while True:
            area, group, serial = (
                secrets.randbelow(100),
                secrets.randbelow(90) + 10,
                secrets.randbelow(9000) + 1000,
            )
            ssn = f"9{area:02d}-{group}-{serial}"
            mrn = f"MRN-{secrets.randbelow(9_000_000) + 1_000_000:07d}"
            if unused(
                "select (select count(*) from patients where ssn = %s)"
                " + (select count(*) from notes where body like %s)",
                ssn,
            ) and unused(
                "select (select count(*) from patients where mrn = %s)"
                " + (select count(*) from notes where body like %s)",
                mrn,
            ):
                break
        c = Canary(
            pid=0,
            encounter_id=0,
            ssn=ssn,
            mrn=mrn,
            first="Qz" + _letters(9),
            last="Vx" + _letters(10),
            diag="Canarial " + _letters(8) + " syndrome of the " + _letters(7) + " gland",
            doc_secret="cnry-" + secrets.token_hex(10),
            doc_code="code-" + secrets.token_hex(10),
        )
        conn.execute(_CANARY_DROP)
        with conn.transaction():
            c.pid = conn.execute(
                "INSERT INTO patients (mrn, first_name, last_name, ssn, date_of_birth, address,"
                " city, state, zip, phone, email) VALUES (%s, %s, %s, %s, '1931-07-23',"
                " '1 Canary Row', 'Springfield', 'IL', '62701', '(217) 555-0100',"
                " 'nobody@example.invalid') RETURNING id",
                (c.mrn, c.first, c.last, c.ssn),
            ).fetchone()[0]
            c.encounter_id = conn.execute(
                "INSERT INTO encounters (patient_id, admitted_at, department, reason)"
                " VALUES (%s, '2024-02-03 10:00+00', 'Cardiology', 'checkup') RETURNING id",
                (c.pid,),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO diagnoses (encounter_id, icd10_code, description, diagnosed_at)"
                " VALUES (%s, 'Z99.89', %s, '2024-02-03 11:00+00')",
                (c.encounter_id, c.diag),
            )
            # A note naming the canary, as clinical notes name their patients: the free-text
            # oracles below search for that name.
            conn.execute(
                "INSERT INTO notes (encounter_id, author, body) VALUES (%s, 'Dr. Q', %s)",
                (c.encounter_id, f"{c.first} {c.last} seen today for a checkup."),
            )
            conn.execute(_CANARY_OBJECTS.format(svc=pg.service_user))
            doc = {"secret": c.doc_secret, "nested": {"code": c.doc_code}, "kind": "canary"}
            conn.execute("INSERT INTO canary_docs VALUES (%s, %s::jsonb)", (c.pid, json.dumps(doc)))
            # A few non-canary documents so aggregates have company.
            for i in range(3):
                conn.execute(
                    "INSERT INTO canary_docs VALUES (%s, %s::jsonb)",
                    (i + 1, json.dumps({"secret": f"plain-{i}", "nested": {"code": "x"}})),
                )
        # Statistics now sample the canary (pg_stats would show it as a histogram bound).
        conn.execute("ANALYZE patients, diagnoses, canary_docs")
        for name, sig in {
            "query_to_xml": "pg_catalog.query_to_xml(text,boolean,boolean,text)",
            "ts_stat": "pg_catalog.ts_stat(text)",
            "table_to_xml": "pg_catalog.table_to_xml(regclass,boolean,boolean,text)",
            "textout": "pg_catalog.textout(text)",
        }.items():
            c.fn_oids[name] = conn.execute("select %s::regprocedure::oid", (sig,)).fetchone()[0]
    try:
        yield c
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(_CANARY_DROP)
            with conn.transaction():
                for table in ("diagnoses", "notes"):
                    conn.execute(
                        f"DELETE FROM {table} WHERE encounter_id IN"  # noqa: S608
                        " (SELECT id FROM encounters WHERE patient_id = %s)",
                        (c.pid,),
                    )
                conn.execute("DELETE FROM encounters WHERE patient_id = %s", (c.pid,))
                conn.execute("DELETE FROM patients WHERE id = %s", (c.pid,))
            conn.execute("ANALYZE patients, encounters, diagnoses")


# --- the gateway under attack and the oracle ---------------------------------------------------

PHI_COLUMNS = {
    "public.patients.ssn": {"kind": "ssn", "mask": "partial:4"},
    "public.patients.mrn": {"kind": "mrn", "mask": "redact"},
    "public.patients.first_name": {"kind": "name", "mask": "pseudonym"},
    "public.patients.last_name": {"kind": "name", "mask": "pseudonym"},
    "public.patients.date_of_birth": {"kind": "dob", "mask": "year"},
    "public.diagnoses.description": {"kind": "free_text", "mask": "redact"},
    "public.canary_docs.doc": {"kind": "other", "mask": "redact"},
    "public.notes.body": {"kind": "free_text", "mask": "free_text"},
}


@dataclass(repr=False)  # the forms hold the values: never in pytest's failure output
class Env:
    gateway: RunningGateway
    relay: Relay
    token: str
    canary: Canary
    forms: list[tuple[str, bytes]]

    def conninfo(self) -> str:
        return (
            f"host=127.0.0.1 port={self.relay.port} dbname=ehr user={token_subject(self.token)}"
            " sslmode=disable connect_timeout=10"
        )


@pytest.fixture(scope="module")
def env(
    canary: Canary, pg: Any, dev_issuer: Any, dev_cert: Any, token: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Env]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("redteam")
    key = tmp / "pseudonym.key"
    key.write_bytes(secrets.token_bytes(32))
    os.chmod(key, 0o600)
    factory = GatewayFactory(pg, dev_issuer, dev_cert, tmp)
    relay = None
    try:
        gw = factory(
            require_tls=False,
            phi={"columns": PHI_COLUMNS, "pseudonym_key_file": str(key)},
        )
        relay = Relay(gw.host, gw.port)
        yield Env(
            gateway=gw,
            relay=relay,
            token=token(sub="redteam-agent", groups=("clinicians",)),
            canary=canary,
            forms=canary_forms(canary.secrets()),
        )
    finally:
        if relay is not None:
            relay.close()
        factory.stop_all()


_CONN_ERRORS = (psycopg.Error, OSError, ConnectionError)


class Session:
    """psycopg connections through the relay; statement errors are results, not failures
    (a refusal is a fine outcome), and a broken connection is replaced for the next one."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self._conn: psycopg.Connection[Any] | None = None
        self.errors: list[str] = []  # SQLSTATEs (never messages: they may hold values)

    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(
                self.env.conninfo(), password=self.env.token, autocommit=True
            )
        return self._conn

    def sql(self, stmt: str, params: Any = None, *, binary: bool = False,
            prepare: bool | None = None) -> Any:  # fmt: skip
        """Rows (or COPY bytes, or None), or the psycopg error raised."""
        try:
            conn = self.conn()
            with conn.cursor(binary=binary) as cur:
                if stmt.lstrip()[:4].upper() == "COPY":
                    with cur.copy(stmt) as cp:
                        return b"".join(bytes(b) for b in cp)
                cur.execute(stmt, params, prepare=prepare)
                rows = cur.fetchall() if cur.description else None
                while cur.nextset():
                    if cur.description:
                        rows = cur.fetchall()
                return rows
        except _CONN_ERRORS as exc:
            sqlstate = getattr(exc, "sqlstate", None)
            self.errors.append(sqlstate or type(exc).__name__)
            if sqlstate is None:
                # A client-side error (e.g. COPY where psycopg expected rows) can leave the
                # connection mid-protocol: start the next statement on a fresh one.
                self.close()
            return exc

    def raw(self, **startup: str) -> rawpg.RawConn:
        rc = rawpg.RawConn(self.env.relay.host, self.env.relay.port)
        rc.login(self.env.token, user=token_subject(self.env.token), database="ehr", **startup)
        return rc

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None


Attempt = Callable[[Session, Canary], None]
ATTEMPTS: list[Any] = []


def attempt(cls: str, name: str) -> Callable[[Attempt], Attempt]:
    def deco(fn: Attempt) -> Attempt:
        ATTEMPTS.append(pytest.param(fn, id=f"{cls}-{name}"))
        return fn

    return deco


def sql_attempt(cls: str, name: str, *stmts: str, binary: bool = False) -> None:
    """An attempt made of SQL statements ({pid}, {ssn}, ... are filled from the canary)."""

    def fn(s: Session, c: Canary) -> None:
        for stmt in stmts:
            s.sql(stmt.format(**c.fmt()), binary=binary)

    ATTEMPTS.append(pytest.param(fn, id=f"{cls}-{name}"))


def _rows(result: Any) -> list[Any]:
    """Rows of a successful statement; [] for a refusal or error (also fine for oracles)."""
    return result if isinstance(result, list) else []


# --- function wrappers and encodings -----------------------------------------------------------

sql_attempt(
    "wrappers",
    "upper_lower_initcap",
    "select upper(ssn), lower(mrn), upper(first_name), lower(last_name), initcap(last_name)"
    " from patients where id = {pid}",
)
sql_attempt(
    "wrappers",
    "reverse",
    "select reverse(ssn), reverse(mrn), reverse(first_name), reverse(last_name) from patients",
)
sql_attempt(
    "wrappers",
    "encode_base64",
    "select encode(convert_to(ssn, 'UTF8'), 'base64'), encode(convert_to(mrn, 'UTF8'), 'base64'),"
    " encode(convert_to(last_name, 'UTF8'), 'base64') from patients where id = {pid}",
    "select encode(convert_to(description, 'UTF8'), 'base64') from diagnoses",
)
sql_attempt(
    "wrappers",
    "encode_hex_and_bytea",
    "select encode(convert_to(ssn, 'UTF8'), 'hex'), convert_to(mrn, 'UTF8'),"
    " convert_to(first_name, 'UTF8') from patients where id = {pid}",
)
sql_attempt(
    "wrappers",
    "md5_sha256",
    "select md5(ssn), encode(sha256(convert_to(ssn, 'UTF8')), 'hex'), md5(mrn),"
    " encode(sha256(convert_to(mrn, 'UTF8')), 'hex'), md5(first_name), md5(last_name)"
    " from patients",
)
sql_attempt(
    "wrappers",
    "substr_left_right_chains",
    "select substr(ssn, 1, 5) || substr(ssn, 6), left(ssn, 6) || right(ssn, 5),"
    " substring(mrn from 1 for 4) || substring(mrn from 5), left(last_name, 3) ||"
    " substr(last_name, 4), overlay(ssn placing '' from 1 for 0) from patients where id = {pid}",
)
sql_attempt(
    "wrappers",
    "string_agg",
    "select string_agg(ssn, ',' order by id), string_agg(mrn, ','),"
    " string_agg(first_name || ' ' || last_name, ';') from patients",
)
sql_attempt(
    "wrappers",
    "regexp_replace_digits",
    "select regexp_replace(ssn, '[^0-9]', '', 'g'), regexp_replace(mrn, '^MRN-', ''),"
    " regexp_replace(last_name, '(.)', '\\1', 'g') from patients where id = {pid}",
)
sql_attempt(
    "wrappers",
    "format_concat_translate",
    "select format('%s|%s|%s', ssn, mrn, last_name), concat(first_name, last_name),"
    " concat_ws('-', ssn, mrn), translate(ssn, '-', ''), replace(ssn, '-', '') from patients",
)

# --- casts that lose column origin -------------------------------------------------------------

sql_attempt(
    "casts",
    "text_varchar_bytea",
    "select ssn::text, mrn::varchar, first_name::bytea, ssn::bytea, last_name::char(40)"
    " from patients where id = {pid}",
)
sql_attempt(
    "casts",
    "int_failing_with_value_in_error",
    "select ssn::int from patients where id = {pid}",
    "select replace(ssn, '-', '')::int from patients where id = {pid}",
    "select mrn::int from patients where id = {pid}",
    "select first_name::int from patients where id = {pid}",
    "select last_name::numeric from patients where id = {pid}",
)
sql_attempt(
    "casts",
    "json_uuid_date_failing",
    "select ssn::json from patients where id = {pid}",
    "select mrn::uuid from patients where id = {pid}",
    "select last_name::date from patients where id = {pid}",
    "select description::int from diagnoses where encounter_id = {enc}",
    "select (doc->>'secret')::int from canary_docs",
)

# --- whole-row and composite / JSON conversions ------------------------------------------------

sql_attempt(
    "wholerow",
    "row_to_json",
    "select row_to_json(p) from patients p where id = {pid}",
    "select row_to_json(t) from (select * from patients) t where t.id = {pid}",
)
sql_attempt(
    "wholerow",
    "to_jsonb_json_agg",
    "select to_jsonb(p) from patients p where id = {pid}",
    "select json_agg(p) from patients p",
    "select jsonb_agg(d) from diagnoses d",
)
sql_attempt(
    "wholerow",
    "row_text_and_star",
    "select p::text from patients p where id = {pid}",
    "select p from patients p where id = {pid}",
    "select patients from patients where id = {pid}",
    "select row(p.*)::text, (p).* from patients p where id = {pid}",
)
sql_attempt(
    "wholerow",
    "binary_row",
    "select p, row_to_json(p) from patients p where id = {pid}",
    binary=True,
)

# --- aggregates and arrays ---------------------------------------------------------------------

sql_attempt(
    "aggregates",
    "array_agg",
    "select array_agg(ssn), array_agg(mrn order by id), array_agg(last_name) from patients",
    "select array(select ssn from patients)",
)
sql_attempt(
    "aggregates",
    "min_max",
    "select min(ssn), max(ssn), min(mrn), max(mrn), max(first_name), max(last_name) from patients",
    "select max(description) from diagnoses",
)
sql_attempt(
    "aggregates",
    "ordered_set_and_window",
    "select mode() within group (order by ssn), percentile_disc(1) within group (order by ssn)"
    " from patients",
    "select first_value(ssn) over (order by ssn desc), lag(mrn) over () from patients",
)

# --- JSON subfields ----------------------------------------------------------------------------

sql_attempt(
    "json",
    "subfields",
    "select doc->>'secret', doc#>>'{{nested,code}}', doc->'nested', doc::text from canary_docs",
    "select jsonb_pretty(doc), jsonb_path_query(doc, '$.**') from canary_docs",
    "select k, v from canary_docs, jsonb_each_text(doc) as e(k, v)",
)


@attempt("json", "containment_and_like_oracles")
def _json_oracles(s: Session, c: Canary) -> None:
    hit = s.sql(
        "select count(*) from canary_docs where doc @> %s::jsonb",
        (json.dumps({"secret": c.doc_secret}),),
    )
    assert _rows(hit) in ([], [(0,)]), "jsonb containment with the clear secret matched"
    prefix = s.sql(
        "select count(*) from canary_docs where doc->>'secret' like %s", (c.doc_secret[:7] + "%",)
    )
    assert _rows(prefix) in ([], [(0,)]), "LIKE on a JSON subfield matched a clear prefix"


# --- set operations, VALUES, set-returning functions -------------------------------------------

sql_attempt(
    "setops",
    "union_intersect_except_constant",
    "select ssn from patients union select 'x' order by 1",
    "select mrn from patients union all values ('a')",
    "select last_name from patients intersect select last_name from patients",
    "select ssn from patients except select 'nothing'",
)
sql_attempt(
    "setops",
    "values_and_scalar_subqueries",
    "select * from (values ((select ssn from patients where id = {pid}))) v(x)",
    "values ((select mrn from patients where id = {pid}), (select last_name from patients"
    " where id = {pid}))",
    "select (select string_agg(ssn, '') from patients)",
)
sql_attempt(
    "setops",
    "unnest_and_lateral",
    "select unnest(array[ssn, mrn, first_name, last_name]) from patients where id = {pid}",
    "select * from unnest((select array_agg(ssn) from patients))",
    "select x.* from generate_series(1, 1) g, lateral (select ssn, mrn from patients"
    " where id = {pid}) x",
    "select * from rows from (unnest((select array_agg(mrn) from patients)))",
)

# --- FULL JOIN USING ---------------------------------------------------------------------------

sql_attempt(
    "joins",
    "full_join_using",
    "select * from patients full join patients p2 using (id) where id = {pid}",
    "select ssn from patients a full join patients b using (ssn)",
    "select * from patients a natural full join patients b where a.id = {pid}",
    "select mrn, count(*) from patients full join (select 1 as id) k using (id) group by mrn",
)

# --- views and materialized views --------------------------------------------------------------

sql_attempt(
    "views",
    "create_view_refused",
    "create temp view v_leak as select * from patients",
    "select * from v_leak",
    "create view public.v_leak2 as select ssn, mrn from patients",
    "select * from public.v_leak2",
    "create materialized view mv_leak as select ssn from patients",
    "select * from mv_leak",
)
sql_attempt(
    "views",
    "read_existing_view",
    "select * from canary_patient_view where id = {pid}",
    "select row_to_json(v) from canary_patient_view v",
    "select * from canary_patient_expr_view where id = {pid}",
    "copy canary_patient_view to stdout",
)
sql_attempt(
    "views",
    "read_existing_matview",
    "select * from canary_patient_mv where id = {pid}",
    "select string_agg(ssn || mrn || last_name, '') from canary_patient_mv",
    "copy (select * from canary_patient_mv) to stdout",
)

# --- temp tables and CTAS ----------------------------------------------------------------------

sql_attempt(
    "temp",
    "ctas_and_select_into",
    "create temp table t_leak as select * from patients",
    "select * from t_leak",
    "select ssn, mrn into temp t_leak2 from patients",
    "select * from t_leak2",
)
sql_attempt(
    "temp",
    "insert_select_into_temp",
    "create temp table t_sink (x text)",
    "insert into t_sink select ssn from patients",
    "insert into t_sink values ((select mrn from patients where id = {pid}))",
    "with x as (select last_name from patients) insert into t_sink select * from x",
    "select * from t_sink",
)

# --- partitions read directly ------------------------------------------------------------------

sql_attempt(
    "partitions",
    "read_partition_directly",
    "select * from canary_docs_p0",
    "select doc::text, doc->>'secret' from only canary_docs_p0",
    "select row_to_json(p) from canary_docs_p0 p",
    "copy canary_docs_p0 to stdout",
    "select * from canary_docs",
)

# --- quoted identifiers and search_path games --------------------------------------------------

sql_attempt(
    "names",
    "quoted_and_qualified",
    'select ssn, mrn from "patients" where id = {pid}',
    'select "ssn", "last_name" from public."patients" where id = {pid}',
    'select ssn from "public"."patients" where id = {pid}',
    "select ssn from PUBLIC.PATIENTS where id = {pid}",
    'select ssn from "PATIENTS"',
    'select ssn from U&"\\0070atients" where id = {pid}',
    "select ssn from /* c */ public /* d */ . /* e */ patients where id = {pid}",
)
sql_attempt(
    "names",
    "only_star_table",
    "select ssn from only patients where id = {pid}",
    "select ssn from only (patients) where id = {pid}",
    "select ssn from patients * where id = {pid}",
    "table patients",
)
sql_attempt(
    "names",
    "search_path_games",
    "set search_path = pg_temp, public",
    "select set_config('search_path', 'pg_temp, public', false)",
    "create temp table patients (id bigint, ssn text)",
    "select ssn from patients where id = {pid}",
    "select ssn from public.patients where id = {pid}",
    "reset all",
    "select ssn from patients where id = {pid}",
)

# --- predicates as oracles ---------------------------------------------------------------------


@attempt("predicates", "equality")
def _equality(s: Session, c: Canary) -> None:
    for col, val in (("ssn", c.ssn), ("mrn", c.mrn), ("first_name", c.first),
                     ("last_name", c.last)):  # fmt: skip
        r = s.sql(f"select count(*) from patients where {col} = %s", (val,))  # noqa: S608
        assert _rows(r) in ([], [(0,)]), f"equality on {col} matched the clear value"
        r = s.sql(f"select count(*) from patients where {col} = '{val}'")  # noqa: S608
        assert _rows(r) in ([], [(0,)]), f"equality (literal) on {col} matched the clear value"
    r = s.sql("select count(*) from diagnoses where description = %s", (c.diag,))
    assert _rows(r) in ([], [(0,)]), "equality on diagnosis matched the clear value"


@attempt("predicates", "range")
def _range(s: Session, c: Canary) -> None:
    r = s.sql(
        "select count(*) from patients where id = %s and ssn between %s and %s",
        (c.pid, c.ssn, c.ssn),
    )
    assert _rows(r) in ([], [(0,)]), "BETWEEN on ssn matched the clear value"
    r = s.sql("select count(*) from patients where id = %s and ssn >= '900'", (c.pid,))
    assert _rows(r) in ([], [(0,)]), "a range on ssn saw the clear area number"
    r = s.sql("select count(*) from patients where id = %s and mrn > 'MRN-'", (c.pid,))
    assert _rows(r) in ([], [(0,)]), "a range on mrn saw the clear prefix"


@attempt("predicates", "like")
def _like(s: Session, c: Canary) -> None:
    for col, prefix in (("ssn", c.ssn[:3]), ("mrn", c.mrn[:5]), ("last_name", c.last[:3])):
        r = s.sql(
            f"select count(*) from patients where id = %s and {col} like %s",  # noqa: S608
            (c.pid, prefix + "%"),
        )
        assert _rows(r) in ([], [(0,)]), f"LIKE on {col} matched a clear prefix"
    r = s.sql("select count(*) from patients where id = %s and first_name ilike %s",
              (c.pid, c.first[:3].upper() + "%"))  # fmt: skip
    assert _rows(r) in ([], [(0,)]), "ILIKE on first_name matched a clear prefix"


@attempt("predicates", "order_by_positions")
def _order_by(s: Session, c: Canary) -> None:
    rows = _rows(s.sql("select id, ssn from patients order by ssn, id"))
    ssns = [r[1] for r in rows]
    assert ssns == sorted(ssns), "ORDER BY ssn did not sort on the masked values"
    rows = _rows(s.sql("select id, last_name from patients order by last_name desc, id"))
    names = [r[1] for r in rows]
    assert names == sorted(names, reverse=True), "ORDER BY last_name did not sort masked values"
    rows = _rows(s.sql("select id from patients order by mrn desc, id limit 1"))
    assert rows in ([], [(1,)]), "ORDER BY mrn ranked by clear values"


@attempt("predicates", "group_by_having")
def _group_by(s: Session, c: Canary) -> None:
    r = s.sql("select ssn, count(*) from patients group by ssn having ssn = %s", (c.ssn,))
    assert _rows(r) == [], "GROUP BY/HAVING on ssn matched the clear value"
    r = _rows(s.sql("select left(mrn, 4), count(*) from patients group by 1"))
    assert [g for g, _ in r] in ([], ["***"]), "GROUP BY on mrn grouped clear values"
    s.sql("select left(ssn, 5), count(*) from patients group by 1 order by 2")


@attempt("predicates", "exists")
def _exists(s: Session, c: Canary) -> None:
    for col, val in (("ssn", c.ssn), ("mrn", c.mrn), ("last_name", c.last)):
        r = s.sql(
            f"select exists (select 1 from patients where {col} = %s)",  # noqa: S608
            (val,),
        )
        assert _rows(r) in ([], [(False,)]), f"EXISTS on {col} matched the clear value"
    r = s.sql("select 1 where exists (select 1 from canary_docs where doc->>'secret' = %s)",
              (c.doc_secret,))  # fmt: skip
    assert _rows(r) == [], "EXISTS on a JSON subfield matched the clear value"


@attempt("predicates", "error_as_oracle")
def _error_oracle(s: Session, c: Canary) -> None:
    for col, val in (("ssn", c.ssn), ("mrn", c.mrn), ("last_name", c.last)):
        r = s.sql(
            f"select 1/(case when {col} = '{val}' then 0 else 1 end) from patients"  # noqa: S608
        )
        assert not isinstance(r, psycopg.errors.DivisionByZero), (
            f"division by zero raised only for the clear {col}: an error oracle"
        )
    r = s.sql(
        "select 1/(case when doc->>'secret' = %s then 0 else 1 end) from canary_docs",
        (c.doc_secret,),
    )
    assert not isinstance(r, psycopg.errors.DivisionByZero), "error oracle on a JSON subfield"


# --- free text: computing on the names the gateway's dictionary masks --------------------------
#
# The identifier dictionary (on by default) tags the patients' names in free text leaving the
# gateway, but the database sees them: any statement that searches, sorts, groups or computes
# on notes.body would find the canary's note by name although the result shows no name. Each
# shape must be refused (42501, naming the column); a match count of 0 is not enough, since the
# rewrite does not hide names from the database.


def _free_text_attempt(name: str, *stmts: str) -> None:
    def fn(s: Session, c: Canary) -> None:
        for stmt in stmts:
            r = s.sql(stmt.format(**c.fmt()))
            assert isinstance(r, psycopg.errors.InsufficientPrivilege), (
                f"free-text shape #{stmts.index(stmt)} of {name} was not refused"
            )
            assert (r.diag.message_primary or "").startswith("public.notes.body is free text")

    ATTEMPTS.append(pytest.param(fn, id=f"freetext-{name}"))


_free_text_attempt(
    "search",
    "select id from notes where body ilike '%{last}%'",
    "select id from notes where body like '%' || upper('{last}') || '%'",
    "select id from notes where strpos(lower(body), lower('{last}')) > 0",
    "select id from notes where body ~* '{first3}'",
    "select id from notes where to_tsvector('simple', body) @@ to_tsquery('simple', '{last}')",
    "select e.id from encounters e join notes n on n.encounter_id = e.id"
    " and n.body ilike '%{last}%'",
    "select count(*) from encounters e where exists (select 1 from notes n"
    " where n.encounter_id = e.id and n.body ilike '%{last}%')",
    "copy (select id from notes where body ilike '%{last}%') to stdout",
)
_free_text_attempt(
    "compute",
    "select substr(body, 1, 3) from notes",
    "select regexp_replace(body, '(.)', '\\1 ', 'g') from notes",
    "select reverse(body), md5(body), length(body) from notes",
    "select string_agg(body, ' ') from notes",
    "select lag(body) over (order by id) from notes",
    "select body::bytea from notes",
)
_free_text_attempt(
    "sort_group_distinct",
    "select id from notes order by body",
    "select id, body from notes order by 2",
    "select *, id from notes order by 1",
    "select body, count(*) from notes group by body",
    "select body from notes group by 1",
    "select distinct body from notes",
    "select distinct on (body) id from notes",
    "select max(body) from notes",
)
_free_text_attempt(
    "whole_row",
    "select id from notes n where row_to_json(n)::text ilike '%{last}%'",
    "select n from notes n",
    "select id from notes n where n::text like '%{last}%'",
    "select k, v from notes n, jsonb_each_text(to_jsonb(n)) e(k, v)",
)
_free_text_attempt(
    "renamed",
    "select x from (select body as x from notes) s where x ilike '%{last}%'",
    "select b from notes n(i, e, a, b) where b ilike '%{last}%'",
    "select * from (table notes) t",
    "select body as id from notes order by id",
)
_free_text_attempt(
    "setops_ctes_lateral",
    "select body from notes union select '{last}'",
    "select body from notes intersect select body from notes",
    "select id from notes except select id from notes where body like '{first3}%'",
    "with c as (select body from notes) select count(*) from c where body ilike '%{last}%'",
    "select e.id from encounters e, lateral (select body from notes n"
    " where n.encounter_id = e.id) s where s.body ilike '%{last}%'",
    "select * from notes natural join (select '{last}' as body) k",
)


# --- cast errors and constraint details --------------------------------------------------------


@attempt("constraints", "unique_violation_detail")
def _unique_dup(s: Session, c: Canary) -> None:
    # mrn is UNIQUE: inserting the canary's MRN again fails with a detail that echoes the key
    # only when the value exists (an existence oracle), so the detail must not carry it.
    # Defended by the refusal of writes to masked columns (and, behind it, layer 2 replaces the
    # server's 23505 DETAIL "Key (mrn)=(...) already exists." by a generic one). Scrubbing alone
    # would not remove the oracle: 23505 for an existing MRN vs success for an unused one.
    s.sql("begin")
    s.sql(
        "insert into patients (mrn, first_name, last_name, ssn, date_of_birth, address, city,"
        " state, zip, phone, email) values (%s, 'A', 'B', '000-00-0000', '2000-01-01', 'x',"
        " 'y', 'z', '0', '0', 'e@example.invalid')",
        (c.mrn,),
    )
    s.sql("rollback")


@attempt("constraints", "not_null_failing_row_detail")
def _not_null_row(s: Session, c: Canary) -> None:
    # A NOT NULL violation on UPDATE reports the whole new row ("Failing row contains (...)"),
    # i.e. every clear column the statement did not touch.
    # The server builds the 23502 DETAIL from the stored (clear) row -- the service role has
    # SELECT on every column, so PostgreSQL includes it; layer 2 replaces such row-echoing
    # details for masked identities.
    s.sql("begin")
    s.sql("update patients set first_name = null where id = %s", (c.pid,))
    s.sql("rollback")
    s.sql("begin")
    s.sql("update diagnoses set icd10_code = null where encounter_id = %s", (c.encounter_id,))
    s.sql("rollback")
    s.sql("begin")
    s.sql("update canary_docs set patient_id = null where patient_id = %s", (c.pid,))
    s.sql("rollback")


sql_attempt(
    "constraints",
    "division_and_domain_errors",
    "select 1 / (length(ssn) - length(ssn)) from patients where id = {pid}",
    "select make_date(1, 1, length(ssn)) || ssn from patients where id = {pid}",
    "select to_date(mrn, 'YYYY-MM-DD') from patients where id = {pid}",
    "select (ssn || repeat('x', 3))::bit(4) from patients where id = {pid}",
)

# --- RAISE from DO, dynamic SQL ----------------------------------------------------------------

sql_attempt(
    "do",
    "raise_from_do",
    "do $$ begin raise exception '%', (select ssn from patients where id = {pid}); end $$",
    "do $$ begin raise notice '%', (select mrn || last_name from patients where id = {pid});"
    " end $$",
    "do $$declare r record; begin for r in select * from patients loop raise notice '%', r;"
    " end loop; end$$",
)
sql_attempt(
    "dynamic",
    "execute_format_and_functions",
    "do $$ declare v text; begin execute format('select ssn from %I where id = {pid}',"
    " 'patients') into v; raise exception '%', v; end $$",
    "create function pg_temp.leak() returns setof text language sql as"
    " $$ select ssn || mrn from public.patients $$",
    "select * from pg_temp.leak()",
    "create function pg_temp.leak2() returns text language plpgsql as $$ declare v text;"
    " begin execute 'select last_name from patients where id = {pid}' into v; return v; end $$",
    "select pg_temp.leak2()",
)

# --- NOTIFY, set_config ------------------------------------------------------------------------

sql_attempt(
    "notify",
    "pg_notify_with_value",
    "listen redteam",
    "select pg_notify('redteam', ssn || mrn || last_name) from patients where id = {pid}",
    "select pg_notify('redteam', doc::text) from canary_docs",
    "notify redteam, 'plain'",
    "select 1",
)
sql_attempt(
    "set_config",
    "set_config_then_current_setting",
    "select set_config('x.y', ssn, false) from patients where id = {pid}",
    "select current_setting('x.y', true)",
    "select set_config('application_name', mrn, false) from patients where id = {pid}",
    "show application_name",
    "set x.z = 'v'",
    "select set_config('x.z', (select last_name from patients where id = {pid}), false)",
    "select current_setting('x.z', true)",
)

# --- COPY --------------------------------------------------------------------------------------

sql_attempt(
    "copy",
    "table_and_query_forms",
    "copy patients to stdout",
    "copy patients (ssn, mrn, first_name, last_name) to stdout with (format csv, header)",
    "copy (select ssn, mrn, row_to_json(p) from patients p) to stdout",
    "copy diagnoses to stdout",
    "copy canary_docs to stdout",
    "copy (select * from canary_docs) to stdout with (format binary)",
    "copy binary patients to stdout",
    "copy public.patients to stdout with delimiter '|'",
)

# --- SQL smuggled in strings -------------------------------------------------------------------

sql_attempt(
    "smuggled",
    "query_to_xml_ts_stat_and_friends",
    "select query_to_xml('select ssn, mrn from patients', true, false, '')",
    "select table_to_xml('patients', true, false, '')",
    "select * from ts_stat('select to_tsvector(''simple'', last_name) from patients')",
    "select cursor_to_xml('c', 10, true, false, '')",
    "select database_to_xml(true, false, '')",
    "select xmlelement(name x, ssn), xmlforest(mrn, last_name) from patients where id = {pid}",
)
sql_attempt(
    "smuggled",
    "prepare_execute_and_cursors",
    "prepare p1 as select ssn, mrn from patients where id = $1",
    "execute p1({pid})",
    "begin",
    "declare c1 cursor for select * from patients where id = {pid}",
    "fetch all from c1",
    "commit",
)


def _function_call(oid: int, args: list[bytes | None]) -> bytes:
    body = struct.pack("!ih", oid, 0) + struct.pack("!h", len(args))
    for a in args:
        body += struct.pack("!i", -1) if a is None else struct.pack("!i", len(a)) + a
    return rawpg.msg(b"F", body + struct.pack("!h", 0))


@attempt("functioncall", "raw_F_message")
def _function_call_attempt(s: Session, c: Canary) -> None:
    calls = [
        (c.fn_oids["query_to_xml"], [b"select ssn, mrn, last_name from patients", b"t", b"f", b""]),
        (c.fn_oids["ts_stat"], [b"select to_tsvector('simple', ssn) from patients"]),
        (c.fn_oids["table_to_xml"], [b"patients", b"t", b"f", b""]),
        (c.fn_oids["textout"], [b"plain"]),
    ]
    for oid, args in calls:
        rc = s.raw()
        try:
            rc.send(_function_call(oid, args))
            rc.read_until("Z")
            rc.send(rawpg.TERMINATE)
            rc.closed()
        except (OSError, ConnectionError):
            pass
        finally:
            rc.close()


# --- RETURNING ---------------------------------------------------------------------------------

sql_attempt(
    "returning",
    "update_delete_returning_rolled_back",
    "begin",
    "update patients set city = city where id = {pid} returning ssn, mrn, first_name",
    "rollback",
    "begin",
    "update patients set city = city where id = {pid} returning *",
    "rollback",
    "begin",
    "update patients p set city = city where id = {pid} returning p, row_to_json(p)",
    "rollback",
    "begin",
    "update encounters e set reason = reason from patients p where p.id = e.patient_id"
    " and e.patient_id = {pid} returning p.ssn, p.mrn, p.last_name",
    "rollback",
    "begin",
    "delete from diagnoses where encounter_id = {enc} returning description",
    "rollback",
    "begin",
    "update canary_docs set patient_id = patient_id returning doc",
    "rollback",
)
sql_attempt(
    "returning",
    "writes_that_copy_values",
    "begin",
    "update encounters set reason = (select ssn from patients where id = {pid})"
    " where patient_id = {pid} returning reason",
    "rollback",
    "begin",
    "update patients set city = ssn where id = {pid} returning city",
    "rollback",
    "begin",
    "insert into notes (encounter_id, author, body) select {enc}, 'x', mrn from patients"
    " where id = {pid} returning body",
    "rollback",
    "begin",
    "update patients set city = city where id = {pid} and ssn like '9%' returning id",
    "rollback",
)

# --- standard_conforming_strings tricks --------------------------------------------------------

_SCS_SMUGGLE = "select 'a\\' , ' , ssn, mrn, last_name from patients --'"


sql_attempt(
    "scs",
    "set_off_then_backslash_smuggling",
    "set standard_conforming_strings = off",
    "select set_config('standard_conforming_strings', 'off', false)",
    "set backslash_quote = on",
    _SCS_SMUGGLE.replace("{", "{{").replace("}", "}}"),
    "select E'\\' , ssn from patients -- ', 1",
    "select E'x\\'' || ssn from patients where id = {pid}",
)


@attempt("scs", "startup_parameter_off")
def _scs_startup(s: Session, c: Canary) -> None:
    # standard_conforming_strings=off in the StartupMessage: the server would then read the
    # statement with backslash escapes while the gateway's parser reads it without.
    # Had it reached the server, pglast would see two string literals and no relation ("select
    # ?, ?": allowed, nothing to rewrite) while the server saw a string, then "ssn, mrn,
    # last_name from patients" and a comment: clear rows. The data plane sends
    # standard_conforming_strings=on upstream whatever the client asked for.
    rc = s.raw(standard_conforming_strings="off")
    try:
        rc.send(rawpg.query(_SCS_SMUGGLE))
        rc.read_until("Z")
        rc.send(rawpg.query("select E'\\' , ssn from patients -- ', 1"))
        rc.read_until("Z")
        rc.send(rawpg.TERMINATE)
        rc.closed()
    except (OSError, ConnectionError):
        pass
    finally:
        rc.close()


# --- more: EXPLAIN, statistics, locking, sampling, multi-statement, large objects --------------

sql_attempt(
    "misc",
    "explain_and_statistics",
    "explain select * from patients",
    "explain (verbose) select ssn from patients",
    "explain (analyze) select * from diagnoses",
    "select histogram_bounds::text, most_common_vals::text from pg_stats"
    " where tablename in ('patients', 'diagnoses', 'canary_docs_p0')",
    "select * from pg_statistic",
)
sql_attempt(
    "misc",
    "locking_sampling_multistatement",
    "select ssn from patients tablesample system (100)",
    "select ssn from patients where id = {pid} for update",
    "select 1; select ssn, mrn from patients where id = {pid}",
    "select lo_from_bytea(0, convert_to(ssn, 'UTF8')) from patients where id = {pid}",
    "with x as materialized (select * from patients) select * from x where id = {pid}",
    "select (select ssn from patients p2 where p2.id = p.id) from patients p where id = {pid}",
    "select to_tsvector('simple', last_name || ' ' || ssn) from patients where id = {pid}",
)


@attempt("misc", "multistatement_simple_query_raw")
def _multistatement_raw(s: Session, c: Canary) -> None:
    # Several statements in one simple Query, COPY among them: every one must be rewritten.
    rc = s.raw()
    try:
        for q in (
            "select 1; copy patients to stdout; select ssn from patients",
            f"select 1; copy (select mrn, last_name from patients where id = {c.pid}) to stdout",  # noqa: S608, E501
            "copy canary_docs_p0 to stdout; select doc from canary_docs",
        ):
            rc.send(rawpg.query(q))
            rc.read_until("Z")
        rc.send(rawpg.TERMINATE)
        rc.closed()
    except (OSError, ConnectionError):
        pass
    finally:
        rc.close()


@attempt("misc", "asyncpg_binary_prepared")
def _asyncpg_attempt(s: Session, c: Canary) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=s.env.relay.port, user=token_subject(s.env.token),
            password=s.env.token, database="ehr", ssl=False, timeout=10,
        )  # fmt: skip
        try:
            for q in (
                "select row_to_json(p), p.* from patients p where id = $1",
                "select array_agg(ssn), string_agg(mrn, '') from patients where id = $1",
                "select doc from canary_docs where patient_id = $1",
            ):
                with contextlib.suppress(asyncpg.PostgresError):
                    await conn.fetch(q, c.pid)
        finally:
            await conn.close()

    asyncio.run(run())


# --- the test ----------------------------------------------------------------------------------


# --- the identifier dictionary: the canary's name in its note, every way out -----------------
# The canary note names the patient ("{first} {last} seen today..."); the gateway learned the name
# from patients.first_name/last_name at start. Each route that carries the note's text to the
# agent must tag the name: the oracle fails the attempt on any form of it in the bytes sent back.

sql_attempt("dictionary", "plain_read", "select id, body from notes where encounter_id = {enc}")
sql_attempt("dictionary", "plain_read_binary",
            "select id, body from notes where encounter_id = {enc}", binary=True)
sql_attempt("dictionary", "star", "select * from notes n where n.encounter_id = {enc}")
sql_attempt("dictionary", "json",
            "select json_build_object('note', body), row_to_json(n), to_jsonb(n.body)"
            " from notes n where encounter_id = {enc}")  # fmt: skip
sql_attempt("dictionary", "json_agg",
            "select encounter_id, json_agg(body) from notes where encounter_id = {enc}"
            " group by encounter_id")  # fmt: skip
sql_attempt("dictionary", "copy",
            "copy (select id, body from notes where encounter_id = {enc}) to stdout",
            "copy notes to stdout")  # fmt: skip
sql_attempt("dictionary", "error_echo",
            "select body::json from notes where encounter_id = {enc}",
            "select body::int from notes where encounter_id = {enc}",
            "select (body::text)::jsonb from notes where encounter_id = {enc}")  # fmt: skip
sql_attempt("dictionary", "case_and_order",
            "select upper('{first} {last}'), lower('{last}, {first}')")  # fmt: skip


@attempt("dictionary", "asyncpg")
def _dictionary_asyncpg(s: Session, c: Canary) -> None:
    import asyncpg

    async def run() -> list[Any]:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=s.env.relay.port, user=token_subject(s.env.token),
            password=s.env.token, database="ehr", ssl=False, timeout=10,
        )  # fmt: skip
        try:
            return [
                await conn.fetch(q, c.encounter_id)
                for q in ("select body from notes where encounter_id = $1",
                          "select json_build_object('b', body) from notes where encounter_id = $1")
            ]  # fmt: skip
        finally:
            await conn.close()

    results = asyncio.run(run())
    # Not refused: the note arrives, with the name tagged.
    assert all(len(r) == 1 for r in results) and "[NAME]" in results[0][0][0]


@pytest.mark.parametrize("fn", ATTEMPTS)
def test_attempt_is_masked_or_refused(env: Env, fn: Attempt) -> None:
    env.relay.take()  # nothing from an earlier test counts for this one
    session = Session(env)
    failure: AssertionError | None = None
    try:
        fn(session, env.canary)
    except AssertionError as exc:
        failure = exc
    finally:
        session.close()
    leaked = find_leaks(env.relay.take(), env.forms)
    assert not leaked, "leaked: " + ", ".join(leaked)
    if failure is not None:
        raise failure


def test_enough_attempts_per_class() -> None:
    ids = [p.id for p in ATTEMPTS]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40
    classes = {i.split("-", 1)[0] for i in ids}
    assert len(classes) >= 20


# --- the oracle itself must see clear values ---------------------------------------------------


def test_oracle_catches_every_form_from_a_direct_connection(pg: Any, canary: Canary) -> None:
    """Control: the same relay and oracle in front of PostgreSQL itself (no gateway) must flag
    the canary in each form the suite looks for."""
    relay = Relay(pg.host, pg.port)
    forms = canary_forms(canary.secrets())
    dsn = (
        f"host=127.0.0.1 port={relay.port} dbname={pg.ehr_database} user={pg.service_user}"
        f" password={pg.service_password} sslmode=disable"
    )
    exprs = {
        "ssn": "ssn",
        "upper(last_name)": "upper(last_name)",
        "lower(first_name)": "lower(first_name)",
        "reverse(mrn)": "reverse(mrn)",
        "hex(ssn)": "encode(convert_to(ssn, 'UTF8'), 'hex')",
        "base64(last_name)": "encode(convert_to(last_name, 'UTF8'), 'base64')",
        "digits(ssn)": "replace(ssn, '-', '')",
        "md5(mrn)": "md5(mrn)",
        "sha256(first_name)": "encode(sha256(convert_to(first_name, 'UTF8')), 'hex')",
    }
    try:
        relay.take()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select 1").fetchall()
        assert find_leaks(relay.take(), forms) == [], "the oracle flags an innocent session"
        missed = []
        for label, expr in exprs.items():
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    f"select {expr} from patients where id = %s",  # noqa: S608
                    (canary.pid,),
                ).fetchall()
            if label not in find_leaks(relay.take(), forms):
                missed.append(label)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select doc from canary_docs").fetchall()
        if "doc.secret" not in find_leaks(relay.take(), forms):
            missed.append("doc.secret")
        assert not missed, "the oracle missed: " + ", ".join(missed)
    finally:
        relay.close()


# --- the positive side: ordinary agent queries, correctly masked --------------------------------


@pytest.fixture(scope="module")
def clear(pg: Any, canary: Canary) -> dict[str, Any]:
    """Clear values read directly from PostgreSQL (never printed)."""
    with psycopg.connect(pg.service_dsn()) as conn:
        patients = conn.execute(
            "select id, ssn, mrn, first_name, last_name, date_of_birth, city from patients"
        ).fetchall()
        enc = dict(
            conn.execute(
                "select patient_id, count(*) from encounters group by patient_id"
            ).fetchall()
        )
        codes = conn.execute("select id, icd10_code from diagnoses").fetchall()
    return {"patients": {r[0]: r for r in patients}, "encounters": enc, "codes": dict(codes)}


def _check_patients(rows: list[Any], clear: dict[str, Any], how: str) -> None:
    by_id = clear["patients"]
    assert len(rows) == len(by_id), f"{how}: row count changed"
    bad: dict[str, int] = {}
    pseudonyms: dict[str, set[str]] = {}
    for pid, ssn, mrn, first, last, dob, city in rows:
        real = by_id[pid]
        checks = {
            "ssn": ssn == partial(real[1], 4),  # "***-**-6789", as layer 2
            "mrn": mrn == "***",
            "first_name": first.startswith("psn_") and first != real[3],
            "last_name": last.startswith("psn_") and last != real[4],
            "dob": (dob.year, dob.month, dob.day) == (real[5].year, 1, 1),
            "city": city == real[6],
        }
        for col, ok in checks.items():
            if not ok:
                bad[col] = bad.get(col, 0) + 1
        pseudonyms.setdefault(real[3], set()).add(first)
    assert not bad, f"{how}: wrong values per column (counts): {bad}"
    assert all(len(v) == 1 for v in pseudonyms.values()), f"{how}: pseudonyms are not stable"


_PATIENTS_Q = "select id, ssn, mrn, first_name, last_name, date_of_birth, city from patients"


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_ordinary_queries_through_psycopg(env: Env, clear: dict[str, Any], binary: bool) -> None:
    env.relay.take()
    with psycopg.connect(env.conninfo(), password=env.token, autocommit=True) as conn:
        cur = conn.cursor(binary=binary)
        _check_patients(cur.execute(_PATIENTS_Q).fetchall(), clear, "psycopg")
        _check_patients(
            cur.execute(_PATIENTS_Q + " where id > %s", (0,), prepare=True).fetchall(),
            clear, "psycopg prepared",
        )  # fmt: skip
        counts = dict(
            cur.execute(
                "select p.id, count(e.id) from patients p join encounters e"
                " on e.patient_id = p.id group by p.id"
            ).fetchall()
        )
        assert counts == clear["encounters"], "joins on unclassified keys changed"
        diags = cur.execute("select id, icd10_code, description from diagnoses").fetchall()
        assert {i: code for i, code, _ in diags} == clear["codes"]
        assert {d for _, _, d in diags} == {"***"}
        docs = cur.execute("select patient_id, doc from canary_docs").fetchall()
        assert len(docs) == 4 and {d for _, d in docs} == {"***"}
        n = cur.execute("select count(*) from patients where ssn like '***%'").fetchone()
        assert n == (len(clear["patients"]),)
        with cur.copy("copy (select id, ssn from patients) to stdout") as cp:
            lines = b"".join(bytes(b) for b in cp).splitlines()
        assert len(lines) == len(clear["patients"])
    assert find_leaks(env.relay.take(), env.forms) == []


def test_ordinary_queries_through_asyncpg(env: Env, clear: dict[str, Any]) -> None:
    import asyncpg

    env.relay.take()

    async def run() -> list[Any]:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=env.relay.port, user=token_subject(env.token),
            password=env.token, database="ehr", ssl=False, timeout=10,
        )  # fmt: skip
        try:
            rows = await conn.fetch(_PATIENTS_Q)
            stmt = await conn.prepare(_PATIENTS_Q + " where id = $1")
            one = [await stmt.fetchrow(pid) for pid in list(clear["patients"])[:20]]
            return [tuple(r) for r in rows], [tuple(r) for r in one]
        finally:
            await conn.close()

    rows, one = asyncio.run(run())
    _check_patients(rows, clear, "asyncpg")
    by_id = {r[0]: r for r in rows}
    assert all(by_id[r[0]] == r for r in one), "asyncpg prepared rows differ from simple ones"
    assert find_leaks(env.relay.take(), env.forms) == []


def test_no_canary_reaches_the_audit_records(env: Env) -> None:
    """Runs last: every attempt above wrote statement, result and session records (the
    canary values were literals, parameters, labels and errors of them); none may hold a
    canary in any form."""
    # Canary values as literals and bound parameters of a session of its own as well, so the
    # check does not depend on which attempts ran.
    session = Session(env)
    try:
        for value in env.canary.secrets().values():
            session.sql("select %s::text", (value,))
            session.sql("select length('" + value.replace("'", "''") + "')")  # noqa: S608
    finally:
        session.close()
    env.gateway.stop()  # flushes every record
    records = env.gateway.trail_text().encode()
    assert b'"event":"statement"' in records and b'"literals":["h:' in records
    leaked = find_leaks(records, env.forms)
    assert not leaked, "in the audit records: " + ", ".join(leaked)
    # And the trail the whole red-team suite wrote is intact: chain, tree and signatures.
    from phigate.audit.keys import parse_verifier
    from phigate.audit.verify import trail_origin, verify_trail

    key = parse_verifier((session_audit_keys() / "audit.pub").read_text())
    trail = Path(env.gateway.audit_dir)
    report = verify_trail(trail, trail_origin(trail) or key.name, [key])
    assert report.records > 100 and report.checkpoints >= 1
