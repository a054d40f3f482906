"""Which protected relation a RangeVar of a parsed statement (pglast JSON) names, and the name
the statement refers to it by, as the server resolves it with the target's pinned search_path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from phigate.masking.catalog_protocols import CatalogLike, RelationLike
from phigate.policy.pg_names import unqualified_relation

__all__ = ["is_range_var", "protected_relation", "reference_name"]


def is_range_var(node: Mapping[str, Any]) -> bool:
    """True for a RangeVar's body (the JSON stores some unwrapped, e.g. UPDATE's target)."""
    return "relname" in node and "relpersistence" in node


def protected_relation(
    rv: Mapping[str, Any], catalog: CatalogLike, schema: str
) -> tuple[str, str, RelationLike] | None:
    """(schema, name, relation) of the protected relation ``rv`` names, else None. A CTE of
    the same name is not told apart: callers that fail closed may treat it as the relation."""
    if rv.get("catalogname"):
        return None  # three-part names are refused by the analyzer
    name: str = rv["relname"]
    written: str | None = rv.get("schemaname")
    key = (written, name) if written else unqualified_relation(name, schema)
    rel = catalog.relation(*key)
    return None if rel is None else (key[0], key[1], rel)


def reference_name(rv: Mapping[str, Any]) -> str:
    """The name the statement's other clauses use for the relation: its alias, else its name."""
    alias = rv.get("alias")
    return str(alias["aliasname"]) if alias else str(rv["relname"])
