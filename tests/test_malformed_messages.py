"""Malformed extended-protocol messages end the session with the gateway's own protocol error:
nothing the gateway cannot fully parse is passed on for PostgreSQL to answer. Parameter type
OIDs that name no type get a clear "type does not exist" error, not an internal one."""

from __future__ import annotations

import struct

import pytest

from rawpg import SYNC, RawConn, bind, cstr, msg, parse, query, tags

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def plain_gateway(_session_gateways):
    return _session_gateways(require_tls=False)


def _login(gw, token) -> RawConn:
    c = RawConn(gw.host, gw.port)
    assert c.login(token)[-1].tag == "Z"
    return c


def _bind_body(formats=(), params=(), results=(), stmt="s") -> bytes:
    body = cstr("") + cstr(stmt) + struct.pack("!h", len(formats))
    body += b"".join(struct.pack("!h", f) for f in formats)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", len(p)) + p
    return body + struct.pack("!h", len(results)) + b"".join(struct.pack("!h", f) for f in results)


def _parse_body(name: str, sql: str, types: bytes) -> bytes:
    return cstr(name) + cstr(sql) + types


MALFORMED = {
    "bind: parameter longer than the message": (
        b"B",
        cstr("") + cstr("s") + struct.pack("!hhi", 0, 1, 100) + b"12" + struct.pack("!h", 0),
        "Bind",
    ),
    "bind: bytes after the result formats": (b"B", _bind_body(params=(b"1",)) + b"\0", "Bind"),
    "bind: 3 formats for 2 parameters": (
        b"B",
        _bind_body(formats=(0, 0, 0), params=(b"1", b"2")),
        "Bind",
    ),
    "bind: unterminated statement name": (b"B", cstr("") + b"s", "Bind"),
    "bind: negative parameter count": (
        b"B",
        cstr("") + cstr("s") + struct.pack("!hh", 0, -1),
        "Bind",
    ),
    "bind: negative value length": (
        b"B",
        cstr("") + cstr("s") + struct.pack("!hhih", 0, 1, -5, 0),
        "Bind",
    ),
    "parse: type count larger than the list": (
        b"P",
        _parse_body("s", "select $1", struct.pack("!hi", 2, 23)),
        "Parse",
    ),
    "parse: negative type count": (
        b"P",
        _parse_body("s", "select 1", struct.pack("!h", -1)),
        "Parse",
    ),
    "parse: unterminated text": (b"P", cstr("s") + b"select 1", "Parse"),
    "close: unknown kind": (b"C", b"X" + cstr("s"), "Close"),
    "close: unterminated name": (b"C", b"Sname", "Close"),
    "close: bytes after the name": (b"C", b"S" + cstr("s") + b"junk", "Close"),
    "describe: unknown kind": (b"D", b"Q" + cstr("s"), "Describe"),
    "describe: empty": (b"D", b"", "Describe"),
    "execute: no row limit": (b"E", cstr(""), "Execute"),
    "execute: bytes after the row limit": (b"E", cstr("") + struct.pack("!ih", 0, 0), "Execute"),
    "sync with a body": (b"S", b"x", "Sync"),
    "flush with a body": (b"H", b"x", "Flush"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_message_is_the_gateways_protocol_violation(plain_gateway, token, case):
    tag, body, what = MALFORMED[case]
    c = _login(plain_gateway, token())
    # A prepared statement "s" exists, so only the malformation can be wrong.
    c.send(parse("select $1::int", name="s") + SYNC)
    assert tags(c.read_until()) == "1Z"
    c.send(msg(tag, body) + SYNC)
    out = c.read_until()
    err = out[-1].fields()
    assert (err["S"], err["C"]) == ("FATAL", "08P01"), err
    assert err["M"].startswith(f"invalid {what} message"), err
    assert c.closed()


@pytest.mark.parametrize("oid", [999_999, 3_000_000_000, 1])
def test_parameter_type_that_names_no_type(plain_gateway, token, oid):
    c = _login(plain_gateway, token())
    c.send(
        msg(b"P", _parse_body("", "select $1", struct.pack("!hI", 1, oid)))
        + bind(params=(b"1",))
        + SYNC
    )
    out = c.read_until()
    assert tags(out) == "EZ"
    err = out[0].fields()
    assert (err["S"], err["C"]) == ("ERROR", "42704"), err
    assert err["M"] == f"type with OID {oid} does not exist"
    # The session goes on.
    c.send(query("select 1"))
    assert tags(c.read_until()) == "TDCZ"
