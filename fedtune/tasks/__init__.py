"""Tasks registered by name: ``"classification"``, ``"causal-lm"``, ``"preference"`` (or yours).

:func:`get_task` returns the :class:`~fedtune.tasks.base.Task` for a config's
``task`` key; nothing outside this package branches on which task it is. The two
built-in tasks are imported only when first asked for (they import torch and
transformers). Adding a task::

    from fedtune.tasks import register_task
    register_task("my-task", MyTask)   # MyTask() implements fedtune.tasks.base.Task

after which ``task = "my-task"`` is a valid config value in that process. A task
that must work in every process of a run (Flower's simulation runs each client in
its own worker; each node is its own machine) is declared by its installed package
as an entry point, which every process finds::

    [project.entry-points."fedtune.tasks"]
    my-task = "my_package.my_task:MyTask"
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from typing import TYPE_CHECKING

from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.tasks.base import Task

__all__ = ["ENTRY_POINT_GROUP", "get_task", "register_task", "task_names", "unregister_task"]

#: Entry-point group of tasks that installed packages provide.
ENTRY_POINT_GROUP = "fedtune.tasks"

#: name -> ``"module:attribute"`` of a built-in task (imported on first use).
_BUILTIN = {
    "classification": "fedtune.tasks.classification:ClassificationTask",
    "causal-lm": "fedtune.tasks.causal_lm:CausalLMTask",
    "preference": "fedtune.tasks.preference:PreferenceTask",
}
_FACTORIES: dict[str, Callable[[], Task]] = {}
_INSTANCES: dict[str, Task] = {}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    """Make ``task = name`` valid; ``factory()`` builds the task on first use."""
    if not name or name in _BUILTIN or name in _FACTORIES:
        raise ValueError(f"a task named {name!r} is already registered (or the name is empty).")
    _FACTORIES[name] = factory


def unregister_task(name: str) -> None:
    """Remove a task added with :func:`register_task` (tests use this to clean up)."""
    _FACTORIES.pop(name, None)
    _INSTANCES.pop(name, None)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep for ep in found if ep.name not in _BUILTIN}


def task_names() -> tuple[str, ...]:
    """Every known task name: built-ins, then installed entry points, then registered."""
    installed = [n for n in _entry_points() if n not in _FACTORIES]
    return (*_BUILTIN, *installed, *_FACTORIES)


def get_task(name: str) -> Task:
    """The task registered as ``name`` (one instance per process)."""
    if name not in _INSTANCES:
        if name in _BUILTIN:
            module, attribute = _BUILTIN[name].split(":")
            factory = getattr(importlib.import_module(module), attribute)
        elif name in _FACTORIES:
            factory = _FACTORIES[name]
        elif name in (installed := _entry_points()):
            factory = installed[name].load()
        else:
            raise ConfigError(f"`task` must be one of {', '.join(task_names())}, got {name!r}.")
        _INSTANCES[name] = factory()
    return _INSTANCES[name]
