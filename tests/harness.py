"""Integration-test helpers: provisioned PostgreSQL, gateways built from configs, real clients."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import ssl
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from phigate.audit.records import audit_section, read_records
from phigate.dev.demo import base_config, dump_toml, merge_config
from phigate.dev.ehr import provision_demo_database
from phigate.dev.pgembed import EmbeddedPostgres, PgEmbedError, find_psql
from phigate.files import write_private

TARGET = "ehr"
SERVICE_USER = "phigate_svc"
AUDIENCE = "phigate"
CERT_HOSTNAMES = ["localhost", "127.0.0.1"]
TEST_PATIENTS = 200
TEST_SEED = 7
AUDIT_ORIGIN = "phigate-tests"
# Records the trail's writer makes itself (docs/audit.md).
TRAIL_RECORDS = frozenset({
    "checkpoint", "audit_open", "audit_close", "audit_key_rotated", "audit_failure",
    "audit_recovered",
})  # fmt: skip

# Top-level sections of the phigate config; any other override key is a [server] key.
CONFIG_SECTIONS = frozenset(
    {
        "server",
        "identity",
        "targets",
        "groups",
        "roles",
        "phi",
        "policy",
        "masking",
        "audit",
        "approvals",
        "approvers",
        "admin",
        "siem",
    }
)


TEST_POLICY: dict[str, Any] = {
    "groups": {g: ["gateway-tests"] for g in ("clinicians", "billing", "research")},
    "roles": {
        "gateway-tests": {
            "relations": ["public.*", "pg_temp.*"],
            "operations": [
                "select", "insert", "update", "delete", "merge", "copy_to", "copy_from",
                "truncate", "ddl",
            ],
            "allow": [
                "listen", "notify", "prepare", "lock", "maintenance", "explain", "do", "call",
                "set_role", "discard", "catalog",
            ],
            "functions": ["pg_catalog.pg_sleep"],
        },
    },
}


def native_import_error() -> str | None:
    """None if phigate._native imports, else why not."""
    try:
        import phigate._native  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def require_native() -> None:
    """Integration tests need the Rust data plane: fail loudly (never skip) without it."""
    err = native_import_error()
    if err is not None:
        pytest.fail(
            f"phigate._native cannot be imported ({err}); run `make build` first "
            "(integration tests never skip)",
            pytrace=False,
        )


@functools.cache
def session_audit_keys() -> Path:
    """The directory with the test session's audit keys (audit.key, audit.pub,
    audit-hmac.key), generated on first use."""
    from phigate.audit.keys import write_keys

    key_dir = Path(tempfile.mkdtemp(prefix="phigate-audit-keys-"))
    write_keys(key_dir, AUDIT_ORIGIN)
    return key_dir


class EhrPostgres(EmbeddedPostgres):
    """EmbeddedPostgres plus the EHR database and the gateway's service role."""

    service_user: str = SERVICE_USER
    service_password: str = ""
    ehr_database: str = TARGET

    def provision(self, patients: int = TEST_PATIENTS, seed: int = TEST_SEED) -> EhrPostgres:
        self.service_password = provision_demo_database(
            self, self.ehr_database, self.service_user, patients=patients, seed=seed
        )
        return self

    def service_dsn(self) -> str:
        return self.dsn(self.ehr_database, self.service_user, self.service_password)

    def install_pseudonym_functions(self, config: Any) -> None:
        """What an administrator runs once per target (`phigate db install`), as the
        superuser, for every target of ``config`` that is this server's EHR database."""
        import psycopg

        from phigate.masking.db_install import install_target

        for name, t in config.targets.items():
            if t.port == self.port and t.database == self.ehr_database:
                with psycopg.connect(self.dsn(self.ehr_database)) as admin:
                    install_target(admin, config, name)


