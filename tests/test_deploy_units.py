"""Deployment pieces without a running federation: TLS, node keys, command lines, run config."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedtune.config import ConfigError
from fedtune.deploy.pki import MAX_DAYS, make_node_key, make_tls


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path: Path) -> None:
    files = make_tls(tmp_path / "certs", ca_dir=tmp_path / "ca", hosts=["127.0.0.1", "localhost"])
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
    make_tls(tmp_path / "c", ca_dir=tmp_path / "ca", hosts=["127.0.0.1"])
    with pytest.raises(ConfigError, match="already exist; fedtune never overwrites"):
        make_tls(tmp_path / "c", ca_dir=tmp_path / "ca", hosts=["127.0.0.1"])
    with pytest.raises(ConfigError, match="--host must name at least one address"):
        make_tls(tmp_path / "x", ca_dir=tmp_path / "x-ca", hosts=[])
    with pytest.raises(ConfigError, match=f"--days must be in 1..{MAX_DAYS}, got 0"):
        make_tls(tmp_path / "y", ca_dir=tmp_path / "y-ca", hosts=["a"], days=0)


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


def test_registration_limits_reach_the_run_config(tmp_path: Path) -> None:
    from fedtune.deploy.roles import node_limits, record_node
    from fedtune.deploy.submit import run_config

    home = tmp_path / "op"
    home.mkdir()
    assert node_limits(home) == {}
    record_node(home, node_id=11, name="alice", max_examples=300)
    record_node(home, node_id=12, name="bob", max_examples=None)  # the run's cap
    record_node(home, node_id=13, name="alice", max_examples=200)  # re-registered
    assert node_limits(home) == {13: 200}
    assert oct((home / "nodes.toml").stat().st_mode & 0o777) == "0o644"
    assert '[nodes."12"]\nname = "bob"' in (home / "nodes.toml").read_text()
    flat = run_config({"label-names": "a,b"}, run_dir=tmp_path / "run", node_limits={13: 200})
    assert flat["node-limits"] == "13=200"
    assert "node-limits" not in run_config({"label-names": "a,b"}, run_dir=tmp_path / "r")
    with pytest.raises(
        ConfigError, match="node 13 was registered with --max-examples 200, outside \\[1, 100\\]"
    ):
        run_config(
            {"label-names": "a,b", "max-client-examples": 100},
            run_dir=tmp_path / "run",
            node_limits={13: 200},
        )
    (home / "nodes.toml").write_text('[nodes."x"]\nmax-examples = 3\n')
    with pytest.raises(ConfigError, match="is not a fedtune node list"):
        node_limits(home)


def test_role_command_lines_keep_tls_auth_and_loopback(tmp_path: Path) -> None:
    from fedtune.deploy import roles

    files = make_tls(tmp_path / "certs", ca_dir=tmp_path / "ca", hosts=["127.0.0.1"])
    key = make_node_key(tmp_path / "keys", "node-0")
    link = roles.superlink(certs=tmp_path / "certs", state_dir=tmp_path / "server", base_env={})
    assert "--enable-supernode-auth" in link.argv
    assert "--disable-runtime-dependency-installation" in link.argv
    assert f"--ssl-certfile={files.server_cert.resolve()}" in link.argv
    assert "--host=127.0.0.1" in link.argv and "--insecure" not in link.argv
    assert f"--ssl-ca-certfile={files.server_ca_cert.resolve()}" in link.argv
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
    # A node's SuperExec polls for its ClientApps four times a second (Flower: once); the
    # SuperLink's, which starts one ServerApp per run, keeps Flower's second.
    assert node.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.25"
    assert "FLWR_SUPEREXEC_TASK_POLL_INTERVAL" not in link.env
    with pytest.raises(ConfigError, match="--superlink must be HOST:PORT, got 'nowhere'"):
        roles.supernode(
            superlink_address="nowhere", ca=files.ca_cert, key=key.private, port=1, config=config
        )
    with pytest.raises(ConfigError, match="--data-path .* does not exist"):
        roles.node_config(state_dir=tmp_path / "n1", data_path=tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="--partition-id must be in \\[0, 3\\), got 3"):
        roles.node_config(state_dir=tmp_path / "n1", partition_id=3, num_partitions=3)


# -- attacks on the deployment (issue 11) ----------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "*",
        "a b",
        "*.example.org",
        "-a.example.org",
        "a..b",
        "a.",
        "x" * 64,
        "0.0.0.0",
        "::",
        "é.org",
    ],
)
def test_certificate_names_must_be_exact_dns_names_or_ip_addresses(
    tmp_path: Path, host: str
) -> None:
    with pytest.raises(ConfigError, match="--host"):
        make_tls(tmp_path / "certs", ca_dir=tmp_path / "ca", hosts=["127.0.0.1", host])
    assert not (tmp_path / "certs").exists() and not (tmp_path / "ca").exists()


def test_certificate_names_accept_dns_names_and_ips_and_always_loopback(tmp_path: Path) -> None:
    files = make_tls(
        tmp_path / "certs",
        ca_dir=tmp_path / "ca",
        hosts=["SuperLink.example.org", "10.0.0.5", "::1"],
    )
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("127.0.0.1"),  # the SuperLink's own listener
    ]


def test_certificate_validity_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"--days must be in 1..{MAX_DAYS}, got 36500"):
        make_tls(tmp_path / "a", ca_dir=tmp_path / "a-ca", hosts=["127.0.0.1"], days=36500)
    files = make_tls(tmp_path / "b", ca_dir=tmp_path / "b-ca", hosts=["127.0.0.1"], days=30)
    for path in (files.ca_cert, files.server_cert):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert dt.timedelta(days=30) < life <= dt.timedelta(days=30, minutes=5)


def test_ca_key_is_written_apart_from_the_superlink_certificates(tmp_path: Path) -> None:
    files = make_tls(tmp_path / "certs", ca_dir=tmp_path / "ca-offline", hosts=["127.0.0.1"])
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == [
        "ca.crt",
        "server.key",
        "server.pem",
    ]
    assert files.ca_key == tmp_path / "ca-offline" / "ca.key"
    assert files.server_ca_cert.read_bytes() == files.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match="--ca-dir must not be --out"):
        make_tls(tmp_path / "same", ca_dir=tmp_path / "same", hosts=["127.0.0.1"])


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_every_file_gets_an_explicit_mode_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        tls = make_tls(tmp_path / "certs", ca_dir=tmp_path / "ca", hosts=["127.0.0.1"])
        key = make_node_key(tmp_path / "keys", "node-0")
    finally:
        os.umask(old)
    modes = {
        tls.ca_key: 0o600,
        tls.server_key: 0o600,
        key.private: 0o600,
        tls.ca_cert: 0o644,
        tls.server_ca_cert: 0o644,
        tls.server_cert: 0o644,
        key.public: 0o644,
        tmp_path / "certs": 0o700,
        tmp_path / "ca": 0o700,
        tmp_path / "keys": 0o700,
    }
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in modes} == modes


def test_keys_are_not_written_into_a_directory_open_to_others(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with pytest.raises(ConfigError, match="open to other users \\(mode 0755\\)"):
        make_node_key(shared, "node-0")
    assert list(shared.iterdir()) == []


def _server_files(tmp_path: Path) -> Path:
    make_tls(tmp_path / "certs", ca_dir=tmp_path / "ca", hosts=["127.0.0.1"])
    return tmp_path / "certs"


@pytest.mark.parametrize("where", ["certs", "server"])
@pytest.mark.parametrize("name", ["secret.ctx", "backup.bin"])
def test_superlink_refuses_to_start_beside_a_secret_ckks_context(
    tmp_path: Path, where: str, name: str
) -> None:
    from fedtune.crypto.context import make_secret_context, save_keys
    from fedtune.deploy import roles

    certs = _server_files(tmp_path)
    keys = save_keys(make_secret_context(), tmp_path / "ckks")
    (tmp_path / "server").mkdir(mode=0o700)
    (tmp_path / where / "public.ctx").write_bytes(keys.public.read_bytes())  # allowed
    roles.superlink(certs=certs, state_dir=tmp_path / "server", base_env={})
    hidden = tmp_path / where / "deep" / name  # the README's old walkthrough: keygen here
    hidden.parent.mkdir()
    hidden.write_bytes(keys.secret.read_bytes())
    with pytest.raises(ConfigError, match="CKKS context with the secret key.*only public.ctx"):
        roles.superlink(certs=certs, state_dir=tmp_path / "server", base_env={})


@pytest.mark.parametrize("name", ["ca.key", "backup.pem"])
def test_superlink_refuses_to_start_beside_the_ca_private_key(tmp_path: Path, name: str) -> None:
    from fedtune.deploy import roles

    certs = _server_files(tmp_path)
    (certs / name).write_bytes((tmp_path / "ca" / "ca.key").read_bytes())
    with pytest.raises(ConfigError, match="the deployment CA's private key.*Keep it offline"):
        roles.superlink(certs=certs, state_dir=tmp_path / "server", base_env={})


def test_superlink_listens_on_loopback_and_only_the_fleet_gateway_faces_nodes(
    tmp_path: Path,
) -> None:
    from fedtune.deploy import roles

    certs = _server_files(tmp_path)
    link = roles.superlink(
        certs=certs, state_dir=tmp_path / "server", control_port=9093, base_env={}
    )
    assert "--host=127.0.0.1" in link.argv and "--port=9093" in link.argv
    gateway = roles.fleet_gateway(
        certs=certs, host="0.0.0.0", port=9092, control_port=9093, base_env={}
    )
    assert gateway.argv[1:3] == ["-m", "fedtune.deploy.gateway"]
    assert "--host=0.0.0.0" in gateway.argv and "--upstream-port=9093" in gateway.argv
    with pytest.raises(ConfigError, match="--fleet-port and --control-port must differ"):
        roles.fleet_gateway(certs=certs, host="0.0.0.0", port=9093, control_port=9093)


def _flower_paths(module: str) -> set[str]:
    import importlib

    router = importlib.import_module(module).router
    return {route.path for route in router.routes}


def test_gateway_forwards_exactly_flowers_fleet_api() -> None:
    from fedtune.deploy.gateway import FLEET_PATHS

    assert _flower_paths("flwr.superlink.routers.fleet.router") == FLEET_PATHS


class _Stream(httpx.AsyncByteStream):
    """A response body that arrives as a stream, as from a real connection."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data


