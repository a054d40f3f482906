"""The free-text rule of layer 1 (phigate.masking.free_text_uses): while the identifier
dictionary masks names in free text, a masked identity reads a free_text column whole or not at
all -- any statement that would let the database search, sort, group or compute on it is
refused with 42501 naming the column and the clause, never a value."""

from __future__ import annotations

import orjson
import pytest
from pglast import parser

from maskedengine import catalog, decide, engine
from phigate.masking.free_text_uses import free_text_use

CAT = catalog()
BODY = "public.notes.body"


def use(sql: str, clear: frozenset[str] = frozenset()) -> tuple[str, str] | None:
    found = free_text_use(orjson.loads(parser.parse_sql_json(sql)), CAT, clear, schema="public")
    return None if found is None else (found.column, found.clause)


READS_WHOLE = [
    "select body from notes",
    "select n.body, notes.body, public.notes.body from notes",  # (PostgreSQL says which works)
    "select body as note, id from notes n where n.patient_id = 3 order by id desc limit 5",
    "select * from notes",
    "select n.*, p.last_name from notes n join patients p on p.id = n.patient_id where p.id = 3",
    "select id, * from notes order by 1",
    "select id, body from notes order by 1",
    "select distinct on (id) id, body from notes order by id",
    "select body from notes group by id",
    "select x from notes n(i, p, a, x)",  # a column alias list, read whole
    "table notes",
    "select body from notes for update",
    "copy notes to stdout",
    "copy notes (id, body) to stdout with (format csv, force_quote (body))",
    "copy (select id, body from notes where patient_id = 1) to stdout",
    "explain select body from notes",
    "prepare q as select body from notes where id = $1",
    "declare c cursor for select * from notes",
    # JSON or text built from whole values: the data plane tags the names in the output.
    "select json_build_object('note', body, 'id', id) from notes where id = 1",
    "select row_to_json(n), row_to_json(n.*), to_jsonb(n.body) from notes n",
    "select body::text, body::json, (body)::jsonb from notes",
    "select patient_id, json_agg(body) from notes group by patient_id",
    # Uses that tell nothing of a name.
    "select count(*) from notes",
    "select count(body), count(n.body) from notes n where body is not null",
    "select id from notes where n.body is null or patient_id = 1",
    # Other relations, and sub-queries that do not read the column.
    "select * from patients p where exists (select 1 from notes n where n.patient_id = p.id)",
    "select body from notes where patient_id in (select id from patients where ssn like '%1')",
    "select id from notes join patients using (id)",
    "select last_name from patients order by last_name",
]


@pytest.mark.parametrize("sql", READS_WHOLE)
def test_reading_the_column_whole_is_allowed(sql: str) -> None:
    assert use(sql) is None