@dataclass
class RunningGateway:
    """A started GatewayThread plus what clients need to reach it (CA, config, audit trail).

    Attribute access falls through to the GatewayThread, so `gateway.host`,
    `gateway.port` and anything else the thread offers work as on the thread.
    """

    thread: Any
    config: Any
    config_path: Path
    ca_file: Path
    audit_dir: Path
    settings: dict[str, Any]
    _stopped: bool = field(default=False, repr=False)

    @property
    def host(self) -> str:
        return str(self.thread.host)

    @property
    def port(self) -> int:
        return int(self.thread.port)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.thread.stop()

    def records(self) -> list[dict[str, Any]]:
        """Every `rec` body of the audit trail so far, in seq order, the writer's own
        (audit_open, checkpoint, ...) included. Batch mode writes within milliseconds: stop()
        first, or poll, to see all of them."""
        return read_records(self.audit_dir)

    def events(self) -> list[dict[str, Any]]:
        """The records the gateway's parts made (sessions, statements, reloads, ...), in seq
        order: `records()` without the trail writer's own."""
        return [r for r in self.records() if r.get("event") not in TRAIL_RECORDS]

    def trail_text(self) -> str:
        """Every segment's raw text, in order."""
        segments = sorted(self.audit_dir.glob("segment-*.jsonl"))
        return "".join(p.read_text(encoding="utf-8") for p in segments)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not defined here; dataclass fields are always set.
        return getattr(self.thread, name)


class GatewayFactory:
    """Builds gateways in front of `pg` from the default test config plus overrides.

    gateway_factory()                                   # like the `gateway` fixture
    gateway_factory(require_tls=False)                  # a [server] key
    gateway_factory(identity={"oidc": {"audience": "x"}})   # deep-merged section
    gateway_factory(tls_cert=None)                      # None deletes a key

    A config with a pseudonym key gets phigate's pseudonym functions installed with it
    first (`phigate db install`), unless ``install_pseudonym_functions`` is set to False.
    """

    def __init__(self, pg: EhrPostgres, issuer: Any, cert: Any, tmp: Path) -> None:
        self.pg = pg
        self.install_pseudonym_functions = True
        self.issuer = issuer
        self.cert = cert
        self.tmp = tmp
        self.started: list[RunningGateway] = []
        self._n = 0
        self.password_file = write_private(
            tmp / "secrets" / "ehr.password", pg.service_password + "\n"
        )
        # One audit key pair for the whole test session; each gateway gets its own trail.
        self.audit_keys = session_audit_keys()

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """The config dict a gateway would get, without starting it."""
        return self._build(overrides)[0]

    def _build(self, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], Path]:
        self._n += 1
        gdir = self.tmp / f"gw{self._n}"
        gdir.mkdir(parents=True, exist_ok=True)
        base = base_config(
            listen="127.0.0.1:0",
            tls_cert=Path(self.cert.cert),
            tls_key=Path(self.cert.key),
            audit=audit_section(
                gdir / "audit", self.audit_keys, name=AUDIT_ORIGIN, checkpoint_interval=0.2
            ),
            issuer=self.issuer.issuer,
            jwks_file=Path(self.issuer.jwks_path),
            pg_host=self.pg.host,
            pg_port=self.pg.port,
            database=self.pg.ehr_database,
            service_user=self.pg.service_user,
            password_file=self.password_file,
        )
        # The gateway tests exercise the wire, not the policy: their groups get a role that
        # opens everything a role can open (tests/test_policy_* cover the policy itself).
        base = merge_config(base, TEST_POLICY)
        nested: dict[str, Any] = {}
        server: dict[str, Any] = {}
        for key, value in overrides.items():
            (nested if key in CONFIG_SECTIONS else server)[key] = value
        if server:
            nested = merge_config(nested, {"server": server})
        return merge_config(base, nested), gdir

    def __call__(self, *, engine_factory: Any = None, **overrides: Any) -> RunningGateway:
        """`engine_factory` (config JSON -> engine) wraps the native engine in tests that need
        to shape the data plane's view of the control plane (see tests/slowcp.py)."""
        require_native()
        from phigate.config import load_config
        from phigate.control.thread import GatewayThread

        settings, gdir = self._build(overrides)
        path = write_private(gdir / "phigate.toml", dump_toml(settings))
        config = load_config(path)
        if self.install_pseudonym_functions and config.phi.pseudonym_key is not None:
            self.pg.install_pseudonym_functions(config)
        thread = GatewayThread(config, engine_factory=engine_factory)
        try:
            thread.start()
        except BaseException:
            with contextlib.suppress(Exception):
                thread.stop()  # whatever part of it did start
            raise
        assert config.audit is not None
        gw = RunningGateway(
            thread=thread,
            config=config,
            config_path=path,
            ca_file=Path(self.cert.ca_cert),
            audit_dir=config.audit.dir,
            settings=settings,
        )
        self.started.append(gw)
        return gw

    def stop_all(self) -> None:
        errors = []
        while self.started:
            gw = self.started.pop()
            try:
                gw.stop()
            except Exception as exc:  # noqa: BLE001 - stop the rest, then report
                errors.append(exc)
        if errors:
            raise errors[0]


