"""Session fixtures for integration tests: PostgreSQL with EHR data, tokens, certs, gateways."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

# Tests run from a checkout (PYTHONPATH=python) or an installed build; prefer what is
# importable, fall back to the source tree.
try:
    import phigate  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from harness import (  # noqa: E402
    CERT_HOSTNAMES,
    TEST_PATIENTS,
    TEST_SEED,
    EhrPostgres,
    GatewayFactory,
    RunningGateway,
    native_import_error,
)
from scripted import ScriptedControlPlane  # noqa: E402

TokenFactory = Callable[..., str]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: starts PostgreSQL and a gateway")


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Integration tests must fail, not skip, when the data plane was not built:
    # a green run without the extension would be a lie.
    if item.get_closest_marker("integration") is not None:
        err = native_import_error()
        if err is not None:
            pytest.fail(
                f"phigate._native cannot be imported ({err}); run `make build` first", pytrace=False
            )


@pytest.fixture(scope="session")
def pg() -> Iterator[EhrPostgres]:
    """PostgreSQL on a free loopback port with the EHR database (200 patients), a service role."""
    server = EhrPostgres()  # own temp dir, removed at stop
    server.start()
    try:
        server.provision(patients=TEST_PATIENTS, seed=TEST_SEED)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dev_issuer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A local token issuer with keys and a JWKS file on disk."""
    from phigate.dev.tokens import DevIssuer

    issuer = DevIssuer(tmp_path_factory.mktemp("keys"))
    issuer.ensure_keys()
    return issuer


@pytest.fixture(scope="session")
def dev_cert(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A dev CA and a server cert for localhost/127.0.0.1 (DevCert: ca_cert, cert, key)."""
    from phigate.dev.certs import make_dev_cert

    return make_dev_cert(tmp_path_factory.mktemp("tls"), list(CERT_HOSTNAMES))


@pytest.fixture(scope="session")
def _session_gateways(
    pg: EhrPostgres, dev_issuer: Any, dev_cert: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(pg, dev_issuer, dev_cert, tmp_path_factory.mktemp("gateways"))
    yield factory
    factory.stop_all()


@pytest.fixture
def gateway_factory(
    pg: EhrPostgres, dev_issuer: Any, dev_cert: Any, tmp_path: Path
) -> Iterator[GatewayFactory]:
    """Call with config overrides to get a started gateway; all are stopped after the test."""
    factory = GatewayFactory(pg, dev_issuer, dev_cert, tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def gateway(_session_gateways: GatewayFactory) -> RunningGateway:
    """The default gateway: TLS required (verify-full works with the dev CA), target `ehr`."""
    return _session_gateways()


@pytest.fixture(scope="session")
def token(dev_issuer: Any) -> TokenFactory:
    """Mint a token: token(sub="agent-1", groups=("clinicians",), ttl_seconds=900, audience=...,
    issuer=..., now=..., **claims)."""

    def mint(
        sub: str = "agent-1",
        groups: Sequence[str] = ("clinicians",),
        ttl_seconds: float = 900,
        *,
        audience: str = "phigate",
        issuer: str | None = None,
        now: float | None = None,
        **claims: Any,
    ) -> str:
        """Extra keyword arguments become (or override) claims, e.g. exp=..., groups=None."""
        return str(
            dev_issuer.mint(
                sub,
                list(groups),
                ttl_seconds=ttl_seconds,
                audience=audience,
                issuer=dev_issuer.issuer if issuer is None else issuer,
                now=now,
                claims=claims,
            )
        )

    return mint


@pytest.fixture
def scripted(pg: Any) -> Iterator[Callable[..., ScriptedControlPlane]]:
    cps: list[ScriptedControlPlane] = []

    def make(**kw: Any) -> ScriptedControlPlane:
        """A scripted control plane (tests/scripted.py) on the session's PostgreSQL."""
        cp = ScriptedControlPlane(pg, **kw)
        cps.append(cp)
        return cp

    yield make
    for cp in cps:
        cp.close()
