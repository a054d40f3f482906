"""`phigate approvals` end to end against a running admin API: over the admin socket (peer
credentials) and over HTTPS with a token file; tables, --json and exit codes."""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from admin_fake import RunningAdmin, start_admin
from phigate.admin.protocol import Scope

ME = getpass.getuser()


@pytest.fixture
def admin(dev_issuer: Any, dev_cert: Any) -> Iterator[RunningAdmin]:
    with tempfile.TemporaryDirectory(prefix="pgcli", dir="/tmp") as d:
        running = start_admin(Path(d), dev_issuer, dev_cert, local_approvers={ME: ["dba-oncall"]})
        yield running
        running.stop()


def phigate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phigate.cli", "approvals", *args],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())


def token_file(tmp_path: Path, tok: str, name: str = "token") -> str:
    path = tmp_path / name
    path.write_text(tok + "\n")
    path.chmod(0o600)
    return str(path)


def test_list_show_deny_over_the_socket(admin: RunningAdmin) -> None:
    rid = admin.add(sql="UPDATE notes SET body = 'canary-4410' WHERE id = 42",
                    parameters=["p-value"])["id"]  # fmt: skip
    sock = str(admin.socket)
    listed = phigate("list", "--socket", sock)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:4] == ["ID", "STATUS", "LEFT", "SUBJECT"]
    assert row.startswith(rid) and "agent-1" in row and "UPDATE notes SET body" in row

    as_json = phigate("list", "--socket", sock, "--json")
    assert [v["id"] for v in json.loads(as_json.stdout)["approvals"]] == [rid]

    shown = phigate("show", rid, "--socket", sock)
    assert shown.returncode == 0, shown.stderr
    assert "canary-4410" in shown.stdout and "$1 = p-value" in shown.stdout
    assert "votes: none yet" in shown.stdout

    denied = phigate("deny", rid, "--reason", "not now", "--socket", sock)
    assert denied.returncode == 0, denied.stderr
    assert "the request is now denied" in denied.stdout
    assert admin.fake.requests[rid].votes == [{"approver": f"unix:{ME}", "verdict": "deny",
                                               "reason": "not now"}]  # fmt: skip
    again = phigate("deny", rid, "--socket", sock)
    assert again.returncode == 1 and "already denied" in again.stderr
    empty = phigate("list", "--socket", sock)
    assert empty.returncode == 0 and "no pending approval requests" in empty.stderr


def test_approve_over_https_with_a_token_file(
    admin: RunningAdmin, token: Any, tmp_path: Path
) -> None:
    rid = admin.add()["id"]
    tok = token_file(tmp_path, token(sub="alice@example.org", groups=("dba-oncall",)))
    base = ["--url", admin.url, "--token-file", tok, "--cacert", str(admin.ca)]
    done = phigate("approve", rid, "--reason", "change ticket", "--scope", "any",
                   "--any-parameters", "--executions", "0", "--valid-for", "2h", *base)
    assert done.returncode == 0, done.stderr
    assert admin.fake.requests[rid].scopes == [Scope("any", True, None, 7200.0)]
    assert admin.fake.requests[rid].votes[0]["approver"] == "alice@example.org"
    shown = phigate("show", rid, "--json", *base)
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "approved"


def test_refusals_exit_1(admin: RunningAdmin, token: Any, tmp_path: Path) -> None:
    rid = admin.add()["id"]
    agent = token_file(tmp_path, token(sub="agent-1", groups=("clinicians",)))
    refused = phigate("approve", rid, "--url", admin.url, "--token-file", agent,
                      "--cacert", str(admin.ca))  # fmt: skip
    assert refused.returncode == 1
    assert "this identity is not an approver" in refused.stderr and "HTTP 403" in refused.stderr
    missing = phigate("show", "00000000-0000-0000-0000-000000000000", "--socket", str(admin.socket))
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    expired = token_file(tmp_path, token(sub="alice", groups=("dba-oncall",), now=1e9), "old")
    stale = phigate("list", "--url", admin.url, "--token-file", expired, "--cacert",
                    str(admin.ca))  # fmt: skip
    assert stale.returncode == 1 and "HTTP 401" in stale.stderr
    assert admin.fake.requests[rid].status == "pending"


def test_unreachable_gateway_exits_3(admin: RunningAdmin, tmp_path: Path) -> None:
    nothing = phigate("list", "--socket", str(tmp_path / "no.sock"))
    assert nothing.returncode == 3 and "cannot reach the gateway" in nothing.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    tok = token_file(tmp_path, "x")
    closed = phigate("list", "--url", f"https://127.0.0.1:{closed_port}", "--token-file", tok)
    assert closed.returncode == 3 and "cannot reach the gateway" in closed.stderr
    # A gateway whose certificate is not trusted is not talked to.
    untrusted = phigate("list", "--url", admin.url, "--token-file", tok)
    assert untrusted.returncode == 3 and "--cacert" in untrusted.stderr


@pytest.mark.parametrize("args, phrase", [
    (["list", "--url", "https://127.0.0.1:1"], "--url needs --token-file"),
    (["list", "--url", "http://127.0.0.1:1", "--token-file", "{tok}"], "must be https://"),
    (["approve", "x", "--executions", "0", "--socket", "/nonexistent"], "needs --valid-for"),
    (["approve", "x", "--executions", "-1"], "not a number of executions"),
    (["approve", "x", "--scope", "everywhere"], "invalid choice"),
    (["list", "--socket", "/s", "--url", "https://h"], "not allowed with argument"),
    (["list", "--token-file", "/nonexistent/token"], "cannot read --token-file"),
])  # fmt: skip
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], phrase: str) -> None:
    tok = token_file(tmp_path, "x")
    result = phigate(*[a.replace("{tok}", tok) for a in args])
    assert result.returncode == 2, result.stderr
    assert phrase in result.stderr
