"""fedtune/train reads bottom up: no import circle, no private name used across modules.

Counts every import, inside functions and under ``TYPE_CHECKING`` too (issue 30: the
old ``runtime -> release -> levels -> runtime._train_dpsgd`` circle hid behind
function-level imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fedtune.train"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "fedtune" / "train").glob("*.py")):
        name = path.stem
        out[PACKAGE if name == "__init__" else f"{PACKAGE}.{name}"] = path
    return out


def _edges(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = {}
    private: list[str] = []
    for module, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    target = sub if sub in modules else node.module
                    if target in modules and target != module:
                        found.add(target)
                        if alias.name.startswith("_"):
                            private.append(f"{module} imports {target}.{alias.name}")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                attr, owner = node.attr, node.value.id
                if attr[:1] == "_" and attr[:2] != "__" and owner not in ("self", "cls"):
                    private.append(f"{module} uses {owner}.{attr}")
        edges[module] = found
    return edges, private


def test_train_has_no_import_circle_and_calls_no_private_function_across_modules() -> None:
    modules = _modules()
    edges, private = _edges(modules)
    assert {"fedtune.train.trainer", "fedtune.train.runtime", "fedtune.train.levels"} <= set(edges)
    assert not private, private
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join([*path, module]))
        if module in done:
            return
        for target in sorted(edges[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in modules:
        visit(module, [])
    # The plain trainer sits below every DP piece.
    assert not edges["fedtune.train.trainer"] & {
        "fedtune.train.runtime",
        "fedtune.train.levels",
        "fedtune.train.eval_release",
        "fedtune.train.keys",
    }
