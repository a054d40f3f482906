"""The `phigate` command: serve, check-config, token, apikey, cert, catalog, db, audit, approvals
and demo.
Each command group lives in its own module and registers its parsers here."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from phigate import __version__
from phigate.cli import apikey, approvals, audit, catalog, cert, db, serve, token
from phigate.cli.common import EXIT_ERROR, parse_duration
from phigate.errors import PhigateError

__all__ = ["main", "parse_duration"]

_GROUPS = (serve, token, apikey, cert, catalog, db, audit, approvals)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phigate", description="Gateway between AI agents and PostgreSQL."
    )
    p.add_argument("--version", action="version", version=f"phigate {__version__}")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.add_parsers(sub)
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
    run = getattr(args, "run", None)
    if run is None:
        raise AssertionError(f"unhandled command {args.command}")
    result: int = run(args)
    return result


def _demo(argv: list[str]) -> int:
    from phigate.dev.demo import main as demo_main  # lazily: it pulls in PostgreSQL tooling

    return demo_main(argv)
