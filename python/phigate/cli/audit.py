"""`phigate audit`: keys, verification, proofs, search and session stories over the audit trail's
files (never talking to the gateway)."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from phigate.cli import audit_disclosures
from phigate.cli.common import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from phigate.errors import PhigateError

EXIT_FAILED = EXIT_ERROR  # verification failed: the trail is not what was written


class _Usage(PhigateError):
    """A usage or configuration problem (exit code 2)."""


def add_parsers(sub: Any) -> None:
    audit = sub.add_parser(
        "audit", help="the signed audit trail: keys, verify, proofs, search",
        description="Work with the audit trail's files: make keys, verify the trail, prove "
        "records to third parties, search and read sessions. Exit codes: 0 ok, 1 verification "
        "failed, 2 usage or configuration error.",
    ).add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")  # fmt: skip

    kg = audit.add_parser("keygen", help="make the signing key, its public key and the HMAC key")
    kg.add_argument("--out", required=True, type=Path, metavar="DIR")
    kg.add_argument("--name", metavar="ORIGIN",
                    help="key name = the trail's origin (default phigate/<hostname>)")  # fmt: skip
    kg.set_defaults(run=_keygen)

    v = audit.add_parser("verify", help="check the trail's chain, tree, signatures and tail")
    _trail_args(v, several=True)
    v.add_argument("--pubkey", action="append", type=Path, default=[], metavar="FILE",
                   help="a trusted public key (audit.pub); repeat for several gateways or "
                   "an older key; a trail is checked with keys named like its origin")  # fmt: skip
    v.add_argument("--checkpoint", action="append", type=Path, default=[], metavar="FILE",
                   help="a checkpoint kept elsewhere (WORM copy, witness); repeatable")  # fmt: skip
    v.add_argument(
        "--checkpoint-interval",
        type=float,
        metavar="SECONDS",
        help="the gateway's checkpoint_interval (default 1, or from --config)",
    )
    v.set_defaults(run=_verify)

    p = audit.add_parser("prove", help="inclusion proof of one record, as JSON")
    _trail_args(p, several=False)
    p.add_argument("--seq", required=True, type=int, metavar="N", help="the record's seq")
    p.add_argument(
        "--checkpoint",
        type=Path,
        metavar="FILE",
        help="prove against this checkpoint note (default: the trail's latest)",
    )
    p.set_defaults(run=_prove)

    c = audit.add_parser("consistency", help="consistency proof between two checkpoints, as JSON")
    _trail_args(c, several=False)
    c.add_argument("old", type=Path, metavar="OLD", help="the older checkpoint note file")
    c.add_argument("new", type=Path, metavar="NEW", help="the newer checkpoint note file")
    c.set_defaults(run=_consistency)

    s = audit.add_parser("search", help="find records (uses a rebuildable index)")
    _trail_args(s, several=True)
    _index_args(s)
    s.add_argument("--from", dest="since", metavar="TIME", help="from this time (RFC 3339 or date)")
    s.add_argument(
        "--to",
        dest="until",
        metavar="TIME",
        help="before this time (a date alone: through the end of that day)",
    )
    filters = (
        ("subject", "the agent (session subject)"), ("session", "session id"),
        ("relation", "table, schema.table or table alone"), ("decision", "allow, deny, ..."),
        ("rule", "the rule that decided"), ("sqlstate", "error code"),
        ("event", "record type, e.g. statement"),
    )  # fmt: skip
    for name, what in filters:
        s.add_argument(f"--{name}", metavar=name.upper(), help=what)
    s.add_argument("--json", action="store_true", help="one JSON object per record")
    s.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (0: all)")
    s.set_defaults(run=_search)

    sh = audit.add_parser("show", help="one session's story in order")
    _trail_args(sh, several=True)
    _index_args(sh)
    sh.add_argument("session", metavar="SESSION")
    sh.set_defaults(run=_show)

    h = audit.add_parser("hash", help="the keyed hash a record holds for VALUE")
    h.add_argument("value", metavar="VALUE")
    h.add_argument(
        "--hmac-key",
        required=True,
        metavar="FILE",
        help="the audit HMAC key file (or credential:NAME)",
    )
    h.set_defaults(run=_hash)
    audit_disclosures.add_parsers(audit)


def _trail_args(ap: argparse.ArgumentParser, *, several: bool) -> None:
    ap.add_argument("--log", action="append" if several else "store", type=Path, metavar="DIR",
                    help="the trail directory" + (" (repeatable)" if several else ""))  # fmt: skip
    ap.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="take the trail directory (and for verify the keys) from [audit]",
    )


def _index_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--index",
        type=Path,
        metavar="FILE",
        help="the index file (default DIR/index.sqlite3); one --log only",
    )
    ap.add_argument("--reindex", action="store_true", help="rebuild the index from scratch")


def _guard(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map the failure kinds to exit codes: usage/config 2, anything else the caller's."""

    def wrapped(args: argparse.Namespace) -> int:
        from phigate.audit.keys import AuditKeyError
        from phigate.audit.note import NoteError
        from phigate.errors import ConfigError

        try:
            return run(args)
        except BrokenPipeError:  # `... | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        except (_Usage, AuditKeyError, NoteError, ConfigError) as exc:
            print(f"phigate audit: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as exc:
            where = f" {exc.filename}:" if exc.filename else ""
            print(f"phigate audit:{where} {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE

    wrapped.__doc__ = run.__doc__
    return wrapped


def _trail_dirs(args: argparse.Namespace) -> list[Path]:
    logs = args.log if isinstance(args.log, list) else [args.log] if args.log else []
    if args.config is not None:
        logs.append(_config(args).dir)
    if not logs:
        raise _Usage("give the trail directory with --log DIR (or --config FILE)")
    for d in logs:
        if not d.is_dir():
            raise _Usage(f"{d} is not a directory (--log takes the trail's directory)")
    return list(logs)


def _config(args: argparse.Namespace) -> Any:
    from phigate.config import load_config

    config = load_config(args.config)
    if config.audit is None:
        raise _Usage(f"{args.config} has no [audit] section")
    return config.audit


@_guard
def _keygen(args: argparse.Namespace) -> int:
    from phigate.audit.keys import write_keys

    name = args.name or f"phigate/{socket.gethostname()}"
    key, pub, hmac_file = write_keys(args.out, name)
    print(f"signing key (keep secret; [audit] signing_key): {key}")
    print(f"public key (give to auditors; `phigate audit verify --pubkey`): {pub}")
    print(f"HMAC key (keep secret; [audit] hmac_key): {hmac_file}")
    return EXIT_OK


@_guard
def _verify(args: argparse.Namespace) -> int:
    from phigate.audit.keys import VerifierKey, parse_signer, parse_verifier
    from phigate.audit.verify import ExternalCheckpoint, VerifyFailure, trail_origin, verify_trail

    dirs = _trail_dirs(args)
    keys = [parse_verifier(p.read_text()) for p in args.pubkey]
    interval = args.checkpoint_interval
    if args.config is not None:
        audit = _config(args)
        for secret in (audit.signing_key, audit.previous_signing_key):
            if secret is not None:
                keys.append(parse_signer(secret.reveal().decode()).verifier)
        interval = interval if interval is not None else audit.checkpoint_interval
    if not keys:
        raise _Usage("give the trail's public key with --pubkey FILE (audit.pub)")
    externals = [ExternalCheckpoint(str(p), p.read_text()) for p in args.checkpoint]
    started, records, checkpoints = time.perf_counter(), 0, 0
    for d in dirs:
        origin = trail_origin(d)
        if origin is None:
            raise _Usage(f"{d} holds no audit trail (no segment or checkpoint file)")
        own: list[VerifierKey] = [k for k in keys if k.name == origin]
        if not own:
            if len(dirs) > 1:
                raise _Usage(f"no --pubkey is named {origin!r} (the origin of {d})")
            own = keys  # one trail: its key may carry another name than the origin
        mine = [e for e in externals if _origin_of(e.text) == origin]
        try:
            r = verify_trail(d, origin, own, mine, interval if interval is not None else 1.0)
        except VerifyFailure as exc:
            print(f"FAILED {d}: {exc}")
            return EXIT_FAILED
        records, checkpoints = records + r.records, checkpoints + r.checkpoints
        print(f"{d} ({origin}): {r.records} records in {r.segments} segments, "
              f"{r.checkpoints} checkpoints, {r.rotations} key rotations, "
              f"{r.external} checkpoint files match: OK")  # fmt: skip
        for note in r.notes:
            print(f"  note: {note}")
        if r.unsigned_tail:
            print(f"  note: the last {r.unsigned_tail} records are not signed by a checkpoint yet")
    unmatched = [
        e.label for e in externals if _origin_of(e.text) not in {trail_origin(d) for d in dirs}
    ]
    if unmatched:
        raise _Usage(f"checkpoint {unmatched[0]} belongs to none of the trails given")
    took = time.perf_counter() - started
    print(f"verified {len(dirs)} trail(s) ({len(dirs)} trees): {records} records, {checkpoints} "
          f"checkpoints in {took:.1f} s ({records / max(took, 1e-9):,.0f} records/s)")  # fmt: skip
    return EXIT_OK


def _origin_of(note_text: str) -> str | None:
    from phigate.audit.note import NoteError, parse_checkpoint, parse_note

    try:
        return parse_checkpoint(parse_note(note_text).body).origin
    except NoteError:
        return None


def _one_trail(args: argparse.Namespace) -> Path:
    dirs = _trail_dirs(args)
    if len(dirs) != 1:
        raise _Usage("give one trail (--log DIR or --config FILE), not both")
    return dirs[0]


def _print_proof(make: Callable[[], dict[str, Any]]) -> int:
    from phigate.audit.proofs import ProofError, ProofMismatch

    try:
        proof = make()
    except ProofError as exc:
        raise _Usage(str(exc)) from None
    except ProofMismatch as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(proof, indent=2, ensure_ascii=False))
    return EXIT_OK


@_guard
def _prove(args: argparse.Namespace) -> int:
    from phigate.audit.proofs import inclusion_proof

    trail = _one_trail(args)
    note = args.checkpoint.read_text() if args.checkpoint else None
    if args.seq < 0:
        raise _Usage("--seq is a record's number (0 or more)")
    return _print_proof(lambda: inclusion_proof(trail, args.seq, note))


@_guard
def _consistency(args: argparse.Namespace) -> int:
    from phigate.audit.proofs import consistency_proof

    trail = _one_trail(args)
    old, new = args.old.read_text(), args.new.read_text()
    return _print_proof(lambda: consistency_proof(trail, old, new))


def _ts(text: str, *, end: bool) -> str:
    """A user's time as the trail writes them; a date alone is its day's start (or, for --to,
    the next day's start, so --to includes that day)."""
    try:
        if len(text) == 10:
            day = datetime.fromisoformat(text).replace(tzinfo=UTC)
            moment = day + timedelta(days=1) if end else day
        else:
            moment = datetime.fromisoformat(text)
            moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    except ValueError:
        raise _Usage(f"{text!r} is not a time like 2026-12-06 or 2026-12-06T15:30:00Z") from None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _open_indexes(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from phigate.audit.index import Index
    from phigate.audit.verify import trail_origin

    dirs = _trail_dirs(args)
    if args.index is not None and len(dirs) > 1:
        raise _Usage("--index names one trail's index; with several --log use their own")
    out = []
    for d in dirs:
        idx = Index(d, args.index)
        idx.update(rebuild=args.reindex)
        out.append((trail_origin(d) or str(d), idx))
    return out


@_guard
def _search(args: argparse.Namespace) -> int:
    from phigate.audit.index import Query
    from phigate.audit.report import table

    limit = None if args.limit == 0 else args.limit + 1  # one more: to say "there is more"
    q = Query(
        since=_ts(args.since, end=False) if args.since else None,
        until=_ts(args.until, end=True) if args.until else None,
        subject=args.subject, session=args.session, relation=args.relation,
        decision=args.decision, rule=args.rule, sqlstate=args.sqlstate, event=args.event,
        limit=limit,
    )  # fmt: skip
    hits: list[tuple[str, Any]] = []
    for origin, idx in _open_indexes(args):
        hits.extend((origin, h) for h in idx.search(q))
        idx.close()
    hits.sort(key=lambda oh: (str(oh[1].rec.get("ts", "")), oh[0], oh[1].seq))
    more = limit is not None and len(hits) > args.limit
    hits = hits[: args.limit] if limit is not None else hits
    if not hits:
        print("no records match", file=sys.stderr)
    elif args.json:
        for origin, h in hits:
            print(json.dumps({"origin": origin, "seq": h.seq, "rec": h.rec}, ensure_ascii=False))
    else:
        print(table(hits, show_origin=len({o for o, _ in hits}) > 1))
    if more:
        print(f"(first {args.limit} shown; use --limit N, or --limit 0 for all)", file=sys.stderr)
    return EXIT_OK


@_guard
def _show(args: argparse.Namespace) -> int:
    from phigate.audit.index import Query
    from phigate.audit.report import session_story

    stories = []
    for origin, idx in _open_indexes(args):
        hits = list(idx.search(Query(session=args.session)))
        idx.close()
        if hits:
            stories.append(session_story(args.session, origin, hits))
    if not stories:
        print(f"no records of session {args.session}", file=sys.stderr)
        return EXIT_ERROR
    print("\n\n".join(stories))
    return EXIT_OK


@_guard
def _hash(args: argparse.Namespace) -> int:
    from phigate.audit.keys import parse_hmac_key, resolve_credential

    key = parse_hmac_key(resolve_credential(args.hmac_key, Path.cwd()).read_text())
    digest = hmac.new(key, args.value.encode(), hashlib.sha256).hexdigest()
    print("h:" + digest[:32])
    return EXIT_OK
