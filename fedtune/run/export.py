"""Write and reload the final adapter in standard PEFT format.

``adapter/`` holds ``adapter_config.json`` and ``adapter_model.safetensors`` as
written by PEFT's own ``save_pretrained`` (the classification head is saved as a
``modules_to_save`` module), ``fedtune.json`` with the label names and the round the
adapter comes from, and ``README.md``, a model card (:mod:`fedtune.run.card`): task,
data, rounds, clients and each client's (ε, δ). ``base_model_name_or_path`` is a name
``from_pretrained`` finds on another machine (:func:`fedtune.run.card.base_model_name`),
and the base model's ``id2label`` holds the label names. Stock
``peft.PeftModel.from_pretrained`` loads it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from torch import nn

from fedtune.aggregation import WeightedSum
from fedtune.config import RunConfig
from fedtune.errors import ConfigError, GlobalRefused
from fedtune.model import adapter_layout, build_model, load_base_model, set_adapter_vector
from fedtune.model.quantize import quiet_torchao_import
from fedtune.privacy.ledger import LedgerCorruptError, PrivacyLedger
from fedtune.run.card import base_model_name, model_card
from fedtune.run.checkpoint import Checkpoint, load_checkpoint
from fedtune.secure import run_codec
from fedtune.secure.codec import PayloadError
from fedtune.secure.multiparty import files, rounds
from fedtune.secure.multiparty.global_file import load_global_record
from fedtune.secure.multiparty.protocol import SIGNATURE_BYTES
from fedtune.secure.verify import min_uploads, receipts_from_record
from fedtune.tasks import get_task
from fedtune.train.shared import process_model

__all__ = ["export_adapter", "load_adapter", "run_privacy", "write_adapter"]


def run_privacy(run_dir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Each client's last ledger record (ε, δ, level, relation) and its training example
    count n_k.

    Read from ``run_dir/privacy/*.jsonl`` (simulation ledgers); an unreadable ledger
    leaves the card without its row rather than failing the export.
    """

    privacy: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for path in sorted((run_dir / "privacy").glob("*.jsonl")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                records = PrivacyLedger(path).records()
        except (LedgerCorruptError, OSError):
            continue
        for r in records:  # the last record's ε composes every earlier release
            privacy[r.client] = {
                "epsilon": r.epsilon,
                "delta": r.delta,
                "level": r.level,
                "relation": r.relation,
            }
            if r.kind == "train" and r.num_examples:
                counts[r.client] = r.num_examples
    return dict(sorted(privacy.items())), counts


def write_adapter(
    out_dir: Path,
    cfg: RunConfig,
    vector: NDArray[np.floating],
    *,
    round_: int,
    base_model: str | None = None,
    run_dir: Path | None = None,
    model: nn.Module | None = None,
) -> Path:
    """Load ``vector`` into ``model``'s adapter (built when None), save it with PEFT, plus a card.

    ``base_model``: the ``base_model_name_or_path`` to write (default
    :func:`~fedtune.run.card.base_model_name`); ``run_dir``: where the privacy ledgers
    the card quotes live.
    """
    labels = cfg.data.labels
    if model is None:
        model = build_model(cfg.model, num_labels=len(labels), seed=cfg.federation.seed)
    set_adapter_vector(model, vector)
    config = getattr(model, "config", None)
    if config is not None and get_task(cfg.model.task).uses_labels and labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))  # type: ignore[operator]
    name = base_model or base_model_name(cfg)
    adapter_config = out_dir / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = name
    adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    meta = {
        "label-names": labels,
        "round": round_,
        "lora-variant": cfg.model.lora_variant,
        "base-model": name,
    }
    (out_dir / "fedtune.json").write_text(json.dumps(meta, indent=1) + "\n")
    privacy, counts = run_privacy(run_dir) if run_dir is not None else ({}, {})
    card = model_card(
        cfg, labels=labels, round_=round_, privacy=privacy, clients=counts, base_model=name
    )
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    return out_dir


def load_adapter(adapter_dir: Path, cfg: RunConfig) -> nn.Module:
    """Base model + adapter through stock ``peft.PeftModel.from_pretrained``."""
    with quiet_torchao_import():  # peft imports torchao when it is installed
        from peft import PeftModel

    labels = json.loads((adapter_dir / "fedtune.json").read_text())["label-names"]
    # Another seed for the base head on purpose: the adapter must bring its own head.
    base = load_base_model(cfg.model, num_labels=len(labels), seed=cfg.federation.seed + 7919)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations inside peft
        return PeftModel.from_pretrained(base, str(adapter_dir))


