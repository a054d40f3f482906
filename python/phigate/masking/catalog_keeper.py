"""Keep each target's PHI catalog in force: a failed (re)load keeps the last good catalog when it is
still valid for the config, and is retried in the background with capped, jittered backoff.

Why: the catalog is read from the database at start and on every reload, and SIGHUP also comes
from logrotate. A database that is briefly down at that moment must not lock masked identities out
until someone reloads again, nor may the gateway say "reloaded" while it refuses them.

Which catalog may stay in force. A snapshot depends on the database (host, port, database) and on
`[phi.columns]`; it holds the rules it was built from. With the same inputs, the last good
snapshot is what a fresh read would give (short of a schema change during the outage, which the
next successful read picks up) and is kept. When the reload changed the classification or points
the target at another database, the old snapshot would enforce the old rules — a newly classified
column would go out in clear — so the target has no catalog until the new one loads, and its
masked identities are refused (58000). Identities that see every kind in clear never need it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from phigate.audit.records import now_ts, ts
from phigate.config import Config
from phigate.errors import ConfigError, PhigateError
from phigate.masking.classification import CatalogError, CatalogSnapshot, load_catalog

__all__ = [
    "LOADED",
    "STALE",
    "UNAVAILABLE",
    "Backoff",
    "CatalogKeeper",
    "load_all",
]

log = logging.getLogger(__name__)

# The states of one target's catalog, as events, stats and log lines name them.
LOADED = "loaded"  # read for the config in force
STALE = "stale"  # the last read failed; the previous catalog (same inputs) is in force; retrying
UNAVAILABLE = "unavailable"  # no usable catalog: masked identities are refused; retrying

Loader = Callable[[Config, str], CatalogSnapshot]
Inputs = tuple[Any, ...]


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait before retry number ``attempt`` (1-based): ``first`` doubling up to
    ``cap``, times a random factor in [0.5, 1) so gateways that lost the same database do not
    all come back in step."""

    first: float = 1.0
    cap: float = 60.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        base = min(self.cap, self.first * 2.0 ** min(max(attempt, 1) - 1, 32))
        return base * (0.5 + 0.5 * rand())


def catalog_inputs(config: Config, target: str) -> Inputs:
    """What a target's snapshot depends on besides the database's own state."""
    t = config.targets[target]
    # The dictionary's settings too: a snapshot read with other kinds or stop words carries an
    # identifier dictionary that no longer matches the config.
    return (t.host, t.port, t.database, frozenset(config.phi.columns.items()),
            config.phi.dictionary)  # fmt: skip


def load_all(
    config: Config, loader: Loader = load_catalog
) -> dict[str, CatalogSnapshot | Exception]:
    """One read of every target's catalog (blocking: run it in a thread). Deliberate failures
    (PhigateError) come back as values; anything else is a bug and propagates."""
    if not config.phi.columns:
        return {}
    out: dict[str, CatalogSnapshot | Exception] = {}
    for name in config.targets:
        try:
            out[name] = loader(config, name)
        except PhigateError as exc:
            out[name] = exc
    return out


@dataclass
class _Target:
    state: str
    snapshot: CatalogSnapshot | None  # in force (None: masked identities are refused)
    why: str | None = None  # client-facing reason when snapshot is None
    error: str | None = None  # operator-facing text of the last failure (log, events)
    failures: int = 0  # failed reads in this streak
    since: float | None = None  # wall time of the streak's first failure
    retry_at: float | None = None  # wall time of the next read


