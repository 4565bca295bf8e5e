"""The configuration reference, generated from the config dataclasses' field metadata.

Every run-config key is one field of one section dataclass (:data:`SECTION_TYPES`) or of
:class:`~fedtune.config.wiring.Wiring`, declared PEFT-style as
``field(default=..., metadata={"help": "..."})``. That field is the key's one source:

- ``fedtune simulate --help`` and ``fedtune deploy run --help`` list every key with its
  default in the form a TOML config file takes (:func:`keys_epilog`);
- ``docs/configuration.md`` is :func:`markdown` (``python scripts/gen_config_docs.py``;
  ``tests/test_docs.py`` fails when the committed file is out of date or a key has no help);
- ``tests/test_config.py`` checks ``pyproject.toml``'s ``[tool.flwr.app.config]`` against
  :func:`pyproject_defaults`;
- an error message can quote a key's help (:func:`key_help`).

The allowed values of a ``Literal``-typed field are read from its type, so they are never
written twice; a key whose values come from a registry (``task``, ``encryption-backend``)
names them in its help.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import textwrap
import typing
from dataclasses import dataclass, fields

from fedtune.config.run import SECTION_TYPES, kebab, toml_value
from fedtune.config.wiring import Wiring

__all__ = [
    "KeyDoc",
    "KeysHelpFormatter",
    "key_docs",
    "key_help",
    "keys_epilog",
    "markdown",
    "missing_help",
    "pyproject_defaults",
]

#: The heading of the wiring keys (paths and switches set per run or per process).
WIRING_SECTION = "wiring"


@dataclass(frozen=True)
class KeyDoc:
    """One configuration key as the reference shows it."""

    key: str
    section: str
    default: str  # the TOML form a config file takes: true, 16, "iid"
    help: str
    choices: tuple[str, ...] = ()


def _section_title(cls: type) -> str:
    if cls is Wiring:
        return "Paths and switches set per run or per process"
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


def _choices(cls: type, f: dataclasses.Field[typing.Any]) -> tuple[str, ...]:
    hint = typing.get_type_hints(cls).get(f.name)
    if typing.get_origin(hint) is typing.Literal:
        return tuple(str(a) for a in typing.get_args(hint))
    return ()


def _default(f: dataclasses.Field[typing.Any]) -> str:
    if "toml" in f.metadata:
        return str(f.metadata["toml"])
    return toml_value(f.default)


def _sections() -> dict[str, type]:
    return {**SECTION_TYPES, WIRING_SECTION: Wiring}


def key_docs(*, wiring: bool = True) -> list[KeyDoc]:
    """Every key in section order (the :class:`RunConfig` sections, then the wiring)."""
    out = []
    for section, cls in _sections().items():
        if section == WIRING_SECTION and not wiring:
            continue
        for f in fields(cls):
            help_text = " ".join(str(f.metadata.get("help", "")).split())
            out.append(KeyDoc(kebab(f.name), section, _default(f), help_text, _choices(cls, f)))
    return out


def missing_help() -> list[str]:
    """Keys whose field has no ``help`` metadata (``tests/test_docs.py`` wants none)."""
    return [d.key for d in key_docs() if not d.help]


def key_help(key: str) -> str:
    """The help of ``key`` (empty for an unknown key), for error messages."""
    return next((d.help for d in key_docs() if d.key == key), "")


def pyproject_defaults() -> dict[str, str]:
    """``key -> default`` in TOML form, as ``[tool.flwr.app.config]`` must declare them."""
    return {d.key: d.default for d in key_docs()}


def keys_epilog(width: int | None = None, *, wiring: bool = False) -> str:
    """The keys with their defaults and help, for an ``argparse`` epilog.

    The defaults are written as a flat TOML file writes them (``encryption = false``,
    strings quoted); sections are comments, since a config file has no tables. The help
    is wrapped at ``width`` (default: the terminal's, at most 100 columns).
    """
    if width is None:
        width = max(40, min(100, shutil.get_terminal_size((100, 24)).columns - 2))
    lines = [
        "config keys (a flat TOML file or --set key=value; shown with their defaults as a",
        "config file writes them; reference: docs/configuration.md):",
    ]
    section = ""
    for d in key_docs(wiring=wiring):
        if d.section != section:
            section = d.section
            lines += ["", f"  # {section}: {_section_title(_sections()[section])}"]
        lines.append(f"  {d.key} = {d.default}")
        text = d.help + (f" One of: {', '.join(d.choices)}." if d.choices else "")
        indent = " " * 6
        lines += textwrap.wrap(
            text,
            width=width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
            break_long_words=False,
        )
    return "\n".join(lines)


class KeysHelpFormatter(argparse.HelpFormatter):
    """Wrap a parser's description; keep an indented epilog (:func:`keys_epilog`) as it is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n  " in text:  # preformatted: the key list, the run directory's layout
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """``docs/configuration.md``: one table per section, generated from the fields."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python scripts/gen_config_docs.py` from the field metadata in",
        "     fedtune/config/; edit the fields, not this file (tests/test_docs.py checks it). -->",
        "",
        "One flat set of kebab-case keys, the same in `pyproject.toml` (`[tool.flwr.app.config]`,",
        "the Flower App's run config), in the TOML files of `simulations/` and in",
        "`--set key=value`. Later sources override earlier ones: defaults < FILE.toml < `--set`.",
        "Values are parsed once into typed dataclasses (`fedtune/config/`) that check them; an",
        "unknown key is an error with a suggestion. A config file is flat: no `[tables]`.",
        "`fedtune simulate --help` prints the same list.",
        "",
    ]
    section = ""
    for d in key_docs():
        if d.section != section:
            section = d.section
            title = _section_title(_sections()[section])
            out += ["", f"## {section}", "", f"{title}.", ""]
            if section == WIRING_SECTION:
                out += [
                    "Set per run or per node by the driver (`fedtune simulate`, "
                    "`fedtune deploy`), not by a config file; declared in `pyproject.toml` "
                    "(empty by default) so that Flower passes them on.",
                    "",
                ]
            out += ["| key | default | meaning |", "|---|---|---|"]
        meaning = d.help + (
            f" One of: {', '.join(f'`{c}`' for c in d.choices)}." if d.choices else ""
        )
        out.append(f"| `{d.key}` | `{_cell(d.default)}` | {_cell(meaning)} |")
    return "\n".join(out) + "\n"
