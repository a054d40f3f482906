"""Typed stubs for phigate._native, the Rust data plane (see native/src/lib.rs).

The data plane owns every socket. The control plane (Python) builds one Engine,
starts it, and then serves the Engine's *requests* and drains its *events*:

    engine = Engine(config_json)          # JSON from phigate.config.Config.native_json()
    engine.start()                        # binds listeners, starts tokio worker threads
    loop.add_reader(engine.wakeup_fd(), on_wakeup)
    def on_wakeup():
        for req in engine.take_requests():   # clears the wakeup fd too
            ...; req.reply({...})            # may be called much later, from any thread
    ...periodically: sink.write(engine.take_events())

Requests (data plane asks, control plane answers):

  kind == "authenticate"   once per client connection, after the client sent its password
    payload = {"session_id": int, "user": str, "database": str, "password": str,
               "peer": "ip:port", "tls": bool, "application_name": str}
    answer  = {"ok": True, "subject": str, "groups": [str, ...],
               "identity_class": str,            # decision-cache key: roles + target
               "db_role": str | None,            # upstream role: SET ROLE after the gateway's login
               "expires_at": float | None,       # unix seconds the credential stops being valid
               "close_on_expiry": bool}          # true: next statement after expires_at gets
                                                 # FATAL 28P01 and the session closes
           or {"ok": False, "sqlstate": "28P01" | "28000", "message": str}
                                                 # sent as FATAL, then the socket closes

  kind == "decide"         per statement text that is not in the decision cache
    payload = {"session_id": int, "identity_class": str, "subject": str, "sql": str,
               "statement_name": str | None,     # None for simple Query; "" = unnamed Parse
               "protocol": "simple" | "extended"}
    answer  = {"action": "allow" | "deny",
               "sqlstate": str, "message": str, "hint": str | None,   # deny only
               "cache": "none" | "exact" | "normalized",
                  # exact: reuse for the same identity_class + identical text;
                  # normalized: also for texts equal after literal normalization
                  # (only when the decision cannot depend on literal values)
               "normalized": str | None}         # PHI-free form of the statement for events

  Decisions attach to the statement (Parse) and are enforced at Bind/Execute: a statement or
  portal judged under an older epoch (before reload/bump_epoch) is judged again before it runs.

  If a request is not answered within the configured timeout the data plane fails
  closed (auth: FATAL 08006 and close; decide: ErrorResponse 58000, statement not run)
  and reply() returns False.

Events (JSON lines, one object per line, produced in Rust, batched):
  {"ts": float, "event": "session_start", "session_id", "subject", "groups", "peer",
   "target", "application_name", "tls": bool}
  {"ts", "event": "session_end", "session_id", "duration_ms", "bytes_in", "bytes_out",
   "statements": int, "reason": str}
  {"ts", "event": "statement", "session_id", "decision": "allow"|"deny", "cached": bool,
   "protocol": "simple"|"extended", "normalized": str|None}
  {"ts", "event": "result", "session_id", "rows": int, "bytes": int, "duration_ms": float,
   "error": sqlstate|None}   # one per request cycle (Query or Sync)
  {"ts", "event": "auth_failure", "session_id", "peer", "sqlstate", "user"}
  {"ts", "event": "protocol_violation", "session_id", "peer", "detail"}
"""

from typing import Any

__version__: str

class Request:
    """One question from the data plane. Answer it exactly once with reply()."""

    id: int
    kind: str
    payload: dict[str, Any]

    def reply(self, answer: dict[str, Any]) -> bool:
        """Send the answer. Returns False if the data plane already gave up
        (timeout, client gone). Raises ValueError for a malformed answer, and
        the data plane then fails closed for that request."""

class Engine:
    def __init__(self, config_json: str) -> None:
        """Validate the data-plane config (see phigate.config for the schema)
        and build the engine without binding anything. Raises ValueError naming
        the bad key."""

    def start(self) -> None:
        """Bind the listeners and start the worker threads. Raises OSError if a
        listen address cannot be bound."""

    def listen_addresses(self) -> list[str]:
        """The bound addresses as "ip:port" (port 0 in the config picks a free port)."""

    def wakeup_fd(self) -> int:
        """A file descriptor that becomes readable when requests are pending
        (or when the event backlog is large). take_requests() clears it."""

    def take_requests(self) -> list[Request]:
        """All pending requests, oldest first. Never blocks."""

    def take_events(self) -> bytes:
        """All pending events as JSON lines (b"" if none). Never blocks."""

    def set_masking(self, state_json: str) -> None:
        """Layer-2 masking state (phigate.masking.layer2); ValueError if it does not validate."""

    def reconfigure(self, config_json: str) -> int:
        """Apply a new config to new sessions (listen addresses are not changed)
        and bump the decision-cache epoch. Returns the new epoch."""

    def bump_epoch(self) -> int:
        """Invalidate every cached decision; returns the new epoch."""

    def stats(self) -> dict[str, int]:
        """Counters: sessions_active, sessions_total, cache_hits, cache_misses,
        cache_entries, requests_pending, requests_timed_out, bytes_in, bytes_out,
        protocol_violations, auth_failures, cancels_forwarded, epoch."""

    def shutdown(self, grace_seconds: float) -> None:
        """Stop accepting connections, let sessions finish for up to grace_seconds,
        then close the rest (clients get FATAL 57P01) and stop the worker threads.
        Blocks (without holding the GIL) until done."""
