"""Config parsing: defaults, coercion and errors that name the key and the value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedtune.config import (
    WIRING_KEYS,
    ConfigError,
    RunConfig,
    load_toml,
    parse_assignment,
    parse_run_config,
)
from fedtune.config.reference import (
    key_docs,
    key_help,
    keys_epilog,
    missing_help,
    pyproject_defaults,
)

ROOT = Path(__file__).resolve().parents[1]


def _app_config() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_equal_dataclass_defaults() -> None:
    declared = _app_config()
    wiring = {k: declared.pop(k) for k in list(declared) if k in WIRING_KEYS}
    assert set(wiring) == WIRING_KEYS
    assert declared == RunConfig().to_flat()


def test_pyproject_declares_every_key_with_the_reference_default() -> None:
    """``[tool.flwr.app.config]`` = the field metadata's defaults, key for key."""
    expected = tomllib.loads("".join(f"{k} = {v}\n" for k, v in pyproject_defaults().items()))
    declared = _app_config()
    missing = sorted(set(expected) - set(declared))
    extra = sorted(set(declared) - set(expected))
    assert not missing, f"add to pyproject.toml [tool.flwr.app.config]: {missing}"
    assert not extra, f"not a config key (remove from pyproject.toml): {extra}"
    assert declared == expected


def test_every_key_has_help_and_choices_come_from_literal_types() -> None:
    assert missing_help() == []
    docs = {d.key: d for d in key_docs()}
    assert docs["partitioning"].choices == ("iid", "dirichlet")
    assert docs["encryption"].default == "false"
    assert docs["target-delta"].default == "1e-05"
    assert "rounds" in key_help("num-rounds").lower()
    assert key_help("no-such-key") == ""


def test_help_lists_every_key_with_a_default_toml_accepts() -> None:
    """The ``key = default`` lines of the --help epilog are a valid flat TOML config."""
    epilog = keys_epilog()
    assignments = [
        ln.strip()
        for ln in epilog.splitlines()
        if ln.startswith("  ") and " = " in ln and not ln.startswith("      ")
    ]
    parsed = tomllib.loads("\n".join(assignments))
    assert parsed == RunConfig().to_flat()
    assert "encryption = false" in epilog
    assert parse_run_config(parsed) == RunConfig()


def test_every_simulation_file_parses() -> None:
    files = sorted((ROOT / "simulations").glob("*.toml"))
    assert {f.name for f in files} >= {"quickstart.toml", "noniid.toml", "federation.toml"}
    for path in files:
        parse_run_config(load_toml(path))


def test_strings_from_set_are_coerced_to_the_default_type() -> None:
    cfg = parse_run_config({"num-rounds": "3", "learning-rate": "1e-3", "lora-variant": "ffa"})
    assert cfg.federation.num_rounds == 3
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.model.lora_variant == "ffa"
    assert cfg.model.target_modules == ["query", "value"]


def test_round_trip_through_toml() -> None:
    cfg = parse_run_config(
        {"num-rounds": 7, "data-path": 'a "quoted" path', "dirichlet-alpha": 0.3}
    )
    again = parse_run_config(tomllib.loads(cfg.to_toml()))
    assert again == cfg


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (
            {"num-round": 3},
            r"Unknown config key 'num-round' \(value 3\)\. Did you mean 'num-rounds'",
        ),
        ({"dirichlet-alpha": 0}, r"`dirichlet-alpha` must be > 0 .*got 0\.0"),
        ({"dirichlet-alpha": -1.5}, r"`dirichlet-alpha` must be > 0 .*got -1\.5"),
        ({"num-rounds": "three"}, r"`num-rounds` must be an integer, got 'three'"),
        ({"num-rounds": 0}, r"`num-rounds` must be >= 1, got 0"),
        ({"partitioning": "random"}, r"`partitioning` must be one of iid, dirichlet, got 'random'"),
        ({"lora-variant": "qlora"}, r"`lora-variant` must be one of standard, ffa, got 'qlora'"),
        ({"lora-target-modules": " , "}, r"`lora-target-modules` must name at least one module"),
        ({"test-fraction": 1.0}, r"`test-fraction` must be in \(0, 1\), got 1\.0"),
        (
            {"min-clients": 5, "num-clients": 4},
            r"`min-clients` must be <= num-clients \(4\), got 5",
        ),
        ({"fraction-train": 0}, r"`fraction-train` must be in \(0, 1\], got 0\.0"),
        ({"learning-rate": True}, r"`learning-rate` must be a number, got True"),
        ({"label-names": "a,b,a"}, r"`label-names` must not repeat a name, got 'a,b,a'"),
    ],
)
def test_bad_values_name_key_and_value(values: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_run_config(values)


def test_wiring_keys_are_skipped_only_when_asked() -> None:
    parse_run_config({"run-dir": "/tmp/x"}, ignore=WIRING_KEYS)
    with pytest.raises(ConfigError, match="Unknown config key 'run-dir'"):
        parse_run_config({"run-dir": "/tmp/x"})


def test_assignment_and_toml_errors(tmp_path: Path) -> None:
    assert parse_assignment("num-rounds = 3") == ("num-rounds", "3")
    with pytest.raises(ConfigError, match="--set expects key=value, got 'num-rounds'"):
        parse_assignment("num-rounds")
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_toml(bad)
    nested = tmp_path / "nested.toml"
    nested.write_text("[train]\nbatch-size = 4\n")
    with pytest.raises(ConfigError, match=r"table \[train\] is not supported"):
        load_toml(nested)
