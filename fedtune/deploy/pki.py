"""What a secured deployment needs besides CKKS keys: TLS certificates and node keys.

* :func:`make_tls` writes a private CA into a directory of its own (``ca.key``,
  ``ca.crt``: the operator keeps it offline) and the SuperLink's certificate
  directory (``ca.crt``, ``server.pem``, ``server.key``) whose server certificate
  names the addresses client nodes will dial (and always ``127.0.0.1``, where the
  SuperLink's own Control and runtime API listen). Every SuperNode and ``flwr``
  CLI user gets only ``ca.crt``. The CA key never sits beside the server key:
  whoever takes the SuperLink could otherwise mint certificates for any name.
* :func:`make_node_key` writes one SuperNode authentication key pair in the
  OpenSSH format Flower reads: an ECDSA key on NIST P-384 (``NAME``, stays on
  the node) and its public half (``NAME.pub``, registered with the SuperLink by
  ``flwr supernode register``).

Every file gets an explicit mode whatever the umask (private keys 0600, public
files 0644) and every directory that holds a private key is 0700. Both use
``cryptography`` (already a dependency of Flower). Existing files are never
overwritten: a deployment's identities must not change by accident.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune import keyfiles
from fedtune.errors import ConfigError

#: Longest certificate validity ``make_tls`` issues (days; about 27 months, the old
#: CA/Browser Forum limit). Renew with a fresh ``fedtune deploy certs``.
MAX_DAYS = 825
#: The address the SuperLink's own APIs listen on; always in the server certificate.
LOOPBACK = "127.0.0.1"
PRIVATE_MODE = keyfiles.PRIVATE_MODE
PUBLIC_MODE = keyfiles.PUBLIC_MODE
SECRET_DIR_MODE = keyfiles.SECRET_DIR_MODE

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class TlsFiles:
    """Paths written by :func:`make_tls`."""

    ca_cert: Path
    ca_key: Path
    server_ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    """Paths written by :func:`make_node_key`."""

    private: Path
    public: Path


def _refuse_existing(*paths: Path) -> None:
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise ConfigError(f"{existing} already exist; fedtune never overwrites keys.")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file with exactly ``mode`` (the umask does not apply).

    Atomic and never through a link (:func:`fedtune.keyfiles.write_key_file`).
    """
    try:
        keyfiles.write_key_file(path, data, mode)
    except keyfiles.KeyFileError as err:
        raise ConfigError(str(err)) from None


def secret_dir(path: Path, option: str) -> Path:
    """Create ``path`` with mode 0700, or check that an existing one is not open to others."""
    path = Path(path)
    if path.is_symlink():
        raise ConfigError(f"{option} {str(path)!r} is a symbolic link; give the directory itself.")
    if not path.exists():  # it and every missing parent: 0700, whatever the umask
        try:
            return keyfiles.private_dir(path, option)
        except keyfiles.KeyFileError as err:
            raise ConfigError(str(err)) from None
    if not path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is not a directory.")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{option} {str(path)!r} is open to other users (mode {mode:04o}) and would hold "
            f"a private key; give a new directory or run `chmod 700 {path}` first."
        )
    return path


def check_san(host: str) -> x509.GeneralName:
    """A subject alternative name for ``host``: an IP address or an RFC 1123 DNS name.

    Wildcards, empty labels, spaces and the unspecified address are refused: a
    certificate names the exact addresses nodes dial, nothing broader.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.is_unspecified or ip.is_multicast:
            raise ConfigError(
                f"--host {host!r} is not an address a node can dial; name the server's own "
                "IP address or DNS name (listening on all interfaces is `--fleet-host`)."
            )
        return x509.IPAddress(ip)
    name = host.lower()
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ConfigError(
            f"--host must be an IP address or a DNS name of letters, digits and inner hyphens "
            f"(RFC 1123 labels of 1-63 characters, no wildcard, no trailing dot), got {host!r}."
        )
    return x509.DNSName(name)


def make_tls(out_dir: Path, *, ca_dir: Path, hosts: list[str], days: int = 365) -> TlsFiles:
    """Write a CA into ``ca_dir`` and the SuperLink's certificates into ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        The SuperLink's certificate directory (``ca.crt``, ``server.pem``,
        ``server.key``); created with mode 0700; must not already hold these files.
    ca_dir : Path
        The CA's own directory (``ca.key``, ``ca.crt``), mode 0700: keep it off the
        SuperLink, offline. Must differ from ``out_dir``.
    hosts : list[str]
        Every address a SuperNode will use to reach the SuperLink, e.g.
        ``["superlink.example.org"]``; ``127.0.0.1`` is always added (the Control
        API and the ServerApp's runtime API listen there).
    days : int
        Validity of both certificates, 1 to :data:`MAX_DAYS`.
    """
    if not hosts or any(not h.strip() for h in hosts):
        raise ConfigError(f"--host must name at least one address, got {hosts!r}.")
    sans = [check_san(h) for h in hosts]
    if x509.IPAddress(ipaddress.ip_address(LOOPBACK)) not in sans:
        sans.append(x509.IPAddress(ipaddress.ip_address(LOOPBACK)))
    sans = list(dict.fromkeys(sans))
    if not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"--days must be in 1..{MAX_DAYS}, got {days}.")
    out_dir, ca_dir = Path(out_dir), Path(ca_dir)
    if out_dir.resolve() == ca_dir.resolve():
        raise ConfigError(
            f"--ca-dir must not be --out ({str(out_dir)!r}): the CA key stays off the SuperLink."
        )
    files = TlsFiles(
        ca_dir / "ca.crt",
        ca_dir / "ca.key",
        out_dir / "ca.crt",
        out_dir / "server.pem",
        out_dir / "server.key",
    )
    _refuse_existing(*dataclasses.astuple(files))
    secret_dir(ca_dir, "--ca-dir")
    secret_dir(out_dir, "--out")
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
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(sans[0].value))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    ca_pem = ca_cert.public_bytes(pem)
    _write(files.ca_key, ca_key.private_bytes(pem, pkcs8, none), PRIVATE_MODE)
    _write(files.ca_cert, ca_pem, PUBLIC_MODE)
    _write(files.server_ca_cert, ca_pem, PUBLIC_MODE)
    _write(files.server_cert, server_cert.public_bytes(pem), PUBLIC_MODE)
    _write(files.server_key, server_key.private_bytes(pem, pkcs8, none), PRIVATE_MODE)
    return files


def make_node_key(out_dir: Path, name: str) -> NodeKey:
    """Write ``out_dir/name`` (private, 0600) and ``out_dir/name.pub`` (0644; OpenSSH, P-384)."""
    if not name or "/" in name or name.startswith(".") or not name.isprintable() or " " in name:
        raise ConfigError(f"node name must be a plain file name, got {name!r}.")
    out_dir = Path(out_dir)
    key = NodeKey(out_dir / name, out_dir / f"{name}.pub")
    _refuse_existing(key.private, key.public)
    secret_dir(out_dir, "--out")
    private = ec.generate_private_key(ec.SECP384R1())
    _write(
        key.private,
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        PRIVATE_MODE,
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(key.public, public + f" {name}\n".encode(), PUBLIC_MODE)
    return key
