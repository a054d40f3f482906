"""Reading pglast's JSON parse nodes, and the error the analyzer raises for a node it does not
understand."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class _Unsupported(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


def _cannot(node_type: str) -> _Unsupported:
    return _Unsupported(f"phigate cannot analyze {node_type} yet")


def _one(node: dict[str, Any]) -> tuple[str, Any]:
    for item in node.items():
        return item
    raise _cannot("an empty node")


def _sval(node: dict[str, Any]) -> str:
    return node["String"]["sval"]  # type: ignore[no-any-return]


def _str_const(node: Any) -> bool:
    """A string literal, possibly under casts (what a literal_sensitive decision looks at)."""
    while isinstance(node, dict):
        c = node.get("A_Const")
        if c is not None:
            return "sval" in c or "bsval" in c
        tc = node.get("TypeCast")
        if tc is None:
            return False
        node = tc.get("arg")
    return False


def _const_text(node: Any) -> str | None:
    """The text of a constant (string, number, boolean) or None."""
    while isinstance(node, dict):
        c = node.get("A_Const")
        if c is not None:
            for key in ("sval", "ival", "fval", "boolval", "bsval"):
                if key in c:
                    v = c[key]
                    inner = v.get(key) if isinstance(v, dict) else v
                    if key == "ival" and inner is None:
                        inner = 0  # libpg_query omits zero
                    if key == "boolval" and inner is None:
                        inner = False
                    return str(inner).lower() if isinstance(inner, bool) else str(inner)
            return None
        tc = node.get("TypeCast")
        if tc is None:
            return None
        node = tc.get("arg")
    return None


def child_nodes(value: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """The outermost parse nodes in ``value`` — ``{"NodeType": {...}}`` dicts — looking through
    lists and plain field dicts, in document order. Walkers recurse into a node's body
    themselves, so each decides what a node's children mean."""
    tv = type(value)
    if tv is list:
        for item in value:
            yield from child_nodes(item)
        return
    if tv is not dict:
        return
    if len(value) == 1:
        ((key, body),) = value.items()
        if key[:1].isupper() and type(body) is dict:
            yield key, body
            return
    for item in value.values():
        yield from child_nodes(item)


def column_ref_names(node: Any) -> list[str] | None:
    """The names of a column reference written as names only (``c``, ``t.c``, ``s.t.c``);
    None for anything else (a ``*``, an expression)."""
    ref = node.get("ColumnRef") if isinstance(node, dict) and len(node) == 1 else None
    if ref is None:
        return None
    fields = ref["fields"]
    if not all("String" in f for f in fields):
        return None
    return [f["String"]["sval"] for f in fields]
