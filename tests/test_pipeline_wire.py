"""Pipelines through the gateway: every answer reaches the right statement whatever the timing of
the gateway's decisions, and pipelined refusals keep the gateway's error however many there are."""

from __future__ import annotations

import os
import resource
import secrets
import struct
import threading
import time
from pathlib import Path

import pytest

from rawpg import SYNC, Message, RawConn, bind, close, execute, msg, parse, query, tags
from slowcp import SlowDecisionsFactory

pytestmark = pytest.mark.integration

PHI = {
    "columns": {
        "public.patients.ssn": {"kind": "ssn", "mask": "partial:4"},
        "public.patients.first_name": {"kind": "name", "mask": "pseudonym"},
    },
}
DECISION_DELAY = 0.4


def _phi(tmp_path: Path) -> dict:
    key = tmp_path / "pseudonym.key"
    key.write_bytes(secrets.token_bytes(32))
    os.chmod(key, 0o600)
    return {**PHI, "pseudonym_key_file": str(key)}


def _login(gw, token) -> RawConn:
    c = RawConn(gw.host, gw.port)
    out = c.login(token)
    assert out[-1].tag == "Z", [m.fields() for m in out if m.tag == "E"]
    return c


def _direct(pg, user: str | None = None) -> RawConn:
    """A raw connection straight to PostgreSQL (as the gateway's service role by default), for
    the reference answers."""
    c = RawConn.unix(str(Path(pg.socket_dir) / f".s.PGSQL.{pg.port}"))
    assert c.login_trust(user or pg.service_user, pg.ehr_database)[-1].tag == "Z"
    return c


def _shape(msgs: list[Message]) -> list[tuple[str, str]]:
    return [(m.tag, m.sqlstate if m.tag == "E" else "") for m in msgs]


def _read_n(c: RawConn, n_ready: int) -> list[Message]:
    out: list[Message] = []
    for _ in range(n_ready):
        out += c.read_until("Z")
    return out


def test_error_answered_while_a_later_decision_is_in_flight(gateway_factory, token, pg, tmp_path):
    """Bind of an unnamed statement never parsed, then Query, Sync, Close, Sync: PostgreSQL's
    error for the Bind comes back while the Query's decision is still pending, and the Query is
    one of the messages it then skips. A masked session must see what PostgreSQL sends and stay
    open, every time."""
    slow = SlowDecisionsFactory(DECISION_DELAY)
    gw = gateway_factory(require_tls=False, phi=_phi(tmp_path), engine_factory=slow)
    assert slow.engine is not None
    direct = _direct(pg)
    c = _login(gw, token())
    for i in range(20):
        # A new text each time: its decision is not cached, so it is asked for (and late).
        sql = f"select id as c{i} from patients order by id limit 1"  # noqa: S608 (no input)
        pipeline = bind() + query(sql) + SYNC + close(b"S") + SYNC
        direct.send(pipeline)
        want = _read_n(direct, 2)
        c.send(pipeline)
        first = c.read_message()
        received = time.monotonic()
        got = [first, *c.read_until("Z"), *c.read_until("Z")]
        # The Bind's error was through the gateway before the Query's decision reached it.
        assert received < slow.engine.delivered[sql], i
        assert _shape(got) == _shape(want) == [("E", "26000"), ("Z", ""), ("3", ""), ("Z", "")]
        # The session is alive and in step: the next statement is answered as usual.
        c.send(query(f"select {i} as n{i}"))
        assert tags(c.read_until()) == "TDCZ", i
    c.close()
    direct.close()


# --- refusals past any bound ------------------------------------------------------------------


REFUSED = "select * from pg_authid"
COUNT = 10_000


def _pipelined(c: RawConn, payload: bytes, n_ready: int) -> list[Message]:
    """Writes `payload` from a thread while reading `n_ready` cycles: neither side may wait on
    the other's full TCP buffers."""
    errors: list[BaseException] = []

    def write() -> None:
        try:
            c.send(payload)
        except BaseException as exc:  # noqa: BLE001 - reported by the reader
            errors.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    out = _read_n(c, n_ready)
    writer.join(30)
    assert not errors, errors
    return out


