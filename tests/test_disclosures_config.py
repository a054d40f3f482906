"""`[phi.subjects]` and `[audit] disclosures_exact_max`: parsed and folded, errors naming the
key, subjects refused without an audit trail to record them in, missing relations and key
columns refused when the catalog is read, and decisions naming the subject relations read."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from phigate.audit.keys import write_keys
from phigate.config import Config, parse_config
from phigate.errors import ConfigError
from phigate.masking.classification import resolve_subjects
from phigate.policy.engine import PolicyEngine
from test_config import BASE_TOML, confdir  # noqa: F401  # the fixture


@pytest.fixture
def data(confdir: Path) -> dict[str, Any]:  # noqa: F811
    import tomllib

    d = tomllib.loads(BASE_TOML)
    signer, _, hmac_file = write_keys(confdir / "keys", "phigate.test/gw")
    (confdir / "trail").mkdir()
    d["audit"] = {"dir": "trail", "signing_key": str(signer), "hmac_key": str(hmac_file)}
    return d


def parse(d: dict[str, Any], where: Path) -> Config:
    return parse_config(d, source=str(where / "phigate.toml"))


def with_subjects(d: dict[str, Any], subjects: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(d)
    d["phi"] = {"subjects": subjects}
    return d


def test_subjects_parse_and_fold(data: dict[str, Any], confdir: Path) -> None:  # noqa: F811
    cfg = parse(with_subjects(data, {"public.patients": "id", 'public."Encounters"': "Patient_ID"}),
                confdir)  # fmt: skip
    assert dict(cfg.phi.subjects) == {
        ("public", "patients"): "id", ("public", "Encounters"): "patient_id",
    }  # fmt: skip
    assert cfg.audit is not None and cfg.audit.disclosures_exact_max == 1000
    data["audit"]["disclosures_exact_max"] = 5
    native = json.loads(parse(data, confdir).native_json())
    assert native["audit"]["disclosures_exact_max"] == 5


@pytest.mark.parametrize(
    ("subjects", "text"),
    [
        ({"patients": "id"}, "must name schema.table"),
        ({"public.patients.id": "id"}, "must name schema.table"),
        ({"public.patients": "a.b"}, "must name one column"),
        ({"public.patients": ""}, "non-empty"),
        ({"public.patients": 3}, "must be a string"),
        ({"pg_catalog.pg_class": "oid"}, "system relations"),
        ({"public.patients": "id", "public.PATIENTS": "id"}, "same relation"),
    ],
)
def test_subject_errors_name_the_key(
    data: dict[str, Any], confdir: Path, subjects: dict[str, Any], text: str  # noqa: F811
) -> None:
    with pytest.raises(ConfigError) as info:
        parse(with_subjects(data, subjects), confdir)
    assert info.value.key.startswith("phi.subjects"), info.value.key
    assert text in info.value.message


def test_subjects_need_an_audit_trail(data: dict[str, Any], confdir: Path) -> None:  # noqa: F811
    d = with_subjects(data, {"public.patients": "id"})
    del d["audit"]
    with pytest.raises(ConfigError) as info:
        parse(d, confdir)
    assert info.value.key == "phi.subjects" and "[audit]" in info.value.message
    data["audit"]["disclosures_exact_max"] = 0
    with pytest.raises(ConfigError) as info:
        parse(data, confdir)
    assert info.value.key == "audit.disclosures_exact_max"


@pytest.mark.integration
def test_catalog_resolves_subjects_and_names_what_is_missing(
    data: dict[str, Any], confdir: Path, pg: Any  # noqa: F811
) -> None:
    def resolve(subjects: dict[str, str]) -> Any:
        cfg = parse(with_subjects(data, subjects), confdir)
        with psycopg.connect(pg.service_dsn()) as conn, conn.cursor() as cur:
            return resolve_subjects(cur, cfg, "ehr")

    (enc, pat) = resolve({"public.patients": "id", "public.encounters": "patient_id"})
    assert (pat.name, pat.key_attnum, pat.columns[1]) == ("public.patients", 1, "id")
    assert (enc.name, enc.columns[enc.key_attnum]) == ("public.encounters", "patient_id")
    for subjects, text in [
        ({"public.patientz": "id"}, "relation public.patientz does not exist"),
        ({"public.patients": "patient_id"}, "column 'patient_id' does not exist"),
    ]:
        with pytest.raises(ConfigError) as info:
            resolve(subjects)
        assert info.value.key == f'phi.subjects."{next(iter(subjects))}"'
        assert text in info.value.message


def test_decisions_name_the_subject_relations_read(
    data: dict[str, Any], confdir: Path  # noqa: F811
) -> None:
    d = with_subjects(data, {"public.patients": "id", "public.encounters": "patient_id"})
    d["groups"] = {"g": ["r"]}
    d["roles"] = {"r": {"relations": ["public.*"]}}
    engine = PolicyEngine(parse(d, confdir), {}, {})
    cls = parse(d, confdir).roleset(["r"], "ehr")
    assert cls is not None
    decide = lambda sql: engine.decide(cls.identity_class, sql)  # noqa: E731
    joined = decide("SELECT e.reason FROM encounters e JOIN patients p ON p.id = e.patient_id")
    assert joined["action"] == "allow"
    assert joined["subject_relations"] == ["public.encounters", "public.patients"]
    assert "subject_relations" not in decide("SELECT * FROM diagnoses")
    assert "subject_relations" not in decide("SELECT * FROM nowhere.patients")
