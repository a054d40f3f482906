"""Which PHI catalog is in force when a (re)load cannot read the database, how failed reads are
retried, and what a masked client is told meanwhile (no database: a scripted loader)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from phigate.config import Config, parse_config
from phigate.control.server import ControlPlane
from phigate.errors import ConfigError
from phigate.masking.catalog_keeper import LOADED, STALE, UNAVAILABLE, Backoff, CatalogKeeper
from phigate.masking.classification import CatalogError, CatalogSnapshot

FAST = Backoff(first=0.01, cap=0.04)
READER_CLASS = '[["reader"],"ehr"]'


def settings(tmp_path: Path, columns: dict[str, Any], database: str = "ehr") -> Config:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}]}))
    return parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "require_tls": False},
            "identity": {"oidc": {"issuer": "i", "audience": "phigate", "jwks_file": str(jwks)}},
            "targets": {
                "ehr": {"host": "127.0.0.1", "database": database, "user": "svc", "tls": "disable"}
            },
            "phi": {"columns": columns},
            "groups": {"readers": ["reader"]},
            "roles": {"reader": {"relations": ["public.*"]}},
        },
        source=str(tmp_path / "phigate.toml"),
    )


SSN = {"public.patients.ssn": {"kind": "ssn", "mask": "partial:4"}}
SSN_AND_PHONE = {**SSN, "public.patients.phone": {"kind": "phone", "mask": "partial:4"}}


class Loader:
    """Returns a new snapshot per read, or raises ``fail`` while it is set."""

    def __init__(self) -> None:
        self.fail: Exception | None = None
        self.reads: list[Config] = []
        self._lock = threading.Lock()

    def __call__(self, config: Config, target: str) -> CatalogSnapshot:
        with self._lock:
            self.reads.append(config)
            if self.fail is not None:
                raise self.fail
        return CatalogSnapshot.empty(target)


DOWN = CatalogError("cannot reach target 'ehr' (127.0.0.1:5432): connection refused")


def run(fn: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(fn())  # type: ignore[arg-type]


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def make(loader: Loader) -> tuple[CatalogKeeper, list[dict[str, Any]], list[int]]:
    events: list[dict[str, Any]] = []
    changes: list[int] = []
    keeper = CatalogKeeper(
        loader=loader, backoff=FAST, emit=events.append, on_change=lambda: changes.append(1)
    )
    return keeper, events, changes


def test_backoff_doubles_from_one_second_to_a_minute_with_jitter() -> None:
    b = Backoff()
    low = [b.delay(n, rand=lambda: 0.0) for n in range(1, 10)]
    high = [b.delay(n, rand=lambda: 0.999999) for n in range(1, 10)]
    assert low == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert [round(h) for h in high] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert b.delay(10_000) <= 60


def test_reload_during_an_outage_keeps_the_previous_catalog_until_a_retry_reads_it(
    tmp_path: Path,
) -> None:
    config = settings(tmp_path, SSN)
    loader = Loader()
    keeper, events, changes = make(loader)

    async def go() -> None:
        keeper.apply(config, keeper.load_all(config))
        first = keeper.catalogs()["ehr"]
        assert keeper.states() == {"ehr": LOADED} and first is not None
        # A catalog read in time: one record saying so, with what it counted.
        assert [(e["event"], e["outcome"], e["relations"]) for e in events] == [
            ("catalog", "loaded", 0)
        ]
        events.clear()

        loader.fail = DOWN  # the database goes down; logrotate sends SIGHUP
        keeper.apply(config, keeper.load_all(config))
        assert keeper.states() == {"ehr": STALE}
        assert keeper.catalogs()["ehr"] is first and keeper.notes() == {}
        assert "could not be refreshed" in keeper.describe()
        assert "previous one stays in force" in keeper.describe()

        await until(lambda: len(events) >= 3)  # the reload's failure and two retries
        assert not changes
        assert [e["attempt"] for e in events[:3]] == [1, 2, 3]
        assert all(
            e["event"] == "catalog" and e["state"] == STALE and e["previous_in_force"]
            and "connection refused" in e["error"] and e["retry_in_ms"] > 0
            for e in events[:3]
        )  # fmt: skip
        assert keeper.summary()["ehr"]["failures"] >= 3

        loader.fail = None  # the database is back: the next retry reads it, no reload needed
        await until(lambda: bool(changes))
        assert keeper.states() == {"ehr": LOADED}
        assert keeper.catalogs()["ehr"] not in (None, first)
        done = events[-1]
        assert (done["state"], done["previous_state"]) == (LOADED, STALE)
        assert done["failed_attempts"] >= 3
        reads = len(loader.reads)
        await asyncio.sleep(0.1)
        assert len(loader.reads) == reads  # no retries once loaded

    run(go)


def test_changed_classification_is_not_judged_with_the_old_catalog(tmp_path: Path) -> None:
    old, new = settings(tmp_path, SSN), settings(tmp_path, SSN_AND_PHONE)
    loader = Loader()
    keeper, events, changes = make(loader)

    async def go() -> None:
        keeper.apply(old, keeper.load_all(old))
        first = keeper.catalogs()["ehr"]
        loader.fail = DOWN
        keeper.apply(new, keeper.load_all(new))
        # The old snapshot knows nothing of the phone column: masked identities are refused.
        assert keeper.states() == {"ehr": UNAVAILABLE} and keeper.catalogs() == {"ehr": None}
        assert "changed with the last config reload" in keeper.notes()["ehr"]
        assert "refused until it loads" in keeper.describe()
        assert events[-1]["previous_in_force"] is False

        # Reverting the change brings the old snapshot back while the database is still down.
        keeper.apply(old, keeper.load_all(old))
        assert keeper.states() == {"ehr": STALE} and keeper.catalogs()["ehr"] is first

        keeper.apply(new, keeper.load_all(new))
        loader.fail = None
        await until(lambda: bool(changes))
        assert keeper.states() == {"ehr": LOADED} and keeper.catalogs()["ehr"] is not None
        assert loader.reads[-1] is new  # read for the config in force, not the old one

    run(go)


def test_another_database_does_not_inherit_the_catalog(tmp_path: Path) -> None:
    loader = Loader()
    keeper, _, _ = make(loader)

    async def go() -> None:
        keeper.apply(settings(tmp_path, SSN), {"ehr": CatalogSnapshot.empty("ehr")})
        moved = settings(tmp_path, SSN, database="ehr_restored")
        keeper.apply(moved, {"ehr": DOWN})
        assert keeper.catalogs() == {"ehr": None}
        keeper.cancel()

    run(go)


def test_a_classification_that_does_not_fit_the_database_drops_the_old_catalog(
    tmp_path: Path,
) -> None:
    config = settings(tmp_path, SSN)
    loader = Loader()
    keeper, _, changes = make(loader)
    missing = ConfigError('phi.columns."public.patients.ssn"', "x.toml", "column missing")

    async def go() -> None:
        keeper.apply(config, keeper.load_all(config))
        loader.fail = DOWN
        keeper.apply(config, keeper.load_all(config))
        assert keeper.states() == {"ehr": STALE}
        loader.fail = missing  # the retry reaches a database that no longer fits
        await until(lambda: keeper.states() == {"ehr": UNAVAILABLE})
        assert changes and keeper.catalogs() == {"ehr": None}
        assert "does not match the database" in keeper.notes()["ehr"]
        loader.fail = DOWN  # and then it is down again: the old snapshot does not come back
        await until(lambda: "could not read it" in keeper.notes().get("ehr", ""))
        assert keeper.catalogs() == {"ehr": None}
        keeper.cancel()

    run(go)


def test_a_new_config_cancels_the_retries_of_the_previous_one(tmp_path: Path) -> None:
    old, new = settings(tmp_path, SSN), settings(tmp_path, SSN_AND_PHONE)
    loader = Loader()
    keeper, _, _ = make(loader)

    async def go() -> None:
        loader.fail = DOWN
        keeper.apply(old, keeper.load_all(old))
        await until(lambda: len(loader.reads) >= 3)
        keeper.apply(new, keeper.load_all(new))
        mark = len(loader.reads)
        await until(lambda: len(loader.reads) >= mark + 3)
        assert all(c is new for c in loader.reads[mark:])
        await keeper.close()
        done = len(loader.reads)
        await asyncio.sleep(0.1)
        assert len(loader.reads) <= done + 1  # at most the read already in its thread

    run(go)


def test_masked_client_is_told_the_catalog_is_not_loaded_yet(tmp_path: Path) -> None:
    """At start with the database down: a masked statement is refused with 58000 and a
    message saying why and that it is being retried; a clear identity is unaffected."""
    config = settings(tmp_path, SSN)
    loader = Loader()
    loader.fail = DOWN
    keeper, _, _ = make(loader)

    class Req:
        def __init__(self, sql: str) -> None:
            self.id, self.kind = 1, "decide"
            self.payload = {"session_id": 1, "identity_class": READER_CLASS, "subject": "a",
                            "sql": sql, "statement_name": None, "protocol": "simple"}  # fmt: skip
            self.answers: list[dict[str, Any]] = []

        def reply(self, answer: dict[str, Any]) -> bool:
            self.answers.append(answer)
            return True

    async def go() -> None:
        keeper.apply(config, keeper.load_all(config))
        control = ControlPlane(verifier=None, config=config)  # type: ignore[arg-type]
        control.catalogs, control.catalog_notes = keeper.catalogs(), keeper.notes()
        req = Req("select ssn from patients")
        control.dispatch([req])
        (answer,) = req.answers
        assert (answer["action"], answer["sqlstate"], answer["cache"]) == ("deny", "58000", "none")
        assert "catalog of this target is not loaded yet" in answer["message"]
        assert "retrying" in answer["message"] and "masked" in answer["message"]
        assert "try again shortly" in answer["hint"]
        assert "127.0.0.1" not in answer["message"] + answer["hint"]  # details stay in the log
        keeper.cancel()

    run(go)


@pytest.mark.parametrize("attempt", [1, 5, 7, 50])
def test_backoff_is_never_zero_nor_above_the_cap(attempt: int) -> None:
    for _ in range(200):
        assert 0 < Backoff().delay(attempt) <= 60
