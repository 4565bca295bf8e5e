"""The server's loop, in one place: resume, one exchange per round, checkpoint, log.

:func:`run_federation` is what the ServerApp runs once its run is resolved
(:mod:`fedtune.apps.server.context`) and its strategy built: it resumes
(:func:`resume_round`), runs :func:`run_rounds` and so writes ``metrics.jsonl``,
the checkpoint after every round and one console line per round.

Why not Flower's ``Strategy.start()``: its contract is initial arrays in, a
``Result`` with the final arrays out and an optional centralised ``evaluate_fn``;
this server never holds the model in the clear (the clients build the initial
adapter from the run seed, the sums may be encrypted, and evaluation is federated),
so none of the three applies. The loop keeps the anchor's shape: configure,
exchange, aggregate, per round, on the strategy's own methods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from rich.console import Console

from fedtune.apps.server.context import ServerRun
from fedtune.apps.server.exchange import PENDING, load_pending, save_pending
from fedtune.apps.server.multiparty import (
    PENDING_DECRYPTION,
    decryption_step,
    pending_round,
    resume_decryption,
    resume_global,
)
from fedtune.apps.server.strategy import FedTuneStrategy, NotEnoughClients
from fedtune.apps.server.verified import verified_exchange
from fedtune.config import RunConfig
from fedtune.errors import FederationError
from fedtune.run.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from fedtune.run.metrics import append_record, read_records
from fedtune.secure.codec import PayloadError
from fedtune.secure.multiparty.backend import MultipartyServerCodec
from fedtune.tasks import get_task

__all__ = ["resume_round", "run_federation", "run_rounds"]

log = logging.getLogger("fedtune.server")


def run_federation(grid: Grid, run: ServerRun, strategy: FedTuneStrategy) -> None:
    """Resume (or start) the run in ``run.run_dir`` and run every round that is left.

    A ``ckks-multiparty`` run stopped while its quorum was decrypting a round first asks
    that round's saved request again (:func:`~fedtune.apps.server.multiparty.resume_decryption`).
    """
    first = resume_round(run.run_dir, strategy, resume=run.wiring.resume)
    if (
        run.wiring.resume
        and isinstance(strategy.codec, MultipartyServerCodec)
        and resume_decryption(
            grid,
            strategy,
            run_dir=run.run_dir,
            server_round=first,
            timeout=run.cfg.federation.round_timeout,
        )
    ):
        _save_checkpoint(run.run_dir, strategy, first)
        first += 1
    run_rounds(grid, run.cfg, strategy, run.run_dir, first_round=first)


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
    pending_request = run_dir / PENDING_DECRYPTION  # ckks-multiparty (apps/server/multiparty.py)
    if not resume:
        held = {"a checkpoint": checkpoint_dir, "a decryption request": pending_request}
        for what, path in held.items():
            if path.exists() or path.is_symlink():
                raise FederationError(
                    f"`run-dir` {str(run_dir)!r} already holds {what}; resume it "
                    "(`resume = true`, `fedtune deploy run --resume`) or choose a new run-dir."
                )
        metrics_path.unlink(missing_ok=True)
        (run_dir / PENDING).unlink(missing_ok=True)
        return 1
    multiparty = isinstance(strategy.codec, MultipartyServerCodec)
    # ckks-multiparty: a round whose decryption request was saved but not answered.
    waiting = pending_round(run_dir) if multiparty else None
    if waiting == 1 and not checkpoint_dir.exists():
        _cut_metrics(metrics_path, 1)  # round 0's line was written before the request
        log.info("Resuming round 1's decryption")
        return 1
    try:
        checkpoint = load_checkpoint(checkpoint_dir, key_dir=run_dir)
    except CheckpointError as err:
        raise CheckpointError(
            f"Cannot resume: {err} Restore the checkpoint, or start a new run-dir without `resume`."
        ) from err
    try:
        if multiparty:  # its Ed25519 receipts and the quorum's partials are in GLOBAL_FILE
            resume_global(run_dir, strategy, checkpoint)
        else:
            strategy.resume(checkpoint.payload, checkpoint.num_examples, list(checkpoint.receipts))
    except PayloadError as err:
        raise FederationError(
            f"The checkpoint in {str(checkpoint_dir)!r} does not fit this run: {err}"
        ) from err
    # The checkpoint round's own line is written again, with its evaluation, by the
    # first exchange of the resumed run (its train half is in PENDING); with a saved
    # decryption request of the next round, that line was written before it.
    _cut_metrics(metrics_path, checkpoint.round + (waiting == checkpoint.round + 1))
    log.info("Resuming after round %d from %s", checkpoint.round, checkpoint_dir)
    return checkpoint.round + 1


def _cut_metrics(metrics_path: Path, first_dropped: int) -> None:
    """Drop the ``metrics.jsonl`` lines of round ``first_dropped`` and after."""
    previous = read_records(metrics_path) if metrics_path.is_file() else []
    kept = [r for r in previous if int(r["round"]) < first_dropped]
    metrics_path.unlink(missing_ok=True)
    for record in kept:
        append_record(metrics_path, record)


def _save_checkpoint(run_dir: Path, strategy: FedTuneStrategy, rnd: int) -> None:
    """Checkpoint round ``rnd``'s global sum (the previous one is kept beside it)."""
    assert strategy.global_payload is not None  # set by a successful aggregate_train
    save_checkpoint(
        run_dir / "checkpoint",
        Checkpoint(
            round=rnd,
            payload=strategy.global_payload,
            num_examples=strategy.global_examples,
            # ckks-multiparty keeps its Ed25519 receipts in GLOBAL_FILE instead
            receipts=()
            if isinstance(strategy.codec, MultipartyServerCodec)
            else tuple(strategy.global_receipts),
        ),
        key_dir=run_dir,
        keep_previous=True,
    )


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
        if isinstance(strategy.codec, MultipartyServerCodec):
            # ckks-multiparty: a quorum's signed partials. The train half is kept first,
            # so a run stopped during the decryption resumes it (its request is saved).
            save_pending(run_dir, pending)
            with console.status(f"round {rnd}/{fed.num_rounds}: decrypting the sum…"):
                decryption_step(
                    grid,
                    strategy,
                    train_replies,
                    server_round=rnd,
                    timeout=fed.round_timeout,
                    run_dir=run_dir,
                )
            seconds = time.perf_counter() - start
            pending["train-seconds"] = pending["round-seconds"] = seconds
        save_pending(run_dir, pending)
        _save_checkpoint(run_dir, strategy, rnd)
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
