"""phigate.dev.pgembed: a throwaway PostgreSQL starts, answers, never outlives its owner."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from phigate.dev import pgembed
from phigate.dev.pgembed import EmbeddedPostgres, PgEmbedError, find_free_port, pg_bin_dir


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    return pgembed.pid_alive(pid)


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as pg:
        yield pg


def test_find_free_port_is_bindable() -> None:
    port = find_free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_bin_dir_has_server_and_client_tools() -> None:
    for tool in ("initdb", "pg_ctl", "postgres", "psql"):
        assert (pg_bin_dir() / tool).is_file(), tool


def test_bin_dir_override_must_contain_postgres(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PHIGATE_TEST_PG_BIN", str(tmp_path))
    with pytest.raises(PgEmbedError, match="PHIGATE_TEST_PG_BIN"):
        pg_bin_dir()
    monkeypatch.delenv("PHIGATE_TEST_PG_BIN")
    real = pg_bin_dir()
    monkeypatch.setenv("PHIGATE_TEST_PG_BIN", str(real))
    assert pg_bin_dir() == real.resolve()


def test_start_stop_removes_everything() -> None:
    pg = EmbeddedPostgres()
    with pg:
        assert pg.running
        assert pg.major_version >= 14
        assert _accepts(pg.host, pg.port)
        workdir = pg.workdir
        assert workdir is not None and (workdir / "pgdata" / "PG_VERSION").is_file()
        pid = pg._postmaster_pid()
        assert pid is not None and _pid_alive(pid)
        port = pg.port
    assert not pg.running
    assert not workdir.exists()
    assert not _pid_alive(pid)
    assert not _accepts("127.0.0.1", port)
    pg.stop()  # idempotent


def test_stops_when_the_body_raises() -> None:
    pg = EmbeddedPostgres()
    with pytest.raises(RuntimeError, match="boom"), pg:
        pid = pg._postmaster_pid()
        raise RuntimeError("boom")
    assert pid is not None and not _pid_alive(pid)


def test_atexit_hook_stops_live_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only this test's server: the session's `pg` fixture is live too and must survive.
    monkeypatch.setattr(pgembed, "_live", weakref.WeakSet())
    pg = EmbeddedPostgres().start()
    pid = pg._postmaster_pid()
    assert pid is not None
    assert pg in pgembed._live
    pgembed._stop_all_at_exit()
    assert not _pid_alive(pid)
    assert pg not in pgembed._live


def test_runs_unprivileged(server: EmbeddedPostgres) -> None:
    """PostgreSQL refuses root: as root we run it as a dedicated system user."""
    pid = server._postmaster_pid()
    assert pid is not None
    uid = os.stat(f"/proc/{pid}").st_uid
    if os.geteuid() == 0:
        assert server.run_as_uid is not None and server.run_as_uid != 0
        assert uid == server.run_as_uid
        assert server.data_dir.stat().st_uid == server.run_as_uid
    else:
        assert server.run_as_uid is None
        assert uid == os.geteuid()


def test_tcp_requires_the_superuser_password(server: EmbeddedPostgres) -> None:
    with psycopg.connect(server.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(server.dsn(user="postgres", password="wrong"))  # noqa: S106


def test_server_settings_applied(server: EmbeddedPostgres) -> None:
    out = server.psql("SHOW fsync; SHOW max_connections; SHOW listen_addresses;")
    assert out.split() == ["off", "200", "127.0.0.1"]


def test_psql_helper_output_and_errors(server: EmbeddedPostgres) -> None:
    assert server.psql("SELECT 1 + 1, 'x';") == "2|x\n"
    with pytest.raises(PgEmbedError, match="no_such_table"):
        server.psql("SELECT * FROM no_such_table;")


def test_create_role_is_scram_and_not_superuser(server: EmbeddedPostgres) -> None:
    server.create_role("svc_test", "first'secret")
    server.create_role("svc_test", "second-secret")  # second call updates, does not fail
    server.create_database("db_test", owner="postgres")
    out = server.psql(
        "SELECT rolsuper, rolcreatedb, rolcanlogin, rolpassword LIKE 'SCRAM-SHA-256$%' "
        "FROM pg_authid WHERE rolname = 'svc_test';"
    )
    assert out.strip() == "f|f|t|t"
    with psycopg.connect(server.dsn("db_test", "svc_test", "second-secret")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("svc_test",)
    assert server.database_exists("db_test")
    server.drop_database("db_test")
    assert not server.database_exists("db_test")


def test_quoting_resists_injection(server: EmbeddedPostgres) -> None:
    odd = 'we"ird; DROP ROLE postgres; --'
    server.create_role(odd, "pw'; DROP TABLE x; --", login=False)
    assert (
        server.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = {pgembed.quote_literal(odd)};")  # noqa: S608
        == "1\n"
    )
    assert server.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'postgres';") == "1\n"


def test_dsn_quotes_values(server: EmbeddedPostgres) -> None:
    dsn = server.dsn("postgres", "u", "p w'\\x")
    assert "password='p w\\'\\\\x'" in dsn


def test_kept_workdir_is_reused(tmp_path: Path) -> None:
    workdir = tmp_path / "kept"
    with EmbeddedPostgres(workdir) as pg:
        pg.create_database("survives")
        password = pg.superuser_password
    assert (workdir / "pgdata" / "PG_VERSION").is_file()
    assert oct((workdir / "superuser.password").stat().st_mode & 0o777) == "0o600"
    with EmbeddedPostgres(workdir) as pg:
        assert pg.superuser_password == password
        assert pg.database_exists("survives")
    assert workdir.exists()


def test_busy_explicit_port_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        pg = EmbeddedPostgres(port=port)
        with pytest.raises(PgEmbedError) as info:
            pg.start()
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg
    assert "tail of" in msg and "Address already in use" in msg
    assert pg.workdir is None  # temp dir removed after the failed start


def test_port_collision_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        ports = iter([busy_port])
        real = pgembed.find_free_port
        monkeypatch.setattr(
            pgembed, "find_free_port", lambda host="127.0.0.1": next(ports, None) or real(host)
        )
        with EmbeddedPostgres() as pg:
            assert pg.port != busy_port
            assert pg.psql("SELECT 1;") == "1\n"


def test_sigterm_stops_the_server(tmp_path: Path) -> None:
    """A test run killed by SIGTERM (CI timeout) must not leave PostgreSQL running."""
    script = (
        "import sys, time\n"
        "from phigate.dev.pgembed import EmbeddedPostgres\n"
        f"pg = EmbeddedPostgres({str(tmp_path / 'w')!r}).start()\n"
        "print(pg._postmaster_pid(), flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        assert _pid_alive(pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert not _pid_alive(pid)


def test_kept_workdir_with_a_leaked_server_is_recovered(tmp_path: Path) -> None:
    workdir = tmp_path / "kept"
    first = EmbeddedPostgres(workdir).start()
    pid = first._postmaster_pid()
    pgembed._live.discard(first)  # simulate an owner that died without stopping it
    first._started = False
    with EmbeddedPostgres(workdir) as second:
        assert second.psql("SELECT 1;") == "1\n"
        assert pid is not None and not _pid_alive(pid)


def test_find_psql_for_tls() -> None:
    """The wheel's libpq has no SSL; find_psql must only hand out a TLS-capable client."""
    any_psql = pgembed.find_psql(require_ssl=False)
    assert any_psql.is_file()
    try:
        tls_psql = pgembed.find_psql(require_ssl=True)
    except PgEmbedError as exc:
        assert "postgresql-client" in str(exc)
    else:
        assert pgembed.psql_supports_ssl(tls_psql)


def test_stop_survives_a_deleted_data_dir() -> None:
    pg = EmbeddedPostgres().start()
    pid = pg._postmaster_pid()
    assert pid is not None and pg.workdir is not None
    shutil.rmtree(pg.workdir / "pgdata")
    pg.stop()
    assert not _pid_alive(pid)


def test_sigkilled_owner_does_not_leak_the_server(tmp_path: Path) -> None:
    """Nothing runs in a SIGKILLed process; the watchdog must stop PostgreSQL for it."""
    script = (
        "import time\n"
        "from phigate.dev.pgembed import EmbeddedPostgres\n"
        f"pg = EmbeddedPostgres({str(tmp_path / 'w')!r}).start()\n"
        "print(pg._postmaster_pid(), flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        assert _pid_alive(pid)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(pid)
