"""Row estimates for `approval_row_estimate` rules: EXPLAIN (FORMAT JSON) upstream, as the
agent's own database role, of the text the agent would run (the masking rewrite if any).

Bound parameters are sent as parameters of the EXPLAIN (extended protocol, the same formats
the client bound them in), so the planner estimates with the very values the agent sent, as
a custom plan would, and no value is ever spliced into SQL text. The EXPLAIN runs in a
transaction that is rolled back, after SET LOCAL ROLE and the target's search_path."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

from phigate.config import Config
from phigate.masking.classification import connect_args

__all__ = ["EstimateError", "Estimator", "plan_rows"]

log = logging.getLogger(__name__)


class EstimateError(Exception):
    """The estimate could not be made (the statement is then held: fail closed)."""


def plan_rows(explain_json: Any) -> int:
    """`Plan Rows` of the top plan node of an EXPLAIN (FORMAT JSON) answer."""
    doc = json.loads(explain_json) if isinstance(explain_json, str | bytes) else explain_json
    try:
        return int(doc[0]["Plan"]["Plan Rows"])
    except (LookupError, TypeError, ValueError):
        raise EstimateError("EXPLAIN answered without a top plan node") from None


def _parameters(parameters: Sequence[Any] | None) -> tuple[list[bytes | None], list[int]]:
    values: list[bytes | None] = []
    formats: list[int] = []
    for p in parameters or ():
        if p is None:
            values.append(None)
            formats.append(0)
        elif "hex" in p:
            # Binary values, and text ones that are not UTF-8: the bytes as the client sent
            # them, in the format it sent them in.
            values.append(bytes.fromhex(str(p["hex"])))
            formats.append(1 if p.get("format") == 1 else 0)
        else:
            values.append(str(p.get("value", "")).encode())
            formats.append(0)
    return values, formats


class Estimator:
    """Estimates rows through the gateway's own connection to a target (its service user,
    then the session's db_role), bounded by ``timeout`` seconds."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout

    async def estimate(
        self, config: Config, target: str, db_role: str | None, sql: str,
        parameters: Sequence[Any] | None,
    ) -> int:
        return await asyncio.wait_for(
            asyncio.to_thread(self._estimate, config, target, db_role, sql, parameters),
            self.timeout + 2,
        )

    def _estimate(
        self, config: Config, target: str, db_role: str | None, sql: str,
        parameters: Sequence[Any] | None,
    ) -> int:
        import psycopg
        from psycopg import sql as q

        settings = config.targets.get(target)
        if settings is None:
            raise EstimateError(f"target {target!r} is not configured")
        args = connect_args(settings)
        args["application_name"] = "phigate-estimate"
        values, formats = _parameters(parameters)
        try:
            with psycopg.connect(**args, autocommit=False) as conn:
                conn.execute("SELECT pg_catalog.set_config('statement_timeout', %s, true)",
                             (str(int(self.timeout * 1000)),))  # fmt: skip
                conn.execute("SELECT pg_catalog.set_config('search_path', %s, true)",
                             (settings.params["search_path"],))  # fmt: skip
                if db_role is not None:
                    conn.execute(q.SQL("SET LOCAL ROLE {}").format(q.Identifier(db_role)))
                result = conn.pgconn.exec_params(
                    b"EXPLAIN (FORMAT JSON) " + sql.encode(), values, None, formats, 0
                )
                conn.rollback()
        except psycopg.Error as exc:
            raise EstimateError(f"cannot reach target {target!r}: {type(exc).__name__}") from None
        if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
            # The server's message may quote the statement's values: keep only its SQLSTATE.
            state = result.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
            raise EstimateError(
                f"EXPLAIN failed with SQLSTATE {state.decode() if state else '?'}"
            )
        raw = result.get_value(0, 0)
        if raw is None:
            raise EstimateError("EXPLAIN answered nothing")
        return plan_rows(bytes(raw).decode())
