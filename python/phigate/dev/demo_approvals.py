"""The demo's approvals: an agent's read of a whole PHI table waits for a person, who approves it
with `phigate approvals` over the demo's admin socket; and the demo check's round trip of it."""

from __future__ import annotations

import concurrent.futures
import getpass
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The token group whose identities approve the demo agents' held statements.
APPROVER_GROUP = "approvers"
#: The demo check's own agent group: masked like "agents", without approval rules, so the
#: check's whole-table reads measure masking and never wait for a person.
CHECK_GROUP = "agents-check"


def demo_approvals(root: Path) -> dict[str, Any]:
    """Config: agents' reads of every row of a PHI table (no WHERE, no LIMIT) need approval;
    the unix user running the demo approves over the admin socket in the work dir."""
    return {
        "approvals": {
            "store": str(root / "approvals.db"),
            "admin_socket": {
                "path": str(admin_socket(root)),
                "mode": "0600",
                "local_approvers": {getpass.getuser(): [APPROVER_GROUP]},
            },
        },
        "approvers": {"demo": {"groups": [APPROVER_GROUP], "roles": ["agent"]}},
        "groups": {CHECK_GROUP: ["agent-check"]},
        "roles": {
            "agent": {"approval_bulk_reads": True, "approval_timeout": "30m"},
            "agent-check": {"relations": ["public.*"], "allow": ["catalog"]},
        },
    }


def admin_socket(root: Path) -> Path:
    return root / "admin.sock"


def approvals_cli(root: Path, *args: str) -> Any:
    """`phigate approvals ARGS --socket … --json` as a user would run it; its JSON answer."""
    argv = [sys.executable, "-m", "phigate.cli", "approvals", *args,
            "--socket", str(admin_socket(root)), "--json"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"phigate approvals {args[0]} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def held_read_round_trip(gateway: Any, token: str, ca: Path, root: Path) -> tuple[int, str, float]:
    """An agent reads every patient id: the read is held; the CLI lists and approves it; the
    rows arrive. Returns (rows, rule that held it, seconds from the approve command's start to
    the rows)."""
    import psycopg

    def read() -> tuple[int, float]:
        with psycopg.connect(
            host="localhost", hostaddr=gateway.host, port=gateway.port, dbname="ehr",
            user="demo-check-agent", password=token, sslmode="verify-full", sslrootcert=str(ca),
            connect_timeout=10, application_name="phigate-demo-check",
        ) as conn:  # fmt: skip
            rows = conn.execute("SELECT id FROM patients").fetchall()
            return len(rows), time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(read)
        deadline = time.monotonic() + 30
        pending: list[dict[str, Any]] = []
        while not pending:
            if future.done():
                future.result()  # raises what went wrong
                raise RuntimeError("the whole-table read was not held for approval")
            if time.monotonic() > deadline:
                raise RuntimeError("no approval request appeared within 30 s")
            pending = approvals_cli(root, "list")["approvals"]
            time.sleep(0.1)
        [request] = pending
        started = time.monotonic()
        approvals_cli(root, "approve", request["id"], "--reason", "demo check")
        rows, arrived = future.result(timeout=30)
    return rows, str(request.get("rule")), arrived - started
