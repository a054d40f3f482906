"""phigate for the benchmark: dev token, TOML config with TLS off on both legs, `phigate serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from procs import LOOPBACK, Registry, free_port, log, run, wait_port

REPO = Path(__file__).resolve().parent.parent
ISSUER = "https://phigate-bench.invalid/"
AUDIENCE = "phigate"
AGENT = "bench-agent"
GROUPS = ["bench"]


def _env() -> dict[str, str]:
    """Environment in which `phigate` imports from this checkout even if it is not pip-installed."""
    env = dict(os.environ)
    py = str(REPO / "python")
    env["PYTHONPATH"] = py + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def importable() -> tuple[bool, str]:
    """Whether the gateway (Rust extension + server) imports; the reason if it does not."""
    cp = run([sys.executable, "-c", "import phigate._native, phigate.control.server, phigate.cli"],
             timeout=60, env=_env(), check=False)
    return cp.returncode == 0, (cp.stderr.strip().splitlines() or ["?"])[-1]


def native_version() -> str:
    cp = run([sys.executable, "-c", "import phigate._native as n; print(n.__version__)"],
             timeout=60, env=_env(), check=False)
    return cp.stdout.strip() if cp.returncode == 0 else "?"


def mint_token(key_dir: Path, ttl_seconds: int, subject: str = AGENT,
               groups: list[str] | None = None) -> tuple[str, Path]:
    """A dev token from phigate.dev.tokens.DevIssuer and the JWKS file that verifies it (the same
    key pair for every subject minted from one key_dir)."""
    from phigate.dev.tokens import DevIssuer

    iss = DevIssuer(key_dir, issuer=ISSUER)
    iss.ensure_keys()
    tok = iss.mint(subject, GROUPS if groups is None else groups, ttl_seconds,
                   audience=AUDIENCE, issuer=ISSUER)
    return tok, iss.jwks_path


def _q(s: str | Path) -> str:
    return json.dumps(str(s))  # a JSON string is a valid TOML basic string


def write_config(workdir: Path, *, port: int, jwks: Path, pg_port: int, pool_port: int | None,
                 pool_db: str, upstream_db: str, svc_user: str, svc_password: str,
                 audit_dir: Path | None, audit_sync: str, workers: int,
                 extra_groups: dict[str, list[str]] | None = None,
                 reader_see_clear: list[str] | None = None, extra_toml: str = "",
                 tls: tuple[Path, Path] | None = None) -> Path:
    """The gateway TOML: plaintext listener, `bench` -> PostgreSQL, `bench_pool` -> PgBouncer.

    `extra_groups` and `extra_toml` (roles, `[phi]`) are for the masked bulk read; when PHI is
    classified, `reader_see_clear` lets the benchmark agent see every classified kind in clear,
    so pgbench and the plain bulk read measure exactly what they measure without `[phi]`.
    `tls` (certificate, key) lets clients negotiate TLS; plaintext is still accepted.
    `audit_dir` None: no [audit] section (only for gateway_noaudit.py, the audit part's baseline).
    """
    group_lines = "".join(f"{_q(g)} = {json.dumps(r)}\n"
                          for g, r in (extra_groups or {}).items())
    see_clear = (f"see_clear = {json.dumps(reader_see_clear)}\n"
                 if reader_see_clear is not None else "")
    tls_lines = (f"tls_cert = {_q(tls[0])}\ntls_key = {_q(tls[1])}\n" if tls is not None
                 else "")
    audit_lines = ""
    if audit_dir is not None:
        from phigate.audit.keys import write_keys

        if not (workdir / "audit.key").exists():
            write_keys(workdir, "phigate-bench")
        audit_dir.mkdir(parents=True, exist_ok=True)
        audit_lines = f"""
[audit]
dir = {_q(audit_dir)}
signing_key = {_q(workdir / "audit.key")}
hmac_key = {_q(workdir / "audit-hmac.key")}
sync = {_q(audit_sync)}
"""
    pw = workdir / "svc.password"
    pw.write_text(svc_password + "\n")
    pw.chmod(0o600)
    toml = f"""\
[server]
listen = "{LOOPBACK}:{port}"
require_tls = false
{tls_lines}workers = {workers}
{audit_lines}
[identity.oidc]
issuer = {_q(ISSUER)}
audience = {_q(AUDIENCE)}
jwks_file = {_q(jwks)}

# Policy is on, as in production: the benchmark agent may read pgbench's tables (and the bulk
# table) and nothing else; decisions are cached after the warm-up, so pgbench never enters Python.
[groups]
{GROUPS[0]} = ["bench-reader"]
{group_lines}
[roles.bench-reader]
relations = ["public.*"]
operations = ["select", "copy_to"]
{see_clear}
[targets.bench]
host = "{LOOPBACK}"
port = {pg_port}
database = {_q(upstream_db)}
user = {_q(svc_user)}
password_file = {_q(pw)}
tls = "disable"
"""
    if pool_port is not None:
        # Only for the 10k idle-connection RSS test: PostgreSQL cannot hold 10k backends here.
        toml += f"""
[targets.bench_pool]
host = "{LOOPBACK}"
port = {pool_port}
database = {_q(pool_db)}
user = {_q(svc_user)}
password_file = {_q(pw)}
tls = "disable"
"""
    toml += extra_toml
    path = workdir / "phigate.toml"
    path.write_text(toml)
    return path


class Gateway:
    """`python -m phigate.cli serve --config FILE` as its own process (CPU apart from pgbench)."""

    def __init__(self, reg: Registry, workdir: Path, name: str = "phigate"):
        self.reg = reg
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "phigate.log"

    def start(self, config: Path, command: list[str] | None = None,
              env: dict[str, str] | None = None) -> None:
        """Run `phigate serve` (or ``command``, which must serve ``config``) with the checkout's
        Python path and ``env`` added to the environment."""
        argv = command or [sys.executable, "-m", "phigate.cli", "serve", "--config", str(config)]
        self.proc = self.reg.spawn(self.name, argv, log_path=self.log_path,
                                   env={**_env(), **(env or {})}, cwd=REPO)
        try:
            wait_port(self.port, 60, self.proc)
        except Exception:
            log("phigate did not come up; last log lines:\n" + self.log_tail())
            raise
        log(f"{self.name} on {LOOPBACK}:{self.port} (pid {self.proc.pid})")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: a gateway with a trail closes it (audit_close, final checkpoint).
        Returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"
