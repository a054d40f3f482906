"""Typed stubs for phigate._native, the Rust data plane (see native/src/lib.rs).

The data plane owns every socket and the audit trail's files. The control plane (Python)
builds one Engine, starts it, serves the Engine's *requests*, and appends its own records:

    engine = Engine(config_json)          # JSON from phigate.config.Config.native_json();
                                          # opens the audit trail (AuditError if it cannot)
    engine.start()                        # binds listeners, starts tokio worker threads
    loop.add_reader(engine.wakeup_fd(), on_wakeup)
    def on_wakeup():
        for req in engine.take_requests():   # clears the wakeup fd too
            ...; req.reply({...})            # may be called much later, from any thread
    engine.audit_append(canonical(body))  # reload, catalog, stats, ... (phigate.audit.records)
    ...
    engine.shutdown(grace); engine.audit_close()

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

  kind == "approval"       a statement whose decision carries "approval" is about to run
                           (simple: at its Query; extended: at its Bind, before it goes upstream)
    payload = {"session": str, "stmt": int, "subject": str, "identity_class": str, "target": str,
               "protocol": "simple" | "extended", "sql": str, "statement_name": str | None,
               "parameters": [{"format": 0, "value": str} | {"format": int, "hex": str} | None]
                             | None,            # the Bind's values in clear (None: simple)
               "literal_hashes": [...], "parameter_hashes": [...] | None,   # as the record has them
               "approval": {...},               # the decision's object, verbatim
               "return_mode": bool,             # the connection asked for return mode
               "earlier": [str, ...],           # the session's last 10 statements, 4 KB each
               "peer": "ip:port"}
    answer  = {"action": "run"} | {"action": "deny", "sqlstate", "message", "hint"}
              | {"action": "hold", "request": str, "notice": str, "timeout_ms": int}
              # hold: the client gets NoticeResponse 01A01 (notice) at once; deny 57P01 ends
              # the session (FATAL)

  kind == "await_approval" a held statement waits; answered when a person decides (no timeout
                           on the data plane's side but its own: timeout_ms + 10 s, then 57014)
    payload = {"session": str, "request": str}
    answer  = {"action": "run"} | {"action": "deny", "sqlstate", "message", "hint"}

  kind == "withdraw"       fire and forget (reply() returns False: nobody waits)
    payload = {"session": str, "request": str,
               "reason": "cancel" | "disconnect" | "session_end" | "timeout"}

  If a request is not answered within the configured timeout the data plane fails
  closed (auth: FATAL 08006 and close; decide: ErrorResponse 58000, statement not run)
  and reply() returns False.

Audit trail (docs/audit.md): every record goes through one writer thread in the data plane,
which numbers it (seq), chains it (prev), hashes it into an RFC 9162 Merkle tree, writes it
to `segment-<seq>.jsonl` files in the config's audit.dir with group-commit fsync, and signs
checkpoints with the audit signing key. Bodies are canonical JSON objects (sorted keys, no
whitespace, no floats: a float is written as a string and counted in audit_status()). With
sync = "write" a statement's record is written (handed to the kernel), with sync = "statement"
fsync'd, before the statement goes upstream. When
the trail cannot be written, new statements are refused with SQLSTATE 58030 until it can.

Records the data plane makes (their fields are the record contents' business, see docs):
  {"ts": "RFC 3339 µs Z", "event": "session_start", "session_id", "subject", "groups", "peer",
   "target", "application_name", "tls": bool}
  {"ts", "event": "session_end", "session_id", "duration_ms", "bytes_in", "bytes_out",
   "statements": int, "reason": str}
  {"ts", "event": "statement", "session_id", "decision": "allow"|"deny", "cached": bool,
   "protocol": "simple"|"extended", "normalized": str|None}
  {"ts", "event": "result", "session_id", "rows": int, "bytes": int, "duration_ms": float,
   "error": sqlstate|None}   # one per request cycle (Query or Sync)
  {"ts", "event": "auth_failure", "session_id", "peer", "sqlstate", "user"}
  {"ts", "event": "protocol_violation", "session_id", "peer", "detail"}

Identifier dictionaries (names, streets, towns... that have no shape a pattern could find):

    builder = DictionaryBuilder(stop_words, min_chars=2)
    builder.add("name", first_names)      # values of one PHI kind; None is skipped
    builder.add("address", addresses)
    engine.set_dictionary("ehr", builder) # replaces target ehr's dictionary
    # later, values of new rows only:
    more = engine.dictionary_builder("ehr")
    more.add("name", new_names)
    engine.set_dictionary("ehr", more, extend=True)

  Every text the content detectors scan for a masked identity (unclassified text and JSON
  columns, free_text masks, COPY output, error and notice fields) then has each stored token
  sequence replaced by its kind's tag: [NAME], [ADDRESS], [CITY], [ZIP], [MRN], [EMAIL],
  [PHONE], [SSN], [DOB], other kinds [PHI]. Matching ignores case, accents and punctuation
  between tokens ("Harris, Daniel" matches "daniel harris" only as a sequence; a name's tokens
  also match alone). The dictionaries are the engine's: set_masking() does not reset them.
"""

from collections.abc import Iterable
from typing import Any

__version__: str

