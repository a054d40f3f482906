"""`phigate serve` and `phigate check-config`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from phigate.cli.common import EXIT_OK
from phigate.errors import PhigateError


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", required=True, type=Path, metavar="FILE")
    s.set_defaults(run=_serve)

    c = sub.add_parser("check-config", help="validate a config file without serving")
    c.add_argument("file", type=Path, metavar="FILE")
    c.set_defaults(run=_check_config)


def _serve(args: argparse.Namespace) -> int:
    from phigate.config import load_config
    from phigate.control.server import serve

    # Load before starting the loop so a bad config is a one-line error, not a traceback.
    config = load_config(args.config)
    try:
        serve(args.config, config)
    except ValueError as exc:  # the data plane names the key it refused
        raise PhigateError(f"the data plane refused the config: {exc}") from None
    except RuntimeError as exc:  # _native.AuditError: the trail cannot be opened
        if type(exc).__name__ != "AuditError":
            raise
        raise PhigateError(f"phigate cannot open its audit trail: {exc}") from None
    return EXIT_OK


def _check_config(args: argparse.Namespace) -> int:
    from phigate.config import load_config

    config = load_config(args.file)
    n = len(config.targets)
    listen = ", ".join(config.server.listen)
    print(f"ok: {n} target{'s' if n != 1 else ''}, listening on {listen}")
    return EXIT_OK