REFUSED = [
    # searches: the oracle this rule exists for
    ("select id from notes where body ilike '%olga harris%'", "WHERE"),
    ("select id from notes where body = $1", "WHERE"),
    ("select id from notes n join patients p on n.body like '%' || p.ssn", "JOIN ... ON"),
    ("select patient_id, count(*) from notes group by patient_id having max(body) > 'm'",
     "HAVING"),
    ("copy (select id from notes where body like '%x%') to stdout", "WHERE"),
    ("explain select id from notes where body ilike '%x%'", "WHERE"),
    ("prepare q as select id from notes where body like $1", "WHERE"),
    # computations whose result would carry the names past word matching
    ("select substr(body, 1, 3) from notes", "an expression in the select list"),
    ("select regexp_replace(body, '(.)', '\\1 ', 'g') from notes",
     "an expression in the select list"),
    ("select body::varchar(3) from notes", "an expression in the select list"),
    ("select to_json(substr(body, 1, 3)) from notes", "an expression in the select list"),
    ("select json_agg(body order by body) from notes", "an expression in the select list"),
    ("select json_build_object('n', body) from notes where body like 'a%'", "WHERE"),
    ("select string_agg(body, ',') from notes", "an expression in the select list"),
    ("select count(distinct body) from notes", "an expression in the select list"),
    ("select count(body) filter (where body like 'x%') from notes",
     "an expression in the select list"),
    ("select lag(body) over () from notes", "an expression in the select list"),
    ("select row_number() over (order by body) from notes",
     "an expression in the select list"),
    ("select id from notes window w as (partition by body)", "WINDOW"),
    # sorting and grouping, by name, alias or position
    ("select body from notes order by body", "ORDER BY"),
    ("select body as x from notes order by x", "ORDER BY"),
    ("select body as id from notes order by id", "ORDER BY"),
    ("select id, body from notes order by 2", "ORDER BY (by position)"),
    ("select *, id from notes order by 1", "ORDER BY (by position)"),
    ("select id, * from notes order by 2", "ORDER BY (by position)"),
    ("select body, count(*) from notes group by body", "GROUP BY"),
    ("select body from notes group by 1", "GROUP BY (by position)"),
    ("select body from notes group by rollup (1)", "GROUP BY (by position)"),
    ("select distinct on (body) id from notes", "DISTINCT ON"),
    ("select distinct on (2) id, body from notes", "DISTINCT ON (by position)"),
    ("select distinct body from notes", "DISTINCT"),
    ("select distinct * from notes", "DISTINCT"),
    # whole rows
    ("select n from notes n", "the select list (a whole-row reference)"),
    ("select notes from notes", "the select list (a whole-row reference)"),
    ("select id from notes n where row_to_json(n)::text ilike '%x%'",
     "WHERE (a whole-row reference)"),
    ("select (n).body from notes n", "an expression in the select list"),
    ("select body(n) from notes n", "an expression in the select list (a whole-row reference)"),
    ("select k, v from notes n, jsonb_each_text(to_jsonb(n)) e(k, v)",
     "FROM (a whole-row reference)"),
    ("select j from (notes n join patients p on p.id = n.patient_id) j",
     "the select list (a whole-row reference)"),
    ("select id from notes n where n is not null", "WHERE (a whole-row reference)"),
    # renamed, nested, combined
    ("select x from (select body as x from notes) s where x ilike '%x%'", "a sub-query in FROM"),
    ("select * from (table notes) t", "a sub-query in FROM (a * that includes it)"),
    ("select x from notes n(i, p, a, x) where x like 'a%'", "WHERE"),
    ("with c as (select body from notes) select * from c", "a CTE (WITH)"),
    ("with c as (select * from notes) select id from c", "a CTE (WITH) (a * that includes it)"),
    ("select * from patients p, lateral (select body from notes n where n.patient_id = p.id) s",
     "a sub-query in FROM"),
    ("select * from patients p where exists (select * from notes n where n.patient_id = p.id)",
     "a sub-query in WHERE (a * that includes it)"),
    ("select (select body from notes limit 1)", "a sub-query in the select list"),
    ("values ((select body from notes limit 1))", "a sub-query in VALUES"),
    ("select body from notes union select 'x'", "a set operation (UNION, INTERSECT, EXCEPT)"),
    ("select body from notes intersect select body from notes",
     "a set operation (UNION, INTERSECT, EXCEPT)"),
    ("select * from notes except select * from notes",
     "a set operation (UNION, INTERSECT, EXCEPT) (a * that includes it)"),
    ("select * from notes natural join patients", "NATURAL JOIN"),
    ("select * from notes join (select 'x') k(body) using (body)", "JOIN ... USING"),
    ("select * from (notes n join patients p on p.id = n.patient_id) j(a, b, c, d)",
     "a column alias list of a join"),
    # writes and other statements
    ("update patients set city = 'x' where id in (select patient_id from notes"
     " where body like '%x%')", "a sub-query in WHERE"),
    ("delete from notes where body like '%x%'", "WHERE"),
    ("delete from notes where id = 1 returning *", "RETURNING (a * that includes it)"),
    ("delete from notes where id = 1 returning body", "RETURNING"),
    ("insert into patients (id) select id from notes where body like 'x'", "INSERT ... SELECT"),
    ("with d as (delete from notes where body like 'x' returning id) select * from d",
     "a CTE (WITH)"),
    # fail closed by name: the column of another relation, named like the free-text one
    ("select body from notes where patient_id in (select id from staff where staff.body = 'x')",
     "a sub-query in WHERE"),
    # two statements: each is judged
    ("select body from notes; select id from notes order by body", "ORDER BY"),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "clause"), REFUSED, ids=[f"refused-{i}" for i in
                                                          range(len(REFUSED))])  # fmt: skip
def test_other_uses_are_found_with_their_clause(sql: str, clause: str) -> None:
    assert use(sql) == (BODY, clause)


def test_an_identity_seeing_free_text_in_clear_is_not_concerned() -> None:
    assert use("select id from notes where body ilike '%x%'", frozenset({"free_text"})) is None
    # Relations without a free-text column do not make anything a use.
    assert use("select id from patients where last_name like 'x%' order by 1") is None


# --- the engine ------------------------------------------------------------------------------

SEARCH = "select id from notes where body ilike '%Olga Harris%'"


def test_the_engine_refuses_with_42501_naming_column_and_clause_never_the_value() -> None:
    answer = decide(engine(), "agent", SEARCH)
    assert (answer["action"], answer["sqlstate"]) == ("deny", "42501")
    assert answer["message"].startswith(f"{BODY} is free text whose identifiers phigate masks")
    assert 'role "agent" may read it as a whole column' in answer["message"]
    assert "in WHERE" in answer["message"] and answer["message"].endswith("(rule: masking)")
    assert "filter the rows in your program" in answer["hint"]
    assert "Olga" not in answer["message"] + answer["hint"]
    # ORDER BY 1 and ORDER BY 2 normalize alike: refusals are reused for their exact text only.
    assert answer["cache"] == "exact"
    allowed = decide(engine(), "agent", "select id, body from notes order by 1")
    assert allowed["action"] == "allow" and allowed["cache"] == "exact"


def test_the_engine_allows_reading_whole_and_roles_seeing_free_text() -> None:
    eng = engine()
    for sql in ("select body from notes", "select * from notes where patient_id = 1",
                "copy notes to stdout"):  # fmt: skip
        assert decide(eng, "agent", sql)["action"] == "allow", sql
    for role in ("reader", "clinician"):
        assert decide(eng, role, SEARCH)["action"] == "allow", role


def test_without_the_dictionary_layer_1_masks_the_search_as_before() -> None:
    for eng in (engine(dictionary=False), engine(kinds=frozenset({"phone"}))):
        # Off, or learning only kinds no column is classified with: the rewrite scrubs the
        # column with the content detectors, and a search runs on that.
        answer = decide(eng, "agent", SEARCH)
        assert answer["action"] == "allow" and "regexp_replace" in answer["rewrite"]
