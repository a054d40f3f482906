"""The audit trail when the disk fails or the gateway dies: a full filesystem and a directory
that refuses new files make the gateway refuse new statements with 58030 and say why, and it
takes statements again by itself once the disk works, with the gap recorded in the chain; a
`kill -9` loses no record of a statement the database saw in sync = "write" or "statement" mode."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import phigate
from audit_check import check_trail
from harness import AUDIT_ORIGIN, psycopg_connect, session_audit_keys
from phigate.dev.demo import dump_toml, merge_config
from phigate.files import write_private

pytestmark = pytest.mark.integration

REFUSAL = "phigate cannot write its audit trail ({}); statements are refused until it can."


def ensure_tools() -> None:
    """mount/umount (util-linux) and chattr (e2fsprogs), installed from Debian if missing."""
    missing = [pkg for tool, pkg in (("mount", "mount"), ("chattr", "e2fsprogs"))
               if shutil.which(tool) is None]  # fmt: skip
    if missing:
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True,
                       capture_output=True, env=env)  # fmt: skip


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of the test's own (tests run as root), unmounted afterwards."""
    ensure_tools()
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["chattr", "-i", str(mnt / "trail")], check=False, capture_output=True)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Writes zeros to ``path`` until the filesystem has no space left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk) == chunk:
                    pass
    finally:
        os.close(fd)


def until_refused(conn: Any, reason: str) -> psycopg.Error:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            conn.execute("select 1").fetchone()
        except psycopg.Error as exc:
            assert exc.sqlstate == "58030", exc
            assert str(exc).startswith(REFUSAL.format(reason)), str(exc)
            assert "Tell the gateway operator." in str(exc)
            return exc
        time.sleep(0.01)
    raise AssertionError("statements were never refused")


def until_accepted(conn: Any) -> float:
    start = time.monotonic()
    while time.monotonic() - start < 20:
        try:
            conn.execute("select 1").fetchone()
            return time.monotonic() - start
        except psycopg.Error as exc:
            assert exc.sqlstate == "58030", exc
            time.sleep(0.1)
    raise AssertionError("statements were still refused after the disk recovered")


def failure_and_recovery(trail: Path, reason: str) -> list[dict[str, Any]]:
    checked = check_trail(trail, [session_audit_keys() / "audit.pub"], AUDIT_ORIGIN)
    events = [r["event"] for r in checked.records]
    failure = checked.records[events.index("audit_failure")]
    assert failure["reason"] == reason and failure["detail"]
    recovered = checked.records[events.index("audit_recovered")]
    assert recovered["lost"] == 0 and recovered["failed_for_us"] > 0
    # Records kept in memory meanwhile sit between the two; checkpoints go on after.
    assert events.index("audit_failure") < events.index("audit_recovered")
    assert "checkpoint" in events[events.index("audit_recovered") :]
    return checked.records


def test_a_full_disk_refuses_statements_until_space_is_freed(gateway_factory, token, small_fs):
    trail = small_fs / "trail"
    trail.mkdir()
    gw = gateway_factory(audit={"dir": str(trail)})
    with psycopg_connect(gw, token(sub="disk-agent")) as conn:
        conn.execute("select 1").fetchone()
        fill(small_fs / "filler")
        until_refused(conn, "disk_full")
        status = gw.thread.gateway.engine.audit_status()
        assert status["state"] == "failing" and status["reason"] == "disk_full"
        (small_fs / "filler").unlink()
        until_accepted(conn)
        assert gw.thread.gateway.engine.audit_status()["state"] == "ok"
        conn.execute("select 2").fetchone()
    gw.stop()
    failure_and_recovery(trail, "disk_full")


def test_a_directory_that_refuses_writes_refuses_statements_until_it_is_writable(
    gateway_factory, token, small_fs
):
    # A read-only remount is refused by the kernel while the gateway holds its segment open
    # for writing (EBUSY), so the directory is made immutable instead: even root cannot add
    # the checkpoint file or a new segment to it (EPERM).
    trail = small_fs / "trail"
    trail.mkdir()
    gw = gateway_factory(audit={"dir": str(trail)})
    with psycopg_connect(gw, token(sub="ro-agent")) as conn:
        conn.execute("select 1").fetchone()
        subprocess.run(["chattr", "+i", str(trail)], check=True)
        until_refused(conn, "not_writable")
        subprocess.run(["chattr", "-i", str(trail)], check=True)
        until_accepted(conn)
    gw.stop()
    failure_and_recovery(trail, "not_writable")


