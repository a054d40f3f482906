"""The 01M02 notice (phigate.masking.comparison_notices, masked_values): a masked identity that
compares a masked column with a constant no masked value can meet is told so in the decision's
``notices``; the statement still runs. The notice names the column and its mask, never the
constant, and such a decision is cached for its exact text only."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest
from pglast import parser

from maskedengine import DATE, TEXT, catalog, decide, engine
from phigate.masking.comparison_notices import masked_comparisons
from phigate.masking.masked_values import like_pattern, masked_values, regex_pattern
from rewritecat import Column

CAT = catalog()


def found(sql: str, clear: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    doc = orjson.loads(parser.parse_sql_json(sql))
    return [(c.column, c.mask) for c in masked_comparisons(doc, CAT, clear, schema="public")]


LAST = ("public.patients.last_name", "pseudonym")
SSN = ("public.patients.ssn", "partial:4")
DOB = ("public.patients.date_of_birth", "year")
CITY = ("public.patients.city", "redact")
EMAIL = ("public.patients.email", "email_domain")
ZIP = ("public.patients.zip", "zip3")

TOLD = [
    ("select id from patients where last_name = 'Harris'", LAST),
    ("select id from patients where 'Harris' = last_name", LAST),
    ("select id from patients p where p.last_name <> 'Harris'", LAST),
    ("select id from patients where last_name in ('psn_0123456789abcdef', 'Harris')", LAST),
    ("select id from patients where last_name not in ('Harris')", LAST),
    ("select id from patients where last_name = any (array['Harris'])", LAST),
    ("select id from patients where last_name is not distinct from 'Harris'", LAST),
    ("select id from patients where last_name ilike 'har%'", LAST),
    ("select id from patients where last_name ~~* 'HAR%'", LAST),
    ("select id from patients where last_name ~* '^harris$'", LAST),
    ("select id from patients where public.patients.last_name = 'Harris'", LAST),
    ("select id from patients where ssn = '123-45-6789'", SSN),
    ("select id from patients where ssn like '123%'", SSN),
    ("select id from patients where ssn not like '123%'", SSN),
    ("select id from patients where ssn ~ '^123'", SSN),
    ("select id from patients where date_of_birth = '1980-03-04'", DOB),
    ("select id from patients where date_of_birth = date '1980-03-04'", DOB),
    ("select id from patients where date_of_birth between '1980-03-01' and '1980-03-31'", DOB),
    ("select id from patients where date_of_birth between symmetric '1980-12-31'"
     " and '1980-02-01'", DOB),
    ("select id from patients where city = 'Springfield'", CITY),
    ("select id from patients where email = 'olga@example.org'", EMAIL),
    ("select id from patients where email like 'olga%'", EMAIL),
    ("select id from patients where zip = '02139'", ZIP),
    # anywhere in the statement: joins, sub-queries, CASE, CTEs, DML
    ("select n.id from notes n join patients p on p.id = n.patient_id"
     " and p.last_name = 'Harris'", LAST),
    ("select id from notes n where exists (select 1 from patients p where p.id = n.patient_id"
     " and last_name = 'Harris')", LAST),
    ("select case when last_name = 'Harris' then 1 end from patients", LAST),
    ("with h as (select id from patients where last_name = 'Harris') select * from h", LAST),
    ("select id from patients where id = 1 union select id from patients"
     " where last_name = 'Harris'", LAST),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "column"), TOLD, ids=[f"told-{i}" for i in range(len(TOLD))])
def test_a_constant_no_masked_value_meets_is_found(sql: str, column: tuple[str, str]) -> None:
    assert found(sql) == [column]


QUIET = [
    # constants a masked value could be
    "select id from patients where last_name = 'psn_0123456789abcdef'",
    "select id from patients where last_name like 'psn_%'",
    "select id from patients where last_name ~ 'ab'",  # hex digits
    "select id from patients where ssn = '***-**-6789'",
    "select id from patients where ssn like '%6789'",
    "select id from patients where ssn ~ '6789$'",
    "select id from patients where date_of_birth = '1980-01-01'",
    "select id from patients where date_of_birth between '1980-03-01' and '1981-03-31'",
    "select id from patients where city = '***'",
    "select id from patients where email like '%@example.org'",
    "select id from patients where zip = '021**'",
    "select id from patients where zip like '021%'",
    # what is not checked: parameters, expressions, patterns phigate does not read, NULL
    "select id from patients where last_name = $1",
    "select id from patients where lower(last_name) = 'harris'",
    "select id from patients where ssn ~ '^[0-9]{3}'",
    "select id from patients where last_name like 'H%' escape '#'",
    "select id from patients where last_name = null",
    "select id from patients where ssn between 'a' and 'b'",  # text order: collation-dependent
    "select id from patients where date_of_birth = '03/04/1980'",  # DateStyle-dependent
    # columns that are not (or may not be) the masked one
    "select id from patients where id = 5",
    "select id from notes where author = 'Harris'",
    "select * from (select last_name from patients) s where last_name = 'Harris'",
    "with patients as (select 'x' as last_name) select * from patients where last_name = 'Harris'",
    "select p.id from patients p where exists (select 1 from staff s where last_name = 'x')",
    "select id from patients p join staff s using (id) where s.last_name = 'Harris'",
]


@pytest.mark.parametrize("sql", QUIET, ids=[f"quiet-{i}" for i in range(len(QUIET))])
def test_constants_that_could_be_masked_values_and_unknown_columns_are_quiet(sql: str) -> None:
    assert found(sql) == []


def test_each_column_once_and_only_masked_kinds() -> None:
    sql = ("select id from patients where last_name = 'A' or last_name = 'B'"
           " or ssn = '123-45-6789'")  # fmt: skip
    assert found(sql) == [LAST, SSN]
    assert found(sql, frozenset({"name"})) == [SSN]


# --- what a mask can show --------------------------------------------------------------------


def _col(type_oid: int = TEXT, type_name: str = "text") -> Column:
    return Column("c", type_oid, type_name)


def test_partial_keeps_letters_and_digits_only_at_the_end() -> None:
    v = masked_values(_col(), "partial:4")
    assert v.could_equal("***-**-6789") and v.could_equal("****") and v.could_equal("")
    assert not v.could_equal("123-45-6789") and not v.could_equal("6789")  # short: masked whole
    like = like_pattern
    assert v.could_match(like("%89"), False) and v.could_match(like("*%"), False)
    assert not v.could_match(like("1%"), False) and not v.could_match(like("%1234567"), False)
    assert v.could_match(like("_1%"), False)  # *1234: the last 4 of 5 characters
    assert not v.could_match(like("_1____%"), False)  # the 2nd of 6 or more characters
    assert masked_values(_col(), "partial:0").could_equal("***") is True
    assert masked_values(_col(), "partial:0").could_equal("**1") is False


def test_pseudonym_shape_and_case() -> None:
    v = masked_values(_col(), "pseudonym")
    assert v.could_equal("psn_0123456789abcdef") and not v.could_equal("psn_0123456789ABCDEF")
    assert v.could_match(like_pattern("PSN%"), True)
    assert not v.could_match(like_pattern("PSN%"), False)
    # Integer pseudonyms can be any number; text padded (char(n)) ignores trailing blanks.
    assert masked_values(_col(20, "bigint"), "pseudonym").could_equal(5)
    padded = masked_values(_col(1042, "character(24)"), "pseudonym")
    assert padded.could_equal("psn_0123456789abcdef    ")


def test_dates_numbers_and_null() -> None:
    year = masked_values(_col(DATE, "date"), "year")
    assert year.could_equal("1980-01-01") and not year.could_equal("1980-01-02")
    assert year.could_equal("today")  # not an ISO date: phigate does not decide
    assert not year.could_be_between("1980-01-02", "1980-12-31")
    assert year.could_be_between("1980-01-02", "1981-01-01")
    stamp = masked_values(_col(1114, "timestamp without time zone"), "year")
    assert stamp.could_equal("1980-01-01 00:00") and not stamp.could_equal("1980-01-01 10:00")
    redacted = masked_values(_col(20, "bigint"), "redact")
    assert redacted.could_equal(0) and not redacted.could_equal(7)
    assert not redacted.could_equal(Decimal("0.5")) and redacted.could_equal("0")
    assert redacted.could_be_between(-1, 1) and not redacted.could_be_between(1, 9)
    assert not masked_values(_col(DATE, "date"), "redact").could_equal("1980-03-04")
    nothing = masked_values(_col(), "null")
    assert not nothing.could_equal("***") and not nothing.could_match(like_pattern("%"), False)
    assert masked_values(_col(), "free_text").could_equal("anything")


def test_simple_regular_expressions_only() -> None:
    assert regex_pattern("^abc$") == [("char", "a"), ("char", "b"), ("char", "c")]
    assert regex_pattern("a.*b") == [("any", ""), ("char", "a"), ("any", ""), ("char", "b"),
                                     ("any", "")]  # fmt: skip
    assert regex_pattern("a\\.b$")[1:] == [("char", "a"), ("char", "."), ("char", "b")]
    for unread in ("[0-9]", "a+", "a|b", "(?i)x", "\\d", "a{2}", "***:x", "x?"):
        assert regex_pattern(unread) is None, unread
    assert like_pattern("a\\%_%") == [("char", "a"), ("char", "%"), ("one", ""), ("any", "")]
    assert like_pattern("bad\\") is None


# --- the engine ------------------------------------------------------------------------------


def told(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The decision's 01M02 notices (other notices may come with it)."""
    return [n for n in answer.get("notices", ()) if n["code"] == "01M02"]


