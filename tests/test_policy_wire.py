"""Statement policy through a real gateway and real drivers: SQLSTATEs, messages, hints, the
session staying usable, pipelines, driver introspection under a narrow role, and reload."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from harness import asyncpg_connect, psycopg_connect

ROLES = {
    "groups": {"analysts": ["analyst"]},
    "roles": {
        "analyst": {
            "relations": ["public.encounters", "public.diagnoses"],
            "columns": {"public.encounters": ["id", "patient_id", "department"]},
        },
    },
}


@pytest.fixture
def analyst_gateway(gateway_factory: Any) -> Any:
    return gateway_factory(**ROLES)


def test_refusals_carry_sqlstate_rule_and_hint_and_the_session_survives(
    analyst_gateway: Any, token: Any
) -> None:
    tok = token(groups=("analysts",))
    with psycopg_connect(analyst_gateway, tok) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("select mrn from patients where mrn = 'MRN-000001'")
        diag = info.value.diag
        assert diag.sqlstate == "42501"
        assert diag.message_primary == (
            'relation public.patients is not allowed for role "analyst" (rule: relation)'
        )
        assert diag.message_hint == (
            'ask your gateway administrator to add relation public.patients to role "analyst"'
        )
        assert "MRN-000001" not in str(info.value)
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("selec 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="rule: column"):
            conn.execute("select reason from encounters limit 1")
        # Still usable, in and out of a transaction.
        assert conn.execute("select count(*) > 0 from encounters").fetchone() == (True,)
        with conn.transaction():
            assert conn.execute("select department from encounters limit 1").fetchone()


def test_a_refusal_in_a_pipeline_skips_to_sync_like_postgres(
    analyst_gateway: Any, token: Any
) -> None:
    tok = token(groups=("analysts",))
    with psycopg_connect(analyst_gateway, tok, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.pipeline():
            conn.execute("select 1")
            conn.execute("select * from notes")
            conn.execute("select 2")
        assert conn.execute("select 3").fetchone() == (3,)


def test_asyncpg_introspection_works_for_a_narrow_role(analyst_gateway: Any, token: Any) -> None:
    async def main() -> None:
        conn = await asyncpg_connect(analyst_gateway, token(groups=("analysts",)))
        try:
            # Composite, range and array results make asyncpg introspect types (pg_type,
            # pg_range, pg_attribute, ... and its set_config('jit', ...) around it).
            row = await conn.fetchrow(
                "select row(1, 'x'::text) as r, int4range(1, 5) as rg, array[now()] as a"
            )
            assert row["rg"].lower == 1
            await conn.reset()  # asyncpg's pool reset: unlock_all, CLOSE ALL, UNLISTEN, RESET
            assert await conn.fetchval("select count(*) from diagnoses") >= 0
        finally:
            await conn.close()

    asyncio.run(main())


def test_reload_applies_to_the_next_statement_of_a_live_session(
    analyst_gateway: Any, token: Any
) -> None:
    from phigate.config import load_config
    from phigate.dev.demo import dump_toml, merge_config

    tok = token(groups=("analysts",))
    with psycopg_connect(analyst_gateway, tok) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select count(*) from medications")
        wider = merge_config(
            analyst_gateway.settings,
            {"roles": {"analyst": {"relations": ["public.encounters", "public.diagnoses",
                                                 "public.medications"]}}},
        )  # fmt: skip
        analyst_gateway.config_path.write_text(dump_toml(wider))
        analyst_gateway.thread.reload(load_config(analyst_gateway.config_path))
        assert conn.execute("select count(*) >= 0 from medications").fetchone() == (True,)


def test_a_session_whose_target_a_reload_removed_is_refused_with_3d000(
    analyst_gateway: Any, token: Any
) -> None:
    from phigate.config import load_config

    tok = token(groups=("analysts",))
    with psycopg_connect(analyst_gateway, tok, autocommit=True) as conn:
        assert conn.execute("select count(*) > 0 from encounters").fetchone() == (True,)
        path = analyst_gateway.config_path
        original = path.read_text()
        assert "[targets.ehr]" in original
        path.write_text(original.replace("[targets.ehr]", "[targets.renamed]"))
        try:
            analyst_gateway.thread.reload(load_config(path))
            with pytest.raises(psycopg.errors.InvalidCatalogName) as info:
                conn.execute("select count(*) from encounters")
            assert info.value.diag.sqlstate == "3D000"
            assert "no longer a target" in (info.value.diag.message_primary or "")
            assert info.value.diag.message_hint is not None
        finally:
            path.write_text(original)
