"""What a config reload changed, as its audit record names it: roles added, removed or
changed, and classified PHI columns whose kind or mask changed (names only)."""

from __future__ import annotations

import dataclasses
from typing import Any

from phigate.config import Config

__all__ = ["config_diff"]


def config_diff(old: Config, new: Config) -> dict[str, Any]:
    """``{"roles": {"added", "removed", "changed"}, "phi_columns": {"added", "removed",
    "changed"}}``, each a sorted list of names ("schema.table.column" for columns)."""
    return {
        "roles": _diff(
            {n: _fields(r) for n, r in old.roles.items()},
            {n: _fields(r) for n, r in new.roles.items()},
        ),
        "phi_columns": _diff(
            {".".join(k): (r.kind, r.mask_spec) for k, r in old.phi.columns.items()},
            {".".join(k): (r.kind, r.mask_spec) for k, r in new.phi.columns.items()},
        ),
    }


def _fields(obj: Any) -> dict[str, Any]:
    # RoleConfig compares by identity (its rule caches key on the object): compare its values.
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[str]]:
    return {
        "added": sorted(new.keys() - old.keys()),
        "removed": sorted(old.keys() - new.keys()),
        "changed": sorted(k for k in old.keys() & new.keys() if old[k] != new[k]),
    }