class DictionaryBuilder:
    """Identifier values for one target's dictionary. Each value is split into tokens (runs of
    letters and digits), folded (case, accents), hashed under the gateway process's dictionary
    key (drawn at start, shared by every target's dictionary so that scans read them merged),
    and forgotten: no clear value is kept.

    What a value adds: its whole token sequence (up to 15 tokens); for kind "name" also each
    token alone; for all-digit values and kinds "mrn", "ssn", "phone" also the digits run
    together ("984-96-1001" matches "984961001"); for "mrn" also its longest digit run of 4 or
    more. Tokens shorter than min_chars characters or in stop_words never match alone, and a
    value made only of such tokens adds nothing. The tags' words (name, address, ...) are
    always stop words."""

    def __init__(self, stop_words: list[str], min_chars: int = 2) -> None: ...

    def add(self, kind: str, values: Iterable[str | None]) -> int:
        """Add values of one PHI kind ("name", "address", "city", "zip", "mrn", "email",
        "phone", "ssn", "dob"; any other kind is tagged [PHI]). None is skipped; a value that
        is not a str raises TypeError. Returns the entries added (a sequence already present,
        under any kind, keeps its first kind and counts 0). RuntimeError once the builder was
        given to Engine.set_dictionary()."""

    def __len__(self) -> int:
        """Entries so far (0 once given to Engine.set_dictionary())."""

class Request:
    """One question from the data plane. Answer it exactly once with reply()."""

    id: int
    kind: str
    payload: dict[str, Any]

    def reply(self, answer: dict[str, Any]) -> bool:
        """Send the answer. Returns False if the data plane already gave up
        (timeout, client gone). Raises ValueError for a malformed answer, and
        the data plane then fails closed for that request."""

class AuditError(RuntimeError):
    """The audit trail cannot be opened (missing or unwritable dir, a trail signed by another
    key, a damaged trail) or is closed; the message says what to fix."""

class Engine:
    def __init__(self, config_json: str) -> None:
        """Validate the data-plane config (see phigate.config for the schema), open the audit
        trail if the config has an "audit" object (recover a torn tail, restore the tree from
        the last checkpoint, write audit_open) and build the engine without binding anything.
        Raises ValueError naming the bad key, AuditError if the trail cannot be opened."""

    def audit_append(self, body: bytes) -> None:
        """Append a record made by the control plane: a JSON object (UTF-8) with "event" and
        "ts" (phigate.audit.records.canonical/now_ts). The writer makes it canonical. Never
        blocks on the disk: while the trail fails, records are kept in memory (up to
        max_pending_records, then counted as lost). AuditError if the engine has no trail or
        it is closed."""

    def audit_status(self) -> dict[str, Any] | None:
        """The trail's state, None without a trail: {"state": "ok"|"failing"|"closed",
        "reason": "disk_full"|"not_writable"|"dir_missing"|"io_error"|None, "detail": errno
        text|None, "seq": next seq, "checkpoint_size": int, "checkpoint_time": RFC 3339|None
        (of the last checkpoint since start), "pending": records kept while failing, "lost":
        records dropped beyond max_pending_records, "bytes_written": int, "float_values":
        floats written as strings, "bad_records": bodies that were not JSON objects,
        "publish_errors": checkpoint copies that failed, "sync": "batch"|"write"|"statement"}."""

    def audit_close(self) -> None:
        """Close the trail: audit_close record, final checkpoint, fsync; blocks (without the
        GIL) until done. Call after shutdown() and the last audit_append(); later appends
        raise AuditError. A second call does nothing; dropping the engine also closes it."""

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
        """Only for an engine built without an "audit" object (embedding, tests): pending
        events as JSON lines (b"" if none). With a trail, events go to it and this is b""."""

    def set_masking(self, state_json: str) -> None:
        """Layer-2 masking state (phigate.masking.layer2); ValueError if it does not validate."""

    def set_subjects(
        self,
        target: str,
        relations: list[tuple[int, int, str, dict[int, str]]],
        names: list[str],
    ) -> None:
        """Subject relations of ``target`` for the accounting of disclosures: ``relations`` as
        (table OID, key attnum, "schema.table", {attnum: column}) resolved in its catalog,
        ``names`` every relation `[phi.subjects]` names (empty: none). ValueError for an unknown
        target."""

    def reconfigure(self, config_json: str) -> int:
        """Apply a new config to new sessions (listen addresses are not changed)
        and bump the decision-cache epoch. Returns the new epoch."""

    def dictionary_builder(self, target: str) -> DictionaryBuilder:
        """A builder that starts from target's current dictionary: same key, stop words,
        min_chars and entries. KeyError if the target has no dictionary."""

    def set_dictionary(
        self, target: str, builder: DictionaryBuilder, extend: bool = False
    ) -> dict[str, int]:
        """Make builder's entries target's dictionary, for every session's next scan; returns
        {"entries": int, "bytes": int}. extend=False replaces the dictionary; extend=True adds
        the builder's entries to the current one (with no current dictionary it simply becomes
        it). Scans read every target's dictionary merged into one. Takes the builder: it cannot
        be used again. ValueError if target is not a configured target."""

    def drop_dictionary(self, target: str) -> bool:
        """Remove target's dictionary; False if it had none."""

    def text_has_phi(self, text: str) -> bool:
        """True when the content detectors or a dictionary find an identifier in text."""

    def bump_epoch(self) -> int:
        """Invalidate every cached decision; returns the new epoch."""

    def stats(self) -> dict[str, Any]:
        """Counters (int): sessions_active, sessions_total, cache_hits, cache_misses,
        cache_entries, requests_pending, requests_timed_out, bytes_in, bytes_out,
        protocol_violations, auth_failures, cancels_forwarded, statements, rows_masked,
        masking_failures, epoch; and "dictionary": {target: {"entries": int, "bytes": int}}
        for every identifier dictionary (counts only)."""

    def shutdown(self, grace_seconds: float) -> None:
        """Stop accepting connections, let sessions finish for up to grace_seconds,
        then close the rest (clients get FATAL 57P01) and stop the worker threads.
        Blocks (without holding the GIL) until done."""
