"""`phigate token`: development tokens from a local issuer (never for production)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from phigate.cli.common import EXIT_OK, parse_duration


def add_parsers(sub: Any) -> None:
    t = sub.add_parser("token", help="local development tokens").add_subparsers(
        dest="what", required=True, metavar="SUBCOMMAND"
    )
    mint = t.add_parser("mint", help="mint a token signed by the development issuer")
    mint.add_argument("--sub", required=True, help="the agent's name (token subject)")
    mint.add_argument("--groups", default="", help="comma-separated groups, e.g. G1,G2")
    mint.add_argument("--ttl", type=parse_duration, default=900.0, help="e.g. 15m (default)")
    mint.add_argument("--audience", default="phigate")
    jwks = t.add_parser("jwks", help="print the development issuer's JWKS")
    jwks.add_argument("--path", action="store_true", help="print the file's path instead")
    for tp in (mint, jwks):
        tp.add_argument("--key-dir", type=Path, default=Path("phigate-dev"), metavar="DIR")
    for tp in (mint, jwks):
        tp.set_defaults(run=_token)


def _token(args: argparse.Namespace) -> int:
    from phigate.dev.tokens import DevIssuer

    issuer = DevIssuer(args.key_dir)
    issuer.ensure_keys()
    if args.what == "jwks":
        if args.path:
            print(issuer.jwks_path)
        else:
            print(json.dumps(json.loads(issuer.jwks_path.read_text()), indent=2))
        return EXIT_OK
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    print(issuer.mint(args.sub, groups, ttl_seconds=args.ttl, audience=args.audience))
    return EXIT_OK
