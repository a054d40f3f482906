"""Names as SQL spells them in messages: bare when PostgreSQL would read them back unchanged,
double-quoted otherwise."""

from __future__ import annotations


def sql_name(name: str) -> str:
    """A name as SQL would spell it (quoted when it needs quotes)."""
    if (
        name
        and (name[0].isalpha() or name[0] == "_")
        and name.isascii()
        and name == name.lower()
        and all(c.isalnum() or c in "_$" for c in name)
    ):
        return name
    return '"' + name.replace('"', '""') + '"'


def sql_relation(rel: tuple[str, str]) -> str:
    """``schema.name`` as SQL would spell it."""
    return f"{sql_name(rel[0])}.{sql_name(rel[1])}"
