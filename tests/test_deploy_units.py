"""Deployment pieces without a running federation: TLS, node keys, command lines, run config."""

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


def test_run_config_needs_labels_and_public_context(tmp_path: Path) -> None:
    from fedtune.deploy.submit import run_config

    with pytest.raises(ConfigError, match="needs `label-names`"):
        run_config({}, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="pass the server's --public-context"):
        run_config({"label-names": "a,b", "encryption": True}, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="Unknown config key 'num-round'"):
        run_config({"label-names": "a,b", "num-round": 3}, run_dir=tmp_path / "run")
    flat = run_config(
        {"label-names": "a,b", "encryption": True},
        run_dir=tmp_path / "run",
        public_context=tmp_path / "public.ctx",
        resume=True,
    )
    assert flat["run-id"] == "run" and flat["resume"] is True
    assert flat["public-context"] == str((tmp_path / "public.ctx").resolve())


def test_role_command_lines_keep_tls_auth_and_loopback(tmp_path: Path) -> None:
    from fedtune.deploy import roles

    files = make_tls(tmp_path / "certs", hosts=["127.0.0.1"])
    key = make_node_key(tmp_path / "keys", "node-0")
    link = roles.superlink(certs=tmp_path / "certs", state_dir=tmp_path / "server", base_env={})
    assert "--enable-supernode-auth" in link.argv
    assert "--disable-runtime-dependency-installation" in link.argv
    assert f"--ssl-certfile={files.server_cert.resolve()}" in link.argv
    assert "--host=127.0.0.1" in link.argv and "--insecure" not in link.argv
    assert link.env["FLWR_HOME"] == str((tmp_path / "server" / "flwr-home").resolve())
    config = roles.node_config(state_dir=tmp_path / "n0", partition_id=0, num_partitions=3)
    node = roles.supernode(
        superlink_address="127.0.0.1:9093",
        ca=files.ca_cert,
        key=key.private,
        port=9094,
        config=config,
        base_env={},
    )
    node_config = next(a for a in node.argv if a.startswith("--node-config="))
    assert f'state-dir="{(tmp_path / "n0").resolve()}"' in node_config
    assert "partition-id=0 num-partitions=3" in node_config
    assert node.env["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ConfigError, match="--superlink must be HOST:PORT, got 'nowhere'"):
        roles.supernode(
            superlink_address="nowhere", ca=files.ca_cert, key=key.private, port=1, config=config
        )
    with pytest.raises(ConfigError, match="--data-path .* does not exist"):
        roles.node_config(state_dir=tmp_path / "n1", data_path=tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="--partition-id must be in \\[0, 3\\), got 3"):
        roles.node_config(state_dir=tmp_path / "n1", partition_id=3, num_partitions=3)
