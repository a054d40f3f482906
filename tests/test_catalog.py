"""Classification against a real PostgreSQL: OIDs, attnums, partitions, children and views."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import EhrPostgres
from phigate.cli import main as cli_main
from phigate.config import Config, parse_config
from phigate.dev.demo import dump_toml
from phigate.errors import ConfigError
from phigate.files import write_private
from phigate.masking.classification import CatalogError, CatalogSnapshot, load_catalog

pytestmark = pytest.mark.integration

COLUMNS: dict[str, Any] = {
    "public.patients.ssn": {"kind": "ssn", "mask": "partial:4"},
    "public.patients.first_name": {"kind": "name", "mask": "pseudonym"},
    "public.patients.date_of_birth": {"kind": "dob", "mask": "year"},
    "public.patients.email": {"kind": "email", "mask": "email_domain"},
    "public.notes.body": {"kind": "free_text", "mask": "free_text"},
}

OBJECTS = """
CREATE TABLE cat_pat_part (id bigint NOT NULL, ssn text, date_of_birth date)
    PARTITION BY RANGE (id);
CREATE TABLE cat_pat_part_1 PARTITION OF cat_pat_part FOR VALUES FROM (0) TO (100);
CREATE TABLE cat_pat_part_2 (date_of_birth date, filler int, id bigint NOT NULL, ssn text);
ALTER TABLE cat_pat_part_2 DROP COLUMN filler;
ALTER TABLE cat_pat_part ATTACH PARTITION cat_pat_part_2 FOR VALUES FROM (100) TO (200);
CREATE TABLE cat_pat_child (ward text) INHERITS (patients);
CREATE TABLE cat_grandchild (bed int) INHERITS (cat_pat_child);
CREATE VIEW cat_v_renamed AS SELECT p.id, p.ssn AS tax_id, p.city FROM patients p;
CREATE VIEW cat_v_expr AS SELECT id, upper(first_name) AS shout FROM patients;
CREATE VIEW cat_v_where AS SELECT id, city FROM patients WHERE ssn LIKE '1%';
CREATE VIEW cat_v_wholerow AS SELECT row_to_json(p) AS doc FROM patients p;
CREATE VIEW cat_v_union AS SELECT ssn FROM patients UNION ALL SELECT 'x';
CREATE VIEW cat_v_harmless AS SELECT id, city FROM patients;
CREATE VIEW cat_v_join AS
    SELECT n.id, n.body AS note, e.department
      FROM notes n JOIN encounters e ON e.id = n.encounter_id;
CREATE VIEW cat_v_over_view AS SELECT tax_id AS t FROM cat_v_renamed;
CREATE VIEW cat_v_over_refused AS SELECT id FROM cat_v_expr;
CREATE MATERIALIZED VIEW cat_mv AS SELECT id, email, date_of_birth AS dob FROM patients;
CREATE TABLE cat_zips (zip_int integer, zip_short character(3), zip_ok character varying(10));
GRANT SELECT ON cat_pat_part, cat_pat_part_1, cat_pat_part_2, cat_pat_child, cat_grandchild,
    cat_zips, cat_mv TO {svc};
"""
CLEANUP = """
DROP MATERIALIZED VIEW IF EXISTS cat_mv;
DROP VIEW IF EXISTS cat_v_over_view, cat_v_over_refused, cat_v_renamed, cat_v_expr, cat_v_where,
    cat_v_wholerow, cat_v_union, cat_v_harmless, cat_v_join;