def _assert_all_refused_by_the_gateway(out: list[Message], n: int) -> None:
    errors = [m for m in out if m.tag == "E"]
    assert len(errors) == n and sum(m.tag == "Z" for m in out) == n
    states = {m.sqlstate for m in errors}
    assert states == {"42501"}, states
    leaked = [m for m in errors if "phigate_refusal" in m.fields().get("M", "")]
    assert not leaked, leaked[0].fields()


@pytest.fixture(scope="module")
def gateways(_session_gateways, tmp_path_factory):
    masked = _session_gateways(require_tls=False, phi=_phi(tmp_path_factory.mktemp("phi")))
    unmasked = _session_gateways(require_tls=False)
    return {"masked": masked, "unmasked": unmasked}


@pytest.mark.parametrize("kind", ["masked", "unmasked"])
def test_ten_thousand_pipelined_simple_refusals(gateways, token, kind):
    c = _login(gateways[kind], token())
    out = _pipelined(c, query(REFUSED) * COUNT, COUNT)
    _assert_all_refused_by_the_gateway(out, COUNT)
    c.send(query("select 1"))
    assert tags(c.read_until()) == "TDCZ"


@pytest.mark.parametrize("kind", ["masked", "unmasked"])
def test_ten_thousand_pipelined_extended_refusals(gateways, token, kind):
    c = _login(gateways[kind], token())
    one = parse(REFUSED) + bind() + execute() + SYNC
    out = _pipelined(c, one * COUNT, COUNT)
    _assert_all_refused_by_the_gateway(out, COUNT)
    assert tags(out[:2]) == "EZ"


@pytest.mark.parametrize("kind", ["masked", "unmasked"])
def test_refusals_skipped_after_an_error_never_hold_the_pipeline(gateways, token, kind):
    """A failed Parse makes the server skip everything up to Sync: 10,000 refusals behind it are
    never answered, and the gateway must not wait for them."""
    c = _login(gateways[kind], token())
    payload = parse("select 1/") + query(REFUSED) * COUNT + SYNC
    out = _pipelined(c, payload, 1)
    assert _shape(out) == [("E", "42601"), ("Z", "")]
    c.send(query("select 2") + parse(REFUSED) + SYNC)
    out = _read_n(c, 2)
    assert _shape(out) == [("T", ""), ("D", ""), ("C", ""), ("Z", ""), ("E", "42501"), ("Z", "")]


def test_a_pipeline_waiting_for_the_server_costs_no_cpu(gateways, token):
    """Past the refusal bound the gateway waits for the server, here busy for 1.5 s: waiting
    must not spin."""
    c = _login(gateways["unmasked"], token())
    payload = query("select pg_sleep(1.5)") + query(REFUSED) * 5_000
    threading.Thread(target=c.send, args=(payload,), daemon=True).start()
    time.sleep(0.3)  # the gateway now holds 4,096 refusals the server has not reached yet
    usage = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(0.8)
    after = resource.getrusage(resource.RUSAGE_SELF)
    spent = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    assert spent < 0.3, f"{spent:.2f} s of CPU in 0.8 s of waiting"
    out = _read_n(c, 5_001)
    assert tags(out[:4]) == "TDCZ"
    _assert_all_refused_by_the_gateway(out[4:], 5_000)


def test_a_copy_from_stdin_with_a_pipelined_sync_keeps_the_session(gateways, token, pg):
    """libpq's extended COPY sends Sync right after the Execute, then the data, CopyDone and
    another Sync: the first Sync is read by the COPY, and only the second is answered."""
    admin = _direct(pg, pg.superuser)
    admin.send(
        query(
            "drop table if exists public.copy_in_wire; create table public.copy_in_wire(x int);"
            f"grant select, insert on public.copy_in_wire to {pg.service_user}"
        )
    )
    assert "E" not in tags(admin.read_until())
    try:
        c = _login(gateways["masked"], token())
        c.send(parse("copy copy_in_wire from stdin") + bind() + execute() + SYNC)
        first = [c.read_message(), c.read_message(), c.read_message()]
        assert tags(first) == "12G", first[-1].fields()
        c.send(msg(b"d", b"1\n2\n") + msg(b"c") + SYNC)
        assert _shape(c.read_until()) == [("C", ""), ("Z", "")]
        c.send(query("select count(*) from copy_in_wire"))
        out = c.read_until()
        assert tags(out) == "TDCZ" and out[1].body == struct.pack("!hi", 1, 1) + b"2"
    finally:
        admin.send(query("drop table public.copy_in_wire"))
        admin.read_until()
