"""The fedtune ServerApp: parse the config once, build the strategy, run the rounds.

The server holds no secret key and no data. Each round it samples clients and
sends each one message: the current global sum to train from, and (to the clients
sampled for evaluation) a request for the held-out metrics of that sum; it adds
the (possibly encrypted) updates and checkpoints the new sum. One evaluation
follows the last round. It writes one line of ``metrics.jsonl`` per round (round 0
evaluates the initial adapter).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedtune import bounds
from fedtune.apps.server.exchange import PENDING, load_pending, save_pending
from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.apps.server.verified import verified_exchange
from fedtune.config import (
    RunConfig,
    Wiring,
    parse_node_limits,
    parse_wiring,
)
from fedtune.data import default_label_names
from fedtune.errors import CheckpointError, ConfigError, FederationError, NotEnoughClients
from fedtune.errors import WirePayloadError as PayloadError
from fedtune.model import adapter_layout, build_model
from fedtune.resolve import resolve
from fedtune.run.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtune.run.metrics import append_record, read_records
from fedtune.secure import get_backend, run_codec
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.codec import Codec
from fedtune.tasks import get_task

__all__ = [
    "app",
    "check_keys",
    "make_server_app",
    "parse_node_limits",
    "resume_round",
    "run_rounds",
    "server_capacity",
    "server_codec",
    "with_default_labels",
]

log = logging.getLogger("fedtune.server")


def with_default_labels(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``label-names`` filled in for the default data (all 8 WordNet categories).

    The server sizes the payload from the label count before any client replies;
    with the default data it knows the labels the clients will find, so ``flwr run .``
    needs no ``label-names``. With the user's own data it must be given.
    """
    if cfg.data.labels or not get_task(cfg.model.task).uses_labels:
        return cfg

    names = ",".join(default_label_names(cfg.data))
    return replace(cfg, data=replace(cfg.data, label_names=names))


def check_keys(cfg: RunConfig, wiring: Wiring) -> None:
    """Refuse an encrypted run without the server's ``public-context`` (no silent plaintext)."""
    if get_backend(cfg.crypto.codec_name).uses_keys and wiring.public_context is None:
        raise ConfigError(
            "`encryption` = true needs the server's `public-context` (and the clients' "
            "`secret-context`): make them with `fedtune keygen --out DIR` and pass both "
            "paths in the run config, or use `fedtune simulate`, which makes a run's keys."
        )


def server_codec(cfg: RunConfig, wiring: Wiring | Mapping[str, object]) -> Codec:
    """The run's codec on the *public* context (never a secret one), or a plain one.

    ``wiring`` is the run's :class:`~fedtune.config.Wiring` (a flat run config is
    parsed into one first); its ``public-context`` selects encryption.
    """
    if not isinstance(wiring, Wiring):
        wiring = parse_wiring(wiring)
    num_labels = len(cfg.data.labels)
    if num_labels < 2 and get_task(cfg.model.task).uses_labels:
        raise ValueError(
            "The server needs `label-names` (comma-separated) to know the head's size; "
            f"got {cfg.data.label_names!r}."
        )
    length = adapter_layout(
        build_model(cfg.model, num_labels=num_labels, seed=cfg.federation.seed)
    ).size
    return run_codec(
        cfg.crypto.encryption_backend, length=length, context=wiring.public_context, public=True
    )


def server_capacity(cfg: RunConfig, codec: Codec) -> float | None:
    """The CKKS range the strategy keeps the sum in (``None`` in plaintext).

    Refuses to start (:class:`fedtune.config.ConfigError` naming the keys) when
    ``num-clients x max-client-examples x VALUE_BOUND`` exceeds it; under
    client-level DP every update claims one example, so the check uses 1.
    """
    if not isinstance(codec, CkksCodec):
        return None
    capacity = bounds.ckks_capacity(codec.context.params)
    per_client = 1 if cfg.privacy.dp == "client" else cfg.federation.max_client_examples
    bounds.check_capacity(
        num_clients=cfg.federation.num_clients,
        max_client_examples=per_client,
        capacity=capacity,
    )
    return capacity


