"""`phigate audit disclosures`: the accounting of disclosures of one person from the audit trail
(hook ``add_parsers`` into the `phigate audit` command group)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from phigate.audit.disclosures import find_disclosures, format_table, subject_hash, trail_records
from phigate.audit.keys import AuditKeyError, parse_hmac_key
from phigate.cli.common import EXIT_OK
from phigate.config.roles import fold_name
from phigate.errors import PhigateError

DEFAULT_LOG = Path("/var/lib/phigate/audit")


def _subject(text: str) -> tuple[str, str]:
    relation, sep, value = text.partition("=")
    try:
        parts = fold_name(relation) if sep else ()
    except ValueError:
        parts = ()
    if len(parts) != 2 or not value:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write the person as RELATION=KEY, e.g. public.patients=123"
        )
    return f"{parts[0]}.{parts[1]}", value


def _time(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date or time like 2026-01-31 or 2026-01-31T14:00:00Z"
        ) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def add_parsers(sub: Any) -> None:
    """Registers `disclosures` on the `phigate audit` subcommand parsers ``sub``."""
    p = sub.add_parser(
        "disclosures",
        help="which identities received a person's rows (accounting of disclosures)",
        description="Lists the results that sent the person's rows (relation, identity, "
        "session, statement, columns in clear and masked), then the results that may have: "
        "rows of subject relations sent without their key.",
    )
    p.add_argument("--subject", required=True, type=_subject, metavar="RELATION=KEY",
                   help="the person, by a [phi.subjects] relation and key value, e.g. "
                   "public.patients=123")  # fmt: skip
    p.add_argument("--from", dest="since", type=_time, help="from this time (UTC unless given)")
    p.add_argument("--to", dest="until", type=_time, help="up to this time (UTC unless given)")
    p.add_argument("--log", action="append", type=Path, metavar="DIR",
                   help=f"an audit trail directory (repeatable; default {DEFAULT_LOG})")
    p.add_argument("--hmac-key", required=True, type=Path, metavar="FILE",
                   help="the trail's audit HMAC key file ([audit] hmac_key)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="JSON lines instead of tables")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        key = parse_hmac_key(args.hmac_key.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError, AuditKeyError) as exc:
        raise PhigateError(f"{args.hmac_key}: cannot read the audit HMAC key: {exc}") from None
    relation, value = args.subject
    hashed = subject_hash(key, value)
    certain, possible = find_disclosures(
        trail_records(args.log or [DEFAULT_LOG]), hashed, since=args.since, until=args.until
    )
    out = sys.stdout
    if args.json:
        for d in [*certain, *possible]:
            out.write(json.dumps({"subject": relation, "hash": hashed, **d.to_json()},
                                 sort_keys=True, ensure_ascii=False) + "\n")  # fmt: skip
        return EXIT_OK
    out.write(f"Disclosures of {relation} {hashed}: {len(certain)}\n")
    if certain:
        out.write(format_table(certain, certain=True) + "\n")
    out.write(f"\nPossible disclosures (rows of subject relations sent without their key, "
              f"so possibly this person's): {len(possible)}\n")  # fmt: skip
    if possible:
        out.write(format_table(possible, certain=False) + "\n")
    return EXIT_OK
