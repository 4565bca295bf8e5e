"""Parse a flat kebab-case mapping (Flower run config, TOML file, ``--set``) into a RunConfig.

Every key maps to one field of one section dataclass (:data:`SECTION_TYPES`); a
value is coerced to the type of the field's default, then the dataclasses check
it in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedtune.config.run import SECTION_TYPES, RunConfig, kebab
from fedtune.errors import ConfigError

__all__ = [
    "coerce_value",
    "check_given",
    "collect_overrides",
    "describe_keys",
    "known_keys",
    "load_toml",
    "parse_assignment",
    "parse_run_config",
]

#: An integer in a string: ASCII digits, an optional sign (``int()`` also takes
#: ``'١٢٣'``, ``'1_000'`` and surrounding spaces: other spellings of one run config).
_INTEGER = re.compile(r"[+-]?[0-9]{1,30}")


def known_keys() -> dict[str, tuple[str, dataclasses.Field[Any]]]:
    """Map every kebab-case key to its section and dataclass field."""
    keys: dict[str, tuple[str, dataclasses.Field[Any]]] = {}
    for section, cls in SECTION_TYPES.items():
        for f in fields(cls):
            keys[kebab(f.name)] = (section, f)
    return keys


def _default_of(f: dataclasses.Field[Any]) -> Any:
    return f.default


def coerce_value(key: str, value: object, default: object) -> object:
    """Coerce ``value`` to the type of ``default``; strings come from ``--set``."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0"}:
            return value.lower() in {"true", "1"}
        raise ConfigError(f"`{key}` must be true or false, got {value!r}.")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _INTEGER.fullmatch(value):  # not '١٢٣', '1_0', ' 1'
            return int(value)
        raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigError(f"`{key}` must be a number, got {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"`{key}` must be a number, got {value!r}.")
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        joined = ",".join(str(v) for v in value)
        raise ConfigError(
            f"`{key}` must be one string, got the list {value!r}; run-config values are "
            f'scalars, so write a list as one comma-separated string: {key} = "{joined}".'
        )
    if not isinstance(value, str):
        raise ConfigError(f"`{key}` must be a string, got {value!r}.")
    return value


def parse_run_config(
    values: Mapping[str, object], *, ignore: frozenset[str] = frozenset(), given: bool = False
) -> RunConfig:
    """Build a validated :class:`RunConfig` from a flat kebab-case mapping.

    Parameters
    ----------
    values : Mapping[str, object]
        Keys as in ``pyproject.toml``; missing keys take their defaults.
    ignore : frozenset[str]
        Keys to skip silently (keys that belong to the wiring, e.g. ``run-dir``).
    given : bool
        Whether ``values`` holds only the keys a person set (a TOML file, ``--set``:
        :func:`collect_overrides`), not a resolved config with every key (a run's
        ``config.toml``, a Flower run config). A key that another set key makes
        meaningless is then refused even at its default value (:func:`check_given`).

    Raises
    ------
    ConfigError
        For an unknown key (with the closest known keys) or a bad value.
    """
    known = known_keys()
    per_section: dict[str, dict[str, object]] = {s: {} for s in SECTION_TYPES}
    for key, value in values.items():
        if key in ignore:
            continue
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            if close and known[close[0]][1].metadata.get("help"):  # the key's one description
                hint += f" ({close[0]}: {known[close[0]][1].metadata['help']})"
            raise ConfigError(
                f"Unknown config key {key!r} (value {value!r}).{hint} "
                "`fedtune simulate --help` lists every key."
            )
        section, f = known[key]
        per_section[section][f.name] = coerce_value(key, value, _default_of(f))
    parts = {s: SECTION_TYPES[s](**kw) for s, kw in per_section.items()}
    cfg = RunConfig(**parts)
    if given:
        check_given(values, cfg)
    return cfg


def check_given(values: Mapping[str, object], cfg: RunConfig) -> None:
    """Refuse a key a person set that another set key makes meaningless.

    ``values`` are the keys as set (a TOML file, ``--set``), ``cfg`` their parsed run
    config. The dataclasses judge values only, and a key set to its default value looks
    unset to them: ``examples-per-label = 250`` beside ``data-path`` would be ignored
    without a word. (``0``, "every example", is what happens to a file: accepted, so a
    federation file that sets it, such as ``silos.toml``, takes a ``data-path``.)
    Raises a :class:`ConfigError` naming both keys.
    """
    if "examples-per-label" in values and cfg.data.data_path and cfg.data.examples_per_label:
        raise ConfigError(
            f"`examples-per-label` = {cfg.data.examples_per_label} is set together with "
            f"`data-path` = {cfg.data.data_path!r}: `examples-per-label` draws from the "
            "bundled WordNet data only, and every row of your file is used. Remove "
            "`examples-per-label` (or set it to 0), or cap your data with `max-examples`."
        )


def parse_assignment(text: str) -> tuple[str, str]:
    """Split one ``key=value`` from ``--set``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"--set expects key=value, got {text!r}: one word per --set, no spaces around "
            "`=` (e.g. --set num-rounds=3)."
        )
    return key.strip(), value.strip()


def load_toml(path: Path) -> dict[str, object]:
    """Read a flat TOML file of config keys (a file in ``simulations/``)."""
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"Config file {str(path)!r} is not valid TOML: {err}") from err
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(
                f"Config file {str(path)!r}: table [{key}] is not supported; "
                "use flat keys such as `num-rounds = 5`."
            )
    return data


def collect_overrides(config: Path | None, assignments: list[str]) -> dict[str, object]:
    """The flat config of a command line: ``FILE.toml`` (if any), then each ``--set``."""
    flat: dict[str, object] = dict(load_toml(config)) if config is not None else {}
    for item in assignments:
        key, value = parse_assignment(item)
        flat[key] = value
    return flat


def describe_keys() -> list[tuple[str, object, str]]:
    """Return ``(key, default, section)`` for every key, for help texts."""
    return [(k, _default_of(f), s) for k, (s, f) in known_keys().items()]