def _table(outcome_accepted: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    return {name: dict(values) for name, values in outcome_accepted.items()}


def _merge_clients(
    train: Mapping[str, Mapping[str, float]], evaluate: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """A round's clients, train and evaluate merged by the strategy's node-bound key.

    A key is a client's name while that name is bound to one node (else
    ``node-<id>``); replies that could not be tabled sit under ``dropped``.
    """
    clients: dict[str, dict[str, float]] = {}
    for table in (train, evaluate):
        for name, values in table.items():
            clients.setdefault(name, {}).update(values)
    return dict(sorted(clients.items()))


def resume_round(run_dir: Path, strategy: FedTuneStrategy, *, resume: bool) -> int:
    """The first round to train: 1 for a new run, checkpoint round + 1 with ``resume``.

    A new run refuses a ``run-dir`` that already holds a checkpoint (it would be
    overwritten); a resumed run loads the checkpoint into the strategy and drops the
    ``metrics.jsonl`` lines of its round and after (they are written again). The
    checkpoint must verify against ``run-dir/checkpoint.key`` (see
    :mod:`fedtune.run.checkpoint`); one that does not stops the server with one line.
    """
    metrics_path = run_dir / "metrics.jsonl"
    checkpoint_dir = run_dir / "checkpoint"
    if not resume:
        if checkpoint_dir.exists() or checkpoint_dir.is_symlink():
            raise FederationError(
                f"`run-dir` {str(run_dir)!r} already holds a checkpoint; resume it "
                "(`resume = true`, `fedtune deploy run --resume`) or choose a new run-dir."
            )
        metrics_path.unlink(missing_ok=True)
        (run_dir / PENDING).unlink(missing_ok=True)
        return 1
    try:
        checkpoint = load_checkpoint(checkpoint_dir, key_dir=run_dir)
    except CheckpointError as err:
        raise CheckpointError(
            f"Cannot resume: {err} Restore the checkpoint, or start a new run-dir without `resume`."
        ) from err
    try:
        strategy.resume(checkpoint.payload, checkpoint.num_examples, list(checkpoint.receipts))
    except PayloadError as err:
        raise FederationError(
            f"The checkpoint in {str(checkpoint_dir)!r} does not fit this run: {err}"
        ) from err
    previous = read_records(metrics_path) if metrics_path.is_file() else []
    # The checkpoint round's own line is written again, with its evaluation, by the
    # first exchange of the resumed run (its train half is in PENDING).
    kept = [r for r in previous if int(r["round"]) < checkpoint.round]
    metrics_path.unlink(missing_ok=True)
    for record in kept:
        append_record(metrics_path, record)
    log.info("Resuming after round %d from %s", checkpoint.round, checkpoint_dir)
    return checkpoint.round + 1


def run_rounds(
    grid: Grid, cfg: RunConfig, strategy: FedTuneStrategy, run_dir: Path, *, first_round: int = 1
) -> None:
    """Each round one message per node, then one evaluation of the last round.

    Round ``r``'s exchange trains round ``r`` and evaluates round ``r - 1``'s global
    state (:meth:`FedTuneStrategy.configure_round`): round 0 (the initial adapter) is
    evaluated with round 1's messages. A ``metrics.jsonl`` line is written for round
    ``r`` once its evaluation is in: its train fields from round ``r``'s exchange
    (``train-seconds``: that exchange's wall time), its ``eval-*`` fields from round
    ``r + 1``'s; the last round's from a final evaluate exchange (``eval-seconds``,
    and ``round-seconds`` is both). The checkpoint of round ``r`` is written as soon
    as it is trained, its train half beside it (:data:`PENDING`).
    """
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    fed = cfg.federation
    metrics_path = run_dir / "metrics.jsonl"
    task = get_task(cfg.model.task)
    # A headline other than accuracy (causal LM: answer perplexity) is printed beside it.
    extra = task.headline.key if task.headline.key != "eval-accuracy" else ""

    def write(pending: dict[str, Any], evaluation: MetricRecord | None) -> None:
        """Complete round ``pending['round']``'s line with its evaluation and append it."""
        record: dict[str, Any] = dict(pending)
        record.update(dict(evaluation) if evaluation is not None else {})
        record["clients"] = _merge_clients(
            pending.get("clients", {}), strategy.last_evaluate.accepted
        )
        if strategy.last_evaluate.dropped:
            record["eval-dropped"] = dict(strategy.last_evaluate.dropped)
        if after := strategy.dropped_after_sum.get(record["round"]):  # verified.py
            record["dropped-after-sum"] = dict(after)
        task.derive_metrics(record)
        append_record(metrics_path, record)
        rnd = record["round"]
        line = f"round {rnd}/{fed.num_rounds}  "
        if rnd > 0 and "clients-trained" in record:
            line += f"clients {record['clients-trained']}/{record['clients-sampled']}  "
        if "train-loss" in record:
            line += f"train-loss {record['train-loss']:.3f}  "
        if rnd > 0:
            line += f"eval-loss {record.get('eval-loss', float('nan')):.3f}  "
        line += f"eval-accuracy {record.get('eval-accuracy', float('nan')):.3f}"
        if extra in record:
            line += f"  {extra} {record[extra]:.2f}"
        if "epsilon" in record:
            line += f"  epsilon {record['epsilon']:.3f}"
        if "round-seconds" in record:
            line += f"  {record['round-seconds']:.1f}s"
        console.print(line)

    if first_round == 1:
        pending: dict[str, Any] = {"round": 0}
    else:
        console.print(f"resuming at round {first_round}/{fed.num_rounds}")
        pending = load_pending(run_dir, first_round - 1)
    for rnd in range(first_round, fed.num_rounds + 1):
        start = time.perf_counter()
        with console.status(
            f"round {rnd}/{fed.num_rounds}: training (and evaluating round {rnd - 1})…"
        ):
            replies = verified_exchange(  # again without uploads key holders refuse
                grid,
                strategy,
                lambda: strategy.configure_round(rnd, grid),  # noqa: B023 - called here
                global_round=rnd - 1,
                timeout=fed.round_timeout,
                run_dir=run_dir,
            )
            train_replies, evaluate_replies = strategy.split_replies(replies)
            evaluation = strategy.aggregate_evaluate(rnd - 1, evaluate_replies)
            _, train_metrics = strategy.aggregate_train(rnd, train_replies)
        seconds = time.perf_counter() - start
        write(pending, evaluation)
        last = strategy.last_train
        if train_metrics is None:
            notes = [f"declined by {k}: {v}" for k, v in last.declined.items()]
            notes += [f"dropped {k}: {v}" for k, v in last.dropped.items()]
            raise NotEnoughClients(
                f"Round {rnd}: {len(last.accepted)} of {len(strategy.train_messages)} sampled "
                f"clients returned a usable update: {strategy.last_refusal}. Stopping; the "
                f"checkpoint of round {rnd - 1} is kept."
                + ("".join(f" {n.rstrip('.')}." for n in notes))
            )
        pending = {
            "round": rnd,
            "train-seconds": seconds,
            "round-seconds": seconds,
            "clients-sampled": len(strategy.train_messages),
            "clients-trained": len(last.accepted),
            "clients-dropped": len(last.dropped),
            "clients-declined": len(last.declined),
            "dropped": dict(last.dropped),
            "declined": dict(last.declined),
            "clients": _table(last.accepted),
        }
        if "train-loss" in train_metrics:  # DP clients send no training statistics
            pending["train-loss"] = train_metrics["train-loss"]
        eps = [c["epsilon"] for c in last.accepted.values() if "epsilon" in c]
        if eps:
            pending["epsilon"] = max(eps)
        save_pending(run_dir, pending)
        assert strategy.global_payload is not None  # set by a successful aggregate_train
        save_checkpoint(
            run_dir / "checkpoint",
            Checkpoint(
                round=rnd,
                payload=strategy.global_payload,
                num_examples=strategy.global_examples,
                receipts=tuple(strategy.global_receipts),
            ),
            key_dir=run_dir,
            keep_previous=True,
        )
    # The last round's state: one evaluate message per sampled node.
    start = time.perf_counter()
    with console.status(f"round {fed.num_rounds}/{fed.num_rounds}: evaluating…"):
        replies = verified_exchange(
            grid,
            strategy,
            lambda: list(
                strategy.configure_evaluate(pending["round"], ArrayRecord(), ConfigRecord(), grid)
            ),
            global_round=pending["round"],
            timeout=fed.round_timeout,
            run_dir=run_dir,
        )
        evaluation = strategy.aggregate_evaluate(pending["round"], replies)
    pending["eval-seconds"] = time.perf_counter() - start
    pending["round-seconds"] = pending.get("train-seconds", 0.0) + pending["eval-seconds"]
    write(pending, evaluation)


def make_server_app(config: Mapping[str, object] | None = None) -> ServerApp:
    """Build the ServerApp.

    Parameters
    ----------
    config : Mapping[str, object] | None
        Flat run config (with wiring keys such as ``run-dir``) for Python-driven
        simulations; ``None`` reads ``context.run_config`` as ``flwr run`` sets it.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        flat = dict(config) if config is not None else dict(context.run_config)
        resolved = resolve(flat)
        cfg, wiring = with_default_labels(resolved.config), resolved.wiring
        check_keys(cfg, wiring)
        # Each Flower run gets its own directory unless the run config names one.
        run_dir = wiring.run_dir_for(context.run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.toml").exists():  # a deployment: `fedtune export` reads it
            (run_dir / "config.toml").write_text(cfg.to_toml())
        codec = server_codec(cfg, wiring)
        strategy = FedTuneStrategy(
            codec=codec,
            fraction_train=cfg.federation.fraction_train,
            fraction_evaluate=cfg.federation.fraction_evaluate,
            min_clients=cfg.federation.min_clients,
            seed=cfg.federation.seed,
            client_dp_tolerance=(
                cfg.privacy.client_dp_tolerance if cfg.privacy.dp == "client" else None
            ),
            max_client_examples=cfg.federation.max_client_examples,
            max_weight_factor=cfg.federation.max_weight_factor,
            node_limits=wiring.node_limits,
            capacity=server_capacity(cfg, codec),
            eval_metrics=get_task(cfg.model.task).eval_metrics,
        )
        strategy.blame_allowed = cfg.privacy.dp == "example"  # each upload is a DP release
        strategy.summary()
        if strategy.node_limits:
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                "per-node example limits (set at registration): "
                + ", ".join(f"node {k} <= {v}" for k, v in sorted(strategy.node_limits.items()))
            )
        first = resume_round(run_dir, strategy, resume=wiring.resume)
        run_rounds(grid, cfg, strategy, run_dir, first_round=first)

    return app


#: The ServerApp that ``flwr run`` loads (``[tool.flwr.app.components]``).
app = make_server_app()
