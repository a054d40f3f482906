"""PgBouncer for the comparison: installed from Debian if missing, session pooling, unprivileged."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from procs import LOOPBACK, Account, Registry, chown_tree, free_port, log, run, wait_port

# Database names a client uses on PgBouncer.
SESSION_DB = "bench"  # session pooling: the fair comparison to a 1:1 gateway
TXN_DB = "bench_txn"  # transaction pooling: only a cheap upstream for the 10k idle-connection test


def ensure_installed() -> str:
    """Path of the pgbouncer binary, installing Debian's package (we are root) when missing."""
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists(
        "/usr/sbin/pgbouncer") else None)
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("pgbouncer is not installed and we are not root to apt-get it")
    log("installing pgbouncer from Debian packages (apt-get) ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update"], timeout=300, env=env)
    run(["apt-get", "install", "-y", "--no-install-recommends", "pgbouncer"], timeout=600, env=env)
    found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(found):
        raise RuntimeError("apt-get install pgbouncer finished but no pgbouncer binary found")
    return found


def version(binary: str) -> str:
    """First line of `pgbouncer --version`."""
    cp = run([binary, "--version"], timeout=20, check=False)
    return (cp.stdout or cp.stderr).splitlines()[0].strip() if (cp.stdout or cp.stderr) else "?"


class PgBouncer:
    """One pgbouncer process with a session-pooled and a transaction-pooled database entry."""

    def __init__(self, reg: Registry, workdir: Path, acct: Account | None, binary: str,
                 pg_port: int, svc_user: str, svc_password: str, upstream_db: str,
                 max_client_conn: int, session_pool_size: int, name: str = "pgbouncer"):
        self.reg, self.acct, self.binary, self.name = reg, acct, binary, name
        self.dir = workdir / name
        self.pg_port = pg_port
        self.user, self.password, self.upstream_db = svc_user, svc_password, upstream_db
        self.max_client_conn = max_client_conn
        self.session_pool_size = session_pool_size
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        self.port = free_port()
        q = self.password.replace('"', '""')
        (self.dir / "userlist.txt").write_text(f'"{self.user}" "{q}"\n')
        # SCRAM for the measured session pool (as in production); trust on the transaction pool,
        # which only carries the idle-RSS test, so 10k logins do not spend minutes in PBKDF2.
        (self.dir / "hba.conf").write_text(
            f"host {TXN_DB} all {LOOPBACK}/32 trust\n"
            f"host all all {LOOPBACK}/32 scram-sha-256\n")
        up = f"host={LOOPBACK} port={self.pg_port} dbname={self.upstream_db}"
        ini = f"""\
[databases]
{SESSION_DB} = {up} pool_mode=session pool_size={self.session_pool_size}
{TXN_DB} = {up} pool_mode=transaction pool_size=4

[pgbouncer]
listen_addr = {LOOPBACK}
listen_port = {self.port}
unix_socket_dir =
auth_type = hba
auth_hba_file = {self.dir / "hba.conf"}
auth_file = {self.dir / "userlist.txt"}
pool_mode = session
max_client_conn = {self.max_client_conn}
default_pool_size = {self.session_pool_size}
server_tls_sslmode = disable
client_tls_sslmode = disable
; per-connection log lines would slow the -C run and are not what is being compared
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 3600
ignore_startup_parameters = extra_float_digits,search_path,options
"""
        (self.dir / "pgbouncer.ini").write_text(ini)
        chown_tree(self.dir, self.acct)
        self.proc = self.reg.spawn(self.name, [self.binary, str(self.dir / "pgbouncer.ini")],
                                   log_path=self.dir / "pgbouncer.log", acct=self.acct)
        wait_port(self.port, 30, self.proc)
        log(f"PgBouncer ({self.name}) on {LOOPBACK}:{self.port} (session pool '{SESSION_DB}', "
            f"transaction pool '{TXN_DB}')")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid
