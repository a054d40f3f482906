"""Config loading: defaults, every validation an operator can trip over, and the data-plane JSON."""

# ruff: noqa: S105  # the "passwords" here are test fixtures and key names

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from phigate.cli import main as cli_main
from phigate.config import DEFAULT_STARTUP_PARAMETERS, Config, load_config, parse_config
from phigate.errors import ConfigError

SECRET = "s3cr3t-upstream-pw"

BASE_TOML = """
[server]
listen = "127.0.0.1:0"
tls_cert = "tls/server.crt"
tls_key = "tls/server.key"

[identity.oidc]
issuer = "https://idp.example/"
audience = "phigate"
jwks_file = "jwks.json"

[targets.ehr]
host = "db.internal"
port = 5433
database = "ehr"
user = "phigate_svc"
password_file = "ehr.password"
ca_file = "upstream-ca.pem"
"""


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls/server.crt").write_text("cert")
    (tmp_path / "tls/server.key").write_text("key")
    (tmp_path / "jwks.json").write_text(
        json.dumps({"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}]})
    )
    (tmp_path / "upstream-ca.pem").write_text("ca")
    (tmp_path / "ehr.password").write_text(SECRET + "\n")
    (tmp_path / "phigate.toml").write_text(BASE_TOML)
    return tmp_path


@pytest.fixture
def base(confdir: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(BASE_TOML)


def parse(data: dict[str, Any], confdir: Path) -> Config:
    return parse_config(data, source=str(confdir / "phigate.toml"))


def error(data: dict[str, Any], confdir: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(data, confdir)
    return info.value


def test_valid_file_loads_with_defaults_and_resolves_relative_paths(confdir: Path) -> None:
    config = load_config(confdir / "phigate.toml")
    s = config.server
    assert s.listen == ("127.0.0.1:0",)
    assert s.require_tls is True
    assert s.tls_cert == confdir / "tls/server.crt"
    assert 1 <= s.workers <= 8
    assert (s.auth_timeout, s.decision_timeout, s.startup_timeout, s.drain_timeout) == (
        10,
        5,
        15,
        30,
    )
    assert s.startup_parameters == DEFAULT_STARTUP_PARAMETERS
    oidc = config.identity.oidc
    assert oidc.jwks_file == confdir / "jwks.json"
    assert (oidc.groups_claim, oidc.leeway, oidc.jwks_cache_ttl) == ("groups", 30, 3600)
    assert oidc.algorithms == ("RS256", "ES256", "EdDSA")
    ehr = config.targets["ehr"]
    assert ehr.tls == "verify-full"
    assert ehr.server_name == "db.internal"
    assert ehr.password is not None and ehr.password.reveal() == SECRET  # newline stripped
    assert dict(ehr.params) == {"search_path": "public"}


def test_native_json_matches_documented_schema(confdir: Path) -> None:
    doc = json.loads(load_config(confdir / "phigate.toml").native_json())
    assert set(doc) == {
        "listen", "workers", "tls", "require_tls", "auth_timeout_ms", "decision_timeout_ms",
        "startup_timeout_ms", "max_statement_bytes", "max_message_bytes", "startup_parameters",
        "event_backlog_wakeup", "targets", "audit",
    }  # fmt: skip
    assert doc["tls"] == {
        "cert_file": str(confdir / "tls/server.crt"),
        "key_file": str(confdir / "tls/server.key"),
    }
    assert doc["auth_timeout_ms"] == 10000 and doc["decision_timeout_ms"] == 5000
    assert doc["startup_parameters"][0] == "application_name"
    assert doc["targets"]["ehr"] == {
        "host": "db.internal",
        "port": 5433,
        "database": "ehr",
        "user": "phigate_svc",
        "password": SECRET,
        "tls": "verify-full",
        "ca_file": str(confdir / "upstream-ca.pem"),
        "server_name": "db.internal",
        "connect_timeout_ms": 5000,
        "params": {"search_path": "public"},
    }


def test_secrets_never_show_in_repr_or_str(confdir: Path) -> None:
    config = load_config(confdir / "phigate.toml")
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert SECRET not in f"{config.targets['ehr'].password}"


def test_error_names_file_and_dotted_key(confdir: Path) -> None:
    (confdir / "phigate.toml").write_text(BASE_TOML.replace("port = 5433", "port = 70000"))
    with pytest.raises(ConfigError) as info:
        load_config(confdir / "phigate.toml")
    message = str(info.value)
    assert str(confdir / "phigate.toml") in message
    assert "targets.ehr.port" in message
    assert "between 1 and 65535" in message


def test_unknown_key_is_an_error_with_suggestion(base: dict[str, Any], confdir: Path) -> None:
    base["server"]["listn"] = "127.0.0.1:1"
    err = error(base, confdir)
    assert err.key == "server.listn"
    assert "unknown key" in str(err) and "'listen'" in str(err)


def test_unknown_section_and_nested_unknown_keys(base: dict[str, Any], confdir: Path) -> None:
    data = copy.deepcopy(base)
    data["policy"] = {}
    assert error(data, confdir).key == "policy"
    data = copy.deepcopy(base)
    data["identity"]["oidc"]["jwks_uri"] = "https://x/"
    assert error(data, confdir).key == "identity.oidc.jwks_uri"
    data = copy.deepcopy(base)
    data["targets"]["ehr"]["passwd"] = "x"
    assert error(data, confdir).key == "targets.ehr.passwd"


def test_invalid_toml_names_the_file(confdir: Path) -> None:
    (confdir / "phigate.toml").write_text("[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(confdir / "phigate.toml")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("server", "workers", True, "must be an integer"),
        ("server", "workers", 0, "between 1 and 64"),
        ("server", "auth_timeout", "10", "number of seconds"),
        ("server", "auth_timeout", 0, "greater than 0"),
        ("server", "drain_timeout", -1, "at least 0"),
        ("server", "require_tls", "yes", "true or false"),
        ("server", "listen", "localhost:6432", "not 'ip:port'"),
        ("server", "listen", "127.0.0.1:99999", "not 'ip:port'"),
        ("server", "listen", "::1:6432", "brackets"),
        ("server", "listen", [], "at least one"),
        ("server", "max_statement_bytes", 10, "between"),
        ("server", "startup_parameters", ["application_name", "options"], "never forwarded"),
        ("server", "startup_parameters", ["replication"], "never forwarded"),
        ("server", "events_log", "events.jsonl", "replaced by the [audit] section"),
        ("oidc", "leeway", 301, "at most 300"),
        ("oidc", "algorithms", ["RS256", "none"], "'none' is never allowed"),
        ("oidc", "algorithms", ["HS256"], "never allowed"),
        ("oidc", "algorithms", ["RS1"], "unknown algorithm"),
        ("oidc", "algorithms", [], "at least one"),
        ("oidc", "jwks_file", "missing.json", "does not exist"),
        ("ehr", "port", "5432", "must be an integer"),
        ("ehr", "tls", "prefer", "must be one of"),
        ("ehr", "ca_file", "missing.pem", "does not exist"),
        ("ehr", "params", {"search_path": 1}, "must be a string"),
        ("ehr", "params", {"user": "postgres"}, "not a settable parameter"),
        ("ehr", "host", "/var/run/postgresql", "Unix sockets"),
    ],
)
def test_bad_values_are_rejected_with_the_key(
    base: dict[str, Any], confdir: Path, section: str, key: str, value: Any, message: str
) -> None:
    table = {
        "server": base["server"],
        "oidc": base["identity"]["oidc"],
        "ehr": base["targets"]["ehr"],
    }[section]
    table[key] = value
    err = error(base, confdir)
    assert key in err.key
    assert message in err.message


def test_listen_accepts_list_and_ipv6(base: dict[str, Any], confdir: Path) -> None:
    base["server"]["listen"] = ["127.0.0.1:6432", "[::1]:6432"]
    assert parse(base, confdir).server.listen == ("127.0.0.1:6432", "[::1]:6432")


def test_require_tls_needs_cert_and_key(base: dict[str, Any], confdir: Path) -> None:
    del base["server"]["tls_cert"], base["server"]["tls_key"]
    err = error(base, confdir)
    assert err.key == "server.tls_cert" and "require_tls" in err.message
    base["server"]["require_tls"] = False
    config = parse(base, confdir)
    assert json.loads(config.native_json())["tls"] is None


def test_cert_without_key_is_rejected(base: dict[str, Any], confdir: Path) -> None:
    del base["server"]["tls_key"]
    assert error(base, confdir).key == "server.tls_key"


def test_exactly_one_jwks_source(base: dict[str, Any], confdir: Path) -> None:
    base["identity"]["oidc"]["jwks_url"] = "https://idp.example/jwks"
    assert "exactly one" in error(base, confdir).message
    del base["identity"]["oidc"]["jwks_file"]
    assert parse(base, confdir).identity.oidc.jwks_url == "https://idp.example/jwks"
    base["identity"]["oidc"]["jwks_url"] = "http://idp.example/jwks"
    assert "https" in error(base, confdir).message
    base["identity"]["oidc"]["jwks_url"] = "http://127.0.0.1:8080/jwks"
    assert parse(base, confdir).identity.oidc.jwks_url == "http://127.0.0.1:8080/jwks"


def test_jwks_file_must_be_a_jwks(base: dict[str, Any], confdir: Path) -> None:
    (confdir / "jwks.json").write_text("{not json")
    assert "not valid JSON" in error(base, confdir).message
    (confdir / "jwks.json").write_text('{"keys": []}')
    assert "not a JWKS" in error(base, confdir).message


def test_identity_oidc_is_required(base: dict[str, Any], confdir: Path) -> None:
    del base["identity"]
    assert error(base, confdir).key == "identity"


def test_at_least_one_target(base: dict[str, Any], confdir: Path) -> None:
    base["targets"] = {}
    assert "at least one target" in error(base, confdir).message
    del base["targets"]
    assert error(base, confdir).key == "targets"


def test_target_name_must_be_a_plain_dbname(base: dict[str, Any], confdir: Path) -> None:
    base["targets"]["bad name"] = base["targets"].pop("ehr")
    assert error(base, confdir).key == "targets.bad name"


def test_tls_disable_only_for_loopback(base: dict[str, Any], confdir: Path) -> None:
    ehr = base["targets"]["ehr"]
    ehr["tls"] = "disable"
    del ehr["ca_file"]
    err = error(base, confdir)
    assert err.key == "targets.ehr.tls" and "loopback" in err.message
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost"):
        ehr["host"] = host
        target = parse(base, confdir).targets["ehr"]
        assert target.tls == "disable" and target.server_name is None


def test_verify_full_needs_ca_and_require_does_not(base: dict[str, Any], confdir: Path) -> None:
    ehr = base["targets"]["ehr"]
    del ehr["ca_file"]
    assert error(base, confdir).key == "targets.ehr.ca_file"
    ehr["tls"] = "require"
    assert parse(base, confdir).targets["ehr"].ca_file is None


def test_server_name_override(base: dict[str, Any], confdir: Path) -> None:
    base["targets"]["ehr"]["host"] = "10.0.0.5"
    base["targets"]["ehr"]["server_name"] = "db.internal"
    assert json.loads(parse(base, confdir).native_json())["targets"]["ehr"]["server_name"] == (
        "db.internal"
    )


def test_password_from_env(
    base: dict[str, Any], confdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ehr = base["targets"]["ehr"]
    del ehr["password_file"]
    ehr["password_env"] = "PHIGATE_TEST_PW"
    monkeypatch.delenv("PHIGATE_TEST_PW", raising=False)
    err = error(base, confdir)
    assert "PHIGATE_TEST_PW is not set" in err.message
    monkeypatch.setenv("PHIGATE_TEST_PW", SECRET)
    target = parse(base, confdir).targets["ehr"]
    assert target.password is not None and target.password.reveal() == SECRET
    assert SECRET not in repr(target)


def test_password_from_systemd_credential(
    base: dict[str, Any], confdir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ehr = base["targets"]["ehr"]
    del ehr["password_file"]
    ehr["password_credential"] = "ehr-db"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert "CREDENTIALS_DIRECTORY" in error(base, confdir).message
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert "not found" in error(base, confdir).message
    (creds / "ehr-db").write_text(SECRET)
    target = parse(base, confdir).targets["ehr"]
    assert target.password is not None and target.password.reveal() == SECRET
    ehr["password_credential"] = "../etc/passwd"
    assert "not a path" in error(base, confdir).message


def test_only_one_password_source_and_none_means_trust(base: dict[str, Any], confdir: Path) -> None:
    ehr = base["targets"]["ehr"]
    ehr["password_env"] = "X"
    assert "only one" in error(base, confdir).message
    del ehr["password_env"], ehr["password_file"]
    config = parse(base, confdir)
    assert config.targets["ehr"].password is None
    assert json.loads(config.native_json())["targets"]["ehr"]["password"] is None


def test_empty_password_file_is_rejected_without_echoing(
    base: dict[str, Any], confdir: Path
) -> None:
    (confdir / "ehr.password").write_text("\n")
    err = error(base, confdir)
    assert err.key == "targets.ehr.password_file" and "empty" in err.message


def test_params_keep_search_path_pinned(base: dict[str, Any], confdir: Path) -> None:
    base["targets"]["ehr"]["params"] = {"statement_timeout": "30s"}
    assert dict(parse(base, confdir).targets["ehr"].params) == {
        "search_path": "public",
        "statement_timeout": "30s",
    }


@pytest.mark.parametrize(
    ("written", "schema", "sent"),
    [
        ("pii", "pii", "pii"),
        ("  PII ", "pii", "pii"),  # unquoted names fold to lower case, as the server folds them
        ('"Pii Data"', "Pii Data", '"Pii Data"'),  # quoted names are kept, and sent quoted
        ('"a,b"', "a,b", '"a,b"'),  # one quoted name holding a comma
        ('"x""y"', 'x"y', '"x""y"'),
        ("Ärzte", "Ärzte", '"Ärzte"'),  # the server lower-cases ASCII letters only
        ("s" * 70, "s" * 63, "s" * 63),  # truncated to 63 bytes, as the server does
    ],
)
def test_search_path_pins_one_schema(
    base: dict[str, Any], confdir: Path, written: str, schema: str, sent: str
) -> None:
    base["targets"]["ehr"]["params"] = {"search_path": written}
    target = parse(base, confdir).targets["ehr"]
    assert target.schema == schema  # what the gateway resolves unqualified names with
    assert dict(target.params) == {"search_path": sent}  # what the upstream session gets
    assert json.loads(parse(base, confdir).native_json())["targets"]["ehr"]["params"] == {
        "search_path": sent
    }


def test_search_path_key_is_case_insensitive(base: dict[str, Any], confdir: Path) -> None:
    base["targets"]["ehr"]["params"] = {"Search_Path": "pii", "statement_timeout": "5s"}
    target = parse(base, confdir).targets["ehr"]
    assert target.schema == "pii"
    assert dict(target.params) == {"search_path": "pii", "statement_timeout": "5s"}
    base["targets"]["ehr"]["params"] = {"search_path": "pii", "SEARCH_PATH": "public"}
    assert str(error(base, confdir)) == (
        f"{confdir / 'phigate.toml'}: targets.ehr.params.SEARCH_PATH: sets the same parameter as "
        "params.search_path"
    )


_SEVERAL = (
    "names {n} schemas; pin exactly one. With several, which schema an unqualified name means "
    "depends on which tables exist when the statement runs, which the gateway cannot know when "
    "it judges the statement. Pin the schema most statements use and write names in the others "
    "schema-qualified ({second}.<table>)"
)
_SYSTEM = (
    "cannot be {0}: pg_* schemas are the server's own (pg_catalog is always searched first; "
    "pg_temp is each session's temporary schema); name the schema your tables are in"
)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("pii, public", "'pii, public' " + _SEVERAL.format(n=2, second="public")),
        ("pii,public,x", "'pii,public,x' " + _SEVERAL.format(n=3, second="public")),
        ('"$user", public', "'\"$user\", public' " + _SEVERAL.format(n=2, second="public")),
        ("$user", "cannot be $user: name the schema itself (the same for every session)"),
        ('"$user"', "cannot be $user: name the schema itself (the same for every session)"),
        ("pg_temp", _SYSTEM.format("pg_temp")),
        ("PG_CATALOG", _SYSTEM.format("pg_catalog")),
        ('"pg_temp_3"', _SYSTEM.format("pg_temp_3")),
        ("", 'must name the schema unqualified names resolve to, e.g. "public"'),
        ("   ", 'must name the schema unqualified names resolve to, e.g. "public"'),
        ("pii,", "'pii,' ends with a comma"),
        (", pii", "', pii' has an empty name between commas"),
        ('"pii', "'\"pii' has an unterminated quoted name"),
        ('""', "'\"\"' has an empty quoted name (\"\")"),
        ('"pii" x', "'\"pii\" x' has 'x' where a comma or the end was expected"),
        (
            "pii.people",
            "'pii.people' is not a plain schema name; write it in double quotes "
            "(search_path = '\"pii.people\"') if the schema is really named so",
        ),
    ],
)
def test_search_path_refusals(
    base: dict[str, Any], confdir: Path, value: str, message: str
) -> None:
    base["targets"]["ehr"]["params"] = {"search_path": value}
    assert str(error(base, confdir)) == (
        f"{confdir / 'phigate.toml'}: targets.ehr.params.search_path: {message}"
    )


_AS_USER = "sessions run as the target's user, or as their role's db_role ([roles.*] db_role)"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (
            "standard_conforming_strings",
            "the gateway always sends on (off makes the server read a backslash in '...' as an "
            "escape, so SQL could hide in what the gateway parsed as a string)",
        ),
        (
            "Client_Encoding",
            "the gateway always sends UTF8 (another encoding makes the server read the statement "
            "bytes differently from the gateway's parser)",
        ),
        (
            "backslash_quote",
            "it changes which string literals the server accepts, which the gateway's parser must "
            "read the same way",
        ),
        ("role", _AS_USER),
        ("ROLE", _AS_USER),
        ("session_authorization", _AS_USER),
        (
            "default_transaction_read_only",
            "it would override the read-only default the database sets for the target's user "
            "(set it there, with ALTER ROLE ... SET)",
        ),
        ("session_replication_role", "it disables triggers and rules"),
        (
            "session_preload_libraries",
            "it loads server code into the session (auto_explain, for one, would log every "
            "statement the gateway sends); configure it on the server",
        ),
        (
            "Local_Preload_Libraries",
            "it loads server code into the session; configure it on the server",
        ),
    ],
)
def test_params_refuse_settings_the_gateway_must_control(
    base: dict[str, Any], confdir: Path, name: str, reason: str
) -> None:
    base["targets"]["ehr"]["params"] = {name: "off"}
    assert str(error(base, confdir)) == (
        f"{confdir / 'phigate.toml'}: targets.ehr.params.{name}: cannot be set here: {reason}"
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("role", _AS_USER),
        ("Session_Authorization", _AS_USER),
        ("search_path", "unqualified names resolve with the target's params.search_path"),
        ("session_replication_role", "it disables triggers and rules"),
        (
            "backslash_quote",
            "it changes which string literals the server accepts, which the gateway's parser must "
            "read the same way",
        ),
    ],
)
def test_startup_parameters_never_forward_identity_or_parsing_settings(
    base: dict[str, Any], confdir: Path, name: str, reason: str
) -> None:
    base["server"]["startup_parameters"] = ["application_name", name]
    assert str(error(base, confdir)) == (
        f"{confdir / 'phigate.toml'}: server.startup_parameters: {name!r} is never forwarded "
        f"from clients: {reason}"
    )


