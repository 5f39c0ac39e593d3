"""Offline PKI for mutual TLS between director, envoys and the notebook client.

``patchsvdd certs --out DIR --director-host HOST --envoy NAME [--envoy NAME ...]``
writes a root authority and one key and certificate per node, signed by it:

    DIR/root_ca.crt          every node trusts this (copy it everywhere)
    DIR/root_ca.key          signs the others; keep it off the nodes
    DIR/director.crt/.key    subjectAltName = the director's host names
    DIR/<envoy>.crt/.key     common name = the envoy's name (OpenFL checks it)
    DIR/<client>.crt/.key    the notebook ("frontend" by default)
    DIR/<envoy>.auth/.pub    the site's SuperNode key on Flower (OpenSSH, P-384): the SuperLink admits only
                             the public keys registered with it (``--enable-supernode-auth``)

Certificates carry serverAuth and clientAuth. Python's ``cryptography`` only;
nothing is downloaded.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT_NAME = "root_ca"


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "patchsvdd federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def create_authority(out: Path, days: int = 365, common_name: str = "patchsvdd root CA") -> tuple[Path, Path]:
    """Self-signed root: ``out/root_ca.key``, ``out/root_ca.crt``."""
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    key_path, cert_path = out / f"{ROOT_NAME}.key", out / f"{ROOT_NAME}.crt"
    _write_key(key, key_path)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def issue_certificate(
    out: Path, file_stem: str, common_name: str, hosts: Iterable[str], ca_key: Path, ca_cert: Path, days: int = 365
) -> tuple[Path, Path]:
    """Key and certificate ``out/<file_stem>.key/.crt`` for ``common_name``, signed by the authority."""
    authority_key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    authority = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(authority.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(_alt_names([common_name, *hosts])), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.public_key()),  # type: ignore[arg-type]
            critical=False,
        )  # the authority's key is the EC key create_authority wrote
    )
    cert = builder.sign(authority_key, hashes.SHA384())  # type: ignore[arg-type]  # an EC key, as above
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / f"{file_stem}.key", out / f"{file_stem}.crt"
    _write_key(key, key_path)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def create_federation_certs(
    out: str | os.PathLike,
    director_hosts: Iterable[str],
    envoys: Iterable[str],
    clients: Iterable[str] = ("frontend",),
    days: int = 365,
) -> Path:
    """Root authority plus certificates for the director, each envoy and each notebook client, all in ``out``."""
    out = Path(out)
    hosts = list(director_hosts)
    if not hosts:
        raise ValueError("at least one director host name is needed (the name envoys and the notebook connect to)")
    if "localhost" in hosts:
        hosts += ["127.0.0.1"]
    ca_key, ca_cert = create_authority(out, days)
    issue_certificate(out, "director", hosts[0], hosts[1:], ca_key, ca_cert, days)
    envoys = list(envoys)
    for name in [*envoys, *clients]:
        issue_certificate(out, name, name, [], ca_key, ca_cert, days)
    for name in envoys:
        write_node_auth_key(out, name)
    return out


def write_node_auth_key(out: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """A site's SuperNode authentication key pair ``out/<name>.auth`` (private) and ``.auth.pub`` (public), in
    the OpenSSH format Flower reads (``flower-supernode --auth-supernode-private-key``, ``flwr supernode
    register``)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = Path(out) / f"{name}.auth"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    os.chmod(private, 0o600)
    public = Path(out) / f"{name}.auth.pub"
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


def issued_by(cert_path: str | os.PathLike, ca_path: str | os.PathLike) -> bool:
    """Whether the certificate at ``cert_path`` was signed by the authority at ``ca_path``."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    authority = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
    try:
        cert.verify_directly_issued_by(authority)
    except (ValueError, TypeError, Exception):
        return False
    return True
