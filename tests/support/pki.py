"""Throw-away certificates made with `cryptography`: a CA, a server certificate for
127.0.0.1/localhost, a client certificate from that CA and one from another CA."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost, a client certificate from
    the same CA, and a client certificate from another CA (which the server must refuse)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
                 server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    elif server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def self_signed(directory: Path, valid_from_days: float = 0.0) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, valid for one day from
    `valid_from_days` from now (negative: in the past), and its key (0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
             + datetime.timedelta(days=valid_from_days))
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(_name("localhost"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return _write_cert(cert, directory / "server.pem"), _write_key(key, directory / "server.key")


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    keys = {n: ec.generate_private_key(ec.SECP256R1())
            for n in ("ca", "server", "client", "other_ca", "other_client")}
    ca = _certificate("snapserve test CA", keys["ca"], "snapserve test CA", keys["ca"], ca=True)
    other = _certificate("another CA", keys["other_ca"], "another CA", keys["other_ca"], ca=True)
    return Pki(
        ca=_write_cert(ca, folder / "ca.pem"),
        server_cert=_write_cert(_certificate("127.0.0.1", keys["server"], "snapserve test CA",
                                             keys["ca"], server=True), folder / "server.pem"),
        server_key=_write_key(keys["server"], folder / "server.key"),
        client_cert=_write_cert(_certificate("client", keys["client"], "snapserve test CA",
                                             keys["ca"]), folder / "client.pem"),
        client_key=_write_key(keys["client"], folder / "client.key"),
        other_ca=_write_cert(other, folder / "other-ca.pem"),
        other_client_cert=_write_cert(_certificate("intruder", keys["other_client"], "another CA",
                                                   keys["other_ca"]), folder / "other-client.pem"),
        other_client_key=_write_key(keys["other_client"], folder / "other-client.key"))


def tls_channel(port: int, pki: Pki, client: tuple[Path, Path] | None = None,
                ca: Path | None = None) -> grpc.aio.Channel:
    cert, key = client if client is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca).read_bytes(),
        private_key=None if key is None else key.read_bytes(),
        certificate_chain=None if cert is None else cert.read_bytes())
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)
