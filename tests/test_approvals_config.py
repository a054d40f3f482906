"""[approvals] and [approvers.*]: defaults, the store kinds, and every refusal naming its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from approvals_support import config_doc, make_config
from phigate.approvals.model import ApprovalRequest, Scope, Vote
from phigate.approvals.rules import decided, needed
from phigate.config import parse_config
from phigate.errors import ConfigError


def _parse(tmp_path: Path, doc: dict[str, Any]) -> Any:
    return parse_config(doc, source=str(tmp_path / "phigate.toml"), base_dir=tmp_path)


def test_defaults_and_sqlite_store(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    a = cfg.approvals
    assert a is not None and a.store_kind == "sqlite" and a.store_path == tmp_path / "approvals.db"
    assert (a.max_pending_per_identity, a.keep_decided, a.timeout) == (5, 7 * 86400, 900)
    rule = cfg.approvers[0]
    assert (rule.name, rule.quorum, rule.require, rule.rules) == ("oncall", 1, "any",
                                                                  frozenset({"*"}))  # fmt: skip


def test_postgres_store_may_not_be_a_target(tmp_path: Path) -> None:
    doc = config_doc("postgresql://svc@localhost:5432/ehr")
    with pytest.raises(ConfigError) as exc:
        _parse(tmp_path, doc)
    assert exc.value.key == "approvals.store" and "target 'ehr'" in exc.value.message
    assert exc.value.file.endswith("phigate.toml")
    ok = _parse(tmp_path, config_doc("postgresql://svc:pw@localhost:5432/phigate_state"))
    assert ok.approvals.store_kind == "postgresql"
    assert ok.approvals.store_where == "postgresql://localhost:5432/phigate_state"  # no password


@pytest.mark.parametrize(("approvals", "approvers", "key", "words"), [
    ({"keep_decided": "soon"}, None, "approvals.keep_decided", "not a duration"),
    ({"max_pending_per_identity": 0}, None, "approvals.max_pending_per_identity", "between"),
    ({"public_url": "gw.example.org"}, None, "approvals.public_url", "http(s) URL"),
    ({"colour": 1}, None, "approvals.colour", "unknown key"),
    ({}, {"x": {"groups": ["g"], "roles": ["agentz"]}}, "approvers.x.roles", "did you mean"),
    ({}, {"x": {"groups": ["g"], "rules": ["writes"]}}, "approvers.x.rules", "not a risk rule"),
    ({}, {"x": {"groups": ["g"], "require": "most"}}, "approvers.x.require", '"any" or "all"'),
    ({}, {"x": {"roles": ["agents"]}}, "approvers.x.groups", "is required"),
    ({}, {"x": {"groups": ["g"], "targets": ["crm"]}}, "approvers.x.targets", "[targets.crm]"),
])  # fmt: skip
def test_refusals_name_the_key(
    tmp_path: Path, approvals: dict[str, Any], approvers: Any, key: str, words: str
) -> None:
    doc = config_doc(str(tmp_path / "a.db"), approvers=approvers, **approvals)
    with pytest.raises(ConfigError) as exc:
        _parse(tmp_path, doc)
    assert exc.value.key == key and words in exc.value.message


def test_approvers_need_an_approvals_section(tmp_path: Path) -> None:
    doc = config_doc(str(tmp_path / "a.db"))
    del doc["approvals"]
    with pytest.raises(ConfigError) as exc:
        _parse(tmp_path, doc)
    assert exc.value.key == "approvers" and "[approvals]" in exc.value.message


def test_require_all_needs_one_approval_from_each_group(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, approvers={
        "two_teams": {"groups": ["dba", "privacy"], "roles": ["agents"], "require": "all"},
    })  # fmt: skip
    rule = cfg.approvers[0]
    assert rule.quorum == 2
    base = ApprovalRequest(
        id="r", created_at=0, expires_at=1, instance="gw", session="s", stmt=1, subject="agent",
        groups=(), roles=("agents",), role="agents", target="ehr", rule="delete", reason="",
        mode="hold", normalized="n", sql=None, parameters=None, literal_hashes=None,
        parameter_hashes=None, values_hash="v", estimate=None, masked_columns={}, earlier=None,
    )  # fmt: skip

    def vote(who: str, group: str, verdict: Any = "approve") -> Vote:
        return Vote("r", who, (group,), verdict, None, Scope(), 0)

    two_dbas = ApprovalRequest(**{**base.__dict__, "votes": (vote("a", "dba"), vote("b", "dba"))})
    assert decided(cfg.approvers, two_dbas) is None
    assert needed(cfg.approvers, two_dbas)[0]["missing_groups"] == ["privacy"]
    both = ApprovalRequest(**{**base.__dict__, "votes": (vote("a", "dba"), vote("c", "privacy"))})
    assert decided(cfg.approvers, both) == ("approved", "two_teams")
    votes = (vote("a", "dba"), vote("c", "privacy", "deny"))
    denied = ApprovalRequest(**{**base.__dict__, "votes": votes})
    assert decided(cfg.approvers, denied) == ("denied", "c")
    outsider = ApprovalRequest(**{**base.__dict__, "votes": (vote("x", "sales", "deny"),)})
    assert decided(cfg.approvers, outsider) is None  # not an approver of this request


def test_a_key_value_connection_string_is_not_taken_for_a_file_name(tmp_path: Path) -> None:
    # It would become a SQLite file named after it (password included), and two gateways
    # meant to share one store would each get their own.
    with pytest.raises(ConfigError, match="postgresql:// URL"):
        make_config(tmp_path, store="host=127.0.0.1 port=5432 dbname=phigate_state password=x")
