"""A throwaway certificate authority for TLS tests, made with ``cryptography`` (no openssl CLI):
a CA certificate and leaf certificates it issues, written as PEM files in a temp dir.

    ca = TestCA(tmp_path)                       # tmp_path/ca.pem
    server = ca.issue("server", ips=["127.0.0.1"], dns=["localhost"])
    server.cert, server.key                     # tmp_path/server.pem, tmp_path/server.key
    phone = ca.issue("phone", client=True)      # may authenticate as a TLS client

Certificates carry what strict X.509 checks (Python 3.13's VERIFY_X509_STRICT) ask for:
key usage, subject and authority key identifiers, a critical basic-constraints on the CA.
Skips the test when ``cryptography`` is not installed (it is in the test extra).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class Issued:
    """A leaf certificate (``cert``: the leaf then the CA, PEM) and its key (``key``, PEM)."""

    name: str
    cert: Path
    key: Path
    cert_pem: bytes
    key_pem: bytes


class TestCA:
    """A CA whose certificate is ``dir/NAME.pem`` (``ca`` / ``ca_pem``); :meth:`issue` makes
    leaf certificates signed by it."""

    __test__ = False     # not a pytest test class despite the name

    def __init__(self, directory: Path, name: str = "ca") -> None:
        pytest.importorskip("cryptography")
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.dir = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                     f"fastsip test {name}")])
        now = _now()
        public = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.subject)
            .issuer_name(self.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_pem = _pem(self.certificate)
        self.ca = directory / f"{name}.pem"
        self.ca.write_bytes(self.ca_pem)

    def issue(self, name: str, *, ips: Sequence[str] = ("127.0.0.1", "::1"),
              dns: Sequence[str] = ("localhost",), client: bool = False) -> Issued:
        """A leaf certificate for ``name`` with those SANs (none: pass empty sequences), for
        a server, or also a client (``client``).  Written to ``dir/NAME.pem`` (leaf, then
        the CA) and ``dir/NAME.key``."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        sans: list[Any] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_pem = _pem(cert) + self.ca_pem
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        cert_path = self.dir / f"{name}.pem"
        key_path = self.dir / f"{name}.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        return Issued(name, cert_path, key_path, cert_pem, key_pem)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))
