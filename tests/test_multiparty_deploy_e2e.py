"""``ckks-multiparty`` over a real federation on 127.0.0.1 (issue 28; docs/deployment.md).

The walkthrough of tests/test_deploy_e2e.py (its fixtures and processes), with
``encryption-backend = "ckks-multiparty"``: the nodes start without ``--secret-context``,
``fedtune deploy run`` without ``--public-context``, and each node pins the other two
nodes' public keys (``--peer NAME.pub``); the ServerApp runs the key ceremony
over the federation before round 1, then the rounds with a quorum of 2 of the 3 key
holders decrypting each sum. Slow: run this module alone (``nice``).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedtune.config import load_toml
from fedtune.crypto import context_from_bytes
from fedtune.node.ceremony import party_path
from fedtune.privacy.policy_file import load_policy
from fedtune.resolve import resolve
from fedtune.run.checkpoint import load_checkpoint
from fedtune.run.export import multiparty_vector
from fedtune.secure.multiparty import files as mp_files
from fedtune.secure.multiparty import protocol as mp
from fedtune.secure.multiparty.global_file import load_global_record
from fedtune.secure.multiparty.protocol import SIGNATURE_BYTES, _key_ntt
from fedtune.secure.verify import receipts_from_record
from tests.test_deploy_e2e import (  # noqa: F401 - `files` is the module's fixture too
    NODES,
    RUN_CONFIG,
    RUNTIME_USER,
    Federation,
    Files,
    _env,
    _fedtune,
    _free_port,
    _records,
    files,
)

pytestmark = pytest.mark.slow

MP_CONFIG = {
    **RUN_CONFIG,
    "encryption-backend": "ckks-multiparty",
    "num-rounds": 2,
    "round-timeout": 120.0,
}


class MultipartyFederation(Federation):
    """Nodes without ``--secret-context``, a run without ``--public-context``."""

    def start_node(self, name: str, **_: object) -> None:  # type: ignore[override]
        self._start(
            name,
            _fedtune(
                "deploy",
                "supernode",
                "--superlink",
                self.fleet_address,
                "--ca",
                str(self.files.certs / "ca.crt"),
                "--key",
                str(self.files.keys / name),
                "--state-dir",
                str(self.state(name)),
                "--port",
                str(_free_port()),
                "--data-path",
                str(self.data[name]),
                "--name",
                name,
                *self.node_policy(),
                # the other data owners' registration keys: the only roster it deals into
                *[
                    arg
                    for peer in NODES
                    if peer != name
                    for arg in ("--peer", str(self.files.keys / f"{peer}.pub"))
                ],
                *(
                    [
                        "--runtime-user",
                        RUNTIME_USER,
                        "--runtime-dir",
                        str(self.files.runtime / self.name / name),
                    ]
                    if RUNTIME_USER
                    else []
                ),
            ),
        )

    def run_cmd(self, run_dir: Path, *extra: str) -> list[str]:
        cmd = super().run_cmd(run_dir, *extra)
        at = cmd.index("--public-context")
        return cmd[:at] + cmd[at + 2 :]


def _config(files: Files) -> Path:  # noqa: F811 - the imported fixture
    """The walkthrough's federation file with the multiparty keys over it."""
    path = files.root / "multiparty.toml"
    lines = [
        line
        for line in files.config.read_text().splitlines()
        if line.split(" =")[0] not in MP_CONFIG
    ]
    lines += [
        f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
        for k, v in MP_CONFIG.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _party(fed: Federation, name: str) -> mp.Party:
    path = party_path(fed.state(name), "server-run", name)
    return mp_files.load_party(path, mp_files.load_roster(path.parent / "roster.json"))


@pytest.fixture(scope="module")
def mp_run(files: Files) -> Iterator[tuple[MultipartyFederation, Path, str]]:  # noqa: F811
    fed = MultipartyFederation(files, "multiparty", config=_config(files))
    try:
        fed.launch()
        run_dir = fed.dir / "server-run"
        started = time.monotonic()
        done = fed.run(run_dir)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        print(f"multiparty deployed run: {time.monotonic() - started:.1f} s")
        yield fed, run_dir, done.stdout + done.stderr
    finally:
        fed.stop()


def test_the_ceremony_and_two_rounds_run_over_the_federation(
    mp_run: tuple[MultipartyFederation, Path, str],
) -> None:
    fed, run_dir, output = mp_run
    records = _records(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["clients-trained"] == 3 for r in records[1:])
    for name in NODES:  # each node dealt only into a roster of its two pinned peers
        assert len(load_policy(fed.state(name)).peers) == 2
    roster = mp_files.load_roster(run_dir / "keys" / "roster.json")
    assert sorted(m.name for m in roster.members) == list(NODES) and roster.threshold == 2
    assert "multiparty key ceremony done in" in output  # the operator's console
    assert f"roster digest {roster.digest}" in output
    for name in NODES:
        assert _party(fed, name).roster.digest == roster.digest
        assert f"roster digest {roster.digest}" in fed.log(name)  # for the owners to compare
    global_record = load_global_record(run_dir)
    assert len(global_record["mp-quorum"]) == 2


def _files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 * 2**20:
                yield path


def test_no_file_but_a_nodes_own_holds_its_key(
    mp_run: tuple[MultipartyFederation, Path, str],
    files: Files,  # noqa: F811 - the imported fixture
) -> None:
    """Every file of the federation (the server's run dir and state, the operator's, every
    node's state and runtime dirs, the logs) but a node's own state: none holds that node's
    SEAL key or signing key, raw or hex; no secret context, no party file on the server."""
    fed, run_dir, _ = mp_run
    for path in _files_under(run_dir):
        assert path.suffix != ".party", path
        if path.suffix == ".ctx":  # the public context only
            assert not context_from_bytes(path.read_bytes()).has_secret_key, path
    for name in NODES:
        party = _party(fed, name)
        key = _key_ntt(party.dealer.context).astype("<u8").tobytes()
        signing = party.dealer._signing.private_bytes_raw()
        needles = [key[:48], key[len(key) // 2 : len(key) // 2 + 48], signing]
        needles += [n.hex().encode() for n in needles]
        own = fed.state(name)
        for path in _files_under(fed.dir, files.runtime):  # server, operator, nodes, logs
            if own in path.parents:
                continue
            data = path.read_bytes()
            assert not any(n in data for n in needles), (name, path)


def test_export_opens_the_final_global_and_a_quorum_of_nodes_agrees(
    mp_run: tuple[MultipartyFederation, Path, str], tmp_path: Path
) -> None:
    """`fedtune export RUN_DIR` (no key: the kept signed partials) writes the adapter; a
    fresh decryption of the same checkpoint by node-1 and node-2's party files gives the
    same mean within the smudging noise."""
    fed, run_dir, _ = mp_run
    out = tmp_path / "adapter"
    done = subprocess.run(
        _fedtune("export", str(run_dir), "--out", str(out)),
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "adapter_model.safetensors").is_file()
    cfg = resolve(load_toml(run_dir / "config.toml"), wiring=False).config
    ckpt = load_checkpoint(run_dir / "checkpoint")
    exported = multiparty_vector(run_dir, cfg, ckpt.payload, ckpt.num_examples)
    record = load_global_record(run_dir)
    items = tuple(receipts_from_record(record, tag_bytes=SIGNATURE_BYTES))
    # A second decryption of the same sum, by copies of two nodes' keys in this process
    # (the nodes' own round logs are untouched): what a quorum of key holders can do.
    request = mp.DecryptionRequest(
        int(record["mp-round"]), items, ckpt.num_examples, ("node-1", "node-2")
    )
    parties = {n: _party(fed, n) for n in request.quorum}
    partials = [parties[n].partial(request, min_count=2) for n in request.quorum]
    total = mp.combine(parties["node-1"].roster, ckpt.payload, request, partials)
    mean = total / ckpt.num_examples
    assert np.all(np.isfinite(exported)) and np.abs(exported).max() > 0
    assert np.abs(mean - exported).max() < 1e-3


def test_a_key_holder_killed_between_its_upload_and_the_decryption_step(
    files: Files,  # noqa: F811 - the imported fixture
) -> None:
    """node-0 (the first uploader by name, so in the first quorum asked) vanishes with its
    SuperNode once its round-1 upload has left; round 1 completes with node-1 and node-2.

    Needs the server to pick the quorum among key holders that answer (the liveness probe
    of the round-side work, docs/multiparty.md); without it the run stops after
    `round-timeout` naming node-0."""
    fed = MultipartyFederation(files, "mpdrop", config=_config(files))
    try:
        fed.launch()
        run_dir = fed.dir / "server-run"
        runner = subprocess.Popen(
            fed.run_cmd(run_dir),
            env=_env(f"{fed.tag}/run"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        fed.wait_log("node-0", "round 1: train reply after")
        sent = fed.log("node-0").count("Sent successfully")
        deadline = time.monotonic() + 30
        while fed.log("node-0").count("Sent successfully") <= sent and time.monotonic() < deadline:
            time.sleep(0.05)
        fed.kill("node-0")
        out, _ = runner.communicate(timeout=900)
        assert runner.returncode == 0, out.decode()[-4000:]
        records = _records(run_dir)
        assert [r["round"] for r in records] == [0, 1, 2]
        assert "node-0" in records[1]["clients"]  # its upload is in round 1's sum ...
        # ... which the other two decrypted: node-0's worker never saw round 1's decrypt
        # message (an evaluate message of round 1; a race lost would show it here)
        assert "round 1: evaluate message" not in fed.log("node-0")
        assert records[2]["clients-trained"] == 2
    finally:
        fed.stop()
