"""Which masked reads the rewrite leaves to the data plane (phigate.masking.passthrough): only
plain column reads of protected tables whose filters never touch a masked column; anything
else -- expressions, whole rows, predicates on masked columns, views, set operations, ordering,
grouping, sub-queries, masks the data plane computes differently -- goes through the rewrite."""

from __future__ import annotations

import orjson
import pytest
from pglast import parser

from phigate.config import ColumnRule
from phigate.masking.classification import CatalogSnapshot, ColumnInfo, RelationInfo
from phigate.masking.passthrough import copy_columns, passthrough_oids


def _rule(table: str, col: str, kind: str, mask: str) -> ColumnRule:
    keep = int(mask.split(":")[1]) if mask.startswith("partial:") else None
    return ColumnRule("public", table, col, kind, mask.partition(":")[0], keep, f"x.{col}")


def _rel(oid: int, name: str, cols: list[tuple[str, int, ColumnRule | None]], kind: str = "r",
         refuse: str | None = None) -> RelationInfo:  # fmt: skip
    infos = tuple(ColumnInfo(c, i, t, "text" if t == 25 else "x", -1, False, r)
                  for i, (c, t, r) in enumerate(cols, 1))  # fmt: skip
    return RelationInfo(oid, "public", name, kind, "configured", infos, refuse_reason=refuse)


SSN = _rule("patients", "ssn", "ssn", "partial:4")
NAME = _rule("patients", "first_name", "name", "pseudonym")
DOB = _rule("patients", "date_of_birth", "dob", "year")
BODY = _rule("notes", "body", "free_text", "free_text")
SEEN = _rule("visits", "seen_on", "dob", "year")
CATALOG = CatalogSnapshot.from_relations("ehr", 180000, [
    _rel(100, "patients", [("id", 20, None), ("ssn", 25, SSN), ("first_name", 25, NAME),
                           ("date_of_birth", 1082, DOB), ("city", 25, None)]),
    _rel(200, "notes", [("id", 20, None), ("body", 25, BODY)]),
    _rel(300, "visits", [("id", 20, None), ("patient_id", 20, None), ("reason", 25, None),
                         ("seen_on", 1184, SEEN)]),
    _rel(400, "patient_names", [("first_name", 25, NAME)], kind="v"),
])  # fmt: skip


def oids(sql: str, clear: frozenset[str] = frozenset()) -> list[int] | None:
    return passthrough_oids(
        orjson.loads(parser.parse_sql_json(sql)), CATALOG, clear, schema="public"
    )


@pytest.mark.parametrize(
    "sql",
    [
        "select * from patients",
        "select ssn, first_name, date_of_birth from patients where id = $1",
        "select p.ssn, p.city from public.patients p where p.id in (1, 2, 3) and p.city = 'X'",
        "select p.* from patients p where upper(city) like 'B%' limit 10 offset 5",
        'select "ssn" as s from patients',
    ],
)
def test_plain_reads_are_left_to_the_data_plane(sql: str) -> None:
    assert oids(sql) == [100]


@pytest.mark.parametrize(
    "sql",
    [
        "select upper(ssn) from patients",  # an expression loses the column origin
        "select ssn || '' from patients",
        "select ssn::varchar from patients",
        "select p from patients p",  # whole row
        "select row_to_json(p) from patients p",
        "select 1, ssn from patients",  # a constant has no origin either
        "select ssn from patients where ssn = '123-45-6789'",  # predicate on a masked column
        "select id from patients where p.first_name like 'A%'",
        "select id from patients p where p::text like '%1%'",  # whole row in a filter
        "select id from patients where public.patients is not null",
        "select id from patients where id = (select id from patients where ssn = 'x')",
        "select id from patients where exists (select 1)",
        "select ssn from patients order by id",
        "select distinct ssn from patients",
        "select city, count(*) from patients group by city",
        "select ssn from patients union select ssn from patients",
        "with x as (select ssn from patients) select * from x",
        "select first_name from patient_names",  # a view: the rewrite maps it
        "select ssn from patients, unprotected_table",  # no OID for the unprotected table
        "select p.ssn from patients p join notes n on n.id = p.id",
        "select ssn from patients limit (select 1)",
        "select body from notes",  # free_text: the detectors differ between the layers
        "select seen_on from visits",  # year of timestamptz depends on TimeZone
        "select ssn from patients for update",
        "select ssn into temp t from patients",
        "select ssn from patients; select 1",
        "select ssn from only patients where id = $1 and date_of_birth > '2000-01-01'",
    ],
)
def test_everything_else_takes_the_rewrite(sql: str) -> None:
    assert oids(sql) is None


