"""The analyzer's output: the fact sheet of one statement (Facts), its column references
(ColumnUse) and why a statement could not be analyzed (FailClosed)."""

from __future__ import annotations

Rel = tuple[str, str]


class FailClosed:
    """Why a statement could not be analyzed; it is refused with this SQLSTATE and message."""

    __slots__ = ("message", "sqlstate")

    def __init__(self, sqlstate: str, message: str) -> None:
        self.sqlstate = sqlstate
        self.message = message

    def __repr__(self) -> str:
        return f"FailClosed({self.sqlstate!r}, {self.message!r})"


class ColumnUse:
    """One column reference. ``candidates`` are the base relations it may belong to (one when
    it is qualified or only one relation is in scope: then ``exact``); ``column`` is "*" for
    SELECT *, rel.*, whole-row references, NATURAL joins and INSERT/COPY without a column list.
    ``write`` is the operation for columns that are written (SET, INSERT/COPY FROM column
    lists), None for columns that are read."""

    __slots__ = ("candidates", "clause", "column", "exact", "write")

    def __init__(
        self, candidates: tuple[Rel, ...], column: str, clause: str, exact: bool, write: str | None
    ) -> None:
        self.candidates = candidates
        self.column = column
        self.clause = clause
        self.exact = exact
        self.write = write

    def __repr__(self) -> str:
        rels = ",".join(f"{s}.{n}" for s, n in self.candidates)
        w = f" write={self.write}" if self.write else ""
        return (
            f"ColumnUse({rels}:{self.column} in {self.clause}{' exact' if self.exact else ''}{w})"
        )


class Facts:
    """The fact sheet of one statement."""

    __slots__ = (
        "bulk_reads", "cascade", "columns", "copy_direction", "copy_query", "copy_target", "ctes",
        "cursor", "cursor_op",
        "data_modifying_ctes", "discard", "explain_analyze", "explain_verbose", "fail",
        "functions", "has_limit",
        "has_where", "index", "inner_kind", "kind", "literal_sensitive", "locking", "node",
        "operators", "params", "reg_casts", "relations", "reserved_schema", "set_configs",
        "set_local",
        "set_name", "set_operations", "set_values", "subqueries", "transaction", "writes",
    )  # fmt: skip

    def __init__(self, index: int = 0) -> None:
        self.index = index  # position in a multi-statement string
        self.kind = "unknown"
        self.node = ""  # the parse node type, e.g. "SelectStmt"
        self.inner_kind: str | None = None  # EXPLAIN / PREPARE / DECLARE / COPY (query)
        #: (schema, name, op): op is select, insert, update, delete, merge, copy_to, copy_from,
        #: truncate or ddl; LOCK and maintenance statements record "select".
        self.relations: list[tuple[str, str, str]] = []
        self.columns: list[ColumnUse] = []
        #: (schema, name, op) reads (op select or copy_to) whose every row may reach the client
        #: or another table: read at a query level that no WHERE, LIMIT or one-row aggregate
        #: narrows, nor an enclosing level does (walk_queries.py says exactly which count).
        self.bulk_reads: list[tuple[str, str, str]] = []
        #: (schema as written or None, name, schema it resolves to)
        self.functions: list[tuple[str | None, str, str]] = []
        self.operators: list[str] = []  # schemas of explicitly qualified operators
        self.set_configs: list[str | None] = []  # set_config() setting names (None: not literal)
        self.writes = False
        self.has_where = False
        self.has_limit = False
        self.set_operations = False
        self.subqueries = 0
        self.locking = False
        self.ctes: list[str] = []
        self.data_modifying_ctes = False
        self.set_name: str | None = None  # SET/RESET/SHOW setting (lower-cased); "all"
        self.set_values: tuple[str, ...] = ()
        self.set_local = False
        self.transaction: str | None = None  # TransactionStmt kind, e.g. "TRANS_STMT_BEGIN"
        self.copy_direction: str | None = None  # "to" | "from"
        self.copy_target: str | None = None  # "stdio" | "program" | "file"
        self.copy_query = False
        self.explain_analyze = False
        self.explain_verbose = False
        self.discard: str | None = None
        #: DECLARE / FETCH / MOVE / CLOSE: the cursor's name as the server folds it (None for
        #: CLOSE ALL) and "declare" | "fetch" | "move" | "close" | "close_all".
        self.cursor: str | None = None
        self.cursor_op: str | None = None
        self.cascade = False
        self.reg_casts = 0
        self.params = False
        self.literal_sensitive = False
        #: A DDL statement names schema phigate or an object in it (relations and functions
        #: anywhere are in ``relations`` / ``functions``).
        self.reserved_schema = False
        self.fail: FailClosed | None = None

    def __repr__(self) -> str:
        if self.fail is not None:
            return f"Facts(#{self.index} {self.fail!r})"
        return (
            f"Facts(#{self.index} {self.kind} rel={self.relations} cols={self.columns} "
            f"fn={self.functions} writes={self.writes})"
        )
