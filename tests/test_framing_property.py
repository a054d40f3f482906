"""Property test through the real gateway: however a client's byte stream is split into TCP
writes, the gateway must cut the same messages and the client must get the same answers."""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rawpg import SYNC, RawConn, bind, execute, parse, query

pytestmark = pytest.mark.integration

PIPELINE = (
    query("select 1; select 'two'")
    + parse("select $1::int + 1")  # unnamed statement, parameter type inferred
    + bind(params=(b"41",))
    + execute()
    + parse("select repeat('z', 70000)")
    + bind()
    + execute()
    + SYNC
)


def _expected(c: RawConn) -> list[tuple[str, bytes]]:
    a = c.read_until()
    b = c.read_until()
    return [(m.tag, m.body) for m in a + b]


@pytest.fixture(scope="module")
def plain(_session_gateways):
    return _session_gateways(require_tls=False)


@pytest.fixture(scope="module")
def reference(plain, token):
    c = RawConn(plain.host, plain.port)
    assert c.login(token())[-1].tag == "Z"
    c.send(PIPELINE)
    out = _expected(c)
    assert "".join(t for t, _ in out) == "TDCTDCZ12DC12DCZ"
    return out


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=len(PIPELINE) - 1), max_size=12, unique=True)
)
def test_any_split_gives_same_answers(plain, token, reference, cuts):
    c = RawConn(plain.host, plain.port)
    assert c.login(token())[-1].tag == "Z"
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    last = 0
    for p in sorted(cuts) + [len(PIPELINE)]:
        c.send(PIPELINE[last:p])
        last = p
        time.sleep(0.001)  # make separate segments likely
    assert _expected(c) == reference
    c.close()
