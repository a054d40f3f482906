"""The approvers' interfaces: the admin HTTP API (HTTPS and the local admin socket), its
server-sent events and OpenAPI description."""

from phigate.admin.api import create_app
from phigate.admin.auth import Caller, make_verify
from phigate.admin.protocol import ApprovalServiceLike, Scope
from phigate.admin.server import AdminServer

__all__ = ["AdminServer", "ApprovalServiceLike", "Caller", "Scope", "create_app", "make_verify"]
