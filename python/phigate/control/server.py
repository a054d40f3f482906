"""Run the control plane: build the Engine (which opens the audit trail), answer its requests,
append the control plane's own records to the trail, handle signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import uvloop

from phigate import __version__
from phigate.admin import AdminServer, make_verify
from phigate.approvals.service import ApprovalService, make_store
from phigate.audit.config_diff import config_diff
from phigate.audit.records import canonical, file_sha256, now_ts
from phigate.config import Config, load_config
from phigate.config.model import native_audit
from phigate.control.allocator import tune_malloc
from phigate.control.dictionaries import DictionaryKeeper
from phigate.control.hangup import block_hangup, watch_hangup
from phigate.control.requests import ControlPlane, PrimableVerifier
from phigate.control.systemd import sd_notify
from phigate.errors import ConfigError, PhigateError
from phigate.identity.apikeys import ApiKeyVerifier
from phigate.identity.oidc import Identity, NoOidcVerifier, OidcVerifier
from phigate.masking.catalog_keeper import CatalogKeeper, Loader
from phigate.masking.classification import CatalogSnapshot, load_catalog
from phigate.masking.layer2 import masking_state_json

__all__ = [
    "ControlPlane",
    "Gateway",
    "run",
    "sd_notify",
    "serve",
]

log = logging.getLogger(__name__)

# How often the API key store is re-read for created, revoked and expired keys to record.
APIKEY_POLL_INTERVAL = 1.0
# Who asked for a reload, when the gateway cannot tell (a SIGHUP that reached asyncio's signal
# handler, which gets no siginfo, instead of the sigwaitinfo watcher; or an in-process reload).
_SIGNAL_SENDER: dict[str, Any] = {"via": "signal", "pid": None, "uid": None}
# How often the data plane's counters (sessions, decision-cache hits/misses, timeouts, bytes)
# are written to the audit trail as a `stats` record, for operators and monitoring.
STATS_INTERVAL = 60.0
NO_AUDIT = (
    "add an [audit] section; `phigate audit keygen --out /etc/phigate` makes its keys; "
    "see docs/audit.md"
)


class EngineLike(Protocol):
    """The subset of phigate._native.Engine the Gateway uses."""

    def start(self) -> None: ...
    def listen_addresses(self) -> list[str]: ...
    def wakeup_fd(self) -> int: ...
    def take_requests(self) -> list[Any]: ...
    def audit_append(self, body: bytes) -> None: ...
    def audit_status(self) -> dict[str, Any] | None: ...
    def audit_close(self) -> None: ...

    def stats(self) -> dict[str, int]: ...
    def reconfigure(self, config_json: str) -> int: ...
    def bump_epoch(self) -> int: ...
    def set_masking(self, state_json: str) -> None: ...
    def set_subjects(
        self, target: str, relations: list[tuple[int, int, str, dict[int, str]]], names: list[str]
    ) -> None: ...
    def set_dictionary(self, target: str, builder: Any, extend: bool = False) -> dict[str, int]: ...
    def dictionary_builder(self, target: str) -> Any: ...
    def drop_dictionary(self, target: str) -> bool: ...
    def shutdown(self, grace_seconds: float) -> None: ...


EngineFactory = Callable[[str], EngineLike]


def _native_engine(config_json: str) -> EngineLike:
    from phigate import _native  # imported late so the control plane is testable without it

    return _native.Engine(config_json)


def _oidc_verifier(config: Config) -> PrimableVerifier:
    oidc = config.identity.oidc
    return OidcVerifier(oidc) if oidc is not None else NoOidcVerifier()


def _apikey_verifier(config: Config, old: ApiKeyVerifier | None) -> ApiKeyVerifier | None:
    """The API key verifier for a (re)loaded config; an unchanged store keeps its verifier (and
    the uses it has not written yet), re-read now."""
    settings = config.identity.apikeys
    if settings is None:
        return None
    if old is not None and old.path == settings.store:
        old.reload(force=True)
        return old
    return ApiKeyVerifier(settings.store)


def _audit_changed(old: Config, new: Config) -> bool:
    """Whether a reload asks for another trail (dir, keys, sync, ...): that needs a restart."""
    def settings(c: Config) -> dict[str, Any] | None:
        return native_audit(c.audit) if c.audit is not None else None

    return settings(old) != settings(new)


def _check_schemas(known: dict[str, str], config: Config) -> None:
    """Refuse a config that changes the schema a target pins: sessions opened before would run
    with the old search_path upstream while their statements were judged with the new one."""
    for name, target in config.targets.items():
        old = known.get(name)
        if old is not None and old != target.schema:
            raise ConfigError(
                f"targets.{name}.params.search_path",
                config.source,
                f"changes only on restart ({old!r} to {target.schema!r}): sessions opened "
                "before a reload keep the search_path they started with",
            )


class Gateway:
    """One Engine plus the control loop that serves it, on the running (uvloop) event loop."""

    def __init__(
        self,
        config: Config,
        *,
        engine_factory: EngineFactory | None = None,
        catalog_loader: Loader = load_catalog,
    ) -> None:
        self.config = config
        self._engine_factory = engine_factory or _native_engine
        self._catalog_loader = catalog_loader
        self._catalogs: CatalogKeeper | None = None
        self._dictionaries = DictionaryKeeper(emit=self.write_event)
        self._reload_lock = asyncio.Lock()
        self._engine: EngineLike | None = None
        self._control: ControlPlane | None = None
        self._approvals: ApprovalService | None = None
        self._admin: AdminServer | None = None
        # Records made before the engine (and so the trail) exists: appended right after.
        self._early_records: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._stopped = asyncio.Event()
        # Every target's pinned schema since start: a session keeps the search_path its
        # upstream connection started with, so no reload may change it (even after removing
        # the target: its sessions may still be open).
        self._schemas = {name: t.schema for name, t in config.targets.items()}
        # SHA-256 of the config file in force, for reload and start records.
        self._config_sha256 = file_sha256(Path(config.source))

    @property
    def engine(self) -> EngineLike:
        if self._engine is None:
            raise RuntimeError("gateway not started")
        return self._engine

    @property
    def control(self) -> ControlPlane:
        if self._control is None:
            raise RuntimeError("gateway not started")
        return self._control

    @property
    def addresses(self) -> list[str]:
        return list(self.engine.listen_addresses())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        verifier = _oidc_verifier(self.config)
        if not await verifier.prime():
            log.warning("no signing keys loaded yet; logins fail until the JWKS can be read")
        self._control = ControlPlane(
            verifier, apikeys=_apikey_verifier(self.config, None), config=self.config
        )
        # A target whose catalog cannot be read now is retried in the background; until it
        # loads, its masked identities are refused with a message saying so.
        keeper = self._catalogs = CatalogKeeper(
            loader=self._catalog_loader, on_change=self._catalog_changed, emit=self.write_event
        )
        results = await asyncio.to_thread(keeper.load_all, self.config)
        keeper.apply(self.config, results)
        try:
            # Before the engine: no statement can ask for approval before the service is up.
            if self.config.approvals is not None:
                await self._start_approvals(self.config)
            engine = self._engine_factory(self.config.native_json())
            # Before the first session: a masked identity never sees text scanned without the
            # catalog's rules and dictionary.
            self._put_in_force(engine, self._control, self.config, keeper)
            engine.start()
        except BaseException:
            await self._stop_approvals()
            await keeper.close()
            raise
        self._engine = engine
        early, self._early_records = self._early_records, []
        for body in early:
            engine.audit_append(body)
        self._control.phi_in_text = getattr(engine, "text_has_phi", None)
        self._loop.add_reader(engine.wakeup_fd(), self._on_wakeup)
        self._spawn(self._periodic_records())
        self._spawn(self._dictionaries.run(engine, lambda: self.config))
        self._on_wakeup()  # requests may have queued before the reader was registered
        self.write_event({
            "ts": now_ts(), "event": "gateway_start", "version": __version__,
            "config": self.config.source, "config_sha256": self._config_sha256,
            "listen": self.addresses, "pid": os.getpid(),
        })  # fmt: skip
        # The key store as it is now: later polls record what changes from here.
        self._record_apikey_changes()
        log.info("phigate listening on %s", ", ".join(self.addresses))

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace: float | None = None, reason: str = "shutdown") -> None:
        """Drain: stop accepting, let sessions finish for up to ``grace`` seconds, then close.
        ``reason`` is what the gateway_stop record says (e.g. "signal SIGTERM")."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._stop_reason = reason
        grace = self.config.server.drain_timeout if grace is None else grace
        try:
            if self._admin is not None:
                await self._admin.stop()
            if self._approvals is not None:
                # Held statements are answered 57P01 now (their sessions end), so the drain
                # does not wait for approvers; statements asking later are refused the same.
                await self._approvals.close()
            if self._engine is not None:
                # shutdown() blocks without the GIL; the loop keeps answering the requests of
                # sessions that are still finishing meanwhile.
                await asyncio.to_thread(self._engine.shutdown, grace)
        finally:
            await self._finish()

    async def _finish(self) -> None:
        if self._engine is not None and self._loop is not None:
            self._loop.remove_reader(self._engine.wakeup_fd())
            self._on_wakeup()
            self.write_stats()  # the final counters, so a short run still reports them
            self.write_event({
                "ts": now_ts(), "event": "gateway_stop",
                "reason": getattr(self, "_stop_reason", "shutdown"),
            })  # fmt: skip
        if self._catalogs is not None:
            await self._catalogs.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._admin is not None:
            await self._admin.stop()
        if self._approvals is not None:
            await self._approvals.close()
        if self._control is not None:
            await self._control.close()
        if self._engine is not None:
            # The last records are in: audit_close, a final checkpoint, fsync.
            await asyncio.to_thread(self._engine.audit_close)
        self._stopped.set()
        log.info("phigate stopped")

    async def reload(self, new_config: Config, sender: dict[str, Any] | None = None) -> None:
        """Apply a new config to new sessions; must run on the gateway's loop.

        The catalogs are read first, in a thread: the loop keeps serving with the old config
        and its catalogs meanwhile (a database that drops packets would otherwise stall every
        login and statement for connect_timeout), then everything switches in one step, so no
        statement is judged with a new classification and an old catalog. A catalog that
        cannot be read keeps the previous one if it is still valid (see catalog_keeper) and is
        retried in the background. Raises ValueError if the data plane refuses the config
        (nothing has changed then)."""
        async with self._reload_lock:
            keeper = self._keeper
            results = await asyncio.to_thread(keeper.load_all, new_config)
            if self._stopping:
                log.info("not reloading: the gateway is stopping")
                return
            # A newly configured approval service starts first: if its store cannot be opened
            # the reload is refused with nothing changed, never applied half.
            starting = self._approvals is None and new_config.approvals is not None
            if starting:
                await self._start_approvals(new_config)
            try:
                self._apply_reload(new_config, results, sender)
            except BaseException:
                if starting:
                    await self._stop_approvals()
                raise
            self._reload_approvals(new_config)

    async def _start_approvals(self, config: Config) -> None:
        """The approval service on the configured store; a store that cannot be opened stops
        the start (statements needing approval could be neither held nor refused rightly)."""
        assert config.approvals is not None
        service = ApprovalService(
            config, make_store(config), write_event=self.write_event, decide=self._decide
        )
        try:
            await service.start()
        except Exception as exc:  # noqa: BLE001 - psycopg, sqlite3, OS errors alike
            raise ConfigError(
                "approvals.store", config.source,
                f"cannot open the approval store {config.approvals.store_where}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            ) from None  # fmt: skip
        self._approvals = service
        self.control.approvals = service
        settings = config.approvals
        if settings.api is not None or settings.admin_socket is not None or settings.webhooks:
            admin = AdminServer(
                service, self._verify_approver, api=settings.api,
                admin_socket=settings.admin_socket, webhooks=settings.webhooks,
                public_url=settings.public_url,
            )  # fmt: skip
            await admin.start()
            self._admin = admin

    async def _verify_approver(self, token: str) -> Identity:
        """An approver's bearer token, verified by the identity sources in force now (a reload
        may swap them): API keys by the key store, anything else as an OIDC access token."""
        control = self.control
        return await make_verify(control.verifier, control.apikeys)(token)

    async def _stop_approvals(self) -> None:
        if self._admin is not None:
            await self._admin.stop()
            self._admin = None
        if self._approvals is not None:
            await self._approvals.close()
            self._approvals = None
            self.control.approvals = None

    def _reload_approvals(self, new_config: Config) -> None:
        """The running approval service takes the reloaded rules and limits (its store and
        listeners stay until a restart)."""
        service = self._approvals
        if service is None:
            return
        old, new = service.config.approvals, new_config.approvals
        if new is None or (old is not None and (old.store_kind, old.store_where)
                           != (new.store_kind, new.store_where)):  # fmt: skip
            log.warning("the [approvals] store changes only on restart; approvals keep using "
                        "%s", service.store.where)  # fmt: skip
        if new is not None:
            service.config = new_config

    def _decide(self, identity_class: str, sql: str) -> dict[str, Any]:
        """The policy's decision, for the approval service (normalized text, masking)."""
        policy = self.control.policy
        if policy is None:
            raise RuntimeError("no statement policy is loaded")
        return policy.decide(identity_class, sql)

    @property
    def admin(self) -> AdminServer | None:
        """The admin API / socket / webhooks (None when [approvals] configures none)."""
        return self._admin

    @property
    def approvals(self) -> ApprovalService | None:
        """The approval service (None without [approvals]): the admin API and CLI use it."""
        return self._approvals

    def reload_failed(self, error: str, sender: dict[str, Any] | None = None) -> None:
        """Record a reload that was refused (the previous config stays in force)."""
        self.write_event({
            "ts": now_ts(), "event": "reload", "outcome": "failed", "error": error,
            "sender": sender or _SIGNAL_SENDER, "old_sha256": self._config_sha256,
            "new_sha256": file_sha256(Path(self.config.source)),
        })  # fmt: skip

    def _apply_reload(
        self,
        new_config: Config,
        results: dict[str, CatalogSnapshot | Exception],
        sender: dict[str, Any] | None = None,
    ) -> None:
        old = self.config
        old_sha256 = self._config_sha256
        if new_config.server.listen != old.server.listen:
            log.warning("listen addresses change only on restart; keeping %s", old.server.listen)
        _check_schemas(self._schemas, new_config)
        # The engine validates first: if it refuses, nothing here has changed yet.
        epoch = self.engine.reconfigure(new_config.native_json())
        self._schemas.update((name, t.schema) for name, t in new_config.targets.items())
        verifier = _oidc_verifier(new_config)
        self.control.verifier = verifier
        self.control.apikeys = _apikey_verifier(new_config, self.control.apikeys)
        audit_changed = _audit_changed(old, new_config)
        if audit_changed:
            log.warning("the [audit] section changes only on restart; the trail keeps writing "
                        "with the settings it started with")  # fmt: skip
        keeper = self._keeper
        keeper.apply(new_config, results)  # reports (and retries) what could not be read
        self._put_in_force(self.engine, self.control, new_config, keeper)
        self.control.config = new_config
        self._spawn(verifier.prime())  # also re-reads a rotated JWKS even if config is unchanged
        self.config = new_config
        self._config_sha256 = file_sha256(Path(new_config.source))
        problems = keeper.describe()
        reload: dict[str, Any] = {
            "ts": now_ts(), "event": "reload", "outcome": "applied", "source": new_config.source,
            "epoch": epoch, "catalogs": keeper.states(), "sender": sender or _SIGNAL_SENDER,
            "old_sha256": old_sha256, "new_sha256": self._config_sha256,
            **config_diff(old, new_config),
        }  # fmt: skip
        if audit_changed:
            reload["audit_restart_needed"] = True
        self.write_event(reload)
        if problems:
            log.warning("reloaded config from %s (decision cache epoch %d), but %s",
                        new_config.source, epoch, problems)  # fmt: skip
        else:
            log.info("reloaded config from %s (decision cache epoch %d)", new_config.source, epoch)

    def _put_in_force(
        self, engine: EngineLike, control: ControlPlane, config: Config, keeper: CatalogKeeper
    ) -> None:
        """The keeper's catalogs in force everywhere at once: the data plane's masking rules and
        identifier dictionaries, and the control plane's policy (with why any is missing)."""
        catalogs = keeper.catalogs()
        engine.set_masking(masking_state_json(config, catalogs))
        names = sorted(f"{schema}.{table}" for schema, table in config.phi.subjects)
        for target, snap in catalogs.items():
            # A target whose catalog is not loaded still knows the names: every row of a
            # statement reading one of them is then recorded as a possible disclosure.
            resolved = snap.subjects if snap is not None and names else ()
            engine.set_subjects(
                target, [(r.oid, r.key_attnum, r.name, dict(r.columns)) for r in resolved], names
            )
        self._dictionaries.install(engine, config, catalogs)
        control.catalogs = catalogs
        control.catalog_notes = keeper.notes()

    @property
    def _keeper(self) -> CatalogKeeper:
        if self._catalogs is None:
            raise RuntimeError("gateway not started")
        return self._catalogs

    def _catalog_changed(self) -> None:
        """A background read put a new catalog in force (or took one out of force)."""
        if self._engine is None or self._stopping:
            return
        self._put_in_force(self.engine, self.control, self.config, self._keeper)
        # Decisions cached under the previous catalog are judged again.
        self.engine.bump_epoch()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _on_wakeup(self) -> None:
        try:
            requests = self.engine.take_requests()
        except Exception:  # noqa: BLE001  # a bug in the bridge must not kill the loop
            log.exception("take_requests failed")
            return
        self.control.dispatch(requests)

    async def _periodic_records(self) -> None:
        """API key changes about every second, the data plane's counters every minute."""
        next_stats = time.monotonic() + STATS_INTERVAL
        while True:
            await asyncio.sleep(APIKEY_POLL_INTERVAL)
            self._record_apikey_changes()
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + STATS_INTERVAL
                self.write_stats()

    def _record_apikey_changes(self) -> None:
        """Records of API keys created, revoked, removed or expired in the store."""
        apikeys = self._control.apikeys if self._control is not None else None
        if apikeys is None:
            return
        try:
            changes = apikeys.changes()
        except Exception:  # noqa: BLE001 - records must never take the gateway down
            log.exception("reading API key changes failed")
            return
        for change in changes:
            self.write_event({"ts": now_ts(), **change})

    def write_stats(self) -> None:
        """Append the data plane's counters to the audit trail as one `stats` record."""
        if self._engine is None:
            return
        try:
            counters = dict(self.engine.stats())
        except Exception:  # noqa: BLE001 - statistics must never take the gateway down
            log.exception("engine.stats failed")
            return
        line: dict[str, Any] = {"ts": now_ts(), "event": "stats", **counters}
        if self._catalogs is not None and self._catalogs.states():
            line["catalogs"] = self._catalogs.summary()
        self.write_event(line)

    def write_event(self, event: dict[str, Any]) -> None:
        """Append one control-plane record (reload, catalog, dictionary, stats) to the audit
        trail, stamped with ``ts`` now; before the engine exists it waits for it."""
        body = canonical({**event, "ts": now_ts()})
        if self._engine is None:
            self._early_records.append(body)
            return
        try:
            self.engine.audit_append(body)
        except Exception:  # noqa: BLE001 - a closed trail (stopping) must not crash a caller
            log.error("cannot append a %s record to the audit trail: it is closed",
                      event.get("event", "?"))  # fmt: skip


async def run(config_path: str | os.PathLike[str], config: Config | None = None) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads ``config_path`` (the audit trail stays)."""
    path = Path(config_path)
    config = config if config is not None else load_config(path)
    if config.audit is None:
        raise ConfigError("audit", config.source, NO_AUDIT)
    block_hangup()  # before any thread starts: the watcher below learns who sent SIGHUP
    gateway = Gateway(config)
    loop = asyncio.get_running_loop()
    # SIGTERM/SIGINT while starting (the listener is already up before start returns) must not
    # kill the process with the trail open: remember it, and drain as soon as start is done.
    early: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, early.append, sig.name)
    await gateway.start()
    pending: set[asyncio.Task[None]] = set()

    def on_stop(signame: str) -> None:
        if gateway.stopping:
            log.info("%s: already draining", signame)
            return
        grace = gateway.config.server.drain_timeout
        log.info("%s: draining connections for up to %gs", signame, grace)
        sd_notify("STOPPING=1")
        task = loop.create_task(gateway.stop(grace, reason=f"signal {signame}"))
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def reload(sender: dict[str, Any] | None) -> None:
        try:
            await gateway.reload(load_config(path), sender)
        except (PhigateError, ValueError, OSError) as exc:
            log.error("reload failed, keeping the previous config: %s", exc)
            gateway.reload_failed(str(exc), sender)
        sd_notify("READY=1")

    def on_hup(sender: dict[str, Any] | None = None) -> None:
        if sender is not None:
            log.info("SIGHUP from pid %s (uid %s): reloading %s",
                     sender["pid"], sender["uid"], path)  # fmt: skip
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        task = loop.create_task(reload(sender))
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    # A SIGHUP that still reaches a thread (one started before block_hangup) comes here,
    # without its sender; the watcher gets the rest with theirs.
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watch_hangup(loop, on_hup)
    sd_notify(f"READY=1\nSTATUS=listening on {', '.join(gateway.addresses)}")
    if early:
        on_stop(early[0])
    try:
        await gateway.serve_forever()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def serve(config_path: str | os.PathLike[str], config: Config | None = None) -> None:
    """Blocking entry point for `phigate serve`."""
    tune_malloc()  # before the data plane's threads allocate anything
    uvloop.run(run(config_path, config))


