"""The table-driven policy corpus (tests/policy_corpus.toml) through analyze + rules."""

# ruff: noqa: S608  # the statements are test data, never executed

from __future__ import annotations

from typing import Any

import pytest

from phigate.policy.analyze import analyze
from phigate.policy.rules import Decision, decide
from policyconf import config, corpus, roleset

CORPUS = corpus()
CONFIG = config()
ROLES = sorted(CORPUS["roles"])


def _cases() -> list[Any]:
    out = []
    for i, case in enumerate(CORPUS["case"]):
        expect = dict(case["expect"])
        every = expect.pop("all", None)
        for role in ROLES:
            want = expect.get(role, every)
            assert want is not None, f"case {i} has no expectation for role {role}"
            label = " ".join(case["sql"].split())[:60]
            out.append(pytest.param(case["sql"], role, want, id=f"{i:03d}-{role}-{label}"))
    return out


def outcome(d: Decision) -> str:
    if d.action == "allow":
        # Allowed once a person approves: the data plane asks before it runs.
        return "allow" if d.ask is None else f"approval:{d.ask.rule}"
    return f"deny:{d.rule}"


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS["case"]) >= 150
    assert len(ROLES) >= 3


@pytest.mark.parametrize(("sql", "role", "want"), _cases())
def test_corpus(sql: str, role: str, want: str) -> None:
    d = decide(analyze(sql, schema="public"), roleset(CONFIG, role))
    got = outcome(d)
    if want == "deny":
        assert got.startswith("deny:"), (got, d.message)
    else:
        assert got == want, (d.message, d.hint)
    if d.action != "allow":
        assert d.sqlstate in ("42501", "42601")
        assert d.message and "rule:" in d.message or d.sqlstate == "42601"


PINNED = CORPUS["pinned"]
PINNED_CONFIG = config(PINNED)
PINNED_ROLES = sorted(PINNED["roles"])


def _pinned_cases() -> list[Any]:
    out = []
    for i, case in enumerate(PINNED["case"]):
        expect = dict(case["expect"])
        every = expect.pop("all", None)
        for role in PINNED_ROLES:
            want = expect.get(role, every)
            assert want is not None, f"pinned case {i} has no expectation for role {role}"
            label = " ".join(case["sql"].split())[:60]
            out.append(pytest.param(case["sql"], role, want, id=f"{i:03d}-{role}-{label}"))
    return out


@pytest.mark.parametrize(("sql", "role", "want"), _pinned_cases())
def test_pinned_schema(sql: str, role: str, want: str) -> None:
    """A target whose params pin search_path to another schema than public."""
    d = decide(analyze(sql, schema=PINNED["schema"]), roleset(PINNED_CONFIG, role))
    assert outcome(d) == want, (d.message, d.hint)


def test_refusals_never_quote_literals() -> None:
    secret = "Jane-Doe-1970-123-45-6789"  # noqa: S105  # a PHI-like literal, not a password
    statements = [
        f"delete from notes where body = '{secret}'",
        f"select pg_read_file('{secret}')",
        f"set client_encoding = '{secret}'",
        f"update patients set ssn = '{secret}'",
        f"select '{secret}",  # unterminated: the parser would quote it
        f"select $${secret}$$ from nowhere where",
        f"copy patients to program '{secret}'",
        f"select set_config('{secret}', 'x', false)",
    ]
    for role in ROLES:
        for sql in statements:
            d = decide(analyze(sql, schema="public"), roleset(CONFIG, role))
            assert d.action != "allow" or d.ask is not None, (sql, role)
            reason = d.ask.reason if d.ask is not None else ""
            assert secret not in (d.message or "") + (d.hint or "") + reason, (sql, role, d)