def test_the_decision_carries_the_notice_and_is_cached_exactly() -> None:
    answer = decide(engine(), "agent", "select id from patients where last_name = 'Harris'")
    assert answer["action"] == "allow" and "rewrite" in answer
    assert answer["cache"] == "exact"
    assert told(answer) == [{
        "key": None,
        "code": "01M02",
        "message": "phigate: public.patients.last_name is masked (pseudonym) for this session, "
        "so comparing it with a clear value matches masked values only (usually no row; with "
        "<>, NOT LIKE or NOT IN, usually every row)",
        "hint": "Compare with a pseudonym (psn_...) from an earlier result, or look the row up "
        "by a column you see in clear (e.g. id); SHOW phigate.masking lists masked columns.",
    }]  # fmt: skip
    assert "Harris" not in str(told(answer))


def test_no_notice_without_a_wrong_constant_and_the_cache_keeps_them_apart() -> None:
    eng = engine()
    # The same normalized text with a pseudonym: no notice, and also cached for its text only,
    # so neither decision is reused for the other.
    quiet = decide(eng, "agent", "select id from patients where last_name = 'psn_0123456789abcdef'")
    assert told(quiet) == [] and quiet["cache"] == "exact"
    for sql in (
        "select id from patients where last_name = $1",
        "select id, last_name from patients where id = 3",
    ):  # a plain read
        assert told(decide(eng, "agent", sql)) == [], sql
    # A role that sees names in clear compares clear values.
    clear = decide(eng, "clinician", "select id from patients where last_name = 'Harris'")
    assert told(clear) == []
    ssn = decide(eng, "agent", "select id from patients where ssn like '123%'")
    assert len(told(ssn)) == 1
    assert "(partial:4)" in told(ssn)[0]["message"] and "123" not in str(ssn.get("notices"))
