"""The `phigate` command: serve, check-config, token, apikey, cert, catalog, db and demo."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from phigate import __version__
from phigate.errors import PhigateError

__all__ = ["main", "parse_duration"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'900', '90s', '15m', '2h', '1d' -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 900, 90s, 15m, 2h or 1d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phigate", description="Gateway between AI agents and PostgreSQL."
    )
    p.add_argument("--version", action="version", version=f"phigate {__version__}")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", required=True, type=Path, metavar="FILE")

    c = sub.add_parser("check-config", help="validate a config file without serving")
    c.add_argument("file", type=Path, metavar="FILE")

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

    cert = sub.add_parser("cert", help="TLS certificates").add_subparsers(
        dest="cert_command", required=True, metavar="SUBCOMMAND"
    )
    dev = cert.add_parser("dev", help="make a development CA and server certificate")
    dev.add_argument("--out", required=True, type=Path, metavar="DIR")
    dev.add_argument("--host", action="append", metavar="NAME", help="DNS name or IP (repeatable)")

    cat = sub.add_parser("catalog", help="PHI classification as resolved in the database")
    cat_sub = cat.add_subparsers(dest="catalog_command", required=True, metavar="SUBCOMMAND")
    show = cat_sub.add_parser(
        "show", help="print classified columns and where each rule applies (reads the catalog)"
    )
    show.add_argument("--config", required=True, type=Path, metavar="FILE")
    show.add_argument("--target", metavar="NAME", help="default: every target")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")

    db = sub.add_parser("db", help="phigate's objects in the target databases")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    inst = db_sub.add_parser(
        "install",
        help="create phigate's pseudonym functions and load (or rotate) the pseudonym key; "
        "run as a database administrator",
    )
    inst.add_argument("--config", required=True, type=Path, metavar="FILE")
    inst.add_argument("--target", metavar="NAME", help="default: every target")
    inst.add_argument(
        "--admin-user", metavar="ROLE", default=None,
        help="the role that will own phigate's objects and the key (default $PGUSER, else "
        "postgres); never the gateway's service user",
    )  # fmt: skip
    inst.add_argument(
        "--admin-password-file", type=Path, metavar="FILE",
        help="its password (default $PGPASSWORD, ~/.pgpass, or a prompt on a terminal)",
    )  # fmt: skip
    inst.add_argument(
        "--admin-host", metavar="HOST",
        help="connect here instead of the target's host (e.g. /var/run/postgresql)",
    )  # fmt: skip
    inst.add_argument("--admin-port", type=int, metavar="PORT", help="default: the target's")

    demo = sub.add_parser(
        "demo", help="run a local demo (PostgreSQL, token issuer, gateway)", add_help=False
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["demo"]:
        return _demo(args_list[1:])
    parser = _parser()
    args, extra = parser.parse_known_args(args_list)
    if args.command == "demo":
        # The demo owns its own options; hand it everything after the word "demo".
        return _demo([*args.demo_args, *extra])
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return _run(args)
    except PhigateError as exc:
        print(f"phigate: {exc}", file=sys.stderr)
    except OSError as exc:
        where = f" {exc.filename}:" if exc.filename else ""
        print(f"phigate: error:{where} {exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "serve":
        from phigate.config import load_config
        from phigate.control.server import serve

        # Load before starting the loop so a bad config is a one-line error, not a traceback.
        config = load_config(args.config)
        try:
            serve(args.config, config)
        except ValueError as exc:  # the data plane names the key it refused
            raise PhigateError(f"the data plane refused the config: {exc}") from None
        return EXIT_OK
    if args.command == "token":
        return _token(args)
    if args.command == "apikey":
        return _apikey(args)
    if args.command == "catalog":
        return _catalog_show(args)
    if args.command == "db":
        return _db_install(args)
    if args.command == "cert":
        from phigate.dev.certs import make_dev_cert

        made = make_dev_cert(args.out, tuple(args.host or ("localhost", "127.0.0.1")))
        print(f"CA certificate (give to clients): {made.ca_cert}")
        print(f"server certificate (server.tls_cert): {made.cert}")
        print(f"server key (server.tls_key): {made.key}")
        return EXIT_OK
    raise AssertionError(f"unhandled command {args.command}")


def _demo(argv: list[str]) -> int:
    from phigate.dev.demo import main as demo_main  # lazily: it pulls in PostgreSQL tooling

    return demo_main(argv)


def _check_config(path: Path) -> int:
    from phigate.config import load_config

    config = load_config(path)
    n = len(config.targets)
    listen = ", ".join(config.server.listen)
    print(f"ok: {n} target{'s' if n != 1 else ''}, listening on {listen}")
    return EXIT_OK


def _catalog_show(args: argparse.Namespace) -> int:
    from phigate.config import load_config
    from phigate.masking.classification import load_catalog

    config = load_config(args.config)
    if args.target is not None and args.target not in config.targets:
        known = ", ".join(sorted(config.targets))
        raise PhigateError(f"{args.config}: no target {args.target!r} (targets: {known})")
    names = [args.target] if args.target is not None else sorted(config.targets)
    snapshots = [load_catalog(config, name) for name in names]
    if args.json:
        print(json.dumps([s.to_json() for s in snapshots], indent=2, ensure_ascii=False))
        return EXIT_OK
    if not config.phi.columns:
        print("no columns are classified ([phi.columns] is empty)")
        return EXIT_OK
    for snap in snapshots:
        print(f"target {snap.target}:")
        fns = snap.pseudonym_functions
        if fns is not None:
            print(f"  pseudonym functions: {'ready' if fns.ready else 'NOT READY'}: {fns.summary}")
            for warning in fns.warnings:
                print(f"    warning: {warning}")
        rels = sorted(snap.relations.values(), key=lambda r: (r.schema, r.name))
        origins = ("configured", "partition", "child", "ancestor", "view")
        for origin in origins:
            group = [r for r in rels if r.origin == origin]
            if not group:
                continue
            print(f"  {origin} relations:")
            for r in group:
                name = f"{r.schema}.{r.name}"
                via = ", ".join(
                    f"{snap.relations[o].schema}.{snap.relations[o].name}"
                    for o in r.derived_from
                    if o in snap.relations
                )
                suffix = f" (from {via})" if via else ""
                if r.refuse_reason is not None:
                    print(f"    {name} [oid {r.oid}]{suffix}: REFUSED: {r.refuse_reason}")
                    continue
                print(f"    {name} [oid {r.oid}]{suffix}")
                for c in r.classified_columns():
                    assert c.rule is not None
                    print(
                        f"      {c.name} (attnum {c.attnum}, {c.type_name}): "
                        f"kind {c.rule.kind}, mask {c.rule.mask_spec}"
                    )
    return EXIT_OK


def _db_install(args: argparse.Namespace) -> int:
    import os

    from phigate.config import load_config
    from phigate.masking.db_install import (
        InstallError,
        admin_connect,
        admin_password,
        install_target,
    )

    config = load_config(args.config)
    if args.target is not None and args.target not in config.targets:
        known = ", ".join(sorted(config.targets))
        raise PhigateError(f"{args.config}: no target {args.target!r} (targets: {known})")
    names = [args.target] if args.target is not None else sorted(config.targets)
    user = args.admin_user or os.environ.get("PGUSER") or "postgres"
    password = admin_password(args.admin_password_file)
    failed = 0
    for name in names:
        target = config.targets[name]
        try:
            with admin_connect(
                target, user, password, host=args.admin_host, port=args.admin_port
            ) as conn:
                report = install_target(conn, config, name)
        except InstallError as exc:
            print(f"phigate: {exc}", file=sys.stderr)
            failed += 1
            continue
        key = {
            "loaded": "key loaded; reload a running gateway (SIGHUP) so it checks the install",
            "unchanged": "key unchanged",
            "rotated": "key ROTATED: pseudonyms change now; reload the gateway (SIGHUP)",
        }[report.key]
        print(
            f"target {name} ({target.host}:{target.port}, database {target.database}): "
            f"phigate's pseudonym functions installed, owned by {report.installer}; {key}"
        )
        print(f"  may call them: {', '.join(report.grantees)}")
        for warning in report.warnings:
            print(f"  warning: {warning}")
    return EXIT_ERROR if failed else EXIT_OK


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
            f"expires {_when(record.expires)}) in {store.path}",
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
                _when(k.created),
                _when(k.expires),
                _when(k.last_used) if k.last_used is not None else "never",
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
        "created": _when(k.created),
        "expires": _when(k.expires),
        "last_used": _when(k.last_used) if k.last_used is not None else None,
        "state": k.state(now),
    }


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


if __name__ == "__main__":
    sys.exit(main())
