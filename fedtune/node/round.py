"""One node's side of a round: a server message's content in, the reply's content out.

The same code serves a simulated client (``fedtune/apps/client/app.py``) and a real node
(its long-lived worker, :mod:`fedtune.node.worker`), so the two paths cannot drift.

Message contents (keys in the ``RecordDict``):

* server -> client: ``config`` (ConfigRecord: ``server-round``; for train messages
  ``sampled-clients``, the number of clients trained this round, and
  ``evaluate-round`` when the server also wants the held-out metrics of the global
  state the message carries), and from round 2 on ``global`` (ConfigRecord: a wire
  payload of ``sum n_k w_k`` plus ``num-examples``).
* client -> server (train): ``update`` (ConfigRecord: the wire payload of
  ``n_k w_k``), ``info`` (ConfigRecord: ``client``, ``declined``), ``metrics``
  (MetricRecord: ``num-examples``, ``partition-id``; ``epsilon`` with DP on;
  ``train-loss`` and ``train-seconds`` only with DP off), and with
  ``evaluate-round`` an ``evaluation`` record (the evaluate reply's ``metrics``,
  computed on the global state *before* training). A client that declines (its
  privacy budget, or a second release of one round) sends no ``update`` and no
  ``metrics``, only ``info`` (and ``evaluation`` if asked).
* client -> server (evaluate): ``info`` and ``metrics`` (``num-examples``,
  ``eval-loss``, ``eval-accuracy``, ``partition-id``).

One train message per node and round carries both the round's training and the evaluation
of the previous round's global state (one evaluate message follows the last round).

The privacy status of every field is declared in :mod:`fedtune.messages`; each reply
is checked against it before it leaves.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedtune.config import RunConfig, parse_wiring
from fedtune.errors import (
    ConfigError,
    ModelError,
    NodeConfigKeyError,
    PolicyError,
    ServerMessageError,
)
from fedtune.messages import check_reply
from fedtune.model.loading import model_digest
from fedtune.node import ceremony as node_ceremony
from fedtune.node import verified as verify
from fedtune.node.cores import node_threads
from fedtune.privacy.policy import NodePolicy
from fedtune.privacy.policy_file import POLICY_KEYS, load_policy
from fedtune.resolve import resolve
from fedtune.train.runtime import ClientRuntime, GlobalState, TrainOutcome

__all__ = [
    "NODE_KEYS",
    "handle",
    "node_settings",
    "runtime_for",
    "train_reply",
]

log = logging.getLogger("fedtune.client")

#: This process's clients (their own state only: the model and data are shared, see
#: :mod:`fedtune.train.shared`), by run config digest, run, partition and name.
_RUNTIMES: dict[tuple[object, ...], ClientRuntime] = {}

#: Node-config keys a node may set (``fedtune deploy supernode``; simulation: ``partition-id``
#: / ``num-partitions``), with its policy's (``POLICY_KEYS``: they override ``policy.toml``).
NODE_KEYS = frozenset(
    {
        "partition-id",
        "num-partitions",
        "name",
        "data-path",
        "state-dir",
        "secret-context",
        "epsilon-budget",
        "node-key",
        *POLICY_KEYS,
    }
)


def node_settings(
    flat: Mapping[str, object], node_config: Mapping[str, object], *, deployed: bool
) -> dict[str, object]:
    """Merge a node's own settings over the run config and check them.

    A real node brings its own ``data-path`` (then its whole file is its data:
    one partition of one), ``state-dir`` (privacy ledger, last global state),
    ``secret-context`` and ``epsilon-budget``; these never come from the server's
    run config on a deployed node, so a node cannot be pointed at another node's
    files by the server. In simulation the driver passes them in the run config.
    """
    unknown = sorted(set(node_config) - NODE_KEYS)
    if unknown:
        raise NodeConfigKeyError(
            f"Unknown node-config key(s) {unknown}; a fedtune node accepts "
            f"{', '.join(sorted(NODE_KEYS))}."
        )
    merged = dict(flat)
    if deployed:
        for key in ("data-path", "secret-context", "state-dir"):
            merged.pop(key, None)
    for key in ("data-path", "state-dir", "secret-context", "epsilon-budget"):
        if key in node_config:
            merged[key] = node_config[key]
    own_data = deployed and bool(node_config.get("data-path"))
    default_parts = (0, 1) if own_data else (None, None)
    for key, default in zip(("partition-id", "num-partitions"), default_parts, strict=True):
        value = node_config.get(key, default)
        if value is None:
            raise NodeConfigKeyError(
                f"node-config needs `{key}` (or a `data-path` of the node's own data)."
            )
        merged[key] = int(str(value))
    merged["name"] = str(node_config.get("name") or f"client-{merged['partition-id']}")
    return merged


def runtime_for(
    flat: Mapping[str, object],
    node_config: Mapping[str, object],
    *,
    run_id: int,
    deployed: bool,
) -> ClientRuntime:
    """Build (once per process, run and partition) the client's runtime.

    Simulation actors and node workers serve many messages; the runtime is kept in
    a process-local cache filled on first use (never at import). It holds only the
    client's own state: the model, tokenizer, codec and the data set are the
    worker's (:mod:`fedtune.train.shared`), the tokenised partition sits in its
    bounded LRU.
    """
    merged = node_settings(flat, node_config, deployed=deployed)
    partition_id = int(str(merged.pop("partition-id")))
    num_partitions = int(str(merged.pop("num-partitions")))
    name = str(merged.pop("name"))
    node_ceremony.use_party_file(merged, node_config, run_id=run_id, name=name, deployed=deployed)
    wiring = parse_wiring(merged)
    state_dir = wiring.state_dir
    # A deployed node's policy is its own (STATE_DIR/policy.toml and its node config),
    # read for every message: the worker may outlive an edit of the file.
    own_policy = load_policy(state_dir, node_config) if deployed else None
    # A node keeps its ledger in its own state directory; a simulation in RUN_DIR/privacy
    # (``run-dir``, else the run directory of this Flower run, as the server names it).
    privacy_dir = (state_dir or wiring.run_dir_for(run_id)) / "privacy"
    ledger_run = wiring.run_name(run_id)
    digest = hashlib.sha256(repr(sorted((k, str(v)) for k, v in merged.items())).encode())
    key = (digest.hexdigest(), run_id, partition_id, num_partitions, name, own_policy)
    if key not in _RUNTIMES:
        # The one resolve of this client's run config (this party's run context).
        cfg: RunConfig = resolve(merged).config
        if deployed and state_dir is None and cfg.privacy.enabled:
            raise NodeConfigKeyError(
                "DP is on: this node's node-config needs `state-dir` for its ledger."
            )
        if deployed and cfg.privacy.seeded_noise:
            raise ConfigError(
                "`seeded-noise` = true is for simulations only: a deployed node draws its "
                "DP noise from a CSPRNG. Remove it from the run config."
            )
        if deployed:
            _node_policy(cfg, node_config)
        if deployed and cfg.privacy.audit_canaries:
            raise ConfigError(
                "`audit-canaries` is for simulations only: a deployed node trains on its "
                "own data and nothing else. Remove it from the run config."
            )
        # Both paths run the same checks; a simulated client's policy is the run config's.
        policy = own_policy if own_policy is not None else NodePolicy.from_run_config(cfg)
        policy.check_run(cfg)
        _check_model_pin(policy, cfg)
        runtime = ClientRuntime(
            cfg,
            partition_id=partition_id,
            num_partitions=num_partitions,
            name=name,
            secret_context=wiring.secret_context,
            privacy_dir=privacy_dir,
            state_dir=state_dir,
            run_id=ledger_run,
            policy=policy,
        )
        if cfg.privacy.enabled:  # before any training: a δ >= 1/n_k promises nothing
            runtime.policy.check_examples(runtime.num_train_examples)
        _RUNTIMES[key] = runtime
    return _RUNTIMES[key]


def _check_model_pin(policy: NodePolicy, cfg: RunConfig) -> None:
    """A deployed node loads a pinned model only if its files still hash to the pin.

    Runs after :meth:`NodePolicy.check_run` accepted the path (so it is one the node
    itself pinned: nothing here touches a path the server chose).
    """
    if policy.source != "node":
        return
    pin = policy.model_pin(cfg.model.model_path)
    if pin is None:
        return

    try:
        digest = model_digest(Path(pin.path))
    except (OSError, ModelError):
        digest = ""
    if digest != pin.sha256:
        raise PolicyError(
            "node policy: a pinned base model no longer matches the SHA-256 in this node's "
            "policy; the node's owner re-pins it (`fedtune deploy supernode --model DIR`).",
            key="model-path",
        )


def _node_policy(cfg: RunConfig, node_config: Mapping[str, object]) -> None:
    """What a real node refuses whatever run config it is sent (by the server or an app).

    A node with its own ``epsilon-budget`` trains only with DP (a run with ``dp`` off
    would release updates its ledger never counts); a node holding a CKKS secret
    context sends only encrypted updates.
    """
    if "epsilon-budget" in node_config and not cfg.privacy.enabled:
        raise ConfigError(
            "this node has its own `epsilon-budget`, so it trains only with DP; the run "
            'config has `dp` = "off". Submit the run with `dp` = "example" or "client".'
        )
    if node_config.get("secret-context") and not cfg.crypto.encryption:
        raise ConfigError(
            "this node holds a CKKS secret context, so it sends only encrypted updates; the "
            "run config has `encryption` = false. Submit the run with `encryption` = true."
        )


def _global_state(
    runtime: ClientRuntime, content: RecordDict, *, server_round: int
) -> GlobalState | None:
    """The global sum of round ``server_round`` a message brings, verified before any use.

    A key holder checks the receipts the server lists with it
    (:func:`fedtune.secure.verify.check_global`): it refuses with a fixed code, before
    decrypting anything, a sum it cannot prove is one of at least ``min-clients``
    authenticated uploads of this round, or a second, different sum for one round.
    """
    if "global" not in content.config_records:
        return None
    record = content.config_records["global"]
    payload = {k: record[k] for k in ("chunks", "length", "fingerprint") if k in record}
    state = GlobalState(payload=payload, num_examples=_int(record, "num-examples"))
    verify.check_runtime_global(runtime, record, state, server_round=server_round)
    return state


def _int(record: ConfigRecord, key: str) -> int:
    """An integer field of a server message (checked: the codec validates the rest)."""
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ServerMessageError(f"server message field {key!r} must be an integer, got {value!r}.")
    return value


def _server_config(content: RecordDict) -> ConfigRecord:
    if "config" not in content.config_records:
        raise ServerMessageError("server message has no 'config' record.")
    return content.config_records["config"]


def _evaluation(
    runtime: ClientRuntime, state: GlobalState | None, server_round: int
) -> tuple[dict[str, object] | None, str]:
    """The held-out metrics of round ``server_round``'s global state, or a refusal code.

    With DP on they are a release (:meth:`ClientRuntime.evaluation`): noised and
    accounted (status ``"dp"``), or exact by the node's own policy (``"held-out"``).
    Returns ``(metrics, "")`` or ``(None, code)``; the fields are checked here.
    """
    outcome = runtime.evaluation(state, server_round=server_round)
    if outcome.declined:
        return None, outcome.declined
    metrics: dict[str, object] = {
        "num-examples": outcome.num_examples,
        **outcome.metrics,
        "partition-id": runtime.partition_id,
    }
    check_reply(
        {"info": {"client": runtime.name}, "metrics": metrics},
        phase="evaluate",
        private=runtime.cfg.privacy.enabled,
        held_out=runtime.task.eval_metrics,
        evaluation=outcome.status,
    )
    return metrics, ""


def train(runtime: ClientRuntime, content: RecordDict) -> RecordDict:
    """A train message: (evaluate the global it brings, if asked, then) train, reply."""
    server_config = _server_config(content)
    server_round = _int(server_config, "server-round")
    sampled = _int(server_config, "sampled-clients") if "sampled-clients" in server_config else 0
    state = _global_state(runtime, content, server_round=server_round - 1)
    asked = "evaluate-round" in server_config
    if asked and (evaluate_round := _int(server_config, "evaluate-round")) != server_round - 1:
        raise ServerMessageError(
            f"server message asks to evaluate round {evaluate_round} in the train "
            f"message of round {server_round}; it carries round {server_round - 1}'s state."
        )
    # The sum the server sent is the result of round server_round - 1 (kept once).
    runtime.keep_global(state, server_round=server_round - 1)
    # A declined evaluation sends no ``evaluation`` record (the server drops it as missing).
    evaluation = _evaluation(runtime, state, server_round - 1)[0] if asked else None
    outcome = runtime.train(state, server_round=server_round, sampled_clients=sampled)
    outcome = verify.sign_outcome(runtime, outcome, server_round=server_round)  # the upload's tag
    return train_reply(runtime, outcome, evaluation=evaluation)


def evaluate(runtime: ClientRuntime, content: RecordDict) -> RecordDict:
    """An evaluate message: the held-out metrics of the global state it brings."""
    server_round = _int(_server_config(content), "server-round")
    state = _global_state(runtime, content, server_round=server_round)
    runtime.keep_global(state, server_round=server_round)
    metrics, declined = _evaluation(runtime, state, server_round)
    if metrics is None:
        return RecordDict({"info": ConfigRecord({"client": runtime.name, "declined": declined})})
    return RecordDict(
        {
            "info": ConfigRecord({"client": runtime.name}),
            "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
        }
    )


def handle(
    message_type: str,
    content: RecordDict,
    *,
    run_config: Mapping[str, object],
    node_config: Mapping[str, object],
    run_id: int,
    deployed: bool,
) -> RecordDict:
    """The reply content to one server message (``"train"`` or ``"evaluate"``)."""
    if message_type not in ("train", "evaluate"):
        raise ServerMessageError(
            f"a fedtune node answers train and evaluate messages, not {message_type!r}."
        )
    if node_ceremony.CEREMONY in content.config_records:  # ckks-multiparty, before round 1
        merged = node_settings(run_config, node_config, deployed=deployed)
        return node_ceremony.reply(content, merged, node_config, run_id=run_id, deployed=deployed)
    threads = node_threads()  # this node's share of the machine (fedtune.node.cores)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # per message: gRPC may hand it another thread
    runtime = runtime_for(run_config, node_config, run_id=run_id, deployed=deployed)
    if "blame" in content.config_records:  # the blame step of verified aggregation
        return verify.blame_reply(runtime, content)
    if "ready" in content.config_records:  # ckks-multiparty: the liveness probe
        return verify.ready_reply(runtime)
    if "decrypt" in content.config_records:  # ckks-multiparty: one partial decryption
        return verify.partial_reply(runtime, content)
    if message_type == "train":
        return train(runtime, content)
    return evaluate(runtime, content)


def train_reply(
    runtime: ClientRuntime,
    outcome: TrainOutcome,
    *,
    evaluation: Mapping[str, object] | None = None,
) -> RecordDict:
    """The train reply: only fields :mod:`fedtune.messages` allows (checked here)."""
    private = runtime.cfg.privacy.enabled
    info: dict[str, object] = {"client": runtime.name, "declined": outcome.declined}
    content: dict[str, dict[str, object]] = {"info": info}
    if outcome.payload is not None:  # declined: nothing else to send
        metrics: dict[str, object] = {
            "num-examples": outcome.num_examples,
            "partition-id": runtime.partition_id,
        }
        if private:
            assert outcome.epsilon is not None  # a DP release always has its ε
            metrics["epsilon"] = outcome.epsilon
        elif outcome.result is not None:
            metrics["train-loss"] = outcome.result.loss
            metrics["train-seconds"] = outcome.result.seconds
        content["update"] = dict(outcome.payload)
        content["metrics"] = metrics
    if evaluation is not None:
        content["evaluation"] = dict(evaluation)
    check_reply(content, phase="train", private=private, held_out=runtime.task.eval_metrics)
    records = {
        name: MetricRecord(values) if name in ("metrics", "evaluation") else ConfigRecord(values)  # type: ignore[arg-type]
        for name, values in content.items()
    }
    return RecordDict(records)  # type: ignore[arg-type]
