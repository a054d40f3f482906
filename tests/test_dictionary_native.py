"""The identifier dictionary's Python interface (phigate._native.DictionaryBuilder and the
Engine's dictionary methods): what a builder counts, how a target's dictionary is replaced,
extended and dropped, the stats, and — through the gateway — that names from the dictionary
leave as tags in rows, JSON and notices for a masked identity, across a masking reload."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from phigate import _native

STOP = ["the", "and", "of", "st", "ave"]


def engine(*targets: str) -> _native.Engine:
    """An engine with these targets (one, "ehr", by default), never started (no socket is
    opened)."""
    target = {"host": "127.0.0.1", "port": 1, "database": "ehr", "user": "u", "password": "p",
              "tls": "disable"}  # fmt: skip
    cfg = {"listen": ["127.0.0.1:0"], "require_tls": False,
           "targets": {name: target for name in targets or ("ehr",)}}
    return _native.Engine(json.dumps(cfg))


def test_builder_counts_entries_per_kind() -> None:
    b = _native.DictionaryBuilder(STOP)
    # A two-token name: the sequence and each token alone.
    assert b.add("name", ["Daniel Harris"]) == 3
    # Already there (under any kind): nothing new; None is skipped.
    assert b.add("city", ["harris", None]) == 0
    # An address: its whole sequence only.
    assert b.add("address", ["12 Elm Street"]) == 1
    # An SSN: the sequence and its digits run together.
    assert b.add("ssn", ["984-96-1001"]) == 2
    # An MRN: sequence, run together, and the digit run alone.
    assert b.add("mrn", ["MRN-0012345"]) == 3
    # Stop words, one-letter tokens and tag words never make an entry alone.
    assert b.add("name", ["The", "J", "name", "", "  "]) == 0
    assert len(b) == 9
    with pytest.raises(TypeError):
        b.add("name", [42])  # type: ignore[list-item]


def test_set_replace_extend_and_drop_with_stats() -> None:
    eng = engine()
    assert eng.stats()["dictionary"] == {}
    b = _native.DictionaryBuilder(STOP, min_chars=2)
    b.add("name", ["Okafor", "Nguyen"])
    stats = eng.set_dictionary("ehr", b)
    assert stats["entries"] == 2 and 0 < stats["bytes"] < 1 << 20
    assert eng.stats()["dictionary"] == {"ehr": stats}
    # The builder was taken.
    assert len(b) == 0
    with pytest.raises(RuntimeError):
        b.add("name", ["Kowalski"])
    with pytest.raises(RuntimeError):
        eng.set_dictionary("ehr", b)

    # Extend: a builder from the current dictionary adds to it.
    more = eng.dictionary_builder("ehr")
    assert len(more) == 2
    more.add("name", ["Kowalski"])
    assert eng.set_dictionary("ehr", more, extend=True)["entries"] == 3
    # Every builder of the process hashes under its keys: a new one extends too.
    other = _native.DictionaryBuilder(STOP)
    other.add("name", ["Haddad"])
    assert eng.set_dictionary("ehr", other, extend=True)["entries"] == 4
    assert eng.stats()["dictionary"]["ehr"]["entries"] == 4
    assert eng.stats()["dictionary_merged_bytes"] == 0, "one target: nothing merged"
    # Replace: only the new builder's entries remain.
    fresh = _native.DictionaryBuilder(STOP)
    fresh.add("city", ["Springfield"])
    assert eng.set_dictionary("ehr", fresh)["entries"] == 1

    unknown = _native.DictionaryBuilder(STOP)
    with pytest.raises(ValueError, match="no target"):
        eng.set_dictionary("lab", unknown)
    assert eng.drop_dictionary("ehr") is True
    assert eng.drop_dictionary("ehr") is False
    assert eng.stats()["dictionary"] == {}
    with pytest.raises(KeyError):
        eng.dictionary_builder("ehr")


def test_several_targets_are_scanned_as_one_dictionary() -> None:
    """A value of any target's dictionary is found, with one dictionary read per scan: the
    targets' merged (a replica's same values once), kept up to date as targets change."""
    eng = engine("ehr", "replica", "lab")
    for target, names in (("ehr", ["Daniel Harris"]), ("replica", ["Daniel Harris"]),
                          ("lab", ["Okafor"])):  # fmt: skip
        b = _native.DictionaryBuilder(STOP)
        b.add("name", names)
        eng.set_dictionary(target, b)
    stats = eng.stats()
    assert {t: s["entries"] for t, s in stats["dictionary"].items()} == {
        "ehr": 3, "replica": 3, "lab": 1}
    assert 0 < stats["dictionary_merged_bytes"] < 1 << 20
    assert eng.text_has_phi("seen with Okafor today") and eng.text_has_phi("daniel harris")
    # Replace one target: its old values are gone from the merged dictionary.
    b = _native.DictionaryBuilder(STOP)
    b.add("name", ["Nguyen"])
    eng.set_dictionary("lab", b)
    assert not eng.text_has_phi("seen with Okafor today")
    assert eng.text_has_phi("seen with Nguyen today")
    assert eng.drop_dictionary("ehr") and eng.drop_dictionary("replica")
    assert not eng.text_has_phi("daniel harris")
    assert eng.text_has_phi("Nguyen")


def test_a_million_tokens_fit_in_64_mb() -> None:
    b = _native.DictionaryBuilder(STOP)
    names = [f"fa{i:x}q lb{i:x}z" for i in range(500_000)]
    assert b.add("name", names) == 1_500_000
    stats = engine().set_dictionary("ehr", b)
    assert stats["entries"] == 1_500_000
    assert stats["bytes"] <= 64 << 20


@pytest.mark.integration
def test_names_leave_as_tags_in_rows_json_and_notices(scripted: Any, pg: Any) -> None:
    setup = (
        "drop table if exists dict_notes;"
        "create table dict_notes (id int, note text, extra jsonb);"
        "insert into dict_notes values (1, 'Seen with HARRIS, Daniel at 12 Elm St.',"
        " '{\"contact\": \"Daniel Harris\", \"city\": \"Springfield\"}');"
    )
    pg.psql(setup + f"grant select on dict_notes to {pg.service_user};", dbname=pg.ehr_database)
    cp = scripted(auth={"masked": True, "clear_kinds": []}, decide=lambda sql: {},
                  masking={"targets": {}})  # fmt: skip
    b = _native.DictionaryBuilder(STOP)
    b.add("name", ["Daniel", "Harris"])
    b.add("address", ["12 Elm St"])
    b.add("city", ["Springfield"])
    cp.engine.set_dictionary("ehr", b)
    with psycopg.connect(cp.dsn, autocommit=True) as conn:
        row = conn.execute("select note, extra from dict_notes").fetchone()
        assert row == ("Seen with [NAME], [NAME] at [ADDRESS].",
                       {"contact": "[NAME] [NAME]", "city": "[CITY]"})  # fmt: skip
        # A catalog reload replaces the masking state; the dictionary stays.
        cp.set_masking({"targets": {}})
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("do $$ begin raise notice 'patient Daniel Harris of Springfield'; end $$")
        assert notices == ["patient [NAME] [NAME] of [CITY]"]
        cp.engine.drop_dictionary("ehr")
        assert conn.execute("select note from dict_notes").fetchone() == (
            "Seen with HARRIS, Daniel at 12 Elm St.",
        )
