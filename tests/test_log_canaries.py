"""PHI a client puts anywhere (comments, literals, labels, parameters, a user name, a password,
application_name, a malformed message) never reaches the events log or the gateway's own log
output, in clear or in any common encoding of it."""

# ruff: noqa: S608  # statements are built from made-up PHI on purpose

from __future__ import annotations

import base64
import logging
import struct
from collections.abc import Iterator

import psycopg
import pytest

import rawpg
from harness import conninfo, psycopg_connect

pytestmark = pytest.mark.integration

# Made-up PHI: a name, an SSN-shaped number, an MRN, an e-mail and a phone number.
NAME = "Zyxwell Quorbin"
SSN = "987-65-4329"
MRN = "MRN-8675309"
EMAIL = "zyxwell.quorbin@example.org"
PHONE = "(555) 014-2368"
CANARIES = (NAME, SSN, MRN, EMAIL, PHONE)
ALL = f"{NAME} {SSN} {MRN} {EMAIL} {PHONE}"
SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def canary_forms() -> set[str]:
    """Every form a canary could be written in: clear, upper and lower case, each word of the
    name, digits only, hex of the UTF-8 bytes and base64 at the three byte alignments."""
    forms: set[str] = set()
    for value in (*CANARIES, *NAME.split()):
        forms.update({value, value.upper(), value.lower()})
        digits = "".join(c for c in value if c.isdigit())
        if len(digits) >= 7:
            forms.add(digits)
        raw = value.encode()
        forms.update({raw.hex(), raw.hex().upper()})
        for shift in range(3):
            encoded = base64.b64encode(b"\0" * shift + raw).decode()
            # Drop the characters that mix in the padding bytes or the end's partial group.
            forms.add(encoded[(shift * 4 + 2) // 3 : -4])
    return {f for f in forms if len(f) >= 6}


@pytest.fixture
def phigate_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="phigate")
    yield caplog


# The masked variant takes the rewrite's path: its statements are judged, rewritten and their
# errors scrubbed for an identity that sees PHI masked.
MASKED_PHI = {
    "columns": {
        "public.patients.ssn": {"kind": "ssn", "mask": "partial:4"},
        "public.patients.mrn": {"kind": "mrn", "mask": "redact"},
        "public.patients.last_name": {"kind": "name", "mask": "redact"},
    },
}


@pytest.mark.parametrize("view", ["clear", "masked"])
def test_canaries_reach_neither_the_audit_trail_nor_the_gateway_log(
    view, gateway_factory, token, phigate_logs, capfd
):
    gw = gateway_factory(phi=MASKED_PHI) if view == "masked" else gateway_factory()
    tok = token(sub="log-canary-agent")
    with psycopg_connect(gw, tok, application_name=ALL) as conn:
        ok = [
            f"/* patient {ALL} /* nested {ALL} */ */ SELECT count(*) FROM patients -- {ALL}",
            f"SELECT count(*) FROM patients WHERE last_name = '{NAME}' OR ssn = '{SSN}'",
            f"SELECT count(*) FROM patients WHERE mrn = $q${MRN}$q$ OR last_name = $${NAME}$$",
            f"SELECT count(*) FROM patients WHERE last_name = E'{NAME}\\'s' OR mrn = U&'{MRN}'",
            f"SELECT B'1011', X'{NAME.encode().hex()}', {SSN.replace('-', '')} AS n",
            f'SELECT mrn AS "{ALL}" FROM patients ORDER BY "{ALL}" LIMIT 1',
            f"SELECT mrn AS {NAME.replace(' ', '_')} FROM patients LIMIT 1",
            f"SELECT first_name {NAME.split()[1]} FROM patients LIMIT 1",
            f'WITH "{NAME}" AS (SELECT 1 AS x) SELECT x FROM "{NAME}"',
            "PREPARE canary AS SELECT count(*) FROM patients WHERE last_name = $1",
            f"EXECUTE canary('{NAME}')",
        ]
        if view == "masked":  # the identity does see the classified columns masked
            assert conn.execute("SELECT last_name FROM patients LIMIT 1").fetchone() == ("***",)
        for sql in ok:
            conn.execute(sql)
        # A bound parameter of the extended protocol (psycopg sends it apart from the text).
        conn.execute("SELECT count(*) FROM patients WHERE email = %s OR phone = %s",
                     (EMAIL, PHONE)).fetchall()  # fmt: skip
        failing = [
            # Refused by the gateway's policy (a server-side file read).
            f"SELECT pg_read_file('/tmp/{NAME}') -- {ALL}",
            # Refused before analysis: the lexer or the parser rejects it.
            f"SELECT count(*) FROM patients WHERE last_name = '{ALL}",
            f"SELEC '{ALL}' FORM patients /* {ALL} */",
            # Fails upstream: the server's error must not carry the statement into any log.
            f"/* {ALL} */ SELECT 1/0, '{ALL}'",
            f"SELECT \"{NAME}\" FROM patients WHERE mrn = '{MRN}'",
            # The server's error echoes the literal (the client may see it; no log may).
            f"SELECT '{ALL}'::int",
        ]
        if view == "masked":  # refused by the masking rule: writing a column seen masked
            failing.append(f"UPDATE patients SET last_name = '{NAME}' WHERE mrn = '{MRN}'")
        for sql in failing:
            with pytest.raises(psycopg.Error):
                conn.execute(sql)
    # Logins that fail: a user name and a password that are PHI.
    logins = ((NAME, ALL), (SSN, tok[:-4] + "AAAA"), (EMAIL, MRN), (PHONE, "phk_" + ALL))
    for user, password in logins:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(conninfo(gw, user), password=password).close()
    # A login that succeeds with PHI as user name and application_name, then a message type
    # the protocol does not know, whose body is PHI: the session ends as a protocol violation.
    raw = rawpg.RawConn(gw.host, gw.port)
    try:
        raw.send(SSL_REQUEST)
        assert raw.recv_exact(1) == b"S"
        raw.start_tls(str(gw.ca_file))
        # A startup parameter the gateway does not forward, named and valued with PHI.
        msgs = raw.login(tok, user=NAME, application_name=ALL, **{NAME: ALL})
        assert msgs[-1].tag == "Z"
        raw.send(rawpg.msg(b"\x01", ALL.encode()))
        end = raw.read_until("Z")
        assert end[-1].tag == "E" and end[-1].sqlstate == "08P01"
    finally:
        raw.close()
    gw.stop()

    events = gw.events()
    kinds = {e["event"] for e in events}
    # Every route was taken: the checks below read something about each of them.
    assert {"statement", "auth_failure", "protocol_violation", "session_start"} <= kinds
    statements = [e for e in events if e["event"] == "statement"]
    assert any(e["decision"] == "deny" for e in statements)
    assert any((e["normalized"] or "").startswith("<unparsable statement") for e in statements)
    starts = [e for e in events if e["event"] == "session_start"]
    assert len(starts) == 2 and all(e["application_name"].startswith("h:") for e in starts)
    assert [p[:2] for e in starts for p in e["dropped_parameters"]] == ["h:"]
    failures = [e for e in events if e["event"] == "auth_failure"]
    assert len(failures) == len(logins) and all(e["user"].startswith("h:") for e in failures)

    logged = {
        "audit trail": gw.trail_text(),
        # The gateway's loggers only: the test's own client libraries may log what it sends.
        "gateway log records": "\n".join(
            f"{r.getMessage()} {r.exc_text or ''}"
            for r in phigate_logs.records
            if r.name.startswith("phigate")
        ),
        "stderr": capfd.readouterr().err,
    }
    assert logged["audit trail"].count("\n") >= len(ok) + len(failing)
    for where, text in logged.items():
        for form in canary_forms():
            assert form not in text, f"a canary form ({len(form)} characters) is in the {where}"
