"""The approvers' interfaces in the config: [approvals.admin_socket], [approvals.api] and
[[approvals.webhooks]] (minimal stand-in: the admin interface's own module replaces it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phigate.config.table import _Ctx, _Table

__all__ = ["AdminSocketConfig", "ApiConfig", "WebhookConfig", "parse_admin_socket",
           "parse_api", "parse_webhooks"]  # fmt: skip


@dataclass(frozen=True)
class AdminSocketConfig:
    path: Path


@dataclass(frozen=True)
class ApiConfig:
    listen: str


@dataclass(frozen=True)
class WebhookConfig:
    url: str


def _table(t: _Table | Mapping[str, Any], source: str | os.PathLike[str], prefix: str) -> _Table:
    if isinstance(t, _Table):
        return t
    path = Path(source)
    return _Table(t, prefix, _Ctx(str(path), path.parent), None)


def parse_admin_socket(
    t: _Table | Mapping[str, Any], source: str | os.PathLike[str]
) -> AdminSocketConfig:
    table = _table(t, source, "approvals.admin_socket")
    return AdminSocketConfig(path=Path(table.string("path", "/run/phigate/admin.sock")))


def parse_api(t: _Table | Mapping[str, Any], source: str | os.PathLike[str]) -> ApiConfig:
    return ApiConfig(listen=_table(t, source, "approvals.api").string("listen", "127.0.0.1:8443"))


def parse_webhooks(
    t: _Table | Mapping[str, Any] | list[Any], source: str | os.PathLike[str]
) -> tuple[WebhookConfig, ...]:
    items = t.data if isinstance(t, _Table) else t
    if not isinstance(items, list):
        _table({}, source, "approvals.webhooks").fail("", "must be a list of tables")
    return tuple(
        WebhookConfig(url=_table(item, source, f"approvals.webhooks[{i}]").string("url"))
        for i, item in enumerate(items)
    )
