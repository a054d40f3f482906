"""Data-plane session rules, driven through a scripted control plane: prepared statements are
judged again after a reload, an expired credential closes the session at its next statement,
and a role's db_role is the upstream user the session runs as."""

from __future__ import annotations

import time

import pytest

from rawpg import SYNC, RawConn, bind, execute, parse, query, tags

pytestmark = pytest.mark.integration


def test_prepared_statement_is_judged_again_after_reload(scripted):
    cp = scripted()
    c = cp.connect()
    c.send(parse("select 'marker-ok' as v", name="s1") + SYNC)
    assert tags(c.read_until()) == "1Z"
    c.send(bind(stmt="s1") + execute() + SYNC)
    assert tags(c.read_until()) == "2DCZ"
    cp.reload(deny_word="marker-ok")  # the rule changes while the statement stays prepared
    c.send(bind(stmt="s1") + execute() + SYNC)
    out = c.read_until()
    assert tags(out) == "EZ"
    assert out[0].fields()["C"] == "42501" and out[0].fields()["M"] == "refused by rule test"
    cp.reload(deny_word=None)
    c.send(bind(stmt="s1") + execute() + SYNC)
    assert tags(c.read_until()) == "2DCZ"


def test_portal_bound_before_reload_is_judged_at_execute(scripted):
    cp = scripted()
    c = cp.connect()
    c.send(query("begin"))
    c.read_until()
    c.send(
        parse("select g from generate_series(1, 10) g", name="s2")
        + bind("p1", "s2")
        + execute("p1", max_rows=3)
        + SYNC
    )
    assert tags(c.read_until()) == "12DDDsZ"
    cp.reload(deny_word="generate_series")
    c.send(execute("p1", max_rows=3) + SYNC)
    out = c.read_until()
    assert tags(out) == "EZ" and out[0].fields()["C"] == "42501"
    assert out[1].body == b"E"  # in a failed transaction, exactly as PostgreSQL reports it


def test_bind_of_statement_never_parsed_here_is_refused(scripted):
    cp = scripted()
    c = cp.connect()
    c.send(bind(stmt="nope") + execute() + SYNC)
    out = c.read_until()
    assert tags(out) == "EZ" and out[0].fields()["C"] == "26000"
    c.send(query("select 1"))
    assert tags(c.read_until()) == "TDCZ"


def test_expired_credential_closes_session_at_next_statement(scripted):
    cp = scripted(auth={"expires_at": time.time() + 1.0, "close_on_expiry": True})
    c = cp.connect()
    c.send(query("select 1"))
    assert tags(c.read_until()) == "TDCZ"
    time.sleep(1.2)
    c.send(query("select 2"))
    out = c.read_until()
    err = out[-1].fields()
    assert (err["S"], err["C"]) == ("FATAL", "28P01") and "expired" in err["M"]
    assert c.closed()


def test_expiry_ignored_when_not_configured(scripted):
    cp = scripted(auth={"expires_at": time.time() - 10, "close_on_expiry": False})
    c = cp.connect()
    c.send(query("select 1"))
    assert tags(c.read_until()) == "TDCZ"


def test_session_runs_as_the_roles_db_user(scripted, pg):
    pg.psql(
        "do $$ begin if not exists (select from pg_roles where rolname = 'phigate_reader') "
        "then create role phigate_reader nologin; end if; end $$; "
        f"grant phigate_reader to {pg.service_user};",
        dbname="postgres",
    )
    cp = scripted(auth={"db_role": "phigate_reader"})
    c = cp.connect()
    c.send(query("select current_user, session_user"))
    rows = [m.body for m in c.read_until() if m.tag == "D"]
    assert b"phigate_reader" in rows[0] and pg.service_user.encode() in rows[0]


def test_unknown_db_role_fails_login_clearly(scripted):
    cp = scripted(auth={"db_role": "no_such_role_here"})
    c = RawConn(cp.host, cp.port)
    out = c.login("token")
    err = out[-1].fields()
    assert (err["S"], err["C"]) == ("FATAL", "08006")
    assert "database user" in err["M"] and "no_such_role_here" not in err["M"]
