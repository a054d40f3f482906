"""PHI masking through the gateway (layer 1, the rewrite): an identity that sees a kind masked
gets masked values through psycopg and asyncpg, in text and binary, with parameters and COPY;
predicates on clear values match nothing; a role that sees the kind in clear gets it; and what
the rewrite cannot make safe is refused."""

from __future__ import annotations

import asyncio
import os
import secrets

import psycopg
import pytest

from harness import asyncpg_connect, psycopg_connect
from layer2ref import partial

pytestmark = pytest.mark.integration

PHI = {
    "columns": {
        "public.patients.ssn": {"kind": "ssn", "mask": "partial:4"},
        "public.patients.mrn": {"kind": "mrn", "mask": "redact"},
        "public.patients.first_name": {"kind": "name", "mask": "pseudonym"},
        "public.patients.date_of_birth": {"kind": "dob", "mask": "year"},
    },
}


@pytest.fixture(scope="module")
def clear(pg):
    """The clear values, read directly from PostgreSQL (never printed)."""
    with psycopg.connect(pg.service_dsn()) as conn:
        return conn.execute(
            "select id, ssn, mrn, first_name, date_of_birth from patients"
        ).fetchall()


@pytest.fixture
def masked_gateway(gateway_factory, tmp_path):
    key = tmp_path / "pseudonym.key"
    key.write_bytes(secrets.token_bytes(32))
    os.chmod(key, 0o600)
    return gateway_factory(
        phi={**PHI, "pseudonym_key_file": str(key)},
        groups={"billing": ["sees-ssn"]},
        roles={"sees-ssn": {"relations": ["public.*"], "see_clear": ["ssn"]}},
    )


def test_masked_values_through_psycopg(masked_gateway, token, clear):
    with psycopg_connect(masked_gateway, token(groups=("clinicians",))) as conn:
        rows = conn.execute(
            "select id, ssn, mrn, first_name, date_of_birth from patients"
        ).fetchall()
        binary = (
            conn.cursor(binary=True).execute("select ssn, date_of_birth from patients").fetchall()
        )
    assert len(rows) == len(clear)
    by_id = {r[0]: r for r in clear}
    names = set()
    for pid, ssn, mrn, first, dob in rows:
        real = by_id[pid]
        assert ssn == partial(real[1], 4) and mrn == "***"  # "***-**-6789", as layer 2
        assert first.startswith("psn_") and first != real[3]
        assert (dob.year, dob.month, dob.day) == (real[4].year, 1, 1)
        names.add(first)
    # One stable pseudonym per distinct clear name: joinable, and not one constant.
    assert len(names) == len({r[3] for r in clear})
    assert all(s.startswith("***") and d.month == 1 for s, d in binary)


def test_predicates_on_clear_values_match_nothing(masked_gateway, token, clear):
    real_ssn, real_mrn = clear[0][1], clear[0][2]
    with psycopg_connect(masked_gateway, token()) as conn:
        assert conn.execute(
            "select count(*) from patients where ssn = %s", (real_ssn,)
        ).fetchone() == (0,)
        assert conn.execute(
            "select count(*) from patients where mrn = '" + real_mrn + "'"  # noqa: S608
        ).fetchone() == (0,)
        # Ordinary queries keep working, with parameters, prepared and repeated.
        for _ in range(3):
            row = conn.execute(
                "select ssn from patients where id = %s", (clear[0][0],), prepare=True
            )
            assert row.fetchone() == (partial(real_ssn, 4),)


def test_copy_out_is_masked(masked_gateway, token, clear):
    with psycopg_connect(masked_gateway, token()) as conn, conn.cursor() as cur:
        with cur.copy("COPY (select ssn, mrn from patients) TO STDOUT") as copy:
            data = b"".join(bytes(b) for b in copy)
        with cur.copy("COPY patients TO STDOUT") as copy:
            whole = b"".join(bytes(b) for b in copy)
    for _, ssn, mrn, *_ in clear:
        assert ssn.encode() not in data and mrn.encode() not in data
        assert ssn.encode() not in whole and mrn.encode() not in whole


def test_masked_values_through_asyncpg(masked_gateway, token, clear):
    async def run():
        conn = await asyncpg_connect(masked_gateway, token())
        try:
            stmt = await conn.prepare("select ssn, date_of_birth from patients where id = $1")
            return [await stmt.fetchrow(pid) for pid, *_ in clear[:20]]
        finally:
            await conn.close()

    for (_pid, ssn, *_rest), row in zip(clear[:20], asyncio.run(run()), strict=True):
        assert row["ssn"] == partial(ssn, 4) and row["date_of_birth"].day == 1


