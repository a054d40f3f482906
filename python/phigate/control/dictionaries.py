"""Keep each target's identifier dictionary in the data plane: install the one read with a new
catalog, drop those of removed targets, and refresh them on the configured interval.

The dictionary is read with the catalog (same connection and transaction, see
masking/dictionary_loader.py), so the catalog keeper's states and retries cover it: a target whose
catalog is unavailable refuses its masked identities anyway. The refresh here only adds the values
of tables that changed since the last read; a failed refresh keeps the dictionary in force and is
tried again at the next interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from phigate.audit.records import now_ts
from phigate.config import Config
from phigate.errors import PhigateError
from phigate.masking.classification import CatalogSnapshot
from phigate.masking.dictionary_loader import (
    BuilderLike,
    IdentifierLoad,
    refresh_identifiers,
)

__all__ = ["DictionaryEngine", "DictionaryKeeper"]

log = logging.getLogger(__name__)


class DictionaryEngine(Protocol):
    """The parts of the native Engine the keeper uses."""

    def set_dictionary(self, target: str, builder: Any, extend: bool = False) -> dict[str, int]: ...

    def dictionary_builder(self, target: str) -> Any: ...

    def drop_dictionary(self, target: str) -> bool: ...


#: Every this many refreshes, every identifier table is read again (statistics aside).
FULL_EVERY = 12

Refresher = Callable[
    [Config, str, Mapping[tuple[str, str], int | None], BuilderLike], IdentifierLoad | None
]


class DictionaryKeeper:
    """Which dictionary each target has in the data plane, and what its last read saw."""

    def __init__(
        self,
        emit: Callable[[dict[str, Any]], None],
        refresher: Refresher = refresh_identifiers,
    ) -> None:
        self._emit = emit
        self._refresher = refresher
        self._signatures: dict[str, Mapping[tuple[str, str], int | None]] = {}
        self._refreshes = 0
        self._lock = asyncio.Lock()
        # Counts installs: a refresh that reads while a reload installs fresh dictionaries
        # must not extend them with its copy of the old one (it would put back what the
        # reload dropped: declassified columns, removed kinds, new stop words).
        self._installs = 0

    def install(
        self,
        engine: DictionaryEngine,
        config: Config,
        catalogs: Mapping[str, CatalogSnapshot | None],
    ) -> None:
        """Hand every newly read dictionary to the data plane; drop removed targets'."""
        self._installs += 1
        for name in list(self._signatures):
            if name not in config.targets:
                engine.drop_dictionary(name)
                del self._signatures[name]
        for name, snap in catalogs.items():
            load = snap.identifiers if snap is not None else None
            if load is None:
                continue
            builder = load.take()
            if builder is None:
                continue  # already installed (a snapshot kept in force by the catalog keeper)
            stats = engine.set_dictionary(name, builder, False)
            self._signatures[name] = load.signatures
            self._report(name, "full", load, stats)
        if not config.phi.dictionary.enabled:
            for name in list(self._signatures):
                engine.drop_dictionary(name)
                del self._signatures[name]

    async def refresh(self, engine: DictionaryEngine, config: Config) -> None:
        """One refresh of every target that has a dictionary (reads run in threads)."""
        async with self._lock:
            self._refreshes += 1
            # Every FULL_EVERY-th refresh reads every table, whatever the statistics say: they
            # can be reset, lag, or be off for one table, and a missed name is not acceptable.
            full = self._refreshes % FULL_EVERY == 0
            for name, before in list(self._signatures.items()):
                if full:
                    before = dict.fromkeys(before)
                if name not in config.targets:
                    continue
                builder = engine.dictionary_builder(name)
                installs = self._installs
                try:
                    load = await asyncio.to_thread(self._refresher, config, name, before, builder)
                except PhigateError as exc:
                    log.warning("target %s: %s; the dictionary in force stays and the next "
                                "refresh tries again", name, exc)  # fmt: skip
                    self._emit({"ts": now_ts(), "event": "dictionary", "target": name,
                                "mode": "refresh", "state": "failed"})  # fmt: skip
                    continue
                if load is None or name not in self._signatures:
                    continue  # dictionary turned off or target dropped meanwhile
                if self._installs != installs:
                    # A reload installed a new read meanwhile: it is newer than this one, and
                    # this builder started from the dictionary it replaced.
                    continue
                self._signatures[name] = load.signatures
                taken = load.take()
                if load.columns == 0 or taken is None:
                    continue  # nothing changed
                stats = engine.set_dictionary(name, taken, True)
                self._report(name, "refresh", load, stats)

    async def run(self, engine: DictionaryEngine, config: Callable[[], Config]) -> None:
        """Refresh forever on the current config's interval (cancel to stop)."""
        while True:
            await asyncio.sleep(config().phi.dictionary.refresh_seconds)
            try:
                await self.refresh(engine, config())
            except Exception:  # noqa: BLE001  # a bug here must not end the refreshes
                log.exception("identifier dictionary refresh failed")

    def _report(
        self, name: str, mode: str, load: IdentifierLoad, stats: Mapping[str, int]
    ) -> None:
        entries, size = stats.get("entries", 0), stats.get("bytes", 0)
        log.info("target %s: identifier dictionary %s: %d columns, %d values read, %d entries, "
                 "%.1f MB", name, "loaded" if mode == "full" else "refreshed", load.columns,
                 load.values, entries, size / 1e6)  # fmt: skip
        self._emit({
            "ts": now_ts(), "event": "dictionary", "target": name, "mode": mode,
            "state": "loaded", "entries": entries, "bytes": size, **load.summary(),
        })  # fmt: skip
