"""`phigate db install`: phigate's pseudonym functions and key in each target database."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from phigate.cli.common import EXIT_ERROR, EXIT_OK, target_names


def add_parsers(sub: Any) -> None:
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
    inst.set_defaults(run=_db_install)


def _db_install(args: argparse.Namespace) -> int:
    from phigate.config import load_config
    from phigate.masking.db_install import (
        InstallError,
        admin_connect,
        admin_password,
        install_target,
    )

    config = load_config(args.config)
    names = target_names(config, args.config, args.target)
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
