"""Configs for the policy unit tests (no files, no database), roles from policy_corpus.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from phigate.config import Config, RoleSet, parse_config

CORPUS = Path(__file__).with_name("policy_corpus.toml")

BASE: dict[str, Any] = {
    "server": {"listen": "127.0.0.1:0", "require_tls": False},
    "identity": {
        "oidc": {
            "issuer": "https://idp.example/",
            "audience": "phigate",
            "jwks_url": "https://idp.example/jwks",
        }
    },
    "targets": {"ehr": {"host": "127.0.0.1", "database": "ehr", "user": "svc", "tls": "disable"}},
    # Roles with approval rules need the section; nothing here opens its store.
    "approvals": {"store": "approvals.db"},
}


def corpus() -> dict[str, Any]:
    with CORPUS.open("rb") as f:
        return tomllib.load(f)


def config(extra: dict[str, Any] | None = None) -> Config:
    """The base config plus [groups] and [roles] (the corpus's unless ``extra`` is given)."""
    doc = corpus() if extra is None else extra
    data = dict(BASE)
    data["groups"] = doc.get("groups", {})
    data["roles"] = doc.get("roles", {})
    return parse_config(data)


def roleset(cfg: Config, *names: str, target: str = "ehr") -> RoleSet:
    rs = cfg.roleset(names, target)
    assert rs is not None
    return rs
