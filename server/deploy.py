"""Deployment helpers: a certificate authority, the SuperLink's TLS certificate,
and per-site authentication keys.

* ``make_certificates``: a self-signed CA (``ca.crt``/``ca.key``) and a server
  certificate (``server.pem``/``server.key``) for the SuperLink, valid for the
  given IP addresses and DNS names. The CA certificate goes to every site
  (``--root-certificates``); the CA key stays with the coordinator.
* ``make_site_key``: an ECDSA P-384 key pair in OpenSSH format, as Flower's
  SuperNode authentication expects. The site keeps ``<site>.key``; the
  coordinator registers ``<site>.pub`` with ``flwr supernode register``.

Private keys are written with mode 0600. Nothing here talks to the network.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_model.errors import MoeflError
from shared_model.federation_config import is_site_name


def _write_private(path: Path, data: bytes) -> None:
    if path.exists():
        raise MoeflError(
            f"{path} exists; refusing to overwrite a private key "
            "(move it away first if you mean to replace it)"
        )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "moefl federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_certificates(
    out: Path, *, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 365
) -> dict[str, Path]:
    """Write ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` under ``out``.

    Args:
        out: folder (created).
        hosts: IP addresses and DNS names the SuperLink is reached by.
        days: validity.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = _ca_certificate(now, days)
    server_key, server_cert = _server_certificate(ca_key, ca_cert, hosts, now, days)
    pem = serialization.Encoding.PEM
    paths = {
        "ca_cert": out / "ca.crt",
        "ca_key": out / "ca.key",
        "server_cert": out / "server.pem",
        "server_key": out / "server.key",
    }
    for key in ("ca_key", "server_key"):
        if paths[key].exists():
            raise MoeflError(
                f"{paths[key]} exists; refusing to overwrite a private key"
            )
    _write_private(paths["ca_key"], _pkcs8_pem(ca_key))
    _write_private(paths["server_key"], _pkcs8_pem(server_key))
    paths["ca_cert"].write_bytes(ca_cert.public_bytes(pem))
    paths["server_cert"].write_bytes(server_cert.public_bytes(pem))
    return paths


def _pkcs8_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ca_certificate(
    now: dt.datetime, days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA that may sign certificates but no further CAs."""
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("moefl federation CA"))
        .issuer_name(_name("moefl federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return ca_key, ca_cert


def _server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    now: dt.datetime,
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new server key and its certificate, signed by the CA, valid for ``hosts``
    (IP addresses and DNS names) and named after the first of them."""
    alt: list[x509.GeneralName] = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return server_key, server_cert


def make_site_key(out: Path, site: str) -> tuple[Path, Path]:
    """Write ``<site>.key`` (private, OpenSSH) and ``<site>.pub`` under ``out``.

    Raises:
        MoeflError: ``site`` is not a site name (it would also name files
            outside ``out``, e.g. ``../escaped``).
    """
    if not is_site_name(site):
        raise MoeflError(
            f"site name {site!r} is not valid: use lower-case letters, digits and "
            "_ (starting with a letter, at most 64), as `site_name` in the site YAML"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / f"{site}.key", out / f"{site}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {site}\n".encode()
    )
    return private, public