def test_role_that_sees_ssn_in_clear(masked_gateway, token, clear):
    with psycopg_connect(masked_gateway, token(groups=("billing",))) as conn:
        rows = dict(conn.execute("select id, ssn from patients").fetchall())
        mrns = {r[0] for r in conn.execute("select mrn from patients").fetchall()}
    assert rows == {r[0]: r[1] for r in clear}
    assert mrns == {"***"}


def test_what_masking_cannot_make_safe_is_refused(masked_gateway, token):
    with psycopg_connect(masked_gateway, token()) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
            conn.execute("create temp table leak as select * from patients")
        assert "masking" in str(exc.value)
        assert conn.execute("select count(*) from patients").fetchone()[0] > 0  # still usable


def test_explain_analyze_and_verbose_refused_on_masked_relations(masked_gateway, token):
    with psycopg_connect(masked_gateway, token()) as conn:
        for stmt in (
            "explain analyze select ssn from patients",
            "explain (verbose) select ssn from patients",
            "explain (analyze, verbose false) select * from patients",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
                conn.execute(stmt)
            assert "EXPLAIN" in str(exc.value) and "masking" in str(exc.value)
        # EXPLAIN ANALYZE of unprotected data still works, and so does a plain EXPLAIN of a
        # pseudonymized column: the plan names phigate.pseudonym, which holds no key material.
        assert conn.execute("explain analyze select count(*) from encounters").fetchall()
        assert conn.execute("explain select first_name from patients order by 1").fetchall()


def test_prepared_statements_after_the_masking_changed(masked_gateway, token):
    """A plain read prepared before a reload follows the new mask (the data plane masks it by
    column origin); a statement the rewrite prepared upstream must be prepared again."""
    from phigate.config import load_config
    from phigate.dev.demo import dump_toml, merge_config

    with psycopg_connect(masked_gateway, token()) as conn:
        plain = "select ssn from patients where id = %s"
        computed = "select lower(ssn) from patients where id = %s"
        assert conn.execute(plain, (1,), prepare=True).fetchone()[0].startswith("***-**-")
        assert conn.execute(computed, (1,), prepare=True).fetchone()[0].startswith("***-**-")
        # The operator changes the SSN mask.
        changed = merge_config(
            masked_gateway.settings,
            {"phi": {"columns": {"public.patients.ssn": {"kind": "ssn", "mask": "redact"}}}},
        )
        masked_gateway.config_path.write_text(dump_toml(changed))
        masked_gateway.thread.reload(load_config(masked_gateway.config_path))
        assert conn.execute(plain, (1,), prepare=True).fetchone() == ("***",)
        cur = conn.cursor()
        with pytest.raises(psycopg.errors.FeatureNotSupported) as exc:
            cur.execute(computed, (1,), prepare=True)
        assert "prepare" in (exc.value.diag.message_hint or "").lower()


def test_masked_identity_refused_when_the_catalog_cannot_load(gateway_factory, token):
    # The classification names a column the database does not have: the catalog fails to
    # load and masked identities get nothing rather than unmasked data.
    gw = gateway_factory(
        phi={"columns": {"public.patients.no_such_column": {"kind": "ssn", "mask": "redact"}}}
    )
    with psycopg_connect(gw, token()) as conn:
        with pytest.raises(psycopg.errors.SystemError) as exc:
            conn.execute("select count(*) from encounters")
        assert "catalog" in str(exc.value) and "gateway log" in (exc.value.diag.message_hint or "")


@pytest.mark.parametrize(
    "ddl",
    [
        "create temp table patients (id bigint, ssn text)",
        "create temporary table scratch (x text)",
        "create temp view v_scratch as select 1 as x",
        "create function pg_temp.f() returns int language sql as 'select 1'",
    ],
    ids=["temp_table_shadowing_a_protected_name", "temp_table", "temp_view", "temp_function"],
)
def test_masked_identities_cannot_create_objects(masked_gateway, token, ddl):
    """Creating objects is refused for identities that see PHI masked: a temp table named like
    a protected table would make the server read another relation than the rewrite masked."""
    with psycopg_connect(masked_gateway, token()) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(ddl)
        conn.rollback()
        assert conn.execute("select count(*) from patients").fetchone()[0] > 0


def test_both_layers_show_the_same_masked_values(masked_gateway, token, clear):
    """A plain read is masked by the data plane (layer 2) from column origins; an expression
    over the same columns is masked by the rewrite (layer 1) in SQL. Both must agree."""
    with psycopg_connect(masked_gateway, token()) as conn:
        for binary in (False, True):
            cur = conn.cursor(binary=binary)
            by_origin = {
                r[0]: r[1:]
                for r in cur.execute(
                    "select id, ssn, first_name, mrn, date_of_birth from patients"
                ).fetchall()
            }
            in_sql = {
                r[0]: r[1:]
                for r in cur.execute(
                    "select id, ssn || '', first_name || '', mrn || '', date_of_birth + 0 "
                    "from patients"
                ).fetchall()
            }
            assert by_origin == in_sql
    assert len(by_origin) == len(clear)
    for pid, ssn, mrn, first, _dob in clear:
        assert by_origin[pid][0] != ssn and by_origin[pid][1] != first and by_origin[pid][2] != mrn


def test_both_layers_mask_copy_the_same(masked_gateway, token):
    """A text COPY of a plain read is masked by the data plane by column position; with an
    expression it is rewritten; CSV keeps the rewrite. The data must agree."""

    def copy_out(conn, sql):
        with conn.cursor().copy(sql) as copy:
            return b"".join(bytes(b) for b in copy)

    with psycopg_connect(masked_gateway, token()) as conn:
        by_position = copy_out(
            conn, "copy (select id, ssn, first_name, mrn, date_of_birth from patients) to stdout"
        )
        in_sql = copy_out(
            conn,
            "copy (select id, ssn || '', first_name || '', mrn || '', date_of_birth + 0 "
            "from patients) to stdout",
        )
        csv = copy_out(
            conn,
            "copy (select id, ssn, first_name, mrn, date_of_birth from patients) "
            "to stdout (format csv, delimiter E'\\t')",
        )
    assert by_position == in_sql == csv
    assert by_position.count(b"\n") > 10 and b"***-**-" in by_position and b"psn_" in by_position


@pytest.mark.parametrize("style", ["ISO, MDY", "SQL, DMY", "German, DMY", "Postgres, MDY"])
def test_year_masks_follow_the_session_datestyle(masked_gateway, token, style):
    """The data plane masks a plain read's dates in the DateStyle the server reports, so they
    parse like every other date the client gets and equal the rewrite's own output."""
    with psycopg_connect(masked_gateway, token()) as conn:
        conn.execute(f"set datestyle = '{style}'")
        plain = conn.execute("select id, date_of_birth from patients").fetchall()
        in_sql = conn.execute("select id, date_of_birth + 0 from patients").fetchall()
        as_text = conn.execute("select id, date_of_birth::text from patients").fetchall()
    assert dict(plain) == dict(in_sql) and all(d.month == 1 and d.day == 1 for _, d in plain)
    assert len({t for _, t in as_text}) > 1  # the text form went through the rewrite too


def test_masked_values_through_psql(masked_gateway, token, clear):
    """psql (libpq, simple protocol, text) gets masked values, the same for a plain read (masked
    by the data plane) and for expressions over the same columns (rewritten)."""
    from harness import psql

    sql = (
        "select id, ssn, first_name, date_of_birth from patients;"
        "select id, ssn || '', first_name || '', date_of_birth + 0 from patients;"
    )
    proc = psql(masked_gateway, token(), sql)
    assert proc.returncode == 0, proc.stderr.strip()
    lines = proc.stdout.splitlines()
    half = len(lines) // 2
    assert half == len(clear) and sorted(lines[:half]) == sorted(lines[half:])
    by_id = {r[0]: r for r in clear}
    for line in lines[:half]:
        pid, ssn, first, dob = line.split("|")
        real = by_id[int(pid)]
        assert ssn == "***-**-" + real[1][-4:] and first.startswith("psn_") and first != real[3]
        assert dob == f"{real[4].year:04d}-01-01"


def test_statement_text_views_are_refused_in_any_schema(masked_gateway, token):
    """pg_stat_statements usually lives in public; it would show other sessions' statements
    (the rewrite's HMAC pads among them)."""
    with psycopg_connect(masked_gateway, token()) as conn:
        for sql in ("select query from public.pg_stat_statements",
                    "select * from pg_stat_monitor"):  # fmt: skip
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
                conn.execute(sql)
            assert "never readable" in str(exc.value)
            conn.rollback()
