"""The `phigate` command: serve, check-config, token, cert and demo subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

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

    cert = sub.add_parser("cert", help="TLS certificates").add_subparsers(
        dest="cert_command", required=True, metavar="SUBCOMMAND"
    )
    dev = cert.add_parser("dev", help="make a development CA and server certificate")
    dev.add_argument("--out", required=True, type=Path, metavar="DIR")
    dev.add_argument("--host", action="append", metavar="NAME", help="DNS name or IP (repeatable)")

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
        from phigate.server import serve

        # Load before starting the loop so a bad config is a one-line error, not a traceback.
        config = load_config(args.config)
        try:
            serve(args.config, config)
        except ValueError as exc:  # the data plane names the key it refused
            raise PhigateError(f"the data plane refused the config: {exc}") from None
        return EXIT_OK
    if args.command == "token":
        return _token(args)
    if args.command == "cert":
        from phigate.certs import make_dev_cert

        made = make_dev_cert(args.out, tuple(args.host or ("localhost", "127.0.0.1")))
        print(f"CA certificate (give to clients): {made.ca_cert}")
        print(f"server certificate (server.tls_cert): {made.cert}")
        print(f"server key (server.tls_key): {made.key}")
        return EXIT_OK
    raise AssertionError(f"unhandled command {args.command}")


def _demo(argv: list[str]) -> int:
    from phigate.demo import main as demo_main  # lazily: it pulls in PostgreSQL tooling

    return demo_main(argv)


def _check_config(path: Path) -> int:
    from phigate.config import load_config

    config = load_config(path)
    n = len(config.targets)
    listen = ", ".join(config.server.listen)
    print(f"ok: {n} target{'s' if n != 1 else ''}, listening on {listen}")
    return EXIT_OK


def _token(args: argparse.Namespace) -> int:
    from phigate.tokens import DevIssuer

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


if __name__ == "__main__":
    sys.exit(main())