# --- clients -------------------------------------------------------------------------------


def token_subject(token: str) -> str:
    """The `sub` claim of a JWT, read without verification (only to pick a user name)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims.get("sub") or "agent")
    except (IndexError, ValueError):
        return "agent"


def conninfo(gateway: RunningGateway, user: str, dbname: str = TARGET, **params: Any) -> str:
    """libpq conninfo for the gateway: verify-full against the dev CA, name `localhost`,
    address pinned to the listener (so ::1 is never tried first)."""
    parts: dict[str, Any] = {
        "host": "localhost",
        "hostaddr": gateway.host,
        "port": gateway.port,
        "dbname": dbname,
        "user": user,
        "sslmode": "verify-full",
        "sslrootcert": gateway.ca_file,
        "connect_timeout": 10,
    }
    parts.update(params)
    return " ".join(
        f"{k}='{str(v).replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'"
        for k, v in parts.items()
        if v is not None
    )


def psycopg_connect(
    gateway: RunningGateway,
    token: str,
    *,
    user: str | None = None,
    dbname: str = TARGET,
    **kw: Any,
) -> Any:
    """A psycopg 3 connection through the gateway (TLS verify-full, token as password)."""
    import psycopg

    kw.setdefault("autocommit", True)
    info = conninfo(gateway, user or token_subject(token), dbname)
    return psycopg.connect(info, password=token, **kw)


async def asyncpg_connect(
    gateway: RunningGateway,
    token: str,
    *,
    user: str | None = None,
    dbname: str = TARGET,
    **kw: Any,
) -> Any:
    """An asyncpg connection through the gateway with a verifying TLS context."""
    import asyncpg

    ctx = ssl.create_default_context(cafile=str(gateway.ca_file))
    kw.setdefault("timeout", 10)
    return await asyncpg.connect(
        host="localhost",
        port=gateway.port,
        user=user or token_subject(token),
        password=token,
        database=dbname,
        ssl=ctx,
        **kw,
    )


def psql_binary() -> Path:
    """A psql whose libpq speaks TLS: the wheel's does not, so usually the system client
    ($PHIGATE_TEST_PSQL overrides). Fails the test with install advice if there is none."""
    try:
        return find_psql(require_ssl=True)
    except PgEmbedError as exc:
        pytest.fail(str(exc), pytrace=False)


def psql_command(
    gateway: RunningGateway,
    token: str,
    sql: str | None = None,
    *,
    file: Path | str | None = None,
    args: Sequence[str] = (),
    user: str | None = None,
    dbname: str = TARGET,
    tuples_only: bool = True,
    env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and environment for running psql against the gateway (for Popen)."""
    argv = [str(psql_binary()), "-X", "-v", "ON_ERROR_STOP=1"]
    if tuples_only:
        argv += ["-A", "-t"]
    argv += ["-d", conninfo(gateway, user or token_subject(token), dbname)]
    if sql is not None:
        argv += ["-c", sql]
    if file is not None:
        argv += ["-f", str(file)]
    argv += list(args)
    # No PG* variables from the outside world; the token travels in PGPASSWORD, not argv.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    full_env["PGPASSWORD"] = token
    full_env["PGAPPNAME"] = "phigate-tests"
    if env:
        full_env.update(env)
    return argv, full_env


def psql(
    gateway: RunningGateway,
    token: str,
    sql: str | None = None,
    *,
    file: Path | str | None = None,
    args: Sequence[str] = (),
    user: str | None = None,
    dbname: str = TARGET,
    input: str | None = None,
    timeout: float = 60,
    tuples_only: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run psql through the gateway; returns the CompletedProcess (check returncode yourself)."""
    argv, full_env = psql_command(
        gateway,
        token,
        sql,
        file=file,
        args=args,
        user=user,
        dbname=dbname,
        tuples_only=tuples_only,
        env=env,
    )
    return subprocess.run(
        argv,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )


__all__ = [
    "EhrPostgres",
    "GatewayFactory",
    "RunningGateway",
    "asyncpg_connect",
    "conninfo",
    "native_import_error",
    "psql",
    "psql_binary",
    "psql_command",
    "psycopg_connect",
    "require_native",
    "token_subject",
]