def _key_hint(run_dir: Path) -> str:
    own = run_dir / "keys" / "secret.ctx"
    if own.is_file():
        return f"pass --key {own} (the key this simulation made)"
    return "pass --key with the secret.ctx from `fedtune keygen` that the clients used"


def export_adapter(
    run_dir: Path,
    cfg: RunConfig,
    *,
    secret_context: Path | None,
    out_dir: Path | None = None,
    base_model: str | None = None,
) -> Path:
    """Decode ``run_dir/checkpoint`` (decrypting with ``secret_context`` if encrypted)
    and write the PEFT adapter to ``out_dir`` (default ``run_dir/adapter``)."""
    checkpoint = load_checkpoint(run_dir / "checkpoint")
    # This process's model (the driver's preflight built it): measured and written once.
    model = process_model(cfg.model, num_labels=len(cfg.data.labels), seed=cfg.federation.seed)
    layout = adapter_layout(model.model)
    if cfg.crypto.encryption and cfg.crypto.encryption_backend == "ckks-multiparty":
        # No key opens it alone: the round's signed partials, kept beside the checkpoint.
        vector = multiparty_vector(run_dir, cfg, checkpoint.payload, checkpoint.num_examples)
    else:
        vector = _decrypted_mean(run_dir, cfg, checkpoint, layout.size, secret_context)
    return write_adapter(
        out_dir or run_dir / "adapter",
        cfg,
        vector,
        round_=checkpoint.round,
        base_model=base_model,
        run_dir=run_dir,
        model=model.model,
    )


def _decrypted_mean(
    run_dir: Path,
    cfg: RunConfig,
    checkpoint: Checkpoint,
    length: int,
    secret_context: Path | None,
) -> NDArray[np.float64]:
    """The checkpointed global ``S / N`` (decrypted with ``secret_context`` if encrypted)."""
    if cfg.crypto.encryption and secret_context is None:
        raise ConfigError(f"{str(run_dir)!r} is encrypted: {_key_hint(run_dir)}.")
    secret = secret_context if cfg.crypto.encryption else None
    codec = run_codec(cfg.crypto.encryption_backend, length=length, context=secret)
    try:
        payload = codec.validate(checkpoint.payload, aggregate=True)
    except PayloadError as err:
        found = dict(checkpoint.payload).get("fingerprint")
        if secret is None or found == codec.fingerprint:
            raise
        raise ConfigError(
            f"--key {str(secret)!r} (fingerprint {codec.fingerprint[:24]!r}) is not the key "
            f"the checkpoint in {str(run_dir)!r} was encrypted under (fingerprint "
            f"{str(found)[:24]!r}): {_key_hint(run_dir)}."
        ) from err
    return WeightedSum(total=codec.decode(payload), num_examples=checkpoint.num_examples).mean()


def multiparty_vector(
    run_dir: Path, cfg: RunConfig, payload: Mapping[str, object], num_examples: int
) -> NDArray[np.float64]:
    """The checkpointed ``ckks-multiparty`` global ``S / N``, from its kept signed partials.

    Needs ``RUN_DIR/keys/roster.json`` (public) and ``RUN_DIR/multiparty-global.json``
    (the round's receipts and the quorum's signed partials, written by the server); no
    party file: the server saw this sum when it was decrypted, and a second decryption
    (a second sample of the smudging noise) is never asked for.
    """

    roster = files.load_roster(run_dir / "keys" / "roster.json")
    record = load_global_record(run_dir)
    try:
        items = receipts_from_record(record, tag_bytes=SIGNATURE_BYTES)
        if record.get("num-examples") != num_examples:
            raise GlobalRefused("global-unverified:examples-mismatch")
        return rounds.open_checkpoint(
            roster,
            payload,
            record,
            receipts=items,
            num_examples=num_examples,
            min_count=min_uploads(min_clients=cfg.federation.min_clients, dp=cfg.privacy.dp),
        )
    except GlobalRefused as err:
        raise ConfigError(
            f"{str(run_dir)!r}: the checkpoint's multiparty partials do not open it ({err}); "
            "multiparty-global.json and checkpoint/ must come from the same round."
        ) from err
