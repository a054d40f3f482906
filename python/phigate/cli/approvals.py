"""`phigate approvals list|show|approve|deny`: approvers' commands, talking to the running gateway
over its local admin socket (peer credentials) or its HTTPS admin API (a bearer token)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from phigate.approvals.model import STATUSES
from phigate.cli.common import EXIT_ERROR, EXIT_OK, EXIT_USAGE

EXIT_REFUSED = EXIT_ERROR  # the gateway answered no (not an approver, no such request, decided)
EXIT_UNREACHABLE = 3  # no answer from the gateway at all
DEFAULT_SOCKET = "/run/phigate/admin.sock"
SOCKET_ENV = "PHIGATE_ADMIN_SOCKET"
_TIMEOUT = 30.0
_MAX_TOKEN_FILE = 64 * 1024


class _Usage(Exception):
    """A usage problem found before talking to the gateway (exit code 2)."""


class _Unreachable(Exception):
    """The gateway could not be reached (exit code 3)."""


class _Answer(Exception):
    """The gateway refused: HTTP status and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def add_parsers(sub: Any) -> None:
    group = sub.add_parser(
        "approvals", help="approve or deny statements held for a person's decision",
        description="List, show, approve and deny approval requests on a running gateway. "
        "Connects to the local admin socket (your unix user must be one of its "
        "local_approvers, or give --token-file) or with --url to the HTTPS admin API with an "
        "approver's token. Exit codes: 0 ok, 1 refused by the gateway, 2 usage error, "
        "3 cannot reach the gateway.",
    ).add_subparsers(dest="approvals_command", required=True, metavar="SUBCOMMAND")  # fmt: skip

    ls = group.add_parser("list", help="requests waiting for a decision (or --status ...)")
    _connection_args(ls)
    ls.add_argument("--status", default="pending", choices=STATUSES)
    ls.set_defaults(run=_list)

    show = group.add_parser("show", help="one request: who, why, the statement with its values")
    _connection_args(show)
    show.add_argument("id", metavar="ID")
    show.set_defaults(run=_show)

    approve = group.add_parser("approve", help="approve a request (one vote toward its quorum)")
    _connection_args(approve)
    approve.add_argument("id", metavar="ID")
    approve.add_argument("--reason", default="", help="why (kept in the audit trail as a hash)")
    approve.add_argument("--scope", choices=("session", "any"), default="session",
                         help="this session only (default) or any session of the identity")
    approve.add_argument("--any-parameters", action="store_true",
                         help="the statement's shape with any values, not only these values")
    approve.add_argument("--executions", type=_executions, default=1, metavar="N",
                         help="how many executions the approval allows (default 1; 0: "
                         "unlimited until --valid-for ends)")
    approve.add_argument("--valid-for", metavar="DURATION",
                         help="how long the approval stays usable, e.g. 15m, 1h")
    approve.set_defaults(run=_approve)  # fmt: skip

    deny = group.add_parser("deny", help="deny a request (the agent gets the reason)")
    _connection_args(deny)
    deny.add_argument("id", metavar="ID")
    deny.add_argument("--reason", default="", help="why; the agent's error message shows it")
    deny.set_defaults(run=_deny)


def _executions(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of executions (0 or more)")
    return value


def _connection_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, metavar="PATH",
                       help=f"the gateway's admin socket (default ${SOCKET_ENV} or "
                       f"{DEFAULT_SOCKET})")
    where.add_argument("--url", metavar="URL",
                       help="the HTTPS admin API, e.g. https://gw.example.org:8443")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="a file holding an approver's OIDC access token or API key (required "
                   "with --url; optional on the socket)")
    p.add_argument("--cacert", type=Path, metavar="FILE",
                   help="trust this CA for --url (default: the system's trusted CAs)")
    p.add_argument("--json", action="store_true", help="print the gateway's JSON answer")