def test_kinds_seen_in_clear_do_not_count_as_masked() -> None:
    # The role sees dob in clear: filtering on it is an ordinary predicate.
    assert oids(
        "select ssn from patients where date_of_birth > '2000-01-01'", frozenset({"dob"})
    ) == [100]
    # free_text seen in clear: notes hold nothing masked for this identity.
    assert oids("select body from notes", frozenset({"free_text"})) == [200]


def test_unqualified_names_follow_the_pinned_schema() -> None:
    rule = ColumnRule("pii", "people", "ssn", "ssn", "partial", 4, "x.ssn")
    people = RelationInfo(500, "pii", "people", "r", "configured", (
        ColumnInfo("id", 1, 20, "bigint", -1, False, None),
        ColumnInfo("ssn", 2, 25, "text", -1, False, rule),
    ))  # fmt: skip
    catalog = CatalogSnapshot.from_relations("ehr", 180000, [people, *CATALOG.relations.values()])

    def read(sql: str, schema: str) -> list[int] | None:
        doc = orjson.loads(parser.parse_sql_json(sql))
        return passthrough_oids(doc, catalog, frozenset(), schema=schema)

    assert read("select id, ssn from people", "pii") == [500]
    assert read("select id, ssn from pii.people", "public") == [500]
    # Pinned to pii, "patients" is pii.patients: not protected, so not a plain protected read.
    assert read("select ssn from patients", "pii") is None
    assert read("select ssn from public.patients", "pii") == [100]
    copy = orjson.loads(parser.parse_sql_json("copy (select ssn from people) to stdout"))
    assert copy_columns(copy, catalog, frozenset(), schema="pii") == [(500, 2, 25)]
    assert copy_columns(copy, catalog, frozenset(), schema="public") is None


def cols(sql: str) -> list[tuple[int, int, int]] | None:
    return copy_columns(
        orjson.loads(parser.parse_sql_json(sql)), CATALOG, frozenset(), schema="public"
    )


def test_a_text_copy_of_a_plain_read_names_every_column() -> None:
    every = [(100, 1, 20), (100, 2, 25), (100, 3, 25), (100, 4, 1082), (100, 5, 25)]
    assert cols("copy (select * from patients) to stdout") == every
    assert cols("copy (select p.*, ssn from patients p where id = 1) to stdout") == [
        *every,
        (100, 2, 25),
    ]
    assert cols("copy (select city, p.first_name from patients p) to stdout") == [
        (100, 5, 25),
        (100, 3, 25),
    ]


@pytest.mark.parametrize(
    "sql",
    [
        "copy (select * from patients) to stdout with (format csv)",  # quoting: not parsed
        "copy (select * from patients) to stdout (delimiter ',')",
        "copy (select * from patients) to stdout (format binary)",
        "copy patients to stdout",  # the table form: left to the rewrite
        "copy (select upper(ssn) from patients) to stdout",
        "copy (select id from patients p, patients q) to stdout",  # ambiguous column
        "copy (select nosuch from patients) to stdout",
        "copy (select * from patients) to '/tmp/x'",
        "copy patients from stdin",
    ],
)
def test_other_copies_take_the_rewrite(sql: str) -> None:
    assert cols(sql) is None
