"""`phigate cert dev`: a development CA and server certificate."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from phigate.cli.common import EXIT_OK


def add_parsers(sub: Any) -> None:
    cert = sub.add_parser("cert", help="TLS certificates").add_subparsers(
        dest="cert_command", required=True, metavar="SUBCOMMAND"
    )
    dev = cert.add_parser("dev", help="make a development CA and server certificate")
    dev.add_argument("--out", required=True, type=Path, metavar="DIR")
    dev.add_argument("--host", action="append", metavar="NAME", help="DNS name or IP (repeatable)")
    dev.set_defaults(run=_cert_dev)


def _cert_dev(args: argparse.Namespace) -> int:
    from phigate.dev.certs import make_dev_cert

    made = make_dev_cert(args.out, tuple(args.host or ("localhost", "127.0.0.1")))
    print(f"CA certificate (give to clients): {made.ca_cert}")
    print(f"server certificate (server.tls_cert): {made.cert}")
    print(f"server key (server.tls_key): {made.key}")
    return EXIT_OK
