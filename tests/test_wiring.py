"""The wiring keys, the sampling formula and the private-file helpers, each on its own."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedtune.config import (
    WIRING_KEYS,
    ConfigError,
    FederationConfig,
    Wiring,
    parse_wiring,
    sample_size,
)
from fedtune.run.files import read_private, write_private


def test_wiring_defaults_when_nothing_is_set() -> None:
    assert parse_wiring({}) == Wiring()
    empty = parse_wiring({k: "" for k in WIRING_KEYS - {"resume"}} | {"resume": False})
    assert empty == Wiring()
    assert {
        "run-dir",
        "run-id",
        "state-dir",
        "secret-context",
        "public-context",
        "resume",
        "node-limits",
    } == WIRING_KEYS


def test_wiring_reads_paths_switches_and_limits() -> None:
    wiring = parse_wiring(
        {
            "run-dir": "/srv/run1",
            "run-id": "run-1",
            "state-dir": Path("/node/state"),
            "public-context": "public.ctx",
            "resume": "true",
            "node-limits": "7=100,9=50",
            "num-rounds": 3,  # a RunConfig key: not the wiring's business
        }
    )
    assert wiring.run_dir == Path("/srv/run1")
    assert wiring.run_id == "run-1"
    assert wiring.state_dir == Path("/node/state")
    assert wiring.secret_context is None
    assert wiring.public_context == Path("public.ctx")
    assert wiring.resume is True
    assert wiring.node_limits == {7: 100, 9: 50}


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"run-dir": 3.5}, r"`run-dir` must be a path \(a string\), got 3\.5"),
        ({"secret-context": ["a"]}, r"`secret-context` must be a path \(a string\), got \['a'\]"),
        ({"run-id": 1.5}, r"`run-id` must be a string, got 1\.5"),
        ({"resume": "maybe"}, r"`resume` must be true or false, got 'maybe'"),
        ({"node-limits": "7=0"}, r"`node-limits` entry '7=0' is not NODE_ID=COUNT"),
    ],
)
def test_bad_wiring_names_key_and_value(values: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_wiring(values)


def test_sample_size_by_hand() -> None:
    # min(K, max(ceil(f K), m)), worked out by hand:
    assert sample_size(10, 0.25, 2) == 3  # ceil(2.5) = 3
    assert sample_size(10, 0.1, 2) == 2  # ceil(1.0) = 1 < min-clients 2
    assert sample_size(1, 0.5, 2) == 1  # never more than are connected
    assert sample_size(4, 1.0, 2) == 4
    fed = FederationConfig(num_clients=10, fraction_train=0.25, min_clients=2)
    assert fed.sampled_per_round == sample_size(10, 0.25, 2) == fed.sampled(10, 0.25)


def test_private_files_are_0600_and_read_back_capped(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    assert read_private(path, 10) is None
    write_private(path, b"0123456789")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_private(path, 10) == b"0123456789"
    with pytest.raises(ValueError, match="is larger than 9 bytes"):
        read_private(path, 9)
    write_private(path, b"new")  # replaced, not appended
    assert read_private(path, 10) == b"new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_private_files_refuse_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    link = tmp_path / "link"
    os.symlink(target, link)
    with pytest.raises(ValueError, match="is a symlink or not a regular file"):
        read_private(link, 100)
