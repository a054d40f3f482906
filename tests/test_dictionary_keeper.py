"""The control plane's side of the identifier dictionary, with a recording engine: a dictionary
read with a catalog is installed once, a catalog kept in force does not install it again, removed
targets and a disabled dictionary drop theirs, a refresh adds only what changed and a failed
refresh keeps the dictionary in force; events carry counts, never a value."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from phigate.config import Config, DictionaryConfig
from phigate.control.dictionaries import DictionaryKeeper
from phigate.masking.classification import CatalogError, CatalogSnapshot
from phigate.masking.dictionary_loader import IdentifierLoad, changed_tables


class Builder:
    def __init__(self, start: list[str] | None = None) -> None:
        self.values = list(start or [])

    def add(self, kind: str, values: list[str | None]) -> int:
        self.values += [v for v in values if v is not None]
        return len(values)

    def __len__(self) -> int:
        return len(self.values)


class Engine:
    def __init__(self) -> None:
        self.dicts: dict[str, list[str]] = {}
        self.calls: list[tuple[str, str, bool]] = []

    def set_dictionary(self, target: str, builder: Any, extend: bool = False) -> dict[str, int]:
        self.calls.append(("set", target, extend))
        self.dicts[target] = list(builder.values)
        return {"entries": len(builder.values), "bytes": 64 * len(builder.values)}

    def dictionary_builder(self, target: str) -> Builder:
        return Builder(self.dicts.get(target))

    def drop_dictionary(self, target: str) -> bool:
        self.calls.append(("drop", target, False))
        return self.dicts.pop(target, None) is not None


class FakeConfig:
    """What the keeper reads of a Config."""

    def __init__(self, targets: tuple[str, ...], enabled: bool = True) -> None:
        self.targets = dict.fromkeys(targets)

        class Phi:
            dictionary = DictionaryConfig(enabled=enabled, refresh_seconds=1.0)

        self.phi = Phi()


def snapshot(target: str, values: list[str], sig: int | None = 1) -> CatalogSnapshot:
    load = IdentifierLoad(builder=Builder(values), columns=2, values=len(values), seconds=0.01,
                          signatures={("public", "patients"): sig})  # fmt: skip
    return replace(CatalogSnapshot.empty(target), identifiers=load)


def cfg(*targets: str, enabled: bool = True) -> Config:
    c: Any = FakeConfig(targets, enabled)
    return c  # type: ignore[no-any-return]


def test_install_once_then_drop() -> None:
    events: list[dict[str, Any]] = []
    keeper, engine = DictionaryKeeper(emit=events.append), Engine()
    snap = snapshot("ehr", ["Harris", "Olga"])
    keeper.install(engine, cfg("ehr"), {"ehr": snap, "other": None})
    assert engine.dicts == {"ehr": ["Harris", "Olga"]}
    # The catalog keeper kept the same snapshot in force (a failed reload): nothing to install.
    keeper.install(engine, cfg("ehr"), {"ehr": snap})
    assert engine.calls == [("set", "ehr", False)]
    assert [e["entries"] for e in events] == [2] and events[0]["mode"] == "full"
    assert "Harris" not in repr(events)
    keeper.install(engine, cfg("other"), {})
    assert engine.dicts == {} and engine.calls[-1] == ("drop", "ehr", False)


def test_disabled_dictionary_is_dropped() -> None:
    keeper, engine = DictionaryKeeper(emit=lambda e: None), Engine()
    keeper.install(engine, cfg("ehr"), {"ehr": snapshot("ehr", ["Harris"])})
    keeper.install(engine, cfg("ehr", enabled=False), {"ehr": CatalogSnapshot.empty("ehr")})
    assert engine.dicts == {}


def test_refresh_adds_changed_tables_and_survives_failures() -> None:
    events: list[dict[str, Any]] = []
    seen: list[Mapping[tuple[str, str], int | None]] = []
    fail = [False]

    def refresher(config: Any, target: str, before: Any, builder: Any) -> IdentifierLoad:
        seen.append(before)
        if fail[0]:
            raise CatalogError("database unreachable")
        builder.add("name", ["Newpatient"])
        return IdentifierLoad(builder=builder, columns=1, values=1, seconds=0.01,
                              signatures={("public", "patients"): 2})  # fmt: skip

    keeper, engine = DictionaryKeeper(emit=events.append, refresher=refresher), Engine()
    keeper.install(engine, cfg("ehr"), {"ehr": snapshot("ehr", ["Harris"])})
    asyncio.run(keeper.refresh(engine, cfg("ehr")))
    assert engine.dicts["ehr"] == ["Harris", "Newpatient"]
    assert engine.calls[-1] == ("set", "ehr", True)
    assert seen == [{("public", "patients"): 1}]
    fail[0] = True
    asyncio.run(keeper.refresh(engine, cfg("ehr")))
    assert engine.dicts["ehr"] == ["Harris", "Newpatient"], "a failed refresh keeps it"
    assert seen[-1] == {("public", "patients"): 2}, "the next refresh compares with the last read"
    assert events[-1] == {"ts": events[-1]["ts"], "event": "dictionary", "target": "ehr",
                          "mode": "refresh", "state": "failed"}  # fmt: skip


def test_a_refresh_during_a_reload_does_not_put_back_what_the_reload_dropped() -> None:
    """The refresh starts from a copy of the dictionary in force; if a reload installs a new
    read while the refresh reads the database, the refresh's result is dropped (extending the
    reload's dictionary with it would bring back the values the reload left out)."""
    keeper: DictionaryKeeper
    engine = Engine()

    def refresher(config: Any, target: str, before: Any, builder: Any) -> IdentifierLoad:
        # Meanwhile, a reload reads the catalog again: "Harris" was declassified.
        keeper.install(engine, cfg("ehr"), {"ehr": snapshot("ehr", ["Olga"], sig=3)})
        builder.add("name", ["Newpatient"])
        return IdentifierLoad(builder=builder, columns=1, values=1, seconds=0.01,
                              signatures={("public", "patients"): 2})  # fmt: skip

    keeper = DictionaryKeeper(emit=lambda e: None, refresher=refresher)
    keeper.install(engine, cfg("ehr"), {"ehr": snapshot("ehr", ["Harris"])})
    asyncio.run(keeper.refresh(engine, cfg("ehr")))
    assert engine.dicts["ehr"] == ["Olga"], "the reload's dictionary, without the old values"
    assert engine.calls[-1] == ("set", "ehr", False)


def test_changed_tables() -> None:
    a, b, c = ("s", "a"), ("s", "b"), ("s", "c")
    assert changed_tables({a: 1, b: 5, c: None}, {a: 1, b: 6, c: 3}) == {b, c}
    assert changed_tables({}, {a: 1}) == {a}
    assert changed_tables({a: 1}, {a: None}) == {a}, "no statistics: always read again"
