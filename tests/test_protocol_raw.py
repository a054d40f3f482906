"""Raw wire-protocol edge cases through the gateway: negotiation, hostile bytes, limits, pipelines,
cancel and fail-closed behaviour, each checked against what the client actually receives."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest

from rawpg import (
    FLUSH,
    GSSENC_REQUEST,
    SSL_REQUEST,
    SYNC,
    RawConn,
    bind,
    cstr,
    execute,
    msg,
    parse,
    query,
    startup_packet,
    tags,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def plain_gateway(_session_gateways):
    """A gateway with TLS off on the client leg (as in benchmarks), for byte-exact tests."""
    return _session_gateways(require_tls=False)


def raw_login(gw, token, **kw) -> RawConn:
    c = RawConn(gw.host, gw.port)
    out = c.login(token, **kw)
    assert out[-1].tag == "Z", [(m.tag, m.fields() if m.tag == "E" else m.body) for m in out]
    return c


def error_of(msgs):
    errs = [m for m in msgs if m.tag == "E"]
    assert errs, f"expected an ErrorResponse, got {tags(msgs)}"
    return errs[0].fields()


# --- negotiation -------------------------------------------------------------------------------


def test_gssenc_then_ssl_then_login(gateway, token):
    c = RawConn(gateway.host, gateway.port)
    c.send(GSSENC_REQUEST)
    assert c.recv_exact(1) == b"N"
    c.send(SSL_REQUEST)
    assert c.recv_exact(1) == b"S"
    c.start_tls(str(gateway.ca_file))
    out = c.login(token())
    assert tags(out).startswith("R") and out[-1].tag == "Z"
    keys = [m for m in out if m.tag == "K"]
    assert len(keys) == 1 and len(keys[0].body) == 8
    c.send(query("select 41 + 1"))
    res = c.read_until()
    assert [m.body for m in res if m.tag == "D"] == [struct.pack("!hi", 1, 2) + b"42"]


def test_direct_tls_with_alpn(gateway, token):
    c = RawConn(gateway.host, gateway.port)
    c.start_tls(str(gateway.ca_file), alpn=["postgresql"])
    assert c.sock.selected_alpn_protocol() == "postgresql"
    assert c.login(token())[-1].tag == "Z"


def test_direct_tls_without_alpn_is_refused(gateway):
    c = RawConn(gateway.host, gateway.port)
    c.start_tls(str(gateway.ca_file))
    c.send(startup_packet({"user": "a", "database": "ehr"}))
    out = c.read_until()
    assert error_of(out)["C"] == "08P01"
    assert "ALPN" in error_of(out)["M"]
    assert c.closed()


def test_plaintext_refused_when_tls_required(gateway, token):
    c = RawConn(gateway.host, gateway.port)
    out = c.login(token())
    err = error_of(out)
    assert (err["S"], err["C"]) == ("FATAL", "28000")
    assert "encrypted" in err["M"] and "sslmode" in err["H"]
    assert c.closed()


def test_bytes_smuggled_before_tls_handshake(gateway):
    c = RawConn(gateway.host, gateway.port)
    # An attacker in the middle appends a plaintext query behind the SSLRequest.
    c.send(SSL_REQUEST + query("select 1"))
    out = c.read_until()
    assert c.buf == b"" and out[0].tag == "E"
    assert out[0].fields()["C"] == "08P01"
    assert "unencrypted data after SSL request" in out[0].fields()["M"]
    assert c.closed()


def test_newer_protocol_minor_and_options_are_negotiated(plain_gateway, token):
    c = RawConn(plain_gateway.host, plain_gateway.port)
    c.send(
        startup_packet({"user": "a", "database": "ehr", "_pq_.fancy": "1"}, version=(3 << 16) | 2)
    )
    v = c.read_message()
    assert v.tag == "v"
    newest, n = struct.unpack("!ii", v.body[:8])
    assert (newest, n) == (0, 1) and b"_pq_.fancy" in v.body
    assert c.read_message().tag == "R"
    c.send(msg(b"p", cstr(token())))
    assert c.read_until()[-1].tag == "Z"


def test_unsupported_major_version(plain_gateway):
    c = RawConn(plain_gateway.host, plain_gateway.port)
    c.send(startup_packet({"user": "a"}, version=(4 << 16)))
    err = error_of(c.read_until())
    assert err["C"] == "0A000" and "3.0" in err["M"]


def test_replication_refused(plain_gateway, token):
    c = RawConn(plain_gateway.host, plain_gateway.port)
    err = error_of(c.login(token(), replication="database"))
    assert err["C"] == "28000" and "replication" in err["M"]


def test_unknown_database_names_no_upstream(plain_gateway, token):
    c = RawConn(plain_gateway.host, plain_gateway.port)
    err = error_of(c.login(token(), database="postgres"))
    assert err["C"] == "3D000" and "not a target" in err["M"]


def test_disallowed_startup_parameters_are_not_forwarded(plain_gateway, token):
    # `options` could set any GUC (e.g. search_path) behind the gateway's back.
    c = raw_login(
        plain_gateway, token(), options="-c search_path=evil", application_name="raw-test"
    )
    c.send(query("select current_setting('search_path'), current_setting('application_name')"))
    rows = [m.body for m in c.read_until() if m.tag == "D"]
    assert b"evil" not in rows[0] and b"raw-test" in rows[0]


def test_client_encoding_is_pinned_to_utf8(plain_gateway, token):
    # A multi-byte client encoding (SJIS, GBK...) would let the server read the bytes the
    # gateway judged as UTF-8 differently; the upstream session always speaks UTF-8.
    c = RawConn(plain_gateway.host, plain_gateway.port)
    out = c.login(token(), client_encoding="SJIS")
    assert out[-1].tag == "Z"
    reported = [m.body for m in out if m.tag == "S" and m.body.startswith(b"client_encoding\0")]
    assert reported == [b"client_encoding\0UTF8\0"]
    c.send(query("show client_encoding"))
    assert [m.body for m in c.read_until() if m.tag == "D"] == [b"\x00\x01\x00\x00\x00\x04UTF8"]


def test_standard_conforming_strings_is_pinned_on(plain_gateway, token):
    # Off, a backslash inside '...' escapes the quote, so the server would read SQL where the
    # gateway's parser saw a string literal.
    c = RawConn(plain_gateway.host, plain_gateway.port)
    assert c.login(token(), standard_conforming_strings="off")[-1].tag == "Z"
    c.send(query("show standard_conforming_strings"))
    assert [m.body for m in c.read_until() if m.tag == "D"] == [b"\x00\x01\x00\x00\x00\x02on"]


def test_startup_packet_length_checks(plain_gateway):
    c = RawConn(plain_gateway.host, plain_gateway.port)
    c.send(struct.pack("!i", 2_000_000_000))  # claims 2 GB: refused before allocating
    err = error_of(c.read_until())
    assert err["C"] == "08P01"
    assert c.closed()


# --- hostile messages after login ---------------------------------------------------------------


def test_length_below_four_is_a_protocol_violation(plain_gateway, token):
    c = raw_login(plain_gateway, token())
    c.send(b"Q" + struct.pack("!i", 3))
    err = error_of(c.read_until())
    assert (err["S"], err["C"]) == ("FATAL", "08P01")
    assert c.closed()


def test_unknown_message_type(plain_gateway, token):
    c = raw_login(plain_gateway, token())
    c.send(msg(b"!", b"hello"))
    err = error_of(c.read_until())
    assert (err["S"], err["C"]) == ("FATAL", "08P01") and "0x21" in err["M"]
    assert c.closed()


def test_function_call_refused_session_survives(plain_gateway, token):
    c = raw_login(plain_gateway, token())
    # FunctionCall for OID 1 (whatever it is, it must never run).
    c.send(msg(b"F", struct.pack("!ihhh", 1, 0, 0, 0)))
    out = c.read_until()
    assert tags(out) == "EZ"
    err = out[0].fields()
    assert err["C"] == "42501" and "FunctionCall" in err["M"]
    c.send(query("select 1"))
    assert tags(c.read_until()) == "TDCZ"


def test_oversized_query_refused_session_survives(_session_gateways, token):
    gw = _session_gateways(require_tls=False, max_statement_bytes=64 * 1024)
    c = raw_login(gw, token())
    c.send(query("select '" + "x" * 100_000 + "'"))
    out = c.read_until()
    assert tags(out) == "EZ"
    assert out[0].fields()["C"] == "54000" and "65536" in out[0].fields()["M"]
    c.send(query("select 2"))
    assert tags(c.read_until()) == "TDCZ"


def test_pipeline_with_gateway_refusal_in_the_middle(_session_gateways, token):
    """Like PostgreSQL: an error mid-pipeline rolls back the implicit transaction, everything up
    to Sync is skipped, and exactly one ReadyForQuery follows."""
    gw = _session_gateways(require_tls=False, max_statement_bytes=4096)
    c = raw_login(gw, token())
    c.send(query("create temp table pipe_t(x int)"))
    c.read_until()
    c.send(
        parse("insert into pipe_t values (1)")
        + bind()
        + execute()
        + parse("select '" + "y" * 5000 + "'")
        + bind()
        + execute()
        + parse("insert into pipe_t values (3)")
        + bind()
        + execute()
        + SYNC
    )
    out = c.read_until()
    assert tags(out) == "12CEZ"
    assert out[3].fields()["C"] == "54000"
    assert out[4].body == b"I"
    c.send(query("select count(*) from pipe_t"))
    rows = [m.body for m in c.read_until() if m.tag == "D"]
    assert rows == [struct.pack("!hi", 1, 1) + b"0"]


def test_pipeline_with_upstream_error_in_the_middle(plain_gateway, token):
    c = raw_login(plain_gateway, token())
    c.send(
        parse("select 1")
        + bind()
        + execute()
        + parse("select 1/0")
        + bind()
        + execute()
        + parse("select 3")
        + bind()
        + execute()
        + SYNC
        + parse("select 4")
        + bind()
        + execute()
        + SYNC
    )
    first = c.read_until()
    assert tags(first) == "12DC1EZ" and first[5].fields()["C"] == "22012"
    assert tags(c.read_until()) == "12DCZ"


def test_flush_without_sync_delivers_results(plain_gateway, token):
    c = raw_login(plain_gateway, token())
    c.send(parse("select 7") + bind() + execute() + FLUSH)
    got = [c.read_message().tag for _ in range(4)]
    assert got == ["1", "2", "D", "C"]
    c.send(SYNC)
    assert tags(c.read_until()) == "Z"


def test_large_statement_and_result_stream(plain_gateway, token):
    c = raw_login(plain_gateway, token())
    big = "x" * 1_500_000
    c.send(query(f"select length('{big}'), repeat('y', 3000000)"))
    out = c.read_until()
    assert tags(out) == "TDCZ"
    assert b"1500000" in out[1].body and len(out[1].body) > 3_000_000


# --- cancel ------------------------------------------------------------------------------------


def test_cancel_reaches_the_right_backend_only(plain_gateway, token):
    a = raw_login(plain_gateway, token())
    b = RawConn(plain_gateway.host, plain_gateway.port)
    out_b = b.login(token())
    key_b = next(m for m in out_b if m.tag == "K").body
    a.send(query("select pg_sleep(1.5)"))
    b.send(query("select pg_sleep(30)"))
    time.sleep(0.3)
    # A key that does not exist: the connection is simply closed, nothing is cancelled.
    bogus = RawConn(plain_gateway.host, plain_gateway.port)
    bogus.send(struct.pack("!ii", 16, 80877102) + struct.pack("!ii", 12345, 678))
    assert bogus.closed()
    cancel = RawConn(plain_gateway.host, plain_gateway.port)
    cancel.send(struct.pack("!ii", 16, 80877102) + key_b)
    assert cancel.closed()
    t0 = time.monotonic()
    err = error_of(b.read_until())
    assert err["C"] == "57014" and time.monotonic() - t0 < 10
    assert tags(a.read_until()) == "TDCZ"  # a's sleep completed normally


# --- fail closed ---------------------------------------------------------------------------------


def test_upstream_down_gives_clear_error_not_hang(_session_gateways, token):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    gw = _session_gateways(require_tls=False, targets={"ehr": {"port": dead_port}})
    c = RawConn(gw.host, gw.port)
    t0 = time.monotonic()
    err = error_of(c.login(token()))
    assert time.monotonic() - t0 < 8
    assert (err["S"], err["C"]) == ("FATAL", "08006")
    assert "unavailable" in err["M"] and str(dead_port) not in err["M"]


def _engine_without_answers(pg, auth_answer):
    """An Engine whose control plane answers authentication (optionally) and never decides."""
    from phigate import _native

    cfg = {
        "listen": ["127.0.0.1:0"],
        "require_tls": False,
        "auth_timeout_ms": 700,
        "decision_timeout_ms": 700,
        "targets": {
            "ehr": {
                "host": pg.host,
                "port": pg.port,
                "database": pg.ehr_database,
                "user": pg.service_user,
                "password": pg.service_password,
                "tls": "disable",
            }
        },
    }
    eng = _native.Engine(json.dumps(cfg))
    eng.start()
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            for r in eng.take_requests():
                if r.kind == "authenticate" and auth_answer:
                    r.reply({"ok": True, "subject": "a", "groups": [], "identity_class": "x"})
                # decide requests are dropped on the floor: the control plane "hangs"
            time.sleep(0.02)

    threading.Thread(target=serve, daemon=True).start()
    host, port = eng.listen_addresses()[0].rsplit(":", 1)
    return eng, stop, host, int(port)


def test_control_plane_silent_on_auth_fails_closed(pg):
    eng, stop, host, port = _engine_without_answers(pg, auth_answer=False)
    try:
        c = RawConn(host, port)
        t0 = time.monotonic()
        err = error_of(c.login("whatever"))
        assert time.monotonic() - t0 < 3
        assert (err["S"], err["C"]) == ("FATAL", "08006")
        assert eng.stats()["requests_timed_out"] >= 1
    finally:
        stop.set()
        eng.shutdown(0.5)


def test_control_plane_silent_on_decision_fails_closed(pg):
    eng, stop, host, port = _engine_without_answers(pg, auth_answer=True)
    try:
        c = RawConn(host, port)
        assert c.login("whatever")[-1].tag == "Z"
        c.send(query("select 1"))
        t0 = time.monotonic()
        out = c.read_until()
        assert time.monotonic() - t0 < 3
        assert tags(out) == "EZ" and out[0].fields()["C"] == "58000"
        assert "did not decide" in out[0].fields()["M"]
    finally:
        stop.set()
        eng.shutdown(0.5)
