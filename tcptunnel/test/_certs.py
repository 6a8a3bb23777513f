"""Certificates minted at test time (no key is ever committed)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CertFiles:
    """Paths of a minted CA and server certificate, and the server certificate's pin."""

    ca: str
    cert: str
    key: str
    pfx: str
    pfx_password: str
    pin_hex: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def mint(directory: str, hostname: str = "localhost", days: int = 30,
         not_after: datetime.datetime | None = None) -> CertFiles:
    """A CA and a server certificate for ``hostname`` and 127.0.0.1, as PEM and PKCS#12."""
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("tcptunnel test CA"))
        .issuer_name(_name("tcptunnel test CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name(hostname)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(min(now, not_after or now) - datetime.timedelta(days=2))
        .not_valid_after(not_after or now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: os.path.join(directory, name)
             for name in ("ca.pem", "cert.pem", "key.pem", "cert.pfx")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert.pem"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key.pem"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    password = "pfx-secret"
    with open(paths["cert.pfx"], "wb") as f:
        f.write(pkcs12.serialize_key_and_certificates(
            b"gateway", key, cert, [ca_cert],
            serialization.BestAvailableEncryption(password.encode())))
    pin = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return CertFiles(paths["ca.pem"], paths["cert.pem"], paths["key.pem"], paths["cert.pfx"],
                     password, pin)
