"""``fedtune`` run commands: a user's bad paths end in one ``error:`` line and exit 2.

Before the CLI checked these paths itself, an output path that is a file (or lies
below one) ended in a traceback (exit 1), and a directory given for a file was
reported as missing. None of the cases gets as far as building a model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.apps.cli import main


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``fedtune ARGV``; check exit 2 and one stderr line; return that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("not a directory\n")
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory with a valid config.toml (the checkpoint is never reached)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("num-rounds = 2\n")
    return run


def test_keygen_into_a_file_names_it(a_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails(["keygen", "--out", str(a_file)], capsys)
    assert err == f"fedtune keygen: error: --out {str(a_file)!r} is a file; expected a directory.\n"


def test_keygen_below_a_file_names_the_file(
    a_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _fails(["keygen", "--out", str(a_file / "keys")], capsys)
    assert f"{str(a_file)!r} is a file, so no directory can be made there" in err


def test_simulate_into_a_file_stops_before_the_federation(
    a_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _fails(["simulate", "--run-dir", str(a_file)], capsys)
    assert err.startswith(f"fedtune simulate: error: --run-dir {str(a_file)!r} is a file")


def test_simulate_with_a_directory_for_its_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _fails(["simulate", str(tmp_path)], capsys)
    assert err == (
        f"fedtune simulate: error: config {str(tmp_path)!r} is a directory; "
        "expected a TOML file of config keys.\n"
    )


def test_export_of_a_file_is_not_a_run(a_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails(["export", str(a_file)], capsys)
    assert err == (
        f"fedtune export: error: {str(a_file)!r} is not a run directory "
        "(expected config.toml and checkpoint/ in it).\n"
    )


def test_export_with_a_directory_for_its_key(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _fails(["export", str(run_dir), "--key", str(tmp_path)], capsys)
    assert err == (
        f"fedtune export: error: --key {str(tmp_path)!r} is a directory; "
        "expected the secret.ctx file from `fedtune keygen`.\n"
    )


def test_export_into_a_file_names_it(
    run_dir: Path, a_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _fails(["export", str(run_dir), "--out", str(a_file)], capsys)
    assert err == f"fedtune export: error: --out {str(a_file)!r} is a file; expected a directory.\n"


def test_export_of_a_missing_run_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-run"
    err = _fails(["export", str(missing)], capsys)
    assert err == (
        f"fedtune export: error: {str(missing)!r} does not exist; expected a run directory "
        "with config.toml and checkpoint/.\n"
    )
