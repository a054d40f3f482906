"""Start and stop the approvers' interfaces: the admin API on its HTTPS listener and on the
local admin socket (one aiohttp app), and the webhook notifier."""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from phigate.admin.api import create_app
from phigate.admin.auth import Verify
from phigate.admin.protocol import ApprovalServiceLike
from phigate.approvals.webhooks import WebhookNotifier
from phigate.config.approvals_admin import AdminSocketConfig, ApiConfig, WebhookConfig
from phigate.errors import PhigateError

__all__ = ["AdminServer", "tls_context"]

log = logging.getLogger(__name__)

_SHUTDOWN_SECONDS = 5.0  # open streams are told to end first; requests in flight get this long


def tls_context(api: ApiConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(api.cert), str(api.key))
    except (ssl.SSLError, OSError) as exc:
        raise PhigateError(f"approvals.api: cannot load cert {api.cert} / key {api.key}: "
                           f"{exc}") from None  # fmt: skip
    return ctx


class AdminServer:
    """The approvers' side of the gateway. ``await start()`` binds the listeners (errors name
    the config key) and starts the webhooks; ``await stop()`` ends streams, closes the
    listeners, removes the socket file and abandons pending webhook deliveries."""

    def __init__(
        self,
        service: ApprovalServiceLike,
        verify: Verify,
        *,
        api: ApiConfig | None = None,
        admin_socket: AdminSocketConfig | None = None,
        webhooks: Sequence[WebhookConfig] = (),
        public_url: str | None = None,
    ) -> None:
        self.service = service
        self.api = api
        self.admin_socket = admin_socket
        local = admin_socket.local_approvers if admin_socket is not None else {}
        self.app = create_app(service, verify, local)
        self.notifier = WebhookNotifier(webhooks, public_url) if webhooks else None
        self._runner: web.AppRunner | None = None
        self._socket_inode: tuple[int, int] | None = None
        self.api_address: tuple[str, int] | None = None  # (host, port) once listening

    async def start(self) -> None:
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=_SHUTDOWN_SECONDS)
        await runner.setup()
        self._runner = runner
        try:
            if self.api is not None:
                sock = _tcp_socket(self.api)
                self.api_address = sock.getsockname()[:2]
                await web.SockSite(runner, sock, ssl_context=tls_context(self.api)).start()
                log.info("approvals admin API listening on https://%s:%d",
                         *self.api_address)  # fmt: skip
            if self.admin_socket is not None:
                usock = _unix_socket(self.admin_socket)
                st = os.stat(self.admin_socket.path)
                self._socket_inode = (st.st_dev, st.st_ino)
                await web.SockSite(runner, usock).start()
                log.info("approvals admin socket at %s (mode %04o)", self.admin_socket.path,
                         self.admin_socket.mode)  # fmt: skip
            if self.notifier is not None:
                await self.notifier.start(self.service.subscribe())
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self.notifier is not None:
            await self.notifier.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.admin_socket is not None and self._socket_inode is not None:
            path = self.admin_socket.path
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == self._socket_inode:  # not a successor's socket
                    path.unlink()
            self._socket_inode = None


def _tcp_socket(api: ApiConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in api.host else socket.AF_INET
    try:
        return socket.create_server((api.host, api.port), family=family, backlog=128)
    except OSError as exc:
        raise PhigateError(f"approvals.api.listen: cannot listen on {api.host}:{api.port}: "
                           f"{exc.strerror}") from None  # fmt: skip


def _unix_socket(cfg: AdminSocketConfig) -> socket.socket:
    """Bind under a temporary name, set mode and group, listen, then rename into place: the
    socket is never reachable with looser permissions than configured."""
    path = cfg.path
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise PhigateError(f"approvals.admin_socket.path: {path} exists and is not a socket")
        if _answers(path):
            raise PhigateError(f"approvals.admin_socket.path: {path} is in use by a running "
                               "gateway; stop it or choose another path")  # fmt: skip
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, cfg.mode)
        if cfg.group is not None:
            try:
                os.chown(tmp, -1, grp.getgrnam(cfg.group).gr_gid)
            except (KeyError, PermissionError) as exc:
                raise PhigateError(f"approvals.admin_socket.group: cannot give {path} to group "
                                   f"{cfg.group!r} ({exc}); the gateway's user must be a member "
                                   "of that group") from None  # fmt: skip
        sock.listen(64)
        os.replace(tmp, path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PhigateError(f"approvals.admin_socket.path: cannot create {path}: "
                           f"{exc.strerror}") from None  # fmt: skip
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    sock.setblocking(False)
    return sock


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True