class CatalogKeeper:
    """The catalogs in force per target, and the background reads that replace failed ones.

    Runs on the gateway's event loop. ``apply`` takes the result of one ``load_all`` for a
    config; ``on_change`` is called after a background read put a new snapshot in force, and
    ``emit`` receives the `catalog` events."""

    def __init__(
        self,
        *,
        loader: Loader = load_catalog,
        backoff: Backoff | None = None,
        on_change: Callable[[], None] = lambda: None,
        emit: Callable[[dict[str, Any]], None] = lambda event: None,
    ) -> None:
        self.loader = loader
        self.backoff = backoff or Backoff()
        self._on_change = on_change
        self._emit = emit
        self._targets: dict[str, _Target] = {}
        # The last snapshot read per target and the inputs it was read with: it comes back into
        # force whenever a config with those inputs is applied and a fresh read fails.
        self._good: dict[str, tuple[Inputs, CatalogSnapshot]] = {}
        self._retries: dict[str, asyncio.Task[None]] = {}

    def load_all(self, config: Config) -> dict[str, CatalogSnapshot | Exception]:
        return load_all(config, self.loader)

    # -- what is in force -------------------------------------------------------------------

    def catalogs(self) -> dict[str, CatalogSnapshot | None]:
        """A new dict of the snapshots in force (None: masked identities are refused)."""
        return {name: t.snapshot for name, t in self._targets.items()}

    def notes(self) -> dict[str, str]:
        """Why each target without a catalog has none, in words a client may read."""
        return {n: t.why for n, t in self._targets.items() if t.snapshot is None and t.why}

    def states(self) -> dict[str, str]:
        return {name: t.state for name, t in self._targets.items()}

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per target: state, when the catalog in force was read, failures in this streak and
        when the next read is due (the `stats` event carries it)."""
        out: dict[str, dict[str, Any]] = {}
        for name, t in self._targets.items():
            item: dict[str, Any] = {
                "state": t.state,
                "loaded_at": ts(t.snapshot.loaded_at) if t.snapshot is not None else None,
            }
            if t.state != LOADED:
                item.update(failures=t.failures, since=ts(t.since) if t.since else None,
                            retry_at=ts(t.retry_at) if t.retry_at else None,
                            error=t.error)  # fmt: skip
            out[name] = item
        return out

    # -- applying a config ------------------------------------------------------------------

    def apply(self, config: Config, results: Mapping[str, CatalogSnapshot | Exception]) -> None:
        """Put ``config``'s catalogs in force from one read of each target, and retry the
        targets whose read failed. Cancels the retries of the previous config."""
        self.cancel()
        self._targets = {}
        self._good = {n: g for n, g in self._good.items() if n in results}
        for name, result in results.items():
            if isinstance(result, CatalogSnapshot):
                log.info("PHI catalog of target %s: %d protected relations", name,
                         len(result.protected_relations()))  # fmt: skip
                self._loaded(config, name, result)
                self._emit({
                    "ts": now_ts(), "event": "catalog", "target": name, "state": LOADED,
                    "outcome": "loaded", "relations": len(result.protected_relations()),
                })  # fmt: skip
            else:
                self._targets[name] = self._fallback(config, name, result)
                self._failed(config, name)

    def _loaded(self, config: Config, name: str, snapshot: CatalogSnapshot) -> None:
        self._good[name] = (catalog_inputs(config, name), snapshot)
        self._targets[name] = _Target(LOADED, snapshot)

    def _fallback(self, config: Config, name: str, exc: Exception) -> _Target:
        """The target's state after a failed read for ``config``."""
        error = _describe(exc)
        if isinstance(exc, ConfigError):
            # The database does not fit the classification (a column is missing, a mask does
            # not fit its type): no older snapshot describes this database any more.
            self._good.pop(name, None)
            why = ("the PHI classification catalog of this target could not be built because "
                   "the classification does not match the database")  # fmt: skip
            return _Target(UNAVAILABLE, None, why=why, error=error)
        good = self._good.get(name)
        if good is not None and good[0] == catalog_inputs(config, name):
            return _Target(STALE, good[1], error=error)
        if good is not None:
            why = ("the PHI classification (or the database) of this target changed with the "
                   "last config reload and the gateway has not been able to read the new "
                   "catalog from the database yet; it is retrying")  # fmt: skip
        else:
            why = ("the PHI classification catalog of this target is not loaded yet: the gateway "
                   "could not read it from the database and is retrying")  # fmt: skip
        return _Target(UNAVAILABLE, None, why=why, error=error)

    # -- background reads -------------------------------------------------------------------

    def _failed(self, config: Config, name: str) -> None:
        """Report the failed read of ``name`` and schedule the next one."""
        t = self._targets[name]
        now = time.time()
        t.failures += 1
        t.since = t.since if t.since is not None else now
        delay = self.backoff.delay(t.failures)
        t.retry_at = now + delay
        if t.snapshot is not None:
            effect = f"the catalog read at {_clock(t.snapshot.loaded_at)} stays in force"
        else:
            effect = "statements of identities that see PHI masked are refused"
        level = logging.ERROR if t.failures == 1 else logging.WARNING
        log.log(level, "PHI catalog of target %s could not be read (attempt %d): %s; %s; "
                "retrying in %.1fs", name, t.failures, t.error, effect, delay)  # fmt: skip
        self._emit({
            "ts": ts(now), "event": "catalog", "target": name, "state": t.state,
            "outcome": "failed", "previous_in_force": t.snapshot is not None,
            "attempt": t.failures, "retry_in_ms": round(delay * 1000), "error": t.error,
        })  # fmt: skip
        self._retries[name] = asyncio.get_running_loop().create_task(
            self._retry(config, name, delay), name=f"phigate-catalog-{name}"
        )

    async def _retry(self, config: Config, name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            snapshot = await asyncio.to_thread(self.loader, config, name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  # a bug must not end the retries silently
            if not isinstance(exc, PhigateError):
                log.exception("reading the PHI catalog of target %s failed", name)
            del self._retries[name]
            before = self._targets[name]
            after = self._fallback(config, name, exc)
            after.failures, after.since = before.failures, before.since
            self._targets[name] = after
            self._failed(config, name)
            if after.snapshot is not before.snapshot:
                self._on_change()
            return
        del self._retries[name]
        t = self._targets[name]
        took = time.time() - (t.since or time.time())
        log.warning("PHI catalog of target %s read after %d failed attempt%s (%s for %.0fs); "
                    "%d protected relations, now in force", name, t.failures,
                    "" if t.failures == 1 else "s", t.state, took,
                    len(snapshot.protected_relations()))  # fmt: skip
        self._emit({
            "ts": now_ts(), "event": "catalog", "target": name, "state": LOADED,
            "outcome": "loaded", "previous_state": t.state, "failed_attempts": t.failures,
            "relations": len(snapshot.protected_relations()),
        })  # fmt: skip
        self._loaded(config, name, snapshot)
        self._on_change()

    def cancel(self) -> None:
        """Stop every background read (a new config is applied, or the gateway stops)."""
        for task in self._retries.values():
            task.cancel()
        self._retries.clear()

    async def close(self) -> None:
        tasks = list(self._retries.values())
        self.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def describe(self) -> str:
        """One clause per target that is not loaded, for the reload log line ("" if none)."""
        parts = []
        for name, t in self._targets.items():
            if t.state == STALE:
                parts.append(f"the PHI catalog of target {name} could not be refreshed and is "
                             "being retried; the previous one stays in force")  # fmt: skip
            elif t.state == UNAVAILABLE:
                parts.append(f"the PHI catalog of target {name} could not be loaded and is "
                             "being retried; its masked identities are refused until it "
                             "loads")  # fmt: skip
        return "; ".join(parts)


def _describe(exc: Exception) -> str:
    if isinstance(exc, (CatalogError, ConfigError)):
        return str(exc)
    return type(exc).__name__  # a bug's message may quote anything: the type only


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))
