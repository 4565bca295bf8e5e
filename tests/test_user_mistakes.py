"""A user's mistakes with data files, metrics files and pipes: one line each, no trace."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.config import ConfigError, parse_run_config
from fedtune.data.sources import read_table
from fedtune.run.metrics import MetricsFileError, append_record, clean_text, read_records

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.csv", b"", "is empty \\(0 bytes\\); expected a header row"),
        ("header.csv", b"text,label\n", "has no examples \\(a CSV file with a header and no rows"),
        (
            "quote.csv",
            b'text,label\ncat,animal\n"unterminated,food\n',
            "is not a readable CSV file: ParserError: .*Check its quoting and delimiters",
        ),
        ("bad.jsonl", b'{"text": "a", "label": "x"}\n{bad\n', "is not a readable JSON lines"),
    ],
)
def test_a_bad_data_file_is_one_line(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as info:
        read_table(path)
    assert "\n" not in str(info.value)


def test_a_non_utf8_csv_is_read_with_replacement_characters(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncafé noir,food\nchien,animal\n".encode("latin-1"))
    table = read_table(path)
    assert table["text"][0] == "caf\ufffd noir"  # one record, not the whole file, is affected


def test_an_unreadable_data_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "locked.csv"
    path.write_text("text,label\na,b\n")
    real_open = Path.open

    def deny(self: Path, *args: object, **kwargs: object) -> object:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", deny)  # the tests run as root, who reads every file
    with pytest.raises(ConfigError, match="cannot read `data-path` .*Permission denied; give"):
        read_table(path)


def test_an_unreadable_or_non_utf8_config_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune.cli.run_commands import readable_text

    latin = tmp_path / "latin.toml"
    latin.write_bytes("# café\nnum-rounds = 2\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text \\(byte 5\\); TOML files are UTF-8"):
        readable_text(latin, "config file")
    locked = tmp_path / "locked.toml"
    locked.write_text("num-rounds = 2\n")

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(ConfigError, match="cannot read config file .*Permission denied"):
        readable_text(locked, "config file")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"round": 0}\n{"round": 1, "eval-acc', "line 2 is not a metrics record"),
        (b'{"round": 0}\n[1, 2]\n', "line 2 is not a metrics record"),
        (b'{"epoch": 0}\n', "line 1 is not a metrics record"),
        (b"\xff\xfe{}\n", "is not UTF-8 text"),
    ],
)
def test_a_corrupt_metrics_file_is_one_line(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    with pytest.raises(MetricsFileError, match=match):
        read_records(path)


def test_metrics_keep_no_trace_and_no_colour(tmp_path: Path) -> None:
    reason = (
        "client error: <class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::"
        "ClientAppActor.run() (pid=1, ip=1.2.3.4)\n\x1b[31mTraceback (most recent call last):\n"
        '  File "x.py", line 1\x1b[0m'
    )
    path = tmp_path / "metrics.jsonl"
    append_record(path, {"round": 1, "dropped": {"client-0": reason}, "eval-accuracy": 0.5})
    (record,) = read_records(path)
    kept = record["dropped"]["client-0"]
    assert "\x1b" not in kept and "Traceback" not in kept and "\n" not in kept
    assert kept.startswith(
        "client error: <class 'ray.exceptions.RayTaskError(ClientAppException)'>"
    )
    assert record["eval-accuracy"] == 0.5
    assert clean_text("x" * 1000).endswith("…") and len(clean_text("x" * 1000)) == 300


def test_a_closed_stdout_ends_quietly() -> None:
    code = (
        "import os, sys\n"
        "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"
        "from fedtune.apps.cli import main\n"
        "sys.exit(main(['simulate', '--help']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # 141 when fedtune's final flush finds the pipe closed; 0 when argparse's own write of
    # the (long) help already met it (argparse ignores a failed help write).
    assert proc.returncode in (0, 141), proc.stderr[-2000:]
    assert "BrokenPipe" not in proc.stderr and "Traceback" not in proc.stderr


def test_preflight_refuses_what_every_client_would(tiny_model_dir: Path, toy_csv: Path) -> None:
    from fedtune.apps.simulation.driver import preflight
    from fedtune.apps.simulation.preflight import check_run

    base = {
        "model-path": str(tiny_model_dir),
        "data-path": str(toy_csv),
        "num-clients": 2,
        "max-examples": 60,
        "label-names": "animal,food,tool",
    }
    dp = {"dp": "example", "target-delta": 1e-3}
    cases = [
        ({"device": "cuda"}, "`device` = 'cuda', but this machine has no CUDA device"),
        ({**dp, "batch-size": 500}, "`batch-size` = 500 is larger than client-0's 24 training"),
        ({**dp, "num-rounds": 10**9}, "`num-rounds` = 1000000000 does not fit the privacy budget"),
    ]
    import torch

    for extra, match in cases:
        if "device" in extra and torch.cuda.is_available():
            continue
        with pytest.raises(ConfigError, match=match):
            check_run(preflight(parse_run_config({**base, **extra})))
    check_run(preflight(parse_run_config({**base, **dp, "batch-size": 8})))  # a good one


def test_a_run_directory_is_described_in_the_events_file_format(tmp_path: Path) -> None:
    """The client events the progress display reads are one JSON object per line."""
    from fedtune.apps.simulation.progress import EVENTS, RunProgress

    (tmp_path / EVENTS).write_text(
        json.dumps(
            {"client": "client-0", "kind": "train", "round": 1, "event": "error", "cause": "X"}
        )
        + "\n"
        + '{"client": "client-1", "kind": "tr'  # a line being written: not read yet
    )
    progress = RunProgress(live=False)
    offset = progress._read_events(tmp_path / EVENTS, 0, tmp_path / "clients.log")  # noqa: SLF001
    assert progress.failures == [
        f"client-0 failed in train round 1: X (full trace: {tmp_path / 'clients.log'})"
    ]
    assert offset == len((tmp_path / EVENTS).read_text().splitlines()[0]) + 1


def test_resume_keeps_the_runs_configuration(tmp_path: Path) -> None:
    from fedtune.apps.simulation.resume import checkpoint_round, prepare_resume

    with pytest.raises(ConfigError, match="is not a run directory \\(no config.toml in it\\)"):
        prepare_resume({}, tmp_path)
    plain = parse_run_config({"num-rounds": 2, "learning-rate": 0.01})
    (tmp_path / "config.toml").write_text(plain.to_toml())
    assert prepare_resume({"num-rounds": 5}, tmp_path).federation.num_rounds == 5  # extended
    with pytest.raises(ConfigError, match="`learning-rate` = 0.5 differs from the run's 0.01"):
        prepare_resume({"learning-rate": 0.5}, tmp_path)
    private = parse_run_config(
        {"num-rounds": 2, "dp": "example", "label-names": "a,b", "target-delta": 1e-3}
    )
    (tmp_path / "config.toml").write_text(private.to_toml())
    with pytest.raises(ConfigError, match="a DP run's clients key their releases by the run's"):
        prepare_resume({"num-rounds": 3}, tmp_path)
    assert prepare_resume({}, tmp_path).federation.num_rounds == 2
    assert checkpoint_round(tmp_path) is None  # stopped before round 1: starts again


def _simulate_args(*argv: str) -> object:
    from fedtune.apps.simulation.command import check_arguments
    from fedtune.cli.dispatch import build_parser

    return check_arguments(build_parser().parse_args(["simulate", *argv]))


def test_examples_per_label_set_beside_data_path_is_refused(tmp_path: Path) -> None:
    """Even at its default value (250), from a TOML file or from --set: it would be ignored."""
    both = "`examples-per-label` = .* is set together with `data-path` = 'mine.csv'"
    with pytest.raises(ConfigError, match=both):
        _simulate_args("--set", "data-path=mine.csv", "--set", "examples-per-label=250")
    config = tmp_path / "mine.toml"
    config.write_text("examples-per-label = 250\n")
    with pytest.raises(ConfigError, match=both + ".*Remove `examples-per-label` \\(or set it"):
        _simulate_args(str(config), "--set", "data-path=mine.csv")
    config.write_text('data-path = "mine.csv"\nexamples-per-label = 250\n')
    with pytest.raises(ConfigError, match="`examples-per-label` = 250 is set together"):
        _simulate_args(str(config))
    assert _simulate_args(str(config), "--set", "data-path=") == {
        "data-path": "",
        "examples-per-label": 250,
    }
    # 0 ("every example") is what happens to a file: silos.toml + --set data-path=FILE
    assert _simulate_args(str(config), "--set", "examples-per-label=0") == {
        "data-path": "mine.csv",
        "examples-per-label": "0",
    }
    # A run's own config.toml holds every key: resume, export and evaluate still read it.
    saved = parse_run_config({"data-path": "mine.csv", "label-names": "a,b"}).to_toml()
    assert "examples-per-label = 250" in saved
    from fedtune.config import load_toml

    (tmp_path / "config.toml").write_text(saved)
    assert parse_run_config(load_toml(tmp_path / "config.toml")).data.data_path == "mine.csv"


def test_a_toml_list_for_a_string_key_names_the_string_to_write() -> None:
    with pytest.raises(ConfigError, match='one comma-separated string: label-names = "a,b"'):
        parse_run_config({"label-names": ["a", "b"]})


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--set", "num-round=3"], "Unknown config key 'num-round' .*Did you mean 'num-rounds'"),
        (["typo.toml"], "Unknown config key 'num-round' .*Did you mean 'num-rounds'"),
        (["--set", "num-rounds", "=", "3"], "--set expects key=value, got 'num-rounds'"),
        (["--config", "typo.toml"], "takes the config file as its argument, without --config"),
    ],
)
def test_a_typo_fails_in_one_line_without_importing_torch(
    tmp_path: Path, argv: list[str], match: str
) -> None:
    """Config checks run before the commands' imports: a typo costs well under a second."""
    (tmp_path / "typo.toml").write_text("num-round = 3\n")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fedtune.cli", "simulate", *argv],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    imported = {
        line.rpartition("|")[2].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    said = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(said) == 1 and re.search(match, said[0]), said
    assert said[0].startswith("fedtune simulate: error: ")
    heavy = {"torch", "transformers", "flwr", "ray", "datasets", "numpy", "tenseal"}
    assert not heavy & imported, sorted(heavy & imported)


def test_simulates_early_parser_is_the_programs() -> None:
    """The parser the early check reads ``simulate`` with gives the full program's help."""
    import argparse

    from fedtune.cli.dispatch import build_parser
    from fedtune.cli.run_commands import OneLineParser, add_parsers

    early: argparse.ArgumentParser = OneLineParser(prog="fedtune")
    add_parsers(early.add_subparsers(dest="command"))

    def simulate_help(parser: argparse.ArgumentParser) -> str:
        (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
        return sub.choices["simulate"].format_help()

    assert simulate_help(early) == simulate_help(build_parser())
