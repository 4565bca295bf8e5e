"""What a secured deployment needs besides CKKS keys: TLS certificates and node keys.

* :func:`make_tls` writes a private CA (``ca.crt``, ``ca.key``) and a server
  certificate signed by it (``server.pem``, ``server.key``) whose subject
  alternative names are the addresses client nodes will dial. The SuperLink gets
  ``ca.crt``, ``server.pem`` and ``server.key``; every SuperNode and ``flwr``
  CLI user gets only ``ca.crt``.
* :func:`make_node_key` writes one SuperNode authentication key pair in the
  OpenSSH format Flower reads: an ECDSA key on NIST P-384 (``NAME``, mode
  0600, stays on the node) and its public half (``NAME.pub``, registered with
  the SuperLink by ``flwr supernode register``).

Both use ``cryptography`` (already a dependency of Flower). Existing files are
never overwritten: a deployment's identities must not change by accident.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.config import ConfigError


@dataclass(frozen=True)
class TlsFiles:
    """Paths written by :func:`make_tls`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    """Paths written by :func:`make_node_key`."""

    private: Path
    public: Path


def _refuse_existing(*paths: Path) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ConfigError(f"{existing} already exist; fedtune never overwrites keys.")


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file readable by its owner only (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_tls(out_dir: Path, *, hosts: list[str], days: int = 365) -> TlsFiles:
    """Write a CA and a server certificate valid for ``hosts`` (IPs or DNS names).

    Parameters
    ----------
    out_dir : Path
        Created if needed; must not already hold these files.
    hosts : list[str]
        Every address a SuperNode or ``flwr`` will use to reach the SuperLink,
        e.g. ``["127.0.0.1", "localhost"]`` or ``["superlink.example.org"]``.
    days : int
        Validity of both certificates.
    """
    if not hosts or any(not h.strip() for h in hosts):
        raise ConfigError(f"--host must name at least one address, got {hosts!r}.")
    if days < 1:
        raise ConfigError(f"--days must be >= 1, got {days}.")
    out_dir = Path(out_dir)
    files = TlsFiles(
        out_dir / "ca.crt", out_dir / "ca.key", out_dir / "server.pem", out_dir / "server.key"
    )
    _refuse_existing(files.ca_cert, files.ca_key, files.server_cert, files.server_key)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
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
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    _write_private(files.ca_key, ca_key.private_bytes(pem, pkcs8, none))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_private(files.server_key, server_key.private_bytes(pem, pkcs8, none))
    return files


def make_node_key(out_dir: Path, name: str) -> NodeKey:
    """Write ``out_dir/name`` (private, 0600) and ``out_dir/name.pub`` (OpenSSH, P-384)."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"node name must be a plain file name, got {name!r}.")
    out_dir = Path(out_dir)
    key = NodeKey(out_dir / name, out_dir / f"{name}.pub")
    _refuse_existing(key.private, key.public)
    out_dir.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        key.private,
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    key.public.write_bytes(public + f" {name}\n".encode())
    return key
