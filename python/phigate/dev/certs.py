"""Make a development CA and a server certificate signed by it, for TLS on a local gateway."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from phigate.files import atomic_write

__all__ = ["DevCert", "make_dev_cert"]

_CA_DAYS = 825
_CERT_DAYS = 397  # the longest validity browsers and strict TLS stacks still accept


@dataclass(frozen=True)
class DevCert:
    ca_cert: Path  # give this to clients (sslrootcert=..., sslmode=verify-full)
    cert: Path  # server.tls_cert
    key: Path  # server.tls_key (mode 0600)


def make_dev_cert(
    out_dir: str | os.PathLike[str], hostnames: Iterable[str] = ("localhost", "127.0.0.1")
) -> DevCert:
    """Write ca.crt, server.crt and server.key into out_dir and return their paths.

    The CA's private key is discarded after signing: nothing else can ever be issued under it,
    so trusting ca.crt on a developer machine trusts exactly this one server certificate.
    """
    names = [h.strip() for h in hostnames if h.strip()]
    if not names:
        raise ValueError("at least one hostname or IP address is needed")
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(minutes=5)  # tolerate small clock skew between hosts

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "phigate development"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"phigate dev CA {now:%Y-%m-%d %H:%M:%S}"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=_CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    result = DevCert(ca_cert=out / "ca.crt", cert=out / "server.crt", key=out / "server.key")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(result.key, key_pem, 0o600)
    atomic_write(result.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    atomic_write(result.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return result


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