# --- kill -9 ---------------------------------------------------------------------------------


def serve(
    settings: dict[str, Any], tmp: Path, poll: float = 0.05
) -> tuple[subprocess.Popen[bytes], int]:
    """`phigate serve` as its own process, listening (checked every ``poll`` seconds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = merge_config(settings, {"server": {"listen": f"127.0.0.1:{port}"}})
    path = write_private(tmp / f"served-{port}.toml", dump_toml(settings))
    env = dict(os.environ)
    src = str(Path(phigate.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    log = open(tmp / f"served-{port}.log", "wb")  # noqa: SIM115 - the child writes it
    proc = subprocess.Popen(
        [sys.executable, "-m", "phigate.cli", "serve", "--config", str(path)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, (tmp / f"served-{port}.log").read_text()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return proc, port
        assert time.monotonic() < deadline, "phigate serve did not listen"
        time.sleep(poll)


class Served:
    def __init__(self, port: int, ca: str) -> None:
        self.host, self.port, self.ca_file = "127.0.0.1", port, ca


@pytest.mark.parametrize("sync", ["statement", "write", "batch"])
def test_kill_9_during_a_statement_loop(gateway_factory, token, pg, tmp_path, sync, capsys):
    trail = tmp_path / "trail"
    trail.mkdir()
    settings = gateway_factory.settings(audit={"dir": str(trail), "sync": sync})
    table = f"audit_kill_{sync}"
    with psycopg.connect(pg.dsn(pg.ehr_database), autocommit=True) as admin:
        admin.execute(f"drop table if exists {table}")
        admin.execute(f"create table {table} (v int)")
        admin.execute(f"grant insert on {table} to {pg.service_user}")
    proc, port = serve(settings, tmp_path)
    gw = Served(port, gateway_factory.cert.ca_cert)
    sent = [0]

    def loop() -> None:
        with contextlib.suppress(psycopg.Error), psycopg_connect(
            gw, token(sub="kill-agent"), prepare_threshold=None
        ) as conn:
            for i in range(1_000_000):
                conn.execute(f"insert into {table} (v) values ({i})")  # noqa: S608
                sent[0] += 1

    driver = threading.Thread(target=loop)
    driver.start()
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    driver.join(timeout=30)
    with psycopg.connect(pg.dsn(pg.ehr_database), autocommit=True) as admin:
        in_db = admin.execute(f"select count(*) from {table}").fetchone()[0]  # noqa: S608
        admin.execute(f"drop table {table}")
    recorded = sum(
        1 for p in sorted(trail.glob("segment-*.jsonl"))
        for line in p.read_text().splitlines()
        if '"event":"statement"' in line and table in line
    )  # fmt: skip
    # A restart recovers the trail (a torn last line is set aside) and the chain goes on.
    proc, _ = serve(settings, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    check_trail(trail, [session_audit_keys() / "audit.pub"], AUDIT_ORIGIN)
    lost = max(0, in_db - recorded)
    with capsys.disabled():
        print(f"\n[kill -9, sync={sync}] statements the database ran: {in_db}, "
              f"their records in the trail: {recorded}, lost: {lost}")  # fmt: skip
    assert in_db > 50, "the loop did not get going before the kill"
    if sync in ("statement", "write"):
        assert recorded >= in_db, f"{in_db - recorded} statements ran without a record"


def test_sigterm_as_soon_as_it_listens_stops_cleanly(gateway_factory, tmp_path):
    """The listener is up a moment before start-up ends: a SIGTERM in that moment (systemd
    stopping a unit it just started, or a test) drains and closes the trail, not a hard kill."""
    trail = tmp_path / "trail"
    trail.mkdir()
    settings = gateway_factory.settings(audit={"dir": str(trail)})
    rounds = 5
    for _ in range(rounds):
        proc, _port = serve(settings, tmp_path, poll=0.0)  # SIGTERM the instant it listens
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    checked = check_trail(trail, [session_audit_keys() / "audit.pub"], AUDIT_ORIGIN)
    events = [r["event"] for r in checked.records]
    assert events.count("audit_close") == rounds
    assert events[-2:] == ["audit_close", "checkpoint"]
