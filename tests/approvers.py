"""An approver for the wire tests: talks to a running gateway's admin HTTPS API with a bearer
token (the way a console or a chat bot would), and the config that makes a gateway hold."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# Groups of the tests' identities: agents whose writes and bulk reads wait for a person, and
# the people who decide.
HELD_GROUP = "held-agents"
APPROVER_GROUP = "dba-oncall"
SECOND_APPROVER_GROUP = "privacy-office"


def approvals_config(tmp: Path, cert: Any, *, store: str | None = None,
                     role: dict[str, Any] | None = None,
                     approvers: dict[str, Any] | None = None,
                     **approvals: Any) -> dict[str, Any]:  # fmt: skip
    """gateway_factory overrides: a `held` role (writes and bulk reads of PHI need approval),
    its group, the [approvals] section with an HTTPS admin API on a free port, and approvers."""
    held: dict[str, Any] = {
        "relations": ["public.*"],
        "operations": ["select", "insert", "update", "delete", "copy_to"],
        "allow": ["prepare", "explain"],
        "approval": ["write"],
        "approval_bulk_reads": True,
        "bulk_read_relations": ["public.encounters"],
        "approval_timeout": "2m",
    }
    held.update(role or {})
    return {
        "groups": {HELD_GROUP: ["held"]},
        "roles": {"held": held},
        "approvals": {
            "store": store or str(tmp / "approvals.db"),
            "public_url": "https://gateway.example.org:8443",
            "api": {"listen": "127.0.0.1:0", "cert": str(cert.cert), "key": str(cert.key)},
            **approvals,
        },
        "approvers": approvers if approvers is not None else {
            "oncall": {"groups": [APPROVER_GROUP], "roles": ["held"]},
        },
    }  # fmt: skip


class Approver:
    """One approver identity on one gateway's admin API."""

    def __init__(self, gateway: Any, token: str) -> None:
        admin = gateway.thread.gateway.admin
        assert admin is not None and admin.api_address is not None, "no admin API listening"
        host, port = admin.api_address
        self.base = f"https://localhost:{port}"
        self.token = token
        self.ctx = ssl.create_default_context(cafile=str(gateway.ca_file))

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)  # noqa: S310
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=10) as resp:  # noqa: S310
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def pending(self) -> list[dict[str, Any]]:
        status, body = self.call("GET", "/v1/approvals?status=pending")
        assert status == 200, body
        return list(body["approvals"])

    def wait_pending(self, n: int = 1, timeout: float = 20.0) -> list[dict[str, Any]]:
        """The pending requests once there are at least ``n`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.pending()
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} pending approval requests, found {found}")
            time.sleep(0.05)

    def show(self, rid: str) -> dict[str, Any]:
        status, body = self.call("GET", f"/v1/approvals/{rid}")
        assert status == 200, body
        return dict(body)

    def wait_status(self, rid: str, status: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            view = self.show(rid)
            if view["status"] == status:
                return view
            if time.monotonic() > deadline:
                raise AssertionError(f"request stayed {view['status']!r}, expected {status!r}")
            time.sleep(0.05)

    def approve(self, rid: str, reason: str = "checked with the ward",
                **scope: Any) -> tuple[int, Any]:  # fmt: skip
        body: dict[str, Any] = {"reason": reason}
        if scope:
            body["scope"] = scope
        return self.call("POST", f"/v1/approvals/{rid}/approve", body)

    def deny(self, rid: str, reason: str = "not during the audit") -> tuple[int, Any]:
        return self.call("POST", f"/v1/approvals/{rid}/deny", {"reason": reason})
