"""Process bookkeeping for the benchmark: free ports, unprivileged users, bounded waits, cleanup."""

from __future__ import annotations

import contextlib
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def log(msg: str) -> None:
    """Progress line on stderr so stdout stays the result table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A currently free loopback TCP port (racy by nature; good enough on a private machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts on 127.0.0.1:port; fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process {proc.args!r} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {LOOPBACK}:{port} after {timeout:.0f}s")


@dataclass(frozen=True)
class Account:
    """An unprivileged OS account: PostgreSQL and PgBouncer both refuse to run as root."""

    name: str
    uid: int
    gid: int


def unprivileged_account() -> Account | None:
    """`nobody` when we are root (PG/PgBouncer refuse root); None when already unprivileged."""
    if os.geteuid() != 0:
        return None
    for name in ("nobody", "postgres"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return Account(name, pw.pw_uid, pw.pw_gid)
    raise RuntimeError("running as root and no unprivileged account (nobody/postgres) exists")


def chown_tree(path: Path, acct: Account | None) -> None:
    """Hand a directory tree to the unprivileged account."""
    if acct is None:
        return
    os.chown(path, acct.uid, acct.gid)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            os.lchown(os.path.join(root, n), acct.uid, acct.gid)


def nofile_hard() -> int:
    """The hard RLIMIT_NOFILE; children may raise their soft limit up to it, never beyond."""
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(hard)


def _child_setup() -> None:
    # Runs in the child between fork and exec: high fd limit for 10k-connection tests.
    raise_nofile()


def run(
    cmd: Sequence[str],
    *,
    timeout: float,
    acct: Account | None = None,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a short command with a hard time limit, optionally as the unprivileged account."""
    cp = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
        preexec_fn=_child_setup, user=acct.uid if acct else None,
        group=acct.gid if acct else None, extra_groups=[] if acct else None,
    )
    if check and cp.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({cp.returncode}):\n{cp.stdout[-2000:]}\n{cp.stderr[-2000:]}"
        )
    return cp


@dataclass
class Registry:
    """Every long-lived process and temp dir this run made, so all of them go away at the end."""

    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    stoppers: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    keep_dirs: bool = False

    def spawn(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        log_path: Path,
        acct: Account | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a server in its own session (its own process group) with output to a log file."""
        out = open(log_path, "ab")  # noqa: SIM115 - the child owns it; closed after Popen
        try:
            p = subprocess.Popen(
                list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, start_new_session=True, preexec_fn=_child_setup,
                user=acct.uid if acct else None, group=acct.gid if acct else None,
                extra_groups=[] if acct else None,
            )
        finally:
            out.close()
        self.procs.append((name, p))
        return p

    def on_cleanup(self, name: str, fn: Callable[[], None]) -> None:
        """Register a graceful stop (e.g. pg_ctl stop) to run before the kill sweep."""
        self.stoppers.append((name, fn))

    def cleanup(self) -> None:
        """Stop everything, newest first; bounded: SIGTERM, 10 s grace, then SIGKILL."""
        for name, fn in reversed(self.stoppers):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - cleanup must go on whatever failed
                log(f"cleanup: stopping {name} failed: {e}")
        self.stoppers.clear()
        for name, p in reversed(self.procs):
            if p.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"cleanup: {name} (pid {p.pid}) ignored SIGTERM; killing")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        self.procs.clear()
        if not self.keep_dirs:
            for d in reversed(self.dirs):
                shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()


def rss_kb(pid: int) -> int:
    """VmRSS of a process in kB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process (all its threads) in seconds, from /proc/PID/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[11], fields[12] are utime, stime (fields 14 and 15 of stat, counted from 1).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_seconds(pid: int) -> float:
    """Time on CPU of a process's live threads in seconds, at nanosecond resolution (the
    scheduler's run time in /proc/PID/task/*/schedstat): one bulk read costs a few tens of
    milliseconds, which 10 ms clock ticks cannot tell apart. Falls back to `cpu_seconds` on a
    kernel without schedstat. Threads that ended are not counted: use it for deltas over a
    short interval of a process whose threads live on (a gateway, a backend)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        if not (tasks[0] / "schedstat").exists():
            return cpu_seconds(pid)
    except (OSError, IndexError):
        return cpu_seconds(pid)
    total = 0
    for t in tasks:
        # A thread that ended meanwhile (ENOENT, ESRCH) counts nothing.
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((t / "schedstat").read_text().split()[0])
    return total / 1e9


def tree_run_seconds(pid: int) -> float:
    """`run_seconds` summed over pid and its live descendants."""
    return _tree_sum(pid, run_seconds)


def _tree_sum(pid: int, per_process: Callable[[int], float]) -> float:
    """`per_process` summed over pid and its live descendants (one that ended counts nothing)."""
    total = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError, ValueError):
            total += per_process(p)
    return total


def tree_pids(pid: int) -> list[int]:
    """pid and all its live descendants (a `phigate serve` might spawn helpers)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_rss_kb(pid: int) -> int:
    """Sum of VmRSS over pid and its descendants, in kB."""
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += rss_kb(p)
    return total


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime summed over pid and its live descendants."""
    return _tree_sum(pid, cpu_seconds)


def begin_run(reg: Registry, prefix: str) -> Path:
    """What every benchmark driver does first: SIGINT, SIGTERM and SIGHUP unwind like Ctrl-C (so
    `finally` cleans up; installed explicitly because a shell starting us in the background
    leaves SIGINT ignored), the open-files limit raised, and a work dir the unprivileged
    PostgreSQL/PgBouncer account can traverse, registered for removal."""

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)
    reg.dirs.append(workdir)
    return workdir

