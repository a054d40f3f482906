"""The state every part of the statement walker shares, and the methods the parts call on each
other (the query, utility and expression walkers are mixins combined in walker.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phigate.policy.facts import Facts, Rel
from phigate.policy.scope import _Scope


class _WalkerBase:
    __slots__ = ("f", "generic_op", "hidden", "narrowed", "read_op", "schema")

    def __init__(self, facts: Facts, schema: str) -> None:
        self.f = facts
        self.schema = schema  # the one schema of the upstream session's search_path
        self.read_op = "select"
        self.generic_op = "ddl"
        # Rows read at the current query level cannot all reach the client: an enclosing level
        # narrows them (narrowing.py), or they only feed a filter.
        self.narrowed = False
        # No row read anywhere below reaches the client (EXPLAIN, a view's query at CREATE):
        # unlike `narrowed`, no subquery level starts over from it.
        self.hidden = False

    if TYPE_CHECKING:
        # For mypy only: the real methods are the mixins' (walk_queries.py,
        # walk_expressions.py) and _Walker's (walker.py); nothing here shadows them.

        def statement(self, node: dict[str, Any], *, top: bool) -> str: ...

        def inner(self, node: dict[str, Any]) -> None: ...

        def select(
            self, body: dict[str, Any], parent: _Scope | None, *, top: bool = False
        ) -> None: ...

        def resolve(self, rv: dict[str, Any], scope: _Scope | None, *, cte: bool) -> Rel | None: ...

        def expr(self, node: Any, scope: _Scope, clause: str) -> None: ...

        def generic(self, ntype: str, body: dict[str, Any], scope: _Scope, clause: str) -> None: ...
