"""The analyzer's name scopes: which relations a column or table name may refer to at one
query level."""

from __future__ import annotations

from phigate.policy.facts import Rel

# An item of a FROM list: (refname, members). members are the base relations behind it (one
# for a table, several for an aliased join, none for a subquery, CTE or function).
_Item = tuple[str | None, tuple[Rel, ...]]


class _Scope:
    __slots__ = ("ctes", "items", "opaque", "outputs", "parent")

    def __init__(self, parent: _Scope | None, *, opaque: bool = False) -> None:
        self.parent = parent
        self.items: list[_Item] = []
        self.ctes: set[str] | None = None
        self.outputs: frozenset[str] | set[str] = frozenset()
        self.opaque = opaque

    def has_cte(self, name: str) -> bool:
        s: _Scope | None = self
        while s is not None:
            if s.ctes is not None and name in s.ctes:
                return True
            s = s.parent
        return False

    def find(self, refname: str) -> _Item | None:
        s: _Scope | None = self
        while s is not None:
            for item in s.items:
                if item[0] == refname:
                    return item
            if s.opaque:
                return None
            s = s.parent
        return None

    def candidates(self) -> tuple[tuple[Rel, ...], bool]:
        """Every base relation an unqualified column might come from, and whether a subquery,
        CTE or function in scope might provide it instead."""
        rels: dict[Rel, None] = {}
        derived = False
        s: _Scope | None = self
        while s is not None:
            for _, members in s.items:
                if members:
                    for m in members:
                        rels[m] = None
                else:
                    derived = True
            if s.opaque:
                break
            s = s.parent
        return tuple(rels), derived
