"""The PHI catalog across upstream outages: a reload (SIGHUP) while the database is down keeps
masked identities working once it is back, without another reload; a gateway started with the
database down loads the catalog when it comes up; masked reads stay masked throughout, and the
events say what state the catalog is in."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

import phigate
from harness import EhrPostgres, GatewayFactory, RunningGateway, psycopg_connect
from layer2ref import partial
from phigate.audit.records import read_records
from phigate.config import Config, load_config
from phigate.control.thread import GatewayThread
from phigate.dev.demo import dump_toml, merge_config
from phigate.dev.pgembed import find_free_port
from phigate.files import write_private
from phigate.masking.classification import CatalogError, CatalogSnapshot, load_catalog

pytestmark = pytest.mark.integration

DEADLINE = 60.0  # retries back off to at most 60 s; they come back within seconds here
SSN_ONLY = {"public.patients.ssn": {"kind": "ssn", "mask": "partial:4"}}
# Billing sees SSNs in clear (and nothing else is classified unless a test adds it).
ROLES = {
    "groups": {"billing": ["sees-ssn"]},
    "roles": {"sees-ssn": {"relations": ["public.*"], "see_clear": ["ssn"]}},
}


@pytest.fixture(scope="module")
def outage_pg() -> Iterator[EhrPostgres]:
    """A PostgreSQL of this module's own, on a fixed port so it can be stopped and started.

    Its directory is not under pytest's temp root: pytest resets that root to mode 0700 when
    another session starts, and the unprivileged server user could then no longer restart it."""
    workdir = Path(tempfile.mkdtemp(prefix="phigate-outage-pg-"))
    server = EhrPostgres(workdir=workdir, port=find_free_port())
    try:
        server.start()
        server.provision(patients=20, seed=11)
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def pg_up(outage_pg: EhrPostgres) -> Iterator[EhrPostgres]:
    """The module's server, running at the start of the test and again after it."""
    outage_pg.start()
    yield outage_pg
    outage_pg.start()