DROP TABLE IF EXISTS cat_grandchild, cat_pat_child, cat_pat_part, cat_zips;
"""


@pytest.fixture(scope="module")
def objects(pg: EhrPostgres) -> Iterator[EhrPostgres]:
    pg.psql(CLEANUP + OBJECTS.format(svc=pg.service_user), dbname=pg.ehr_database)
    try:
        yield pg
    finally:
        pg.psql(CLEANUP, dbname=pg.ehr_database)


@pytest.fixture(scope="module")
def confdir(tmp_path_factory: pytest.TempPathFactory, pg: EhrPostgres) -> Path:
    d = tmp_path_factory.mktemp("catalog")
    write_private(d / "ehr.password", pg.service_password + "\n")
    key = d / "pseudonym.key"
    key.write_bytes(bytes(range(40)))
    key.chmod(0o600)
    return d


def settings(pg: EhrPostgres, confdir: Path, columns: dict[str, Any], **target: Any) -> Any:
    return {
        "server": {"listen": "127.0.0.1:0", "require_tls": False},
        "identity": {"oidc": {"issuer": "https://idp.example/", "audience": "phigate",
                              "jwks_url": "https://idp.example/jwks"}},
        "targets": {"ehr": {"host": pg.host, "port": pg.port, "database": pg.ehr_database,
                            "user": pg.service_user, "password_file": str(confdir / "ehr.password"),
                            "tls": "disable", "connect_timeout": 3, **target}},
        "phi": {"columns": columns, "pseudonym_key_file": str(confdir / "pseudonym.key")},
    }  # fmt: skip


def config_for(pg: EhrPostgres, confdir: Path, columns: dict[str, Any], **target: Any) -> Config:
    data = settings(pg, confdir, columns, **target)
    return parse_config(data, source=str(confdir / "phigate.toml"))


@pytest.fixture(scope="module")
def snap(objects: EhrPostgres, confdir: Path) -> CatalogSnapshot:
    cols = {**COLUMNS, "public.cat_pat_part.ssn": {"kind": "ssn", "mask": "redact"}}
    return load_catalog(config_for(objects, confdir, cols), "ehr")


def q(pg: EhrPostgres, sql: str) -> str:
    return pg.psql(sql, dbname=pg.ehr_database).strip()


def oid(pg: EhrPostgres, rel: str) -> int:
    return int(q(pg, f"SELECT '{rel}'::regclass::oid"))


def attnum(pg: EhrPostgres, rel: str, col: str) -> int:
    sql = "SELECT attnum FROM pg_attribute WHERE attrelid = '%s'::regclass AND attname = '%s'"
    return int(q(pg, sql % (rel, col)))


def test_classified_table_columns_oids_and_attnums(objects: EhrPostgres, snap: Any) -> None:
    pg = objects
    rel = snap.relation("public", "patients")
    assert rel is not None and rel.origin == "configured" and rel.relkind == "r"
    assert rel.oid == oid(pg, "public.patients")
    names = q(pg, "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute "
                  "WHERE attrelid = 'public.patients'::regclass AND attnum > 0 "
                  "AND NOT attisdropped")  # fmt: skip
    assert [c.name for c in rel.columns] == names.split(",")
    for c in rel.columns:
        assert c.attnum == attnum(pg, "public.patients", c.name)
    ssn = rel.column("ssn")
    assert ssn.type_oid == 25 and ssn.type_name == "text" and ssn.not_null
    assert ssn.rule.kind == "ssn" and ssn.rule.mask_spec == "partial:4"
    assert ssn.rule.config_key == 'phi.columns."public.patients.ssn"'
    dob = rel.column("date_of_birth")
    assert dob.type_oid == 1082 and dob.type_name == "date" and dob.rule.mask == "year"
    assert rel.column("city").rule is None
    assert snap.rule_for(rel.oid, ssn.attnum) is ssn.rule
    assert snap.rule_for(rel.oid, rel.column("id").attnum) is None
    assert {c.name for c in rel.masked_columns(frozenset({"dob", "name"}))} == {"ssn", "email"}
    notes = snap.relation("public", "notes")
    assert notes.oid == oid(pg, "public.notes")
    assert snap.rule_for(notes.oid, attnum(pg, "public.notes", "body")).mask == "free_text"
    assert snap.relation("public", "encounters") is None


def test_partitions_follow_column_names_not_attnums(objects: EhrPostgres, snap: Any) -> None:
    pg = objects
    p2 = snap.relation("public", "cat_pat_part_2")
    assert p2.origin == "partition" and p2.oid == oid(pg, "public.cat_pat_part_2")
    a = attnum(pg, "public.cat_pat_part_2", "ssn")
    assert a == 4 and p2.column("ssn").attnum == 4  # a dropped column sits at 2
    assert [c.name for c in p2.columns] == ["date_of_birth", "id", "ssn"]
    assert snap.rule_for(p2.oid, a).mask == "redact"
    parent = snap.relation("public", "cat_pat_part")
    assert p2.derived_from == (parent.oid,)
    assert p2.column("ssn").source == (parent.oid, attnum(pg, "public.cat_pat_part", "ssn"))
    p1 = snap.relation("public", "cat_pat_part_1")
    assert snap.rule_for(p1.oid, attnum(pg, "public.cat_pat_part_1", "ssn")).mask == "redact"


def test_inheritance_children_recursively(objects: EhrPostgres, snap: Any) -> None:
    pg = objects
    for name in ("cat_pat_child", "cat_grandchild"):
        rel = snap.relation("public", name)
        assert rel.origin == "child" and rel.oid == oid(pg, f"public.{name}")
        a = attnum(pg, f"public.{name}", "ssn")
        assert snap.rule_for(rel.oid, a).kind == "ssn"
        assert rel.column("first_name").rule.mask == "pseudonym"
        assert rel.column("city").rule is None
    assert snap.relation("public", "cat_grandchild").derived_from == (
        oid(pg, "public.cat_pat_child"),
    )


def test_views_map_plain_columns_and_refuse_the_rest(objects: EhrPostgres, snap: Any) -> None:
    pg = objects
    v = snap.relation("public", "cat_v_renamed")
    assert v.origin == "view" and not v.refuse and v.oid == oid(pg, "public.cat_v_renamed")
    assert [c.name for c in v.columns] == ["id", "tax_id", "city"]
    assert snap.rule_for(v.oid, 2).mask_spec == "partial:4"
    assert v.column("id").rule is None and v.column("city").rule is None
    mv = snap.relation("public", "cat_mv")
    assert mv.relkind == "m" and mv.oid == oid(pg, "public.cat_mv")
    assert mv.column("email").rule.mask == "email_domain" and mv.column("dob").rule.mask == "year"
    j = snap.relation("public", "cat_v_join")
    assert j.column("note").rule.kind == "free_text" and j.column("department").rule is None
    over = snap.relation("public", "cat_v_over_view")
    assert over.column("t").rule.kind == "ssn" and over.derived_from == (v.oid,)
    refused = {("public", n) for n in (
        "cat_v_expr", "cat_v_where", "cat_v_wholerow", "cat_v_union", "cat_v_over_refused",
    )}  # fmt: skip
    assert snap.views_to_refuse() == refused
    for _, name in refused:
        rel = snap.relation("public", name)
        assert rel.refuse and all(c.rule is None for c in rel.columns)
        assert snap.rule_for(rel.oid, 1) is None
    assert snap.relation("public", "cat_v_harmless") is None
    assert "selects from public.cat_v_expr" in snap.relation("public", "cat_v_over_refused")\
        .refuse_reason


def test_protected_sets(objects: EhrPostgres, snap: Any) -> None:
    pg = objects
    names = {
        "patients", "notes", "cat_pat_part", "cat_pat_part_1", "cat_pat_part_2", "cat_pat_child",
        "cat_grandchild", "cat_v_renamed", "cat_v_expr", "cat_v_where", "cat_v_wholerow",
        "cat_v_union", "cat_v_join", "cat_v_over_view", "cat_v_over_refused", "cat_mv",
    }  # fmt: skip
    assert snap.protected_relations() == {("public", n) for n in names}
    assert snap.protected_oids() == {oid(pg, f"public.{n}") for n in names}


def test_partition_classified_alone_protects_its_parent(
    objects: EhrPostgres, confdir: Path
) -> None:
    cols = {"public.cat_pat_part_2.ssn": {"kind": "ssn", "mask": "null"}}
    snap = load_catalog(config_for(objects, confdir, cols), "ehr")
    parent = snap.relation("public", "cat_pat_part")
    assert parent.origin == "ancestor" and parent.column("ssn").rule.mask == "null"
    assert snap.relation("public", "cat_pat_part_1") is None


@pytest.mark.parametrize(
    ("column", "rule", "text"),
    [
        ("public.patients.nope", {"kind": "ssn"}, "column 'nope' does not exist"),
        ("public.nope.ssn", {"kind": "ssn"}, "relation public.nope does not exist"),
        ("public.patients.city", {"kind": "dob", "mask": "year"}, "needs a date"),
        ("public.patients.id", {"kind": "other", "mask": "partial:2"}, "needs a text column"),
        ("public.cat_zips.zip_int", {"kind": "zip", "mask": "zip3"}, "store ZIPs as text"),
        ("public.cat_zips.zip_short", {"kind": "zip", "mask": "zip3"}, "shows five characters"),
    ],
)
def test_config_errors_name_the_key(
    objects: EhrPostgres, confdir: Path, column: str, rule: dict[str, str], text: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_catalog(config_for(objects, confdir, {column: rule}), "ehr")
    assert info.value.key == f'phi.columns."{column}"'
    assert text in info.value.message


def test_zip3_fits_a_text_column_of_five_or_more(objects: EhrPostgres, confdir: Path) -> None:
    cols = {
        "public.cat_zips.zip_ok": {"kind": "zip", "mask": "zip3"},
        "public.patients.zip": {"kind": "zip", "mask": "zip3"},
    }
    snap = load_catalog(config_for(objects, confdir, cols), "ehr")
    assert snap.relation("public", "cat_zips").column("zip_ok").rule.mask == "zip3"
    assert snap.relation("public", "patients").column("zip").rule.mask == "zip3"


def test_unreachable_upstream(objects: EhrPostgres, confdir: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read the catalog of target 'ehr'"):
        load_catalog(config_for(objects, confdir, COLUMNS, port=1), "ehr")


def test_cli_catalog_show(
    objects: EhrPostgres, confdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = confdir / "phigate.toml"
    path.write_text(dump_toml(settings(objects, confdir, COLUMNS)))
    assert cli_main(["catalog", "show", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "public.patients [oid" in out and "ssn (attnum 5, text): kind ssn, mask partial:4" in out
    assert "public.cat_v_expr" in out and "REFUSED" in out
    assert cli_main(["catalog", "show", "--config", str(path), "--target", "ehr", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rels = {r["name"]: r for r in doc[0]["relations"]}
    assert rels["patients"]["oid"] == oid(objects, "public.patients")
    assert rels["cat_pat_child"]["origin"] == "child"
    bad = confdir / "bad.toml"
    bad.write_text(dump_toml(settings(objects, confdir, COLUMNS, port=1)))
    assert cli_main(["catalog", "show", "--config", str(bad)]) == 1
    assert "cannot read the catalog" in capsys.readouterr().err


def test_an_unreadable_identifier_column_fails_the_read_with_advice(
    objects: EhrPostgres, confdir: Path
) -> None:
    """The dictionary must read every identifier column it is configured for: a table the
    service user cannot read fails the catalog (masked identities are refused) with a message
    that says what to grant."""
    q(objects, "CREATE TABLE cat_secret_names (id int, name text)")
    try:
        cols = {**COLUMNS, "public.cat_secret_names.name": {"kind": "name", "mask": "redact"}}
        with pytest.raises(CatalogError) as err:
            load_catalog(config_for(objects, confdir, cols), "ehr")
        msg = str(err.value)
        assert "public.cat_secret_names.name" in msg and "lacks SELECT" in msg
        assert "[phi.dictionary] kinds" in msg
        # Without the dictionary (or without that kind in it) the catalog reads.
        data = settings(objects, confdir, cols)
        data["phi"]["dictionary"] = {"kinds": ["ssn", "email"]}
        snap = load_catalog(parse_config(data, source=str(confdir / "phigate.toml")), "ehr")
        assert snap.relation("public", "cat_secret_names") is not None
    finally:
        q(objects, "DROP TABLE cat_secret_names")