# -- talking to the gateway -------------------------------------------------------------------


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return None
    try:
        raw = args.token_file.read_bytes()[: _MAX_TOKEN_FILE + 1]
    except OSError as exc:
        raise _Usage(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
    token = str(raw.decode("utf-8", "replace")).strip()
    if not token or len(raw) > _MAX_TOKEN_FILE or any(c.isspace() for c in token):
        raise _Usage(f"--token-file {args.token_file} must hold one token or API key")
    return token


async def _call(args: argparse.Namespace, method: str, path: str,
                body: Mapping[str, Any] | None = None) -> Any:  # fmt: skip
    import aiohttp  # lazily: the other commands do not need it

    token = _token(args)
    headers = {"Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    connector: aiohttp.BaseConnector
    if args.url is not None:
        if token is None:
            raise _Usage("--url needs --token-file (an approver's token or API key)")
        if not args.url.startswith("https://"):
            raise _Usage("--url must be https:// (tokens never travel in clear text)")
        ctx = ssl.create_default_context(cafile=str(args.cacert) if args.cacert else None)
        connector = aiohttp.TCPConnector(ssl=ctx)
        base = args.url.rstrip("/")
        where = base
    else:
        sock = args.socket or Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)
        connector = aiohttp.UnixConnector(path=str(sock))
        base, where = "http://phigate", str(sock)
    timeout = aiohttp.ClientTimeout(total=_TIMEOUT)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
                session.request(method, base + path, json=body, headers=headers) as response:
            text = await response.text()
            status = response.status
    except aiohttp.ClientSSLError as exc:
        raise _Unreachable(f"TLS with {where} failed: {exc} (give the gateway's CA with "
                           "--cacert)") from None  # fmt: skip
    except aiohttp.InvalidURL:
        raise _Usage(f"--url {args.url!r} is not a URL like https://gw.example.org:8443") from None
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.strerror:
            why = exc.os_error.strerror
        raise _Unreachable(f"cannot reach the gateway at {where}: {why}") from None
    try:
        answer = json.loads(text) if text else None
    except ValueError:
        answer = None
    if status >= 400:
        message = (answer.get("error", {}).get("message") if isinstance(answer, dict)
                   else None) or f"HTTP {status}"  # fmt: skip
        raise _Answer(status, message)
    if answer is None:
        raise _Unreachable(f"{where} did not answer with JSON (is it a phigate admin endpoint?)")
    return answer


def _run(args: argparse.Namespace, method: str, path: str,
         body: Mapping[str, Any] | None = None) -> tuple[int, Any]:  # fmt: skip
    """Call the gateway; on failure print why and give the exit code (answer None)."""
    try:
        return EXIT_OK, asyncio.run(_call(args, method, path, body))
    except _Usage as exc:
        print(f"phigate approvals: {exc}", file=sys.stderr)
        return EXIT_USAGE, None
    except _Unreachable as exc:
        print(f"phigate approvals: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE, None
    except _Answer as exc:
        print(f"phigate approvals: {exc.message} (HTTP {exc.status})", file=sys.stderr)
        if exc.status == 400:
            return EXIT_USAGE, None
        return (EXIT_UNREACHABLE if exc.status >= 500 else EXIT_REFUSED), None


def _id_path(rid: str, suffix: str = "") -> str:
    from urllib.parse import quote

    return f"/v1/approvals/{quote(rid, safe='')}{suffix}"


# -- commands -----------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    code, answer = _run(args, "GET", f"/v1/approvals?status={args.status}")
    if answer is None:
        return code
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
        return EXIT_OK
    views = answer.get("approvals", [])
    if not views:
        print(f"no {args.status.replace('_', ' ')} approval requests", file=sys.stderr)
        return EXIT_OK
    print(_table(views))
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    code, answer = _run(args, "GET", _id_path(args.id))
    if answer is None:
        return code
    print(json.dumps(answer, indent=2, ensure_ascii=False) if args.json else _details(answer))
    return EXIT_OK


def _approve(args: argparse.Namespace) -> int:
    scope: dict[str, Any] = {
        "session": "this" if args.scope == "session" else "any",
        "shape_only": bool(args.any_parameters),
        "executions": None if args.executions == 0 else args.executions,
    }
    if args.valid_for is not None:
        scope["valid_for"] = args.valid_for
    if scope["executions"] is None and args.valid_for is None:
        print("phigate approvals: --executions 0 (unlimited) needs --valid-for, e.g. 1h",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    return _vote(args, "approve", {"reason": args.reason, "scope": scope})


def _deny(args: argparse.Namespace) -> int:
    return _vote(args, "deny", {"reason": args.reason})


def _vote(args: argparse.Namespace, verdict: str, body: dict[str, Any]) -> int:
    code, answer = _run(args, "POST", _id_path(args.id, f"/{verdict}"), body)
    if answer is None:
        return code
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
        return EXIT_OK
    request = answer.get("request") if isinstance(answer.get("request"), dict) else answer
    status = request.get("status", "recorded")
    done = "approved" if verdict == "approve" else "denied"
    print(f"{args.id}: your vote ({done}) was recorded; the request is now {status}")
    needed = request.get("needed")
    if needed and status == "pending":
        print(f"still needed: {_text(needed)}")
    return EXIT_OK


# -- rendering ---------------------------------------------------------------------------------


def _when(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return "-" if value is None else str(value)


def _left(value: Any) -> str:
    """Time until a deadline, e.g. 14m; '-' when not known."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return str(value)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    seconds = int(value - time.time())
    if seconds <= 0:
        return "due"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds < 3600 else f"{seconds // 3600}h"


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return "-" if value is None else str(value)


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(views: list[dict[str, Any]]) -> str:
    header = ("ID", "STATUS", "LEFT", "SUBJECT", "ROLE", "RULE", "TARGET", "STATEMENT")
    rows = [header]
    for v in views:
        rows.append((
            str(v.get("id", "?")), str(v.get("status", "?")), _left(v.get("expires_at")),
            _cut(str(v.get("subject", "-")), 24), _cut(_text(v.get("roles")), 16),
            str(v.get("rule", "-")), str(v.get("target", "-")),
            _cut(str(v.get("normalized") or v.get("sql") or ""), 60),
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
             for r in rows]  # fmt: skip
    return "\n".join(line.rstrip() for line in lines)


_SHOWN = (
    ("id", "request"), ("status", "status"), ("created_at", "held at"),
    ("expires_at", "expires at"), ("subject", "subject"), ("groups", "groups"),
    ("roles", "roles"), ("target", "target"), ("rule", "rule"), ("reason", "why"),
    ("mode", "mode"), ("estimate", "estimated rows"), ("masked_columns", "masked columns"),
)  # fmt: skip


def _details(view: dict[str, Any]) -> str:
    out = []
    width = max(len(label) for _, label in _SHOWN)
    for key, label in _SHOWN:
        if key in view:
            value = view[key]
            text = _when(value) if key.endswith("_at") else _text(value)
            out.append(f"{label.ljust(width)}  {text}")
    out.append("")
    out.append("statement:")
    out.append("  " + str(view.get("sql") or view.get("normalized") or "-"))
    params = view.get("parameters")
    if params:
        out.append("parameters:")
        out.extend(f"  ${i} = {_text(p)}" for i, p in enumerate(params, 1))
    earlier = view.get("earlier")
    if earlier:
        out.append("earlier in the session:")
        out.extend(f"  {_cut(str(s), 200)}" for s in earlier)
    votes = view.get("votes")
    out.append("votes:" if votes else "votes: none yet")
    for vote in votes or []:
        if isinstance(vote, dict):
            who, verdict = vote.get("approver", "?"), vote.get("verdict", "?")
            reason = f": {vote['reason']}" if vote.get("reason") else ""
            out.append(f"  {verdict} by {who}{reason}")
        else:
            out.append(f"  {_text(vote)}")
    if view.get("needed"):
        out.append(f"still needed: {_text(view['needed'])}")
    return "\n".join(out)
