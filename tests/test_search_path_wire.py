"""A target pinned to a schema other than public, through a real gateway with psycopg: names the
client leaves unqualified mean the pinned schema's tables, both to the upstream session and to
policy and masking, so a role granted public.* never reads them by leaving the schema out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import EhrPostgres, GatewayFactory, psycopg_connect
from layer2ref import partial
from phigate.cli import main as cli_main
from phigate.dev.demo import dump_toml
from phigate.dev.pgembed import quote_ident
from phigate.files import write_private

pytestmark = pytest.mark.integration

DATABASE = "pinned_schemas"
# Made-up rows: the same table name in three schemas, distinguishable by every column.
ROWS = {
    "public": [(1, "Public Person", "000-00-0001", "MRN-0001")],
    "pii": [(1, "Alice Example", "123-45-6789", "MRN-1001"),
            (2, "Bob Example", "987-65-4321", "MRN-1002")],
    "Pii Data": [(1, "Carol Example", "555-12-3456", "MRN-2001")],
}  # fmt: skip
ROLES = {
    "public-reader": {"relations": ["public.*"]},
    "pii-reader": {"relations": ["pii.*"]},
    "pii-clear": {"relations": ["pii.*"], "see_clear": ["ssn", "name", "mrn"]},
    "quoted-reader": {"relations": ['"Pii Data".*']},
}
GROUPS = {"pub": ["public-reader"], "pii": ["pii-reader"], "clear": ["pii-clear"],
          "quoted": ["quoted-reader"]}  # fmt: skip
# mrn's type is a domain in public: the rewrite casts to it by the name the catalog read, which
# must resolve in sessions whose search_path is pii.
PHI = {
    "columns": {
        "pii.people.ssn": {"kind": "ssn", "mask": "partial:4"},
        "pii.people.name": {"kind": "name", "mask": "redact"},
        "pii.people.mrn": {"kind": "mrn", "mask": "redact"},
    }
}


@pytest.fixture(scope="module")
def schemas(pg: EhrPostgres) -> Iterator[None]:
    pg.drop_database(DATABASE)
    pg.create_database(DATABASE)
    svc = quote_ident(pg.service_user)
    sql = [f"GRANT CONNECT ON DATABASE {quote_ident(DATABASE)} TO {svc};",
           "CREATE DOMAIN public.mrn_t AS text;"]  # fmt: skip
    for schema, rows in ROWS.items():
        s = quote_ident(schema)
        if schema != "public":
            sql.append(f"CREATE SCHEMA {s};")
        sql += [
            f"CREATE TABLE {s}.people (id int PRIMARY KEY, name text, ssn text, mrn public.mrn_t);",
            f"GRANT USAGE ON SCHEMA {s} TO {svc};",
            f"GRANT SELECT ON {s}.people TO {svc};",
        ]
        sql += [f"INSERT INTO {s}.people VALUES ({i}, '{n}', '{ssn}', '{mrn}');"  # noqa: S608
                for i, n, ssn, mrn in rows]  # fmt: skip
    # Defaults the database sets for the gateway's user, which its startup packet overrides.
    db = quote_ident(DATABASE)
    sql += [f"ALTER DATABASE {db} SET standard_conforming_strings = off;",
            f"ALTER ROLE {svc} IN DATABASE {db} SET search_path = public, pii;"]  # fmt: skip
    pg.psql("\n".join(sql) + "\n", dbname=DATABASE)
    yield
    pg.drop_database(DATABASE)


@pytest.fixture(scope="module")
def gateways(
    pg: EhrPostgres, dev_issuer: Any, dev_cert: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(pg, dev_issuer, dev_cert, tmp_path_factory.mktemp("pinned"))
    yield factory
    factory.stop_all()


def _pinned(schema: str, **extra: Any) -> dict[str, Any]:
    return {
        "targets": {"ehr": {"database": DATABASE, "params": {"search_path": schema}}},
        "groups": GROUPS,
        "roles": ROLES,
        **extra,
    }


@pytest.fixture(scope="module")
def pinned_gateway(gateways: GatewayFactory, schemas: None) -> Any:
    return gateways(**_pinned("pii"))


def _refused(conn: psycopg.Connection[Any], sql: str) -> str:
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
        conn.execute(sql)
    return str(exc.value)


def test_public_role_is_refused_on_the_pinned_schemas_tables(pinned_gateway, token):
    with psycopg_connect(pinned_gateway, token(groups=("pub",))) as conn:
        # What the upstream session resolves names with is what policy resolved them with.
        assert conn.execute("show search_path").fetchone() == ("pii",)
        message = _refused(conn, "SELECT name, ssn FROM people")
        assert "pii.people" in message and "rule: relation" in message
        _refused(conn, "SELECT p.name FROM people p JOIN public.people q USING (id)")
        _refused(conn, "WITH x AS (SELECT 1 AS id) SELECT name FROM x JOIN people USING (id)")
        # Its own schema, named, still works, and a CTE still shadows the table's name.
        assert conn.execute("SELECT * FROM public.people").fetchall() == ROWS["public"]
        assert conn.execute("WITH people AS (SELECT 7 AS id) SELECT id FROM people").fetchall() == [
            (7,)
        ]


def test_database_defaults_cannot_change_how_the_server_reads_statements(pinned_gateway, token):
    # The database defaults standard_conforming_strings to off and the gateway user's
    # search_path to "public, pii"; the gateway's own startup values win over both.
    with psycopg_connect(pinned_gateway, token(groups=("pub",))) as conn:
        assert conn.execute("show standard_conforming_strings").fetchone() == ("on",)
        assert conn.execute("show search_path").fetchone() == ("pii",)
        # With backslash escapes on, the server would read this as one literal, then pii's
        # names and SSNs; the gateway's parser, and the server, read two literals.
        smuggle = "select 'a\\' , ' , name, ssn from people --'"
        assert conn.execute(smuggle).fetchall() == [("a\\", " , name, ssn from people --")]


def test_pii_role_reads_the_pinned_schemas_rows(pinned_gateway, token):
    with psycopg_connect(pinned_gateway, token(groups=("clear",))) as conn:
        assert conn.execute("SELECT * FROM people ORDER BY id").fetchall() == ROWS["pii"]
        assert "public.people" in _refused(conn, "SELECT name FROM public.people")


def test_several_schemas_are_refused_by_check_config(
    gateways: GatewayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = gateways.settings(**_pinned("pii, public"))
    path = write_private(tmp_path / "phigate.toml", dump_toml(settings))
    assert cli_main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: targets.ehr.params.search_path: 'pii, public' names 2 schemas" in err
    assert "cannot know when it judges the statement" in err


@pytest.fixture(scope="module")
def masked_gateway(gateways: GatewayFactory, schemas: None) -> Any:
    return gateways(**_pinned("pii", phi=PHI))


def test_masked_identity_gets_masked_values_from_unqualified_names(masked_gateway, token):
    real = ROWS["pii"]
    with psycopg_connect(masked_gateway, token(groups=("pii",))) as conn:
        # A plain read (masked by the data plane from the column origins)...
        rows = conn.execute("SELECT id, name, ssn FROM people").fetchall()
        assert sorted(rows) == [(i, "***", partial(ssn, 4)) for i, _, ssn, _ in real]
        # ...and values computed from the columns: masked at the source by the rewrite, whose
        # casts name mrn's type as these sessions resolve it.
        computed = conn.execute(
            "SELECT upper(name), ssn || '', mrn FROM people ORDER BY id"
        ).fetchall()
        assert [r[:2] for r in computed] == [("***", partial(ssn, 4)) for _, _, ssn, _ in real]
        assert not {r[2] for r in computed} & {mrn for *_, mrn in real}
        # ...and a predicate on a clear value matches nothing (no oracle).
        count = conn.execute("SELECT count(*) FROM people WHERE ssn = %s", (real[0][2],))
        assert count.fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM people WHERE name LIKE 'Alice%'").fetchone() == (
            0,
        )
    with psycopg_connect(masked_gateway, token(groups=("clear",))) as conn:
        assert conn.execute("SELECT * FROM people ORDER BY id").fetchall() == real


def test_a_quoted_schema_reaches_upstream_as_the_same_name(gateways, schemas, token):
    gw = gateways(**_pinned('"Pii Data"'))
    with psycopg_connect(gw, token(groups=("quoted",))) as conn:
        assert conn.execute("show search_path").fetchone() == ('"Pii Data"',)
        assert conn.execute("SELECT * FROM people").fetchall() == ROWS["Pii Data"]
    with psycopg_connect(gw, token(groups=("pii",))) as conn:
        assert '"Pii Data".people' in _refused(conn, "SELECT name FROM people")
