"""A checkpoint read back is checked before anything trusts it (issue 11).

Each attack below is what someone who can write to ``run-dir/checkpoint`` (but
cannot read ``run-dir/checkpoint.key``) could do; each must end in a
:class:`CheckpointError` that names what was wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedtune.apps.server.app import resume_round
from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.errors import CheckpointError
from fedtune.run.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtune.secure.plain import PlainCodec

CODEC = PlainCodec(length=4)


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    """A legit checkpoint of round 3 (sum of 5 examples) in ``tmp_path/checkpoint``."""
    directory = tmp_path / "checkpoint"
    save_checkpoint(directory, Checkpoint(3, CODEC.encode(np.arange(4.0)), num_examples=5))
    return directory


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _manifest(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / "state.json").read_text()))


def _write_manifest(
    directory: Path, manifest: dict[str, Any], raw: dict[str, str] | None = None
) -> None:
    """Write ``manifest``; ``raw`` puts JSON text (``Infinity``, deep lists) in place of fields."""
    raw = raw or {}
    for i, field in enumerate(raw):
        manifest[field] = f"@@raw{i}@@"
    text = json.dumps(manifest)
    for i, value in enumerate(raw.values()):
        text = text.replace(f'"@@raw{i}@@"', value)
    (directory / "state.json").write_text(text)


def _swap_chunk(directory: Path, data: bytes) -> None:
    """Replace chunk 0 and recompute its SHA-256 in state.json, as an attacker would."""
    (directory / "chunk-00000.bin").write_bytes(data)
    manifest = _manifest(directory)
    manifest["chunks"][0] = hashlib.sha256(data).hexdigest()
    _write_manifest(directory, manifest)


# -- a legit checkpoint ------------------------------------------------------------------


def test_save_then_load_round_trips(ckpt_dir: Path) -> None:
    loaded = load_checkpoint(ckpt_dir)
    assert (loaded.round, loaded.num_examples) == (3, 5)
    np.testing.assert_array_equal(CODEC.decode(loaded.payload), np.arange(4.0))
    assert loaded.payload["fingerprint"] == CODEC.fingerprint
    assert loaded.payload["length"] == 4


def test_several_chunks_and_a_key_elsewhere_round_trip(tmp_path: Path) -> None:
    payload = {"chunks": [b"a" * 10, b"", b"\x00\xff" * 7], "length": 3, "fingerprint": "fp-1"}
    save_checkpoint(tmp_path / "c", Checkpoint(0, payload, 7), key_dir=tmp_path / "keys")  # type: ignore[arg-type]
    assert (tmp_path / "keys" / "checkpoint.key").is_file()
    assert not (tmp_path / "checkpoint.key").exists()
    loaded = load_checkpoint(tmp_path / "c", key_dir=tmp_path / "keys")
    assert loaded == Checkpoint(0, payload, 7)  # type: ignore[arg-type]


def test_a_second_save_replaces_the_first_with_the_same_key(ckpt_dir: Path) -> None:
    key = (ckpt_dir.parent / "checkpoint.key").read_bytes()
    save_checkpoint(ckpt_dir, Checkpoint(4, CODEC.encode(np.ones(4)), num_examples=6))
    assert (ckpt_dir.parent / "checkpoint.key").read_bytes() == key
    assert load_checkpoint(ckpt_dir).round == 4
    assert sorted(p.name for p in ckpt_dir.parent.iterdir()) == ["checkpoint", "checkpoint.key"]


def test_the_server_keeps_one_checkpoint_back_to_resume_before_a_refused_round(
    ckpt_dir: Path,
) -> None:
    # Key holders refused round 5's global (StepGuard): the operator resumes from round 4.
    for rnd in (4, 5):
        save_checkpoint(
            ckpt_dir, Checkpoint(rnd, CODEC.encode(np.full(4, rnd)), 6), keep_previous=True
        )
    previous = ckpt_dir.with_name("checkpoint.previous")
    assert (load_checkpoint(ckpt_dir).round, load_checkpoint(previous).round) == (5, 4)
    assert stat.S_IMODE(previous.stat().st_mode) == 0o700
    shutil.rmtree(ckpt_dir)
    previous.rename(ckpt_dir)  # what the README tells the operator to do
    strategy = FedTuneStrategy(
        codec=CODEC, fraction_train=1.0, fraction_evaluate=1.0, min_clients=1, seed=0
    )
    assert resume_round(ckpt_dir.parent, strategy, resume=True) == 5
    np.testing.assert_array_equal(CODEC.decode(strategy.global_payload), np.full(4, 4.0))  # type: ignore[arg-type]


def test_files_have_explicit_modes_whatever_the_umask(ckpt_dir: Path, umask_022: None) -> None:
    save_checkpoint(ckpt_dir, Checkpoint(4, CODEC.encode(np.ones(4)), num_examples=6))
    key = ckpt_dir.parent / "checkpoint.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_bytes()) == 32
    assert stat.S_IMODE(ckpt_dir.stat().st_mode) == 0o700
    for path in ckpt_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


# -- the hash list cannot be replaced together with the data -----------------------------


def test_a_swapped_chunk_with_its_hash_recomputed_is_refused(ckpt_dir: Path) -> None:
    _swap_chunk(ckpt_dir, CODEC.encode(np.full(4, 1e6))["chunks"][0])
    with pytest.raises(CheckpointError, match="HMAC does not match"):
        load_checkpoint(ckpt_dir)


def test_a_swapped_chunk_without_its_hash_is_refused(ckpt_dir: Path) -> None:
    (ckpt_dir / "chunk-00000.bin").write_bytes(CODEC.encode(np.full(4, 1e6))["chunks"][0])
    with pytest.raises(CheckpointError, match="chunk 0 .* does not match its digest"):
        load_checkpoint(ckpt_dir)


def test_a_changed_round_is_refused(ckpt_dir: Path) -> None:
    manifest = _manifest(ckpt_dir)
    _write_manifest(ckpt_dir, {**manifest, "round": 9})
    with pytest.raises(CheckpointError, match="HMAC does not match"):
        load_checkpoint(ckpt_dir)


def test_a_checkpoint_signed_with_another_key_is_refused(ckpt_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    save_checkpoint(other / "checkpoint", Checkpoint(3, CODEC.encode(np.ones(4)), 5))
    for path in (other / "checkpoint").iterdir():  # the whole checkpoint of another run
        (ckpt_dir / path.name).write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="HMAC does not match"):
        load_checkpoint(ckpt_dir)


def test_a_checkpoint_without_hmac_is_refused(ckpt_dir: Path) -> None:
    manifest = _manifest(ckpt_dir)
    manifest.pop("hmac-sha256", None)
    _write_manifest(ckpt_dir, manifest)
    with pytest.raises(CheckpointError, match="fields"):
        load_checkpoint(ckpt_dir)


def test_a_missing_key_is_refused_not_recreated(ckpt_dir: Path) -> None:
    (ckpt_dir.parent / "checkpoint.key").unlink()
    with pytest.raises(CheckpointError, match="No checkpoint key"):
        load_checkpoint(ckpt_dir)
    assert not (ckpt_dir.parent / "checkpoint.key").exists()


def test_a_key_readable_by_others_is_refused(ckpt_dir: Path) -> None:
    (ckpt_dir.parent / "checkpoint.key").chmod(0o644)
    with pytest.raises(CheckpointError, match=r"open to other users \(mode 0644\).*chmod 600"):
        load_checkpoint(ckpt_dir)


def test_a_symlinked_key_is_refused(ckpt_dir: Path, tmp_path: Path) -> None:
    key = ckpt_dir.parent / "checkpoint.key"
    key.rename(tmp_path / "elsewhere.key")
    key.symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(CheckpointError, match="symlink or not a regular file"):
        load_checkpoint(ckpt_dir)


def test_a_key_of_the_wrong_size_is_refused(ckpt_dir: Path) -> None:
    key = ckpt_dir.parent / "checkpoint.key"
    key.write_bytes(b"short")
    with pytest.raises(CheckpointError, match="must hold 32 bytes"):
        load_checkpoint(ckpt_dir)


def test_the_key_may_not_live_inside_the_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        save_checkpoint(
            tmp_path / "c", Checkpoint(1, CODEC.encode(np.ones(4)), 1), key_dir=tmp_path / "c"
        )


# -- types and ranges ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("round", -5, r"`round` must be an integer in 0\.\.1000000; got -5"),
        ("round", 10**9, r"`round` must be an integer in 0\.\.1000000; got 1000000000"),
        ("round", True, r"`round` must be an integer .*; got True"),
        ("round", 2.0, r"`round` must be an integer .*; got 2\.0"),
        ("num-examples", 0, r"`num-examples` must be an integer in 1\.\.\d+; got 0"),
        ("num-examples", -40, r"`num-examples` .*; got -40"),
        ("num-examples", 10**30, r"`num-examples` .*; got 1000000000000000000000000000000"),
        ("num-examples", True, r"`num-examples` .*; got True"),
        ("num-examples", "5", r"`num-examples` .*; got '5'"),
        ("length", 0, r"`length` must be an integer in 1\.\.\d+; got 0"),
        ("length", 10**12, r"`length` .*; got 1000000000000"),
        ("fingerprint", "x" * 300, r"`fingerprint` must be printable ASCII of at most 256"),
        ("fingerprint", "ab\ncd", r"`fingerprint` must be printable ASCII"),
        ("fingerprint", 7, r"`fingerprint` must be printable ASCII .*; got 7"),
        ("chunks", "abc", r"`chunks` must be a list of 1\.\.4096 SHA-256 hex digests; got 'abc'"),
        ("chunks", [], r"`chunks` must be a list of 1\.\.4096"),
        ("chunks", ["0" * 64] * 5000, r"`chunks` must be a list of 1\.\.4096 .*; got 5000"),
        ("chunks", ["nothex"], r"`chunks` entry 0 must be a SHA-256 hex digest; got 'nothex'"),
        ("chunk-bytes", [-1], r"`chunk-bytes` entry 0 must be an integer in 0\.\.\d+; got -1"),
    ],
)
def test_fields_out_of_type_or_range_are_refused(
    ckpt_dir: Path, field: str, value: object, match: str
) -> None:
    manifest = _manifest(ckpt_dir)
    _write_manifest(ckpt_dir, {**manifest, field: value})
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(ckpt_dir)


def test_the_caller_caps_num_examples(ckpt_dir: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"`num-examples` must be an integer in 1\.\.4; got 5"
    ):
        load_checkpoint(ckpt_dir, max_examples=4)


def test_unknown_fields_are_refused(ckpt_dir: Path) -> None:
    _write_manifest(ckpt_dir, {**_manifest(ckpt_dir), "extra": 1})
    with pytest.raises(CheckpointError, match="unexpected 'extra'"):
        load_checkpoint(ckpt_dir)


def test_save_refuses_what_load_would_refuse(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"`round` must be an integer .*; got -1"):
        save_checkpoint(tmp_path / "c", Checkpoint(-1, CODEC.encode(np.ones(4)), 1))
    with pytest.raises(CheckpointError, match=r"`num-examples` .*; got True"):
        save_checkpoint(tmp_path / "c", Checkpoint(1, CODEC.encode(np.ones(4)), True))
    assert not (tmp_path / "c").exists()


# -- parsing with limits ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "raw", "match"),
    [
        ("round", "Infinity", r"`round` must be an integer .*; got Infinity"),
        ("num-examples", "-Infinity", r"`num-examples` .*; got -Infinity"),
        ("num-examples", "NaN", r"`num-examples` .*; got NaN"),
        ("round", "1e400", r"`round` must be an integer .*; got 1e400"),
        ("length", "9" * 5000, r"`length` must be an integer .*; got 9999"),
    ],
)
def test_non_finite_and_huge_numbers_are_refused(
    ckpt_dir: Path, field: str, raw: str, match: str
) -> None:
    _write_manifest(ckpt_dir, _manifest(ckpt_dir), raw={field: raw})
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(ckpt_dir)


def test_deep_json_is_refused(ckpt_dir: Path) -> None:
    _write_manifest(ckpt_dir, _manifest(ckpt_dir), raw={"chunks": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match="nests too deeply"):
        load_checkpoint(ckpt_dir)


def test_a_large_state_json_is_refused(ckpt_dir: Path) -> None:
    manifest = _manifest(ckpt_dir)
    (ckpt_dir / "state.json").write_text(json.dumps(manifest) + " " * (2 << 20))
    with pytest.raises(CheckpointError, match="state.json .* larger than 1048576 bytes"):
        load_checkpoint(ckpt_dir)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "\xff\xfe"])
def test_state_json_that_is_no_object_is_refused(ckpt_dir: Path, text: str) -> None:
    (ckpt_dir / "state.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match="state.json"):
        load_checkpoint(ckpt_dir)


# -- files that are not what they seem -----------------------------------------------------


def test_a_chunk_symlinked_to_dev_zero_is_refused(ckpt_dir: Path) -> None:
    (ckpt_dir / "chunk-00000.bin").unlink()
    (ckpt_dir / "chunk-00000.bin").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="chunk 0 .* symlink or not a regular file"):
        load_checkpoint(ckpt_dir)


def test_a_chunk_symlinked_to_an_identical_file_is_refused(ckpt_dir: Path, tmp_path: Path) -> None:
    chunk = ckpt_dir / "chunk-00000.bin"
    (tmp_path / "copy.bin").write_bytes(chunk.read_bytes())
    chunk.unlink()
    chunk.symlink_to(tmp_path / "copy.bin")
    with pytest.raises(CheckpointError, match="chunk 0 .* symlink or not a regular file"):
        load_checkpoint(ckpt_dir)


def test_a_chunk_that_is_a_fifo_or_a_directory_is_refused(ckpt_dir: Path) -> None:
    chunk = ckpt_dir / "chunk-00000.bin"
    chunk.unlink()
    os.mkfifo(chunk)  # opening it for reading would block without O_NONBLOCK
    with pytest.raises(CheckpointError, match="chunk 0 .* symlink or not a regular file"):
        load_checkpoint(ckpt_dir)
    chunk.unlink()
    chunk.mkdir()
    with pytest.raises(CheckpointError, match="chunk 0 .* symlink or not a regular file"):
        load_checkpoint(ckpt_dir)


def test_a_chunk_over_the_callers_cap_is_refused_before_it_is_read(ckpt_dir: Path) -> None:
    with pytest.raises(CheckpointError, match=r"`chunk-bytes` entry 0 must be .* 0\.\.16; got 32"):
        load_checkpoint(ckpt_dir, max_chunk_bytes=16)


def test_a_grown_chunk_is_read_only_to_its_recorded_size_plus_one(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (ckpt_dir / "chunk-00000.bin").write_bytes(b"\x00" * (10 << 20))
    asked: list[int] = []
    real_read = os.read

    def read(fd: int, n: int) -> bytes:
        asked.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", read)
    with pytest.raises(CheckpointError, match="chunk 0 .* holds 10485760 bytes, not the 32"):
        load_checkpoint(ckpt_dir)
    assert asked[-1] == 33  # the chunk: 32 recorded + 1, not the 10 MiB on disk


def test_a_chunk_of_another_size_than_recorded_is_refused(ckpt_dir: Path) -> None:
    (ckpt_dir / "chunk-00000.bin").write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="chunk 0 .* holds 40 bytes, not the 32 recorded"):
        load_checkpoint(ckpt_dir)


def test_a_missing_chunk_is_refused(ckpt_dir: Path) -> None:
    (ckpt_dir / "chunk-00000.bin").unlink()
    with pytest.raises(CheckpointError, match="chunk 0 .* missing"):
        load_checkpoint(ckpt_dir)


def test_a_symlinked_state_json_is_refused(ckpt_dir: Path, tmp_path: Path) -> None:
    state = ckpt_dir / "state.json"
    state.rename(tmp_path / "state.json")
    state.symlink_to(tmp_path / "state.json")
    with pytest.raises(CheckpointError, match="state.json .* symlink or not a regular file"):
        load_checkpoint(ckpt_dir)


def test_a_symlinked_checkpoint_directory_is_refused(ckpt_dir: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    ckpt_dir.rename(real)
    ckpt_dir.symlink_to(real)
    with pytest.raises(CheckpointError, match="is a symlink or not a directory"):
        load_checkpoint(ckpt_dir)


def test_save_replaces_a_symlinked_checkpoint_directory_without_following_it(
    ckpt_dir: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    ckpt_dir.rename(tmp_path / "moved")
    ckpt_dir.symlink_to(victim)
    save_checkpoint(ckpt_dir, Checkpoint(4, CODEC.encode(np.ones(4)), 6))
    assert not ckpt_dir.is_symlink() and load_checkpoint(ckpt_dir).round == 4
    assert (victim / "keep.txt").read_text() == "mine"


# -- the server's resume -----------------------------------------------------------------


def test_server_resume_refuses_a_tampered_checkpoint_in_one_line(ckpt_dir: Path) -> None:
    _swap_chunk(ckpt_dir, CODEC.encode(np.full(4, 1e6))["chunks"][0])
    strategy = FedTuneStrategy(
        codec=CODEC, fraction_train=1.0, fraction_evaluate=1.0, min_clients=1, seed=0
    )
    with pytest.raises(CheckpointError, match=r"Cannot resume: .*HMAC does not match") as err:
        resume_round(ckpt_dir.parent, strategy, resume=True)
    assert "\n" not in str(err.value)
    assert strategy.global_payload is None