def test_check_config_refuses_several_schemas(
    confdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = confdir / "phigate.toml"
    path.write_text(BASE_TOML + 'params = { search_path = "pii, public" }\n')
    assert cli_main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: targets.ehr.params.search_path: 'pii, public' names 2 schemas" in err
    assert "Traceback" not in err
    path.write_text(BASE_TOML + 'params = { search_path = "pii" }\n')
    assert cli_main(["check-config", str(path)]) == 0


def test_search_path_cannot_be_phigates_own_schema(base: dict[str, Any], confdir: Path) -> None:
    base["targets"]["ehr"]["params"] = {"search_path": "PHIGATE"}
    assert str(error(base, confdir)) == (
        f"{confdir / 'phigate.toml'}: targets.ehr.params.search_path: cannot be phigate: that "
        "schema holds phigate's own pseudonym key and functions, which no session may use by "
        "name; name the schema your tables are in"
    )


def test_statement_cap_not_above_message_cap(base: dict[str, Any], confdir: Path) -> None:
    base["server"]["max_statement_bytes"] = 2_000_000
    base["server"]["max_message_bytes"] = 1_000_000
    assert error(base, confdir).key == "server.max_statement_bytes"


def test_float_seconds(base: dict[str, Any], confdir: Path) -> None:
    base["server"]["auth_timeout"] = 2.5
    config = parse(base, confdir)
    assert json.loads(config.native_json())["auth_timeout_ms"] == 2500


def test_an_old_events_log_points_at_the_audit_section(
    base: dict[str, Any], confdir: Path
) -> None:
    base["server"]["events_log"] = "/var/log/phigate/events.jsonl"
    err = error(base, confdir)
    assert err.key == "server.events_log"
    assert "[audit]" in err.message and "docs/audit.md" in err.message


def test_check_config_command(confdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check-config", str(confdir / "phigate.toml")]) == 0
    assert capsys.readouterr().out.strip() == "ok: 1 target, listening on 127.0.0.1:0"
    (confdir / "phigate.toml").write_text(BASE_TOML.replace('database = "ehr"\n', ""))
    assert cli_main(["check-config", str(confdir / "phigate.toml")]) == 1
    err = capsys.readouterr().err
    assert "targets.ehr.database: is required" in err
    assert "Traceback" not in err


def test_cli_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(["check-config"])
    assert info.value.code == 2


# --- roles ---------------------------------------------------------------------------------


def with_roles(base: dict[str, Any], roles: Any, groups: Any) -> dict[str, Any]:
    data = copy.deepcopy(base)
    data["roles"] = roles
    data["groups"] = groups
    return data


def test_roles_fold_names_and_union_by_groups(base: dict[str, Any], confdir: Path) -> None:
    roles = {
        "clinician": {
            "relations": ['public."Patients"', "Public.Encounters", "lab.*"],
            "columns": {'public."Patients"': ["ID", '"Mrn"']},
            "operations": ["select", "insert"],
            "allow": ["explain"],
            "approval": ["write"],
            "functions": ["public.my_fn"],
            "db_role": "phigate_clinician",
        },
        "analyst": {
            "targets": ["ehr"], "relations": ["public.diagnoses"], "db_role": "phigate_clinician"
        },  # fmt: skip
    }
    data = with_roles(base, roles, {"clin": ["clinician"], "ana": ["analyst"]})
    data["approvals"] = {"store": "approvals.db"}  # `approval` needs approvers
    config = parse(data, confdir)
    c = config.roles["clinician"]
    assert c.relations == {("public", "Patients"), ("public", "encounters")}
    assert c.schemas == {"lab"} and c.targets is None
    assert c.columns[("public", "Patients")] == {"id", "Mrn"}
    assert dict(c.approval) == {"insert": "write"}
    assert c.functions == {("public", "my_fn")}
    rs = config.roles_for(["clin", "ana", "unknown"], target="ehr")
    assert rs is not None and rs.names == ("analyst", "clinician")
    assert rs.db_role == "phigate_clinician"
    assert rs.identity_class == '[["analyst","clinician"],"ehr"]'
    assert config.roles_for(["unknown"]) is None
    # Without a target only roles valid for every target count.
    only = config.roles_for(["ana", "clin"])
    assert only is not None and only.names == ("clinician",)


def test_roles_with_different_db_roles_are_refused_at_login(
    base: dict[str, Any], confdir: Path
) -> None:
    from phigate.errors import IdentityError

    roles = {"a": {"relations": ["public.x"], "db_role": "r1"}, "b": {"relations": ["public.x"]}}
    config = parse(with_roles(base, roles, {"ga": ["a"], "gb": ["b"]}), confdir)
    with pytest.raises(IdentityError) as info:
        config.roles_for(["ga", "gb"], target="ehr")
    assert info.value.sqlstate == "28000" and "db_role" in info.value.message
    err = error(with_roles(base, roles, {"both": ["a", "b"]}), confdir)
    assert err.key == "groups.both" and "db_role" in err.message


@pytest.mark.parametrize(
    ("roles", "groups", "key", "text"),
    [
        ({"r": {"relations": ["patients"]}}, {}, "roles.r.relations", "schema-qualified"),
        ({"r": {"relations": ['public."x']}}, {}, "roles.r.relations", "unterminated"),
        ({"r": {"relations": ["pg_catalog.pg_authid"]}}, {}, "roles.r.relations", "never"),
        ({"r": {"relations": ["pg_catalog.*"]}}, {}, "roles.r.relations", "catalog"),
        ({"r": {"relations": ["phigate.*"]}}, {}, "roles.r.relations", "pseudonym key"),
        ({"r": {"relations": ["PHIGATE.pseudonym_key"]}}, {}, "roles.r.relations", "never"),
        ({"r": {"functions": ["phigate.pseudonym"]}}, {}, "roles.r.functions", "never"),
        ({"r": {"operations": ["selcet"]}}, {}, "roles.r.operations", "'select'"),
        ({"r": {"allow": ["everything"]}}, {}, "roles.r.allow", "unknown allow entry"),
        ({"r": {"approval": ["write"]}}, {}, "roles.r.approval", "does not grant"),
        ({"r": {"functions": ["public.dblink_exec"]}}, {}, "roles.r.functions", "never"),
        ({"r": {"functions": ["pg_catalog.query_to_xml"]}}, {}, "roles.r.functions", "never"),
        ({"r": {"targets": ["nope"]}}, {}, "roles.r.targets", "not a configured target"),
        ({"r": {"relations": ["public.a"], "columns": {"public.b": ["x"]}}}, {},
         "roles.r.columns.public.b", "not one of this role's relations"),
        ({"r": {"relatons": []}}, {}, "roles.r.relatons", "unknown key"),
        ({"r": {}}, {"g": ["rr"]}, "groups.g", "not defined"),
        ({"bad name": {}}, {}, "roles.bad name", "role names"),
    ],
)  # fmt: skip
def test_role_errors_name_the_key(
    base: dict[str, Any], confdir: Path, roles: Any, groups: Any, key: str, text: str
) -> None:
    err = error(with_roles(base, roles, groups), confdir)
    assert err.key == key, err
    assert text in err.message, err


# --- PHI classification ---------------------------------------------------------------------


def with_phi(base: dict[str, Any], confdir: Path, **phi: Any) -> dict[str, Any]:
    data = copy.deepcopy(base)
    key = confdir / "pseudonym.key"
    if not key.exists():
        key.write_bytes(bytes(range(100, 140)))
        key.chmod(0o600)
    phi.setdefault("pseudonym_key_file", "pseudonym.key")
    data["phi"] = phi
    return data


PHI_COLUMNS: dict[str, Any] = {
    "public.patients.ssn": {"kind": "ssn", "mask": "partial:4"},
    'public."Patients".First_Name': {"kind": "name", "mask": "pseudonym"},
    "public.patients.date_of_birth": {"kind": "dob", "mask": "year"},
    "public.patients.email": {"kind": "email", "mask": "email_domain"},
    "public.notes.body": {"kind": "free_text", "mask": "free_text"},
    "public.patients.mrn": {"kind": "mrn"},
}


def test_phi_columns_parse_and_fold(base: dict[str, Any], confdir: Path) -> None:
    data = with_phi(
        base, confdir, columns=PHI_COLUMNS, mrn_pattern="MRN-\\d{7}",
        extra_patterns={"badge": "EMP-\\d{6}"},
    )  # fmt: skip
    phi = parse(data, confdir).phi
    ssn = phi.columns[("public", "patients", "ssn")]
    assert (ssn.kind, ssn.mask, ssn.keep, ssn.mask_spec) == ("ssn", "partial", 4, "partial:4")
    assert ssn.config_key == 'phi.columns."public.patients.ssn"'
    name = phi.columns[("public", "Patients", "first_name")]
    assert name.mask == "pseudonym" and name.keep is None
    assert phi.columns[("public", "patients", "mrn")].mask == "redact"  # the default
    assert phi.relations() == {("public", "patients"), ("public", "Patients"), ("public", "notes")}
    assert phi.pseudonym_key is not None and phi.pseudonym_key.reveal() == bytes(range(100, 140))
    assert "100" not in repr(phi) and "SecretBytes('********')" in repr(phi)
    assert phi.pseudonym_key_file == confdir / "pseudonym.key"
    assert phi.mrn_pattern == "MRN-\\d{7}" and dict(phi.extra_patterns) == {"badge": "EMP-\\d{6}"}
    assert ssn.masked_for(frozenset({"dob"})) and not ssn.masked_for(frozenset({"ssn"}))


def test_phi_defaults_to_nothing_classified(base: dict[str, Any], confdir: Path) -> None:
    phi = parse(base, confdir).phi
    assert not phi.columns and phi.pseudonym_key is None and phi.mrn_pattern is None


def test_roles_see_clear_and_clear_kinds(base: dict[str, Any], confdir: Path) -> None:
    roles = {
        "clinician": {"relations": ["public.*"], "see_clear": ["dob", "name"]},
        "billing": {"relations": ["public.*"], "see_clear": ["address"]},
        "analyst": {"relations": ["public.*"]},
    }
    config = parse(with_roles(base, roles, {"c": ["clinician"], "b": ["billing"],
                                            "a": ["analyst"]}), confdir)  # fmt: skip
    assert config.roles["clinician"].see_clear == {"dob", "name"}
    assert config.roles["analyst"].see_clear == frozenset()
    rs = config.roles_for(["c", "b"], target="ehr")
    assert rs is not None and rs.clear_kinds == {"dob", "name", "address"}
    only = config.roles_for(["a"], target="ehr")
    assert only is not None and only.clear_kinds == frozenset()


@pytest.mark.parametrize(
    ("phi", "key", "text"),
    [
        ({"columns": {"patients.ssn": {"kind": "ssn"}}}, 'phi.columns."patients.ssn"',
         "schema.table.column"),
        ({"columns": {"public.p.ssn": {"kind": "sn"}}}, 'phi.columns."public.p.ssn".kind',
         "did you mean 'ssn'"),
        ({"columns": {"public.p.ssn": {"mask": "redact"}}}, 'phi.columns."public.p.ssn".kind',
         "is required"),
        ({"columns": {"public.p.ssn": {"kind": "ssn", "mask": "partial"}}},
         'phi.columns."public.p.ssn".mask', "partial:N"),
        ({"columns": {"public.p.ssn": {"kind": "ssn", "mask": "partial:0"}}},
         'phi.columns."public.p.ssn".mask', "1 to 64"),
        ({"columns": {"public.p.ssn": {"kind": "ssn", "mask": "hash"}}},
         'phi.columns."public.p.ssn".mask', "unknown mask"),
        ({"columns": {"public.p.ssn": {"kind": "ssn", "mask": "year"}}},
         'phi.columns."public.p.ssn".mask', "does not fit kind 'ssn'"),
        ({"columns": {"public.p.d": {"kind": "dob", "mask": "email_domain"}}},
         'phi.columns."public.p.d".mask', "does not fit"),
        ({"columns": {"public.p.d": {"kind": "dob", "mask": "partial:2"}}},
         'phi.columns."public.p.d".mask', "does not fit"),
        ({"columns": {"public.p.ssn": {"kind": "ssn", "colour": "x"}}},
         'phi.columns."public.p.ssn".colour', "unknown key"),
        ({"columns": {"public.p.ssn": "ssn"}}, 'phi.columns."public.p.ssn"', "must be a table"),
        ({"columns": {"public.p.ssn": {"kind": "ssn"}, 'public."p".SSN': {"kind": "ssn"}}},
         "phi.columns.", "same column"),
        ({"columns": {"pg_catalog.pg_class.relname": {"kind": "other"}}},
         'phi.columns."pg_catalog.pg_class.relname"', "system schemas"),
        ({"columns": {"public.p.n": {"kind": "name", "mask": "pseudonym"}},
          "pseudonym_key_file": None}, "phi.pseudonym_key_file", "is required"),
        ({"mrn_pattern": "MRN-(\\d"}, "phi.mrn_pattern", "not a valid regular expression"),
        ({"mrn_pattern": "\\d*"}, "phi.mrn_pattern", "empty string"),
        ({"extra_patterns": {"Bad Name": "x"}}, 'phi.extra_patterns."Bad Name"', "pattern names"),
        ({"extra_patterns": {"badge": 3}}, "phi.extra_patterns.badge", "must be a string"),
        ({"maskz": {}}, "phi.maskz", "unknown key"),
        ({"columns": {"public.p.z": {"kind": "address", "mask": "zip3"}}},
         'phi.columns."public.p.z".mask', "'zip3' does not fit kind 'address' (it fits other"),
        ({"columns": {"public.p.z": {"kind": "city", "mask": "zip3"}}},
         'phi.columns."public.p.z".mask', "does not fit kind 'city'"),
        ({"columns": {"public.p.z": {"kind": "zip", "mask": "year"}}},
         'phi.columns."public.p.z".mask', "does not fit kind 'zip'"),
        ({"columns": {"public.p.z": {"kind": "zip", "mask": "zip5"}}},
         'phi.columns."public.p.z".mask', "did you mean 'zip3'"),
        ({"columns": {"public.p.z": {"kind": "zipcode", "mask": "zip3"}}},
         'phi.columns."public.p.z".kind', "did you mean 'zip'"),
        ({"zip3_restricted_file": "nope.txt"}, "phi.zip3_restricted_file", "does not exist"),
        ({"dictionary": {"kinds": ["nmae"]}}, "phi.dictionary.kinds", "did you mean 'name'"),
        ({"dictionary": {"kinds": ["dob"]}}, "phi.dictionary.kinds", "not identifiers"),
        ({"dictionary": {"refresh_seconds": 0}}, "phi.dictionary.refresh_seconds", "at least 1"),
        ({"dictionary": {"min_chars": 0}}, "phi.dictionary.min_chars", "between 1 and 16"),
        ({"dictionary": {"enabled": "yes"}}, "phi.dictionary.enabled", "true or false"),
        ({"dictionary": {"stop_words_file": "nope.txt"}}, "phi.dictionary.stop_words_file",
         "does not exist"),
        ({"dictionary": {"refresh": 5}}, "phi.dictionary.refresh", "unknown key"),
    ],
)  # fmt: skip
def test_phi_errors_name_the_key(
    base: dict[str, Any], confdir: Path, phi: dict[str, Any], key: str, text: str
) -> None:
    data = with_phi(base, confdir, **phi)
    if data["phi"].get("pseudonym_key_file") is None:
        del data["phi"]["pseudonym_key_file"]
    err = error(data, confdir)
    assert err.key.startswith(key), (err.key, key)
    assert text in err.message
    assert str(confdir / "phigate.toml") in str(err)


def test_zip3_restricted_list(base: dict[str, Any], confdir: Path) -> None:
    cols = {"public.p.zip": {"kind": "zip", "mask": "zip3"},
            "public.p.city": {"kind": "city", "mask": "redact"}}  # fmt: skip
    phi = parse(with_phi(base, confdir, columns=cols), confdir).phi
    assert phi.columns[("public", "p", "zip")].mask_spec == "zip3"
    assert phi.columns[("public", "p", "city")].kind == "city"
    # The package's list: HHS's Safe Harbor prefixes (2000 Census), all 17 of them.
    assert phi.zip3_restricted == frozenset({
        "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831",
        "878", "879", "884", "890", "893",
    }) and phi.zip3_restricted_file is None  # fmt: skip
    own = confdir / "zip3.txt"
    own.write_text("# local list\n036\n\n  123  # added\n")
    phi = parse(with_phi(base, confdir, zip3_restricted_file=str(own)), confdir).phi
    assert phi.zip3_restricted == {"036", "123"} and phi.zip3_restricted_file == own
    own.write_text("036\n1234\n")
    err = error(with_phi(base, confdir, zip3_restricted_file=str(own)), confdir)
    assert err.key == "phi.zip3_restricted_file"
    assert "line 2: '1234' is not a 3-digit" in err.message


def test_dictionary_settings(base: dict[str, Any], confdir: Path) -> None:
    d = parse(with_phi(base, confdir), confdir).phi.dictionary
    # On by default for every identifier kind; a new patient is masked within 5 minutes.
    assert d.enabled and d.refresh_seconds == 300 and d.min_chars == 2
    assert d.kinds == {"name", "mrn", "address", "city", "zip", "email", "phone", "ssn"}
    words = confdir / "stop.txt"
    words.write_text("# local words\nclinic\n\n  ward  \n")
    d = parse(with_phi(base, confdir, dictionary={
        "kinds": ["name", "city"], "refresh_seconds": 30, "stop_words": ["Dr"],
        "stop_words_file": "stop.txt", "min_chars": 3,
    }), confdir).phi.dictionary  # fmt: skip
    assert d.kinds == {"name", "city"} and d.refresh_seconds == 30 and d.min_chars == 3
    assert d.stop_words == {"Dr", "clinic", "ward"} and d.stop_words_file == words
    off = parse(with_phi(base, confdir, dictionary={"enabled": False}), confdir)
    assert not off.phi.dictionary.enabled
    # A catalog read with other dictionary settings may not stay in force after a reload (its
    # dictionary would not be what the config asks for).
    from phigate.masking.catalog_keeper import catalog_inputs

    on = parse(with_phi(base, confdir), confdir)
    assert catalog_inputs(on, "ehr") != catalog_inputs(off, "ehr")
    again = parse(with_phi(base, confdir), confdir)
    assert catalog_inputs(on, "ehr") == catalog_inputs(again, "ehr")


def test_pseudonym_key_file_checks(base: dict[str, Any], confdir: Path) -> None:
    key = confdir / "pseudonym.key"
    key.write_bytes(bytes(range(40)))
    key.chmod(0o640)
    err = error(with_phi(base, confdir), confdir)
    assert err.key == "phi.pseudonym_key_file" and "chmod 600" in err.message
    key.chmod(0o600)
    key.write_bytes(b"short")
    assert "at least 32" in error(with_phi(base, confdir), confdir).message
    key.write_bytes(b"a" * 40)
    assert "does not look random" in error(with_phi(base, confdir), confdir).message
    key.write_bytes(bytes(range(40)))
    assert parse(with_phi(base, confdir), confdir).phi.pseudonym_key is not None


def test_see_clear_unknown_kind(base: dict[str, Any], confdir: Path) -> None:
    err = error(with_roles(base, {"r": {"see_clear": ["dobb"]}}, {}), confdir)
    assert err.key == "roles.r.see_clear" and "did you mean 'dob'" in err.message
