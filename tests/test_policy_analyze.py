"""The analyzer's fact sheets: kinds, relations, columns and clauses, functions, flags."""

from __future__ import annotations

import pytest

from phigate.policy.analyze import Facts, analyze


def one(sql: str) -> Facts:
    facts = analyze(sql, schema="public")
    assert len(facts) == 1, facts
    assert facts[0].fail is None, facts[0].fail
    return facts[0]


def cols(f: Facts) -> set[tuple[str, str, str]]:
    return {(".".join(c.candidates[0]), c.column, c.clause) for c in f.columns if c.exact}


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("select 1", "select"), ("insert into t values (1)", "insert"),
        ("update t set a = 1", "update"), ("delete from t", "delete"),
        ("merge into t using s on t.id = s.id when matched then delete", "merge"),
        ("copy t to stdout", "copy_to"), ("copy t from stdin", "copy_from"),
        ("create table t (a int)", "ddl"), ("select * into t2 from t", "ddl"),
        ("truncate t", "truncate"), ("begin", "transaction"), ("set a.b = 1", "set"),
        ("show x", "show"), ("reset x", "reset"), ("reset all", "reset"),
        ("explain select 1", "explain"), ("lock t", "lock"), ("vacuum t", "maintenance"),
        ("call p()", "call"), ("do $$ begin end $$", "do"), ("prepare p as select 1", "prepare"),
        ("execute p", "execute"), ("deallocate p", "deallocate"), ("listen c", "listen"),
        ("notify c", "notify"), ("unlisten c", "unlisten"), ("discard all", "discard"),
        ("declare c cursor for select 1", "declare_cursor"), ("fetch c", "fetch"),
        ("close c", "close_cursor"), ("set role x", "set_role"), ("reset role", "set_role"),
        ("set session authorization x", "set_session_authorization"),
        ("grant select on t to x", "admin"), ("alter system set x = 1", "admin"),
    ],
)  # fmt: skip
def test_statement_kinds(sql: str, kind: str) -> None:
    assert one(sql).kind == kind


def test_relations_resolve_with_pinned_search_path_and_pg_catalog_first() -> None:
    f = one('select * from patients, pg_class, "Notes", s.x, U&"\\0070g_type"')
    assert [r[:2] for r in f.relations] == [
        ("public", "patients"),
        ("pg_catalog", "pg_class"),
        ("public", "Notes"),
        ("s", "x"),
        ("pg_catalog", "pg_type"),
    ]


def test_unqualified_names_resolve_to_the_pinned_schema() -> None:
    def pinned(sql: str, schema: str = "pii") -> Facts:
        (f,) = analyze(sql, schema=schema)
        assert f.fail is None, f.fail
        return f

    f = pinned('select * from people, pg_class, "Notes", public.x, U&"\\0070eople" u')
    assert [r[:2] for r in f.relations] == [
        ("pii", "people"),
        ("pg_catalog", "pg_class"),  # pg_catalog is still searched first
        ("pii", "Notes"),
        ("public", "x"),
        ("pii", "people"),
    ]
    assert pinned("select 1 from people", schema="Pii Data").relations == [
        ("Pii Data", "people", "select")
    ]
    g = pinned("select lower(name), risk(1), public.f() from people")
    assert g.functions == [
        (None, "lower", "pg_catalog"), (None, "risk", "pii"), ("public", "f", "public"),
    ]  # fmt: skip
    assert {(".".join(c.candidates[0]), c.column) for c in g.columns} == {("pii.people", "name")}
    for sql, rels in [
        ("with people as (select 1 as id) select id from people", []),
        ("with people as (select 1) delete from people", [("pii", "people", "delete")]),
        ("insert into people (name) select name from public.people",
         [("pii", "people", "insert"), ("public", "people", "select")]),
        ("copy people to stdout", [("pii", "people", "copy_to")]),
        ("create temp table people (a int)", [("pg_temp", "people", "ddl")]),
        ("lock people", [("pii", "people", "select")]),
        ("drop table people", [("pii", "people", "ddl")]),
    ]:  # fmt: skip
        assert pinned(sql).relations == rels, sql


def test_cte_shadows_relations_but_not_dml_targets() -> None:
    assert one("with patients as (select 1 as id) select id from patients").relations == []
    f = one("with notes as (select 1) delete from notes")
    assert f.relations == [("public", "notes", "delete")]


def test_data_modifying_cte_writes() -> None:
    f = one("with x as (delete from notes where id = 1 returning *) select * from x")
    assert f.kind == "select" and f.writes and f.data_modifying_ctes
    assert ("public", "notes", "delete") in f.relations


