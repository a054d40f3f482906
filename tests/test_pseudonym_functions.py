"""No pseudonym key material in anything the database sees: `phigate db install` and the
pseudonym functions the masking rewrite calls, on a server that logs every statement.

The server runs with ``log_statement = all``, ``log_min_error_statement = error``, bind
parameters logged in full, ``auto_explain`` (verbose, nested statements) and
``pg_stat_statements`` (nested statements too). Masked sessions make the rewritten statements
fail in every way an agent can (division by zero, failing casts, EXPLAIN, COPY), and the
server log, EXPLAIN (VERBOSE) plans of the rewritten statements, ``pg_stat_activity`` and
``pg_stat_statements`` are scanned for the key and its HMAC pads in every form.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import TEST_SEED, EhrPostgres, GatewayFactory, RunningGateway, psycopg_connect
from phigate.files import write_private
from phigate.masking.pseudonym_db import pads, pseudonym

pytestmark = pytest.mark.integration

LOG_SETTINGS = {
    "log_statement": "all",
    "log_min_error_statement": "error",
    "log_error_verbosity": "verbose",
    "log_parameter_max_length": "-1",
    "log_parameter_max_length_on_error": "-1",
    "shared_preload_libraries": "auto_explain,pg_stat_statements",
    "auto_explain.log_min_duration": "0",
    "auto_explain.log_verbose": "on",
    "auto_explain.log_nested_statements": "on",
    "pg_stat_statements.track": "all",
    "track_activity_query_size": "32768",  # pg_stat_activity shows whole rewritten statements
}
PHI = {
    "public.patients.first_name": {"kind": "name", "mask": "pseudonym"},
    "public.patients.last_name": {"kind": "name", "mask": "pseudonym"},
    "public.patients.mrn": {"kind": "mrn", "mask": "pseudonym"},
    "public.patients.ssn": {"kind": "ssn", "mask": "partial:4"},
    "public.encounters.patient_id": {"kind": "other", "mask": "pseudonym"},  # an integer
    "public.notes.body": {"kind": "free_text", "mask": "free_text"},  # no pseudonym
}
KINDS = ["name", "mrn", "ssn", "other", "free_text"]
PLAIN = "SELECT id, first_name FROM patients"  # layer 2 alone masks it
REWRITTEN = "SELECT id, first_name FROM patients ORDER BY id"  # the database computes it


# --- what counts as key material ---------------------------------------------------------------


def key_needles(key: bytes) -> dict[str, bytes]:
    """Every form of the key and of its HMAC pads the database could ever print, by name (the
    name goes into failure messages, never the bytes). Pads beyond the key's length are a
    constant (0x36.. / 0x5c..), not key material."""
    ipad, opad = pads(key)
    n = min(len(key), 64)
    out: dict[str, bytes] = {}
    for label, data in (("key", key), ("ipad", ipad[:n]), ("opad", opad[:n])):
        for i in range(len(data) - 11):  # any 12 bytes in a row
            w = data[i : i + 12]
            out[f"{label}[{i}:+12] raw"] = w
            out[f"{label}[{i}:+12] hex"] = w.hex().encode()
            out[f"{label}[{i}:+12] HEX"] = w.hex().upper().encode()
        for shift in range(3):  # base64 depends on the alignment
            out[f"{label}[{shift}:] base64"] = base64.b64encode(data[shift:])[:16]
            out[f"{label}[{shift}:] base64url"] = base64.urlsafe_b64encode(data[shift:])[:16]
        escaped = "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\{b:03o}" for b in data[:12])
        out[f"{label} bytea escape"] = escaped.encode()
        out[f"{label} bytea hex"] = b"\\x" + data[:12].hex().encode()
    return out


def leaks(blob: bytes, keys: list[bytes]) -> list[str]:
    found = []
    for i, key in enumerate(keys):
        found += [f"key #{i} {name}" for name, needle in key_needles(key).items() if needle in blob]
    return found


def assert_clean(where: str, blob: bytes | str, keys: list[bytes]) -> None:
    data = blob.encode("utf-8", "replace") if isinstance(blob, str) else blob
    found = leaks(data, keys)
    assert not found, f"key material in {where}: {found[:5]}"


def test_the_scan_finds_what_the_old_rewrite_sent() -> None:
    # What statements carried before `phigate db install`: both pads as bytea literals.
    key = secrets.token_bytes(32)
    ipad, opad = pads(key)
    old = f"pg_catalog.sha256(pg_catalog.decode('{ipad.hex()}', 'hex') || x)"
    assert leaks(old.encode(), [key]) and leaks(opad.hex().upper().encode(), [key])
    assert leaks(b"\\x" + opad.hex().encode(), [key])
    assert leaks(base64.b64encode(b"..." + key), [key]) and leaks(b"x" + key + b"y", [key])
    assert not leaks(b"\\x" + (b"36" * 64) + b" psn_0123456789abcdef", [key])


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpg() -> Iterator[EhrPostgres]:
    """A PostgreSQL of its own that logs everything, with the EHR database."""
    server = EhrPostgres(extra_settings=LOG_SETTINGS)
    server.start()
    try:
        server.provision(patients=40, seed=TEST_SEED)
        server.psql("CREATE EXTENSION pg_stat_statements;\n", dbname=server.ehr_database)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keys() -> list[bytes]:
    """Every key this module put in a key file: none may ever show up on the server."""
    return []


@pytest.fixture
def factory(
    lpg: EhrPostgres, dev_issuer: Any, dev_cert: Any, tmp_path: Path
) -> Iterator[GatewayFactory]:
    f = GatewayFactory(lpg, dev_issuer, dev_cert, tmp_path)
    f.install_pseudonym_functions = False  # these tests run `phigate db install` themselves
    yield f
    f.stop_all()


def new_key(directory: Path, keys: list[bytes]) -> Path:
    key = secrets.token_bytes(32)
    keys.append(key)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"pseudonym-{len(keys)}.key"
    path.write_bytes(key)
    path.chmod(0o600)
    return path


def masked_gateway(factory: GatewayFactory, key_file: Path) -> RunningGateway:
    return factory(
        phi={"columns": PHI, "pseudonym_key_file": str(key_file)},
        groups={"research": ["seer"]},
        roles={
            "seer": {  # sees every kind in clear and may use every class and function
                "relations": ["public.*"], "see_clear": KINDS,
                "allow": ["catalog", "explain", "prepare", "do", "call"],
                "operations": ["select", "copy_to", "ddl"],
                "functions": ["pg_catalog.pg_sleep"],
            },
        },
    )  # fmt: skip


def phigate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run(
        [sys.executable, "-m", "phigate.cli", *args],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip


def db_install(
    lpg: EhrPostgres, config: Path, tmp: Path, user: str = "postgres", password: str = ""
) -> subprocess.CompletedProcess[str]:
    pw = write_private(tmp / f"admin-{user}.password", (password or lpg.superuser_password) + "\n")
    return phigate_cli(
        "db", "install", "--config", str(config), "--target", "ehr",
        "--admin-user", user, "--admin-password-file", str(pw),
    )  # fmt: skip


def admin(lpg: EhrPostgres) -> psycopg.Connection[Any]:
    return psycopg.connect(lpg.dsn(lpg.ehr_database), autocommit=True)


def service(lpg: EhrPostgres) -> psycopg.Connection[Any]:
    return psycopg.connect(lpg.service_dsn(), autocommit=True)


def first_names(gw: RunningGateway, token: str, sql: str) -> dict[int, str]:
    with psycopg_connect(gw, token) as conn:
        return dict(conn.execute(sql).fetchall())


def server_log(lpg: EhrPostgres) -> bytes:
    return lpg.log_path.read_bytes()


# --- the install ---------------------------------------------------------------------------


def test_install_as_the_service_role_is_refused(
    lpg: EhrPostgres, factory: GatewayFactory, keys: list[bytes], tmp_path: Path
) -> None:
    gw_config = _config_file(factory, tmp_path, new_key(tmp_path, keys))
    done = db_install(lpg, gw_config, tmp_path, lpg.service_user, lpg.service_password)
    assert done.returncode == 1
    assert "database administrator" in done.stderr and "--admin-user" in done.stderr
    with admin(lpg) as conn:
        owners = conn.execute(
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'phigate'"
        ).fetchall()
    assert owners in ([], [("postgres",)])  # nothing of the service role's making


def test_install_keeps_the_key_from_the_service_role(
    lpg: EhrPostgres, factory: GatewayFactory, keys: list[bytes], tmp_path: Path
) -> None:
    key_file = new_key(tmp_path, keys)
    cfg = _config_file(factory, tmp_path, key_file)
    done = db_install(lpg, cfg, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "owned by postgres" in done.stdout and "may call them: phigate_svc" in done.stdout
    again = db_install(lpg, cfg, tmp_path)
    assert again.returncode == 0 and "key unchanged" in again.stdout  # idempotent

    with service(lpg) as svc:
        for sql in (
            "SELECT * FROM phigate.pseudonym_key",
            "COPY phigate.pseudonym_key TO STDOUT",
            "SELECT ipad FROM phigate.pseudonym_key",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                svc.execute(sql)
        got = svc.execute("SELECT phigate.pseudonym('Jane')").fetchone()
        assert got == (pseudonym(keys[-1], "Jane"),)  # the function uses the file's key
    with admin(lpg) as conn:
        conn.execute("DROP ROLE IF EXISTS phigate_test_other")
        conn.execute("CREATE ROLE phigate_test_other LOGIN PASSWORD 'other-pw'")
        conn.execute("GRANT CONNECT ON DATABASE ehr TO phigate_test_other")
        attrs = conn.execute(
            "SELECT p.proname, p.prosecdef, p.provolatile, p.proisstrict, p.proparallel, "
            "p.proconfig FROM pg_proc p WHERE p.pronamespace = 'phigate'::regnamespace "
            "ORDER BY 1"
        ).fetchall()
    for name, secdef, volatile, strict, parallel, config in attrs:
        assert (secdef, volatile, strict, parallel) == (True, "s", True, "s"), name
        assert config == ["search_path=pg_catalog, pg_temp"], name
    assert [a[0] for a in attrs] == ["pseudonym", "pseudonym_int"]
    other = lpg.dsn(lpg.ehr_database, "phigate_test_other", "other-pw")
    with (  # PUBLIC may do nothing
        psycopg.connect(other, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT phigate.pseudonym('x')")
    assert_clean("the server log", server_log(lpg), keys)


def _config_file(factory: GatewayFactory, tmp: Path, key_file: Path) -> Path:
    from phigate.dev.demo import dump_toml

    settings = factory.settings(phi={"columns": PHI, "pseudonym_key_file": str(key_file)})
    return write_private(tmp / f"{key_file.stem}.toml", dump_toml(settings))


# --- masked sessions that fail in every way ---------------------------------------------------

# Each must reach the server rewritten (so the pseudonym is computed in SQL) and fail there.
FAILING = [
    ("SELECT lower(first_name) FROM patients WHERE id = 1/0", "22012"),
    ("SELECT first_name FROM patients WHERE first_name <> '' AND id = 1/0", "22012"),
    ("SELECT first_name::int FROM patients", "22P02"),
    ("SELECT mrn FROM patients WHERE last_name::int > 0", "22P02"),
    ("SELECT patient_id FROM encounters WHERE id = 1/0", "22012"),
    ("SELECT p.first_name, e.patient_id FROM patients p JOIN encounters e ON e.id = p.id "
     "WHERE p.id / 0 = 1", "22012"),
    ("COPY (SELECT first_name::int FROM patients) TO STDOUT", "22P02"),
]  # fmt: skip


def test_masked_errors_leave_no_key_in_logs_plans_or_activity(
    lpg: EhrPostgres, factory: GatewayFactory, keys: list[bytes], tmp_path: Path, token: Any
) -> None:
    key_file = new_key(tmp_path, keys)
    assert db_install(lpg, _config_file(factory, tmp_path, key_file), tmp_path).returncode == 0
    gw = masked_gateway(factory, key_file)
    agent = token(sub="masked-agent", groups=("clinicians",))
    with psycopg_connect(gw, agent) as conn:
        for sql, sqlstate in FAILING:
            with pytest.raises(psycopg.Error) as exc:
                if sql.startswith("COPY"):
                    with conn.cursor().copy(sql) as copy:
                        for _ in copy:
                            pass
                else:
                    conn.execute(sql)
            assert exc.value.sqlstate == sqlstate, (sql, exc.value.sqlstate)
        # The extended protocol: bind parameters are logged on error too.
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT lower(last_name) FROM patients WHERE id = 1 / %s", (0,))
        # EXPLAIN of a pseudonymized statement is allowed and shows no key either.
        plan = conn.execute("EXPLAIN SELECT first_name FROM patients ORDER BY 1").fetchall()
        assert_clean("EXPLAIN through the gateway", "\n".join(r[0] for r in plan), keys)
        # A successful COPY of a rewritten query.
        with conn.cursor().copy("COPY (SELECT first_name, mrn FROM patients ORDER BY id) "
                                "TO STDOUT") as copy:  # fmt: skip
            copied = b"".join(bytes(chunk) for chunk in copy)
        assert copied.count(b"\n") == 40 and b"psn_" in copied
        # The session's last statement stays in pg_stat_activity while it is open.
        rows = conn.execute(REWRITTEN).fetchall()
        assert len(rows) == 40 and all(r[1].startswith("psn_") for r in rows)
        with admin(lpg) as a:
            activity = a.execute(
                "SELECT query FROM pg_stat_activity WHERE usename = %s", (lpg.service_user,)
            ).fetchall()
    rewritten = [q for (q,) in activity if "phigate.pseudonym(" in q]
    assert rewritten, "the rewritten statement is not in pg_stat_activity"
    assert_clean("pg_stat_activity", "\n".join(q for (q,) in activity), keys)

    # The rewritten statement's plans, run directly, verbose, as the service role and as the
    # superuser (every expression of every node, the functions' own statements included).
    statement = rewritten[0]
    for conn_of in (service, admin):
        with conn_of(lpg) as c:
            for explain in ("EXPLAIN (VERBOSE, COSTS OFF) ", "EXPLAIN (ANALYZE, VERBOSE) "):
                plan_rows = c.execute(explain + statement).fetchall()
                text = "\n".join(r[0] for r in plan_rows)
                assert "phigate.pseudonym(" in text
                assert_clean(f"{explain}as {conn_of.__name__}", text, keys)
    with admin(lpg) as a:
        statements = a.execute("SELECT query FROM pg_stat_statements").fetchall()
    texts = "\n".join(q for (q,) in statements)
    assert "phigate.pseudonym_key" in texts  # nested statements are tracked
    assert_clean("pg_stat_statements", texts, keys)

    log = server_log(lpg)
    assert b"division by zero" in log and b"invalid input syntax for type integer" in log
    assert b"STATEMENT:" in log and b"phigate.pseudonym(" in log  # rewritten text was logged
    assert b"auto_explain" in log or b"Query Text:" in log  # plans were logged
    assert_clean("the server log", log, keys)


def test_sessions_with_a_db_role_call_the_functions_as_that_role(
    lpg: EhrPostgres, factory: GatewayFactory, keys: list[bytes], tmp_path: Path, token: Any
) -> None:
    from phigate.dev.demo import dump_toml

    with admin(lpg) as a:
        a.execute("DROP ROLE IF EXISTS phigate_test_reader")
        a.execute("CREATE ROLE phigate_test_reader NOLOGIN")
        a.execute("GRANT SELECT ON patients, encounters, notes TO phigate_test_reader")
        a.execute(f"GRANT phigate_test_reader TO {lpg.service_user}")
    key_file = new_key(tmp_path, keys)
    overrides = {
        "phi": {"columns": PHI, "pseudonym_key_file": str(key_file)},
        "groups": {"billing": ["reader"]},
        "roles": {"reader": {"relations": ["public.*"], "db_role": "phigate_test_reader"}},
    }
    cfg = write_private(tmp_path / "db-role.toml", dump_toml(factory.settings(**overrides)))
    done = db_install(lpg, cfg, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "may call them: phigate_svc, phigate_test_reader" in done.stdout
    gw = factory(**overrides)
    agent = token(sub="billing-agent", groups=("billing",))
    with psycopg_connect(gw, agent) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("phigate_test_reader",)
    assert first_names(gw, agent, REWRITTEN) == first_names(gw, agent, PLAIN)
    assert_clean("the server log", server_log(lpg), keys)


# --- the schema is the gateway's own -------------------------------------------------------


@pytest.mark.parametrize("groups", [("clinicians",), ("research",)], ids=["masked", "clear"])
def test_schema_phigate_is_refused_through_the_gateway(
    lpg: EhrPostgres, factory: GatewayFactory, keys: list[bytes], tmp_path: Path, token: Any,
    groups: tuple[str, ...],
) -> None:  # fmt: skip
    key_file = new_key(tmp_path, keys)
    assert db_install(lpg, _config_file(factory, tmp_path, key_file), tmp_path).returncode == 0
    gw = masked_gateway(factory, key_file)
    with psycopg_connect(gw, token(sub="curious-agent", groups=groups)) as conn:
        for sql in (
            "SELECT * FROM phigate.pseudonym_key",
            "SELECT phigate.pseudonym('Jane Doe')",
            "SELECT phigate.pseudonym_int('42', 15)",
            "COPY phigate.pseudonym_key TO STDOUT",
            "DROP SCHEMA phigate CASCADE",
            "DROP FUNCTION phigate.pseudonym(text)",
            "ALTER FUNCTION phigate.pseudonym(text) OWNER TO phigate_svc",
            "CREATE FUNCTION phigate.f() RETURNS int LANGUAGE sql AS 'select 1'",
            "COMMENT ON SCHEMA phigate IS 'x'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
                conn.execute(sql)
            assert "never accessible through the gateway" in str(exc.value), sql
            assert "(rule: phigate)" in str(exc.value)
        # The rewrite's own calls still run.
        rows = conn.execute("SELECT lower(first_name) FROM patients ORDER BY id").fetchall()
        assert len(rows) == 40
    assert_clean("the server log", server_log(lpg), keys)


# --- rotation and a missing install ----------------------------------------------------------


def test_reinstall_with_a_new_key_rotates_and_the_gateway_notices(
    lpg: EhrPostgres, factory: GatewayFactory, keys: list[bytes], tmp_path: Path, token: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from phigate.config import load_config

    caplog.set_level(logging.INFO, logger="phigate.masking.classification")
    agent = token(sub="masked-agent", groups=("clinicians",))
    old_file = new_key(tmp_path / "old", keys)
    old_cfg = _config_file(factory, tmp_path, old_file)
    assert db_install(lpg, old_cfg, tmp_path).returncode == 0
    gw = masked_gateway(factory, old_file)
    before_sql = first_names(gw, agent, REWRITTEN)
    assert before_sql == first_names(gw, agent, PLAIN)  # both layers agree
    assert all(v == pseudonym(keys[-1], v_clear) for v, v_clear in _pairs(lpg, before_sql))

    new_file = new_key(tmp_path / "new", keys)
    rotated = db_install(lpg, _config_file(factory, tmp_path, new_file), tmp_path)
    assert rotated.returncode == 0 and "key ROTATED" in rotated.stdout

    # The old gateway checks again on reload: its key no longer matches the database's.
    gw.thread.reload(load_config(gw.config_path))
    with psycopg_connect(gw, agent) as conn:
        with pytest.raises(psycopg.errors.SystemError) as exc:
            conn.execute(REWRITTEN)
        assert "phigate db install" in (exc.value.diag.message_hint or "")
        assert "rule: masking" in str(exc.value)
        assert dict(conn.execute(PLAIN).fetchall()) == before_sql  # layer 2 alone still works
    assert "different key" in caplog.text
    shown = phigate_cli("catalog", "show", "--config", str(gw.config_path), "--target", "ehr")
    assert shown.returncode == 0
    assert "pseudonym functions: NOT READY" in shown.stdout and "different key" in shown.stdout

    # A gateway with the new key: new pseudonyms, the same from both layers.
    gw2 = masked_gateway(factory, new_file)
    after_sql = first_names(gw2, agent, REWRITTEN)
    assert after_sql == first_names(gw2, agent, PLAIN)
    assert set(after_sql) == set(before_sql)
    assert all(after_sql[i] != before_sql[i] for i in after_sql)
    shown = phigate_cli("catalog", "show", "--config", str(gw2.config_path), "--target", "ehr")
    assert "pseudonym functions: ready" in shown.stdout
    assert_clean("the server log", server_log(lpg), keys)


def _pairs(lpg: EhrPostgres, masked: dict[int, str]) -> list[tuple[str, str]]:
    with admin(lpg) as a:
        clear = dict(a.execute("SELECT id, first_name FROM patients").fetchall())
    return [(masked[i], clear[i]) for i in masked]


def test_without_the_install_pseudonyms_are_refused_and_plain_reads_work(
    lpg: EhrPostgres, factory: GatewayFactory, keys: list[bytes], tmp_path: Path, token: Any
) -> None:
    from phigate.config import load_config

    with admin(lpg) as a:
        a.execute("DROP SCHEMA IF EXISTS phigate CASCADE")
    key_file = new_key(tmp_path, keys)
    gw = masked_gateway(factory, key_file)
    agent = token(sub="masked-agent", groups=("clinicians",))
    with psycopg_connect(gw, agent) as conn:
        for sql in (REWRITTEN, "SELECT patient_id FROM encounters"):
            with pytest.raises(psycopg.errors.SystemError) as exc:
                conn.execute(sql)
            assert "not ready on this target" in str(exc.value)
            assert "phigate db install" in (exc.value.diag.message_hint or "")
        plain = dict(conn.execute(PLAIN).fetchall())  # masked by the data plane alone
        assert len(plain) == 40 and all(v.startswith("psn_") for v in plain.values())
        # Relations without a pseudonym column are still rewritten and masked in SQL.
        body = conn.execute("SELECT body FROM notes ORDER BY id LIMIT 1").fetchone()
        assert body is not None
    shown = phigate_cli("catalog", "show", "--config", str(gw.config_path), "--target", "ehr")
    assert "NOT READY" in shown.stdout and "not installed" in shown.stdout
    # The operator installs and reloads: the same statement now runs.
    assert db_install(lpg, gw.config_path, tmp_path).returncode == 0
    gw.thread.reload(load_config(gw.config_path))
    assert first_names(gw, agent, REWRITTEN) == plain
    assert_clean("the server log", server_log(lpg), keys)


def test_the_whole_server_log_holds_no_key_material(
    lpg: EhrPostgres, factory: GatewayFactory, keys: list[bytes], tmp_path: Path
) -> None:
    # One more install with a fresh key, then everything the server wrote in this module.
    done = db_install(lpg, _config_file(factory, tmp_path, new_key(tmp_path, keys)), tmp_path)
    assert done.returncode == 0
    log = server_log(lpg)
    assert b"COPY phigate.pseudonym_key (ipad, opad) FROM STDIN" in log  # the install was logged
    assert_clean("the server log", log, keys)
    with admin(lpg) as a:
        texts = "\n".join(q for (q,) in a.execute("SELECT query FROM pg_stat_statements"))
    assert_clean("pg_stat_statements", texts, keys)