@pytest.fixture
def gateways(
    pg_up: EhrPostgres, dev_issuer: Any, dev_cert: Any, tmp_path: Path
) -> Iterator[GatewayFactory]:
    """Gateways in front of the module's server, stopped after the test."""
    factory = GatewayFactory(pg_up, dev_issuer, dev_cert, tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def clear(outage_pg: EhrPostgres) -> dict[int, tuple[str, str]]:
    """id -> (ssn, city) in clear, read directly (never printed)."""
    with psycopg.connect(outage_pg.service_dsn()) as conn:
        rows = conn.execute("select id, ssn, city from patients").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


@pytest.fixture
def phi(tmp_path: Path) -> dict[str, Any]:
    key = write_private(tmp_path / "pseudonym.key", secrets.token_hex(32))
    return {"columns": SSN_ONLY, "pseudonym_key_file": str(key)}


def read_events(trail_dir: Path) -> list[dict[str, Any]]:
    return read_records(trail_dir)


def wait_event(path: Path, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        for event in read_events(path):
            if match(event):
                return event
        time.sleep(0.05)
    raise AssertionError(f"no matching event within {DEADLINE}s in {read_events(path)}")


def catalog_event(state: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    def match(e: dict[str, Any]) -> bool:
        return (
            e.get("event") == "catalog"
            and e.get("state") == state
            and all(e.get(k) == v for k, v in fields.items())
        )

    return match


def masked_ssns(gw: Any, token: str) -> dict[int, str]:
    with psycopg_connect(gw, token) as conn:
        return dict(conn.execute("select id, ssn from patients").fetchall())


def assert_masked(ssns: dict[int, str], clear: dict[int, tuple[str, str]]) -> None:
    assert set(ssns) == set(clear)
    for pid, ssn in ssns.items():
        assert ssn == partial(clear[pid][0], 4) and ssn != clear[pid][0]


def until_masked_read_works(read: Callable[[], Any], allowed_refusal: str) -> tuple[Any, list[str]]:
    """Poll ``read`` until it succeeds; only the outage itself (the gateway cannot reach the
    database) or the catalog refusal naming ``allowed_refusal`` may fail it meanwhile."""
    seen: list[str] = []
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            return read(), seen
        except psycopg.errors.SystemError as exc:  # 58000 from the gateway
            assert allowed_refusal in str(exc), str(exc)
            seen.append("58000")
        except psycopg.OperationalError as exc:  # the upstream is not back yet
            assert "upstream" in str(exc) or "08006" in str(exc) or "connect" in str(exc), exc
            seen.append("down")
        assert time.monotonic() < deadline, f"masked reads did not come back: {seen[-5:]}"
        time.sleep(0.2)


@dataclass
class ServedGateway:
    """`phigate serve` as its own process (SIGHUP is handled by the main thread's loop)."""

    proc: subprocess.Popen[bytes]
    port: int
    ca_file: Path
    audit_dir: Path
    log_path: Path
    host: str = "127.0.0.1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[dict[str, Any], Path], ServedGateway]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(settings: dict[str, Any], ca_file: Path) -> ServedGateway:
        port = find_free_port()
        settings = merge_config(settings, {"server": {"listen": f"127.0.0.1:{port}"}})
        path = write_private(tmp_path / "served.toml", dump_toml(settings))
        env = dict(os.environ)
        src = str(Path(phigate.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        log_path = tmp_path / "served.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "phigate.cli", "serve", "--config", str(path)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        procs.append(proc)
        deadline = time.monotonic() + DEADLINE
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "phigate serve did not listen"
            time.sleep(0.05)
        events = Path(settings["audit"]["dir"])
        return ServedGateway(proc, port, ca_file, events, log_path)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_sighup_during_an_outage_recovers_without_another_reload(
    pg_up: EhrPostgres, gateways: GatewayFactory, dev_cert: Any, token: Any,
    clear: dict[int, tuple[str, str]], phi: dict[str, Any], serve: Any,
) -> None:  # fmt: skip
    gw = serve(gateways.settings(phi=phi, **ROLES), Path(dev_cert.ca_cert))
    agent = token(sub="outage-agent")
    assert_masked(masked_ssns(gw, agent), clear)

    pg_up.stop()  # the database blips just as logrotate sends SIGHUP
    gw.proc.send_signal(signal.SIGHUP)
    stale = wait_event(gw.audit_dir, catalog_event("stale", previous_in_force=True))
    reload = wait_event(gw.audit_dir, lambda e: e.get("event") == "reload")
    assert reload["catalogs"] == {"ehr": "stale"}
    # The record names who sent SIGHUP: this test process.
    assert reload["sender"] == {
        "via": "signal", "pid": os.getpid(), "uid": os.getuid(),
        "user": pwd.getpwuid(os.getuid()).pw_name,
    }  # fmt: skip
    assert stale["attempt"] == 1 and stale["retry_in_ms"] > 0 and "ehr" in stale["error"]
    assert (
        "the PHI catalog of target ehr could not be refreshed and is being retried; "
        "the previous one stays in force" in gw.log()
    )

    pg_up.start()
    # Right away (the previous catalog may still be in force) and until the retry has read the
    # new one, masked reads are masked, with no reload in between.
    ssns, seen = until_masked_read_works(lambda: masked_ssns(gw, agent), "catalog")
    assert "58000" not in seen  # the previous catalog stayed in force: nobody was refused
    assert_masked(ssns, clear)
    loaded = wait_event(gw.audit_dir, catalog_event("loaded", previous_state="stale"))
    assert loaded["failed_attempts"] >= 1
    assert_masked(masked_ssns(gw, agent), clear)
    with psycopg_connect(gw, token(sub="billing-agent", groups=("billing",))) as conn:
        assert dict(conn.execute("select id, ssn from patients").fetchall()) == {
            pid: v[0] for pid, v in clear.items()
        }
    assert "read after" in gw.log() and "now in force" in gw.log()
    reloads = [e for e in read_events(gw.audit_dir) if e.get("event") == "reload"]
    assert len(reloads) == 1  # recovered by itself

    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=30) == 0
    stats = [e for e in read_events(gw.audit_dir) if e.get("event") == "stats"][-1]
    assert stats["catalogs"]["ehr"]["state"] == "loaded"


def test_start_with_the_database_down_loads_the_catalog_when_it_comes_up(
    pg_up: EhrPostgres, gateways: GatewayFactory, token: Any,
    clear: dict[int, tuple[str, str]], phi: dict[str, Any],
) -> None:  # fmt: skip
    pg_up.stop()
    # `phigate db install` needs the database; these masks use no pseudonym anyway.
    gateways.install_pseudonym_functions = False
    gw = gateways(phi=phi, **ROLES)  # starts (and listens) although the catalog cannot be read
    first = wait_event(gw.audit_dir, catalog_event("unavailable", attempt=1))
    assert first["previous_in_force"] is False
    wait_event(gw.audit_dir, catalog_event("unavailable", attempt=2))  # retried by itself
    gw.thread.gateway.write_stats()
    stats = wait_event(gw.audit_dir, lambda e: e.get("event") == "stats")  # the trail's writer
    state = stats["catalogs"]["ehr"]
    assert state["state"] == "unavailable" and state["failures"] >= 2 and state["retry_at"]
    assert state["loaded_at"] is None

    pg_up.start()
    agent = token(sub="late-agent")
    ssns, _ = until_masked_read_works(lambda: masked_ssns(gw, agent), "not loaded yet")
    assert_masked(ssns, clear)
    wait_event(gw.audit_dir, catalog_event("loaded", previous_state="unavailable"))


def test_changed_classification_during_an_outage_is_never_served_with_the_old_catalog(
    pg_up: EhrPostgres, gateways: GatewayFactory, token: Any,
    clear: dict[int, tuple[str, str]], phi: dict[str, Any],
) -> None:  # fmt: skip
    gw = gateways(phi=phi, **ROLES)
    agent = token(sub="outage-agent")

    def cities() -> dict[int, str]:
        with psycopg_connect(gw, agent) as conn:
            return dict(conn.execute("select id, city from patients").fetchall())

    assert cities() == {pid: v[1] for pid, v in clear.items()}  # not classified yet

    pg_up.stop()
    # The operator classifies the patients' towns while the database is down.
    more = merge_config(
        gw.settings,
        {"phi": {"columns": {"public.patients.city": {"kind": "address", "mask": "redact"}}}},
    )
    gw.config_path.write_text(dump_toml(more))
    gw.thread.reload(load_config(gw.config_path))
    event = wait_event(gw.audit_dir, catalog_event("unavailable", previous_in_force=False))
    assert event["attempt"] == 1
    reload = wait_event(gw.audit_dir, lambda e: e.get("event") == "reload")
    assert reload["catalogs"] == {"ehr": "unavailable"}

    pg_up.start()
    # Until the new catalog is read, a masked identity is refused (58000) — never answered with
    # the old catalog, which knows nothing of the towns.
    got, _ = until_masked_read_works(cities, "changed with the last config reload")
    assert set(got) == set(clear) and set(got.values()) == {"***"}
    wait_event(gw.audit_dir, catalog_event("loaded", previous_state="unavailable"))


class FlakyLoader:
    """The real catalog read, failing as if the database could not be reached while ``down``."""

    def __init__(self) -> None:
        self.down = True
        self.attempts = 0

    def __call__(self, config: Config, target: str) -> CatalogSnapshot:
        self.attempts += 1
        if self.down:
            raise CatalogError(f"cannot reach target {target!r}: connection refused")
        return load_catalog(config, target)


def test_masked_statements_are_refused_until_the_catalog_loads_then_work(
    pg: EhrPostgres, dev_issuer: Any, dev_cert: Any, tmp_path: Path, token: Any,
    phi: dict[str, Any],
) -> None:  # fmt: skip
    """The database is reachable for sessions but the catalog read fails (an outage that ends
    between the two): the masked client is told why and that it is being retried, the session
    stays usable, and the same session works as soon as a retry reads the catalog."""
    factory = GatewayFactory(pg, dev_issuer, dev_cert, tmp_path)
    settings = factory.settings(phi=phi, **ROLES)
    path = write_private(tmp_path / "flaky.toml", dump_toml(settings))
    loader = FlakyLoader()
    thread = GatewayThread(load_config(path), catalog_loader=loader).start()
    gw = RunningGateway(
        thread=thread, config=thread.config, config_path=path, ca_file=Path(dev_cert.ca_cert),
        audit_dir=Path(settings["audit"]["dir"]), settings=settings,
    )  # fmt: skip
    factory.started.append(gw)
    try:
        with psycopg_connect(gw, token(sub="masked-agent")) as conn:
            with pytest.raises(psycopg.errors.SystemError) as exc:
                conn.execute("select ssn from patients limit 1")
            message = str(exc.value)
            assert "PHI classification catalog of this target is not loaded yet" in message
            assert "retrying" in message and "(rule: masking)" in message
            assert "try again shortly" in (exc.value.diag.message_hint or "")
            assert "connection refused" not in message  # details stay in the gateway log
            # An identity that sees every classified kind in clear never needs the catalog.
            with psycopg_connect(gw, token(sub="billing-agent", groups=("billing",))) as clear:
                assert clear.execute("select count(ssn) from patients").fetchone()[0] > 0

            loader.down = False  # the same session works once a retry has read the catalog
            deadline = time.monotonic() + DEADLINE
            while True:
                try:
                    row = conn.execute("select ssn from patients order by id limit 1").fetchone()
                    break
                except psycopg.errors.SystemError:
                    assert time.monotonic() < deadline, "the catalog was not retried"
                    time.sleep(0.1)
            assert row is not None and row[0].startswith("***-**-")
        assert loader.attempts >= 2
        wait_event(gw.audit_dir, catalog_event("loaded", previous_state="unavailable"))
    finally:
        factory.stop_all()
