"""The README fits a first screen and a tour; docs/ pages are linked and their links resolve.

- README.md is at most 250 lines;
- every ``docs/*.md`` that exists is linked from the README (pages other work adds later are
  required only once they exist);
- every relative link in README.md and docs/*.md names an existing file, and an anchor in a
  link to a Markdown file names one of its headings (GitHub's slugs);
- ``docs/configuration.md`` is what ``scripts/gen_config_docs.py`` writes from the field
  metadata, and every key has help;
- every option of every ``fedtune`` command has help text.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune.cli.dispatch import build_parser
from fedtune.config.reference import markdown, missing_help

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# [text](target) and ![alt](target), not inside code spans; the target ends at space or ')'.
_LINK = re.compile(r"(?<!`)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _prose(path: Path) -> Iterator[str]:
    """The lines of ``path`` outside fenced code blocks."""
    fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fence = not fence
        elif not fence:
            yield line


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path):
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path) -> list[str]:
    out = []
    for line in _prose(path):
        out += _LINK.findall(re.sub(r"`[^`]*`", "", line))  # code spans are not links
    return out


def test_readme_fits_a_first_screen_and_a_tour() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, (
        f"README.md has {len(lines)} lines (at most 250): move detail to docs/"
    )


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(README.parent / t.split("#")[0]).resolve() for t in _links(README)}
    unlinked = [p.name for p in _pages() if p.resolve() not in linked]
    assert not unlinked, f"link these docs/ pages from README.md: {unlinked}"


@pytest.mark.parametrize("path", [README, *_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in _links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{path.name}: broken links: {broken}"


def test_configuration_reference_is_generated_and_every_key_has_help() -> None:
    assert missing_help() == [], "give these fields metadata={'help': ...} in fedtune/config/"
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert committed == markdown(), "run: python scripts/gen_config_docs.py"


def _options(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_cli_option_has_help_and_version_is_offered(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser()
    missing = [
        f"{cmd} {'/'.join(a.option_strings) or a.dest}"
        for cmd, a in _options(parser, "fedtune")
        if not a.help
    ]
    assert not missing, f"options without help: {missing}"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("fedtune ")
