"""`phigate apikey`: create, list and revoke static API keys."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from phigate.cli.common import EXIT_OK, parse_duration, when
from phigate.errors import PhigateError


def add_parsers(sub: Any) -> None:
    ak = sub.add_parser("apikey", help="static API keys (create, list, revoke)").add_subparsers(
        dest="apikey_command", required=True, metavar="SUBCOMMAND"
    )
    create = ak.add_parser("create", help="create a key; it is printed once, never stored")
    create.add_argument("--name", required=True, help="the agent's name (the session's subject)")
    create.add_argument("--groups", required=True, help="comma-separated groups, e.g. G1,G2")
    create.add_argument(
        "--expires", required=True, type=parse_duration, metavar="DURATION",
        help="lifetime, e.g. 90d, 12h",
    )  # fmt: skip
    ls = ak.add_parser("list", help="list keys (never their secrets)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    revoke = ak.add_parser("revoke", help="revoke a key; applies to the next connection")
    revoke.add_argument("ref", metavar="ID|NAME")
    for ap in (create, ls, revoke):
        where = ap.add_mutually_exclusive_group()
        where.add_argument(
            "--store", type=Path, metavar="FILE",
            help="the key store (default: [identity.apikeys] store of --config, else "
            "./phigate-apikeys.json)",
        )  # fmt: skip
        where.add_argument(
            "--config", type=Path, metavar="FILE", help="take the store path from this config"
        )
    for ap in (create, ls, revoke):
        ap.set_defaults(run=_apikey)


def _store_path(args: argparse.Namespace) -> Path:
    from phigate.config import apikeys_store_from_file
    from phigate.identity.apikeys import DEFAULT_STORE

    if args.store is not None:
        return Path(args.store)
    if args.config is not None:
        store = apikeys_store_from_file(args.config)
        if store is None:
            raise PhigateError(
                f"{args.config}: has no [identity.apikeys] section; add one with "
                '`store = "..."` (the gateway only accepts API keys then) or pass --store'
            )
        return store
    return DEFAULT_STORE


def _apikey(args: argparse.Namespace) -> int:
    from phigate.identity.apikeys import ApiKeyStore

    store = ApiKeyStore(_store_path(args))
    if args.apikey_command == "create":
        groups = [g.strip() for g in args.groups.split(",") if g.strip()]
        record, key = store.create(args.name, groups, args.expires)
        # The key alone on stdout (KEY=$(phigate apikey create ...)); the rest on stderr.
        print(
            f"created API key {record.id} for {record.name!r} (groups: {', '.join(record.groups)}; "
            f"expires {when(record.expires)}) in {store.path}",
            file=sys.stderr,
        )
        print(
            "this is the only time the key is shown: hand it to the agent now "
            "(it is its database password)",
            file=sys.stderr,
        )
        print(key)
        return EXIT_OK
    if args.apikey_command == "list":
        keys = store.list()
        now = time.time()
        if args.json:
            out = [_key_summary(k, now) for k in keys]
            print(json.dumps(out, indent=2, ensure_ascii=False))
            return EXIT_OK
        if not keys:
            print(f"no API keys in {store.path}", file=sys.stderr)
            return EXIT_OK
        header = ("ID", "NAME", "GROUPS", "CREATED", "EXPIRES", "LAST USED", "STATE")
        rows = [
            (
                k.id,
                k.name,
                ",".join(k.groups),
                when(k.created),
                when(k.expires),
                when(k.last_used) if k.last_used is not None else "never",
                k.state(now),
            )
            for k in keys
        ]
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
        for r in (header, *rows):
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        return EXIT_OK
    record, changed = store.revoke(args.ref)
    if changed:
        print(f"revoked API key {record.id} ({record.name!r}); new connections with it are refused")
    else:
        print(f"API key {record.id} ({record.name!r}) was already revoked")
    return EXIT_OK


def _key_summary(k: Any, now: float) -> dict[str, Any]:
    return {
        "id": k.id,
        "name": k.name,
        "groups": list(k.groups),
        "created": when(k.created),
        "expires": when(k.expires),
        "last_used": when(k.last_used) if k.last_used is not None else None,
        "state": k.state(now),
    }

