"""TLS certificates and SuperNode keys for a deployment."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedtune.config import ConfigError
from fedtune.deploy.pki import make_node_key, make_tls


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path: Path) -> None:
    files = make_tls(tmp_path, hosts=["127.0.0.1", "localhost"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not signed by the CA
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (files.ca_key, files.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_tls_never_overwrites_and_checks_input(tmp_path: Path) -> None:
    make_tls(tmp_path, hosts=["127.0.0.1"])
    with pytest.raises(ConfigError, match="already exist; fedtune never overwrites"):
        make_tls(tmp_path, hosts=["127.0.0.1"])
    with pytest.raises(ConfigError, match="--host must name at least one address"):
        make_tls(tmp_path / "x", hosts=[])
    with pytest.raises(ConfigError, match="--days must be >= 1, got 0"):
        make_tls(tmp_path / "y", hosts=["a"], days=0)


def test_node_key_is_an_openssh_p384_pair(tmp_path: Path) -> None:
    key = make_node_key(tmp_path, "node-0")
    private = load_ssh_private_key(key.private.read_bytes(), None)
    public = load_ssh_public_key(key.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(key.private.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="never overwrites"):
        make_node_key(tmp_path, "node-0")
    with pytest.raises(ConfigError, match="node name must be a plain file name, got '../x'"):
        make_node_key(tmp_path, "../x")
