"""The statement walker: the query, utility and expression walkers combined, and the dispatch
of each statement to its handler."""

from __future__ import annotations

from typing import Any

from phigate.policy.parse_nodes import _cannot, _one
from phigate.policy.walk_expressions import _ExpressionWalker
from phigate.policy.walk_queries import _QUERY_STATEMENTS, _QueryWalker
from phigate.policy.walk_utility import _ADMIN, _DDL, _UTILITY_STATEMENTS, _UtilityWalker


class _Walker(_QueryWalker, _UtilityWalker, _ExpressionWalker):
    __slots__ = ()

    def statement(self, node: dict[str, Any], *, top: bool) -> str:
        ntype, body = _one(node)
        handler = _STATEMENTS.get(ntype)
        if handler is None:
            if ntype in _DDL:
                handler = _Walker.ddl
            elif ntype in _ADMIN:
                handler = _Walker.admin
            else:
                raise _cannot(ntype)
        kind: str = handler(self, body, top, ntype)
        if top:
            self.f.node = ntype
            self.f.kind = kind
        return kind

    def inner(self, node: dict[str, Any]) -> None:
        """The statement inside EXPLAIN / PREPARE / DECLARE CURSOR / CREATE TABLE AS."""
        kind = self.statement(node, top=False)
        f = self.f
        f.inner_kind = kind if f.inner_kind is None else f.inner_kind


_STATEMENTS: dict[str, Any] = {**_QUERY_STATEMENTS, **_UTILITY_STATEMENTS}