def _gateway_calls(requests: list[tuple[str, str]]) -> tuple[list[int], list[httpx.Request]]:
    """Send ``(method, path)`` through the gateway to a recording fake SuperLink.

    Every request is signed by a node key as Flower's SuperNode signs it (the
    gateway refuses unsigned calls before reading their body, see
    tests/test_gateway.py); the key is accepted by the fake SuperLink.
    """
    import datetime
    from base64 import b64encode

    from flwr.supercore.primitives.asymmetric import (
        generate_key_pairs,
        public_key_to_bytes,
        sign_message,
    )

    from fedtune.deploy.gateway import FleetGateway
    from fedtune.deploy.gateway_limits import GatewayLimits

    seen: list[httpx.Request] = []
    private, public = generate_key_pairs()
    stamp = datetime.datetime.now(datetime.UTC).isoformat()
    auth = {
        "flwr-public-key": b64encode(public_key_to_bytes(public)).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": b64encode(sign_message(private, stamp.encode())).decode(),
    }

    async def superlink(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = await request.aread()
        return httpx.Response(200, stream=_Stream(b"reply:" + body))

    gateway = FleetGateway(
        "https://127.0.0.1:9093",
        lambda: httpx.AsyncClient(transport=httpx.MockTransport(superlink)),
        limits=GatewayLimits(max_body=1024, max_unproven_body=1024, max_inflight_bytes=4096),
    )

    async def send_all() -> list[int]:
        transport = httpx.ASGITransport(app=gateway)
        async with httpx.AsyncClient(transport=transport, base_url="https://node") as client:
            codes = []
            for method, path in requests:
                body = b"x" * 2048 if path.endswith("?big") else b"body"
                r = await client.request(
                    method,
                    path.removesuffix("?big"),
                    content=body,
                    headers={"X-Flwr-Signature": "sig", **auth},
                )
                codes.append(r.status_code)
                if r.status_code == 200:
                    assert r.content == b"reply:" + body
            return codes

    return asyncio.run(send_all()), seen


def test_gateway_never_lets_a_control_or_runtime_call_reach_the_superlink() -> None:
    attacks = sorted(
        _flower_paths("flwr.superlink.routers.control.router")
        | _flower_paths("flwr.supercore.routers.runtime.router")
    )
    assert "/v1/control/register-node" in attacks and "/v1/control/start-run" in attacks
    requests = [("POST", p) for p in attacks]
    requests += [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/fleet/get-run")]
    requests += [("POST", "/v1/fleet/../control/start-run"), ("POST", "/v1/fleet/get-run/")]
    codes, seen = _gateway_calls(requests)
    assert codes == [404] * len(requests)
    assert seen == []


def test_gateway_forwards_fleet_calls_unchanged_and_bounds_their_size() -> None:
    codes, seen = _gateway_calls(
        [("POST", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/push-object?big")]
    )
    assert codes == [200, 413]
    assert [str(r.url) for r in seen] == ["https://127.0.0.1:9093/v1/fleet/pull-messages"]
    assert seen[0].content == b"body" and seen[0].headers["x-flwr-signature"] == "sig"
    assert seen[0].headers["content-length"] == "4" and "flwr-signature" in seen[0].headers


def test_runtime_dir_and_runtime_user_are_checked(tmp_path: Path) -> None:
    import os

    from fedtune.deploy import node, roles

    state = tmp_path / "state"
    assert roles.runtime_dir(state, None, runtime_user=None) == state.resolve() / "runtime"
    with pytest.raises(ConfigError, match="--runtime-user needs --runtime-dir"):
        roles.runtime_dir(state, None, runtime_user="nobody")
    with pytest.raises(ConfigError, match="must lie outside --state-dir"):
        roles.runtime_dir(state, state / "rt", runtime_user="nobody")
    with pytest.raises(ConfigError, match="--runtime-user 'no-such-user-x' does not exist"):
        node.runtime_user("no-such-user-x")
    if os.geteuid() != 0:
        with pytest.raises(ConfigError, match="needs root"):
            node.runtime_user("nobody")
    else:
        with pytest.raises(ConfigError, match="uid 0, the worker's own or root's"):
            node.runtime_user("root")


def test_a_node_file_the_runtime_user_could_read_is_refused_by_name(tmp_path: Path) -> None:
    import os
    import tempfile

    from fedtune.deploy import node

    if os.geteuid() != 0:
        pytest.skip("trying files as another user needs root")
    user = node.runtime_user("nobody")
    assert user is not None
    root = Path(tempfile.mkdtemp(prefix="fedtune-runtime-unit-"))
    try:
        root.chmod(0o711)
        data = root / "data.csv"
        data.write_text("text,label\n")
        data.chmod(0o644)
        key, ca = root / "node.key", root / "ca.crt"
        key.write_text("k")
        ca.write_text("c")
        with pytest.raises(
            ConfigError,
            match=r"--data-path '.*data.csv' can be read by "
            r"--runtime-user 'nobody'.*chmod go-rwx",
        ):
            node.prepare_runtime(root / "rt", user, private={"--data-path": data}, key=key, ca=ca)
        data.chmod(0o600)
        assert not node.readable_by(user, data)
        # A runtime directory the runtime user could write to is refused, by name.
        theirs = root / "theirs"
        theirs.mkdir()
        os.chown(theirs, user.uid, user.gid)
        with pytest.raises(ConfigError, match=r"--runtime-dir '.*theirs' must belong to uid 0"):
            node.prepare_runtime(theirs, user, private={"--data-path": data}, key=key, ca=ca)
        # A planted link is never written through.
        (root / "planted").symlink_to(data)
        with pytest.raises(ConfigError, match="a link, or not ours"):
            node._write_for(user, key, root / "planted")
        assert data.read_text() == "text,label\n"
        import shutil
        import sys

        program = Path(
            shutil.which("flower-supernode")
            or shutil.which("flower-supernode", path=str(Path(sys.executable).parent))
            or "flower-supernode"
        )
        if not node._runs(user, program):  # e.g. a Python under a 0700 /root
            with pytest.raises(ConfigError, match="'nobody' cannot run .*flower-supernode"):
                node.prepare_runtime(
                    root / "rt", user, private={"--data-path": data}, key=key, ca=ca
                )
            return
        copies = node.prepare_runtime(
            root / "rt", user, private={"--data-path": data}, key=key, ca=ca
        )
        for path in (*copies, root / "rt" / "flwr-home"):
            assert path.stat().st_uid == user.uid
        runtime = (root / "rt").stat()  # stays ours: the runtime user can plant nothing there
        assert runtime.st_uid == 0 and stat.S_IMODE(runtime.st_mode) == 0o711
        assert node.readable_by(user, copies[0])
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