def test_columns_and_clauses_with_aliases() -> None:
    f = one(
        "select p.mrn, e.department from patients p join encounters e on e.patient_id = p.id "
        "where p.date_of_birth < $1 group by p.mrn, e.department having count(*) > 1 "
        "order by e.department limit 3"
    )
    assert cols(f) >= {
        ("public.patients", "mrn", "target"), ("public.encounters", "department", "target"),
        ("public.encounters", "patient_id", "join"), ("public.patients", "id", "join"),
        ("public.patients", "date_of_birth", "where"), ("public.patients", "mrn", "group"),
        ("public.encounters", "department", "order"),
    }  # fmt: skip
    assert f.has_where and f.has_limit and f.params and not f.writes


def test_star_whole_row_and_unqualified_candidates() -> None:
    f = one("select p, e.*, x from patients p, encounters e")
    assert ("public.patients", "*", "target") in cols(f)
    assert ("public.encounters", "*", "target") in cols(f)
    (x,) = [c for c in f.columns if c.column == "x"]
    assert not x.exact and set(x.candidates) == {("public", "patients"), ("public", "encounters")}


def test_update_insert_set_and_returning() -> None:
    f = one("update patients set phone = upper(phone) where id = 1 returning mrn")
    assert [(c.column, c.clause, c.write) for c in f.columns if c.write] == [
        ("phone", "set", "update")
    ]
    assert ("public.patients", "mrn", "returning") in cols(f)
    g = one("insert into notes select * from notes")
    assert [(c.column, c.write) for c in g.columns if c.write] == [("*", "insert")]


def test_functions_schema_and_literal_sensitivity() -> None:
    f = one("select lower(x), public.f(1), pg_catalog.upper('a') from t")
    assert f.functions == [
        (None, "lower", "pg_catalog"), ("public", "f", "public"),
        ("pg_catalog", "upper", "pg_catalog"),
    ]  # fmt: skip
    assert not f.literal_sensitive  # upper('a'): the literal is data
    assert one("select 'notes'::regclass").literal_sensitive
    assert one("select current_setting('jit')").literal_sensitive
    assert one("set statement_timeout = 5").literal_sensitive
    assert not one("select id from t where name = 'x'").literal_sensitive


def test_set_copy_explain_details() -> None:
    f = one("set local TimeZone = 'UTC'")
    assert (f.set_name, f.set_values, f.set_local) == ("timezone", ("UTC",), True)
    c = one("copy (select 1) to program 'x'")
    assert (c.copy_direction, c.copy_target, c.copy_query) == ("to", "program", True)
    e = one("explain (analyze, costs off) delete from t")
    assert e.explain_analyze and e.inner_kind == "delete" and e.writes
    assert not one("explain (analyze false) select 1").explain_analyze


@pytest.mark.parametrize(
    "options",
    ["analyze", "analyze true", "analyze on", "analyze 1", "analyze 'ON'", "analyze 'true'",
     "analyze on, analyze off", "analyze 2"],
)  # fmt: skip
def test_every_spelling_of_explain_analyze_is_seen(options: str) -> None:
    assert one(f"explain ({options}) select 1").explain_analyze
    assert one(f"explain ({options.replace('analyze', 'verbose')}) select 1").explain_verbose


@pytest.mark.parametrize("options", ["analyze false", "analyze off", "analyze 0", "analyze 'OFF'"])
def test_explain_analyze_spelled_off(options: str) -> None:
    assert not one(f"explain ({options}) select 1").explain_analyze
    assert not one(f"explain ({options.replace('analyze', 'verbose')}) select 1").explain_verbose


def test_set_operations_subqueries_locking() -> None:
    f = one("select a from t where b in (select b from u) union select 1 for update")
    assert f.set_operations and f.subqueries == 1
    assert one("select a from t for update").locking


def test_multi_statement_and_fail_closed() -> None:
    assert [f.kind for f in analyze("select 1; delete from t; ", schema="public")] == [
        "select",
        "delete",
    ]
    (bad,) = analyze("select 'x", schema="public")
    assert bad.fail is not None and bad.fail.sqlstate == "42601"
    assert "'x" not in bad.fail.message and "at character 8" in bad.fail.message
    (cross,) = analyze("select * from db.s.t", schema="public")
    assert cross.fail is not None and cross.fail.sqlstate == "42501"
    assert analyze("", schema="public") == [] and analyze("-- nothing", schema="public") == []


def test_unknown_node_types_fail_closed() -> None:
    (f,) = analyze("create rule r as on insert to t do instead nothing", schema="public")
    assert f.fail is not None and f.fail.message == "phigate cannot analyze RuleStmt yet"
