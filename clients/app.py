"""The fedtune ClientApp: translate Flower messages into :class:`ClientRuntime` calls.

Message contents (keys in the ``RecordDict``):

* server -> client: ``config`` (ConfigRecord: ``server-round``, and for train
  messages ``sampled-clients``, the number of clients trained this round), and from
  round 2 on ``global`` (ConfigRecord: a wire payload of ``sum n_k w_k`` plus
  ``num-examples``).
* client -> server (train): ``update`` (ConfigRecord: the wire payload of
  ``n_k w_k``), ``info`` (ConfigRecord: ``client``, ``declined``), ``metrics``
  (MetricRecord: ``num-examples``, ``partition-id``; ``epsilon`` with DP on;
  ``train-loss`` and ``train-seconds`` only with DP off). A client that declines
  (its privacy budget, or a second release of one round) replies with ``info``
  only, ``declined`` saying why.
* client -> server (evaluate): ``info`` and ``metrics`` (``num-examples``,
  ``eval-loss``, ``eval-accuracy``, ``partition-id``).

The privacy status of every field is declared in :mod:`fedtune.messages`; each reply
is checked against it before it leaves.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.config import WIRING_KEYS, ConfigError, RunConfig, parse_run_config, parse_wiring
from fedtune.messages import check_reply
from fedtune.train.runtime import ClientRuntime, GlobalState, TrainOutcome

#: This process's clients (their own state only: the model and data are shared, see
#: :mod:`fedtune.train.shared`), by run config digest, partition and name.
_RUNTIMES: dict[tuple[object, ...], ClientRuntime] = {}

#: The node config Flower's simulation engine gives each simulated SuperNode.
SIMULATION_NODE_KEYS = frozenset({"partition-id", "num-partitions"})


#: Node-config keys a SuperNode may set (``flower-supernode --node-config``).
NODE_KEYS = frozenset(
    {
        "partition-id",
        "num-partitions",
        "name",
        "data-path",
        "state-dir",
        "secret-context",
        "epsilon-budget",
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
        raise ValueError(
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
            raise ValueError(
                f"node-config needs `{key}` (or a `data-path` of the node's own data)."
            )
        merged[key] = int(str(value))
    merged["name"] = str(node_config.get("name") or f"client-{merged['partition-id']}")
    return merged


def simulated_node(node_config: Mapping[str, object]) -> bool:
    """Whether this ClientApp runs on Flower's simulation engine, not on a real node.

    ``flwr run`` on a local simulation (``--federation-config "num-supernodes=N"``
    or a ``:local:`` SuperLink connection) runs ClientApps in Ray actors with the
    node config ``partition-id`` / ``num-partitions`` and nothing else. A real node
    runs them in ``flwr-clientapp`` processes, never in a Ray actor, and a fedtune
    node always has a ``state-dir`` (``fedtune deploy supernode`` sets it). Only a
    simulated node takes paths (``data-path``, ``secret-context``, ``run-dir``) from
    the run config, as it does under ``fedtune simulate``.
    """
    if set(node_config) != SIMULATION_NODE_KEYS:
        return False
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().get_actor_id() is not None


def _runtime(flat: Mapping[str, object], context: Context, *, deployed: bool) -> ClientRuntime:
    """Build (once per process and partition) the client's runtime.

    Simulation actors serve many messages; the runtime is kept in a process-local
    cache filled on first use (never at import). It holds only the client's own
    state: the model, tokenizer, codec and the data set are the worker's
    (:mod:`fedtune.train.shared`), the tokenised partition sits in its bounded LRU.
    """
    merged = node_settings(flat, dict(context.node_config), deployed=deployed)
    partition_id = int(str(merged.pop("partition-id")))
    num_partitions = int(str(merged.pop("num-partitions")))
    name = str(merged.pop("name"))
    wiring = parse_wiring(merged)
    state_dir = wiring.state_dir
    if (
        deployed
        and state_dir is None
        and parse_run_config(merged, ignore=WIRING_KEYS).privacy.enabled
    ):
        raise ValueError("DP is on: this node's node-config needs `state-dir` for its ledger.")
    # A node keeps its ledger in its own state directory; a simulation in RUN_DIR/privacy
    # (``run-dir``, else the run directory of this Flower run, as the server names it).
    privacy_dir = (state_dir or wiring.run_dir_for(context.run_id)) / "privacy"
    run_id = wiring.run_name(context.run_id)
    digest = hashlib.sha256(repr(sorted((k, str(v)) for k, v in merged.items())).encode())
    key = (
        digest.hexdigest(),
        context.run_id,
        partition_id,
        num_partitions,
        name,
    )
    if key not in _RUNTIMES:
        cfg: RunConfig = parse_run_config(merged, ignore=WIRING_KEYS)
        if deployed and cfg.privacy.seeded_noise:
            raise ConfigError(
                "`seeded-noise` = true is for simulations only: a deployed node draws its "
                "DP noise from a CSPRNG. Remove it from the run config."
            )
        if deployed and cfg.privacy.audit_canaries:
            raise ConfigError(
                "`audit-canaries` is for simulations only: a deployed node trains on its "
                "own data and nothing else. Remove it from the run config."
            )
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        _RUNTIMES[key] = ClientRuntime(
            cfg,
            partition_id=partition_id,
            num_partitions=num_partitions,
            name=name,
            secret_context=wiring.secret_context,
            privacy_dir=privacy_dir,
            state_dir=state_dir,
            run_id=run_id,
        )
    return _RUNTIMES[key]


def _deployed(config: Mapping[str, object] | None, context: Context) -> bool:
    """A real node: ``flwr run`` against a deployment (not a simulation, not Python-driven)."""
    return config is None and not simulated_node(dict(context.node_config))


def _global_state(msg: Message) -> GlobalState | None:
    if "global" not in msg.content.config_records:
        return None
    record = msg.content.config_records["global"]
    payload = {k: record[k] for k in ("chunks", "length", "fingerprint") if k in record}
    return GlobalState(payload=payload, num_examples=_int(record, "num-examples"))


def _int(record: ConfigRecord, key: str) -> int:
    """An integer field of a server message (checked: the codec validates the rest)."""
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"server message field {key!r} must be an integer, got {value!r}.")
    return value


def make_client_app(config: Mapping[str, object] | None = None) -> ClientApp:
    """Build the ClientApp.

    Parameters
    ----------
    config : Mapping[str, object] | None
        Flat run config for Python-driven simulations (``run_simulation`` passes no
        run config); ``None`` reads ``context.run_config`` as ``flwr run`` sets it.
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        flat = dict(config) if config is not None else dict(context.run_config)
        runtime = _runtime(flat, context, deployed=_deployed(config, context))
        server_config = msg.content.config_records["config"]
        server_round = _int(server_config, "server-round")
        sampled = (
            _int(server_config, "sampled-clients") if "sampled-clients" in server_config else 0
        )
        state = _global_state(msg)
        # The sum the server sent is the result of round server_round - 1.
        runtime.keep_global(state, server_round=server_round - 1)
        outcome = runtime.train(state, server_round=server_round, sampled_clients=sampled)
        return Message(train_reply(runtime, outcome), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        flat = dict(config) if config is not None else dict(context.run_config)
        runtime = _runtime(flat, context, deployed=_deployed(config, context))
        state = _global_state(msg)
        server_round = _int(msg.content.config_records["config"], "server-round")
        runtime.keep_global(state, server_round=server_round)
        result = runtime.evaluate(state, server_round=server_round)
        info: dict[str, object] = {"client": runtime.name}
        metrics: dict[str, object] = {
            "num-examples": result.num_examples,
            **result.metrics(),
            "partition-id": runtime.partition_id,
        }
        check_reply(
            {"info": info, "metrics": metrics},
            phase="evaluate",
            private=runtime.cfg.privacy.enabled,
            held_out=runtime.task.eval_metrics,
        )
        reply = RecordDict(
            {"info": ConfigRecord(info), "metrics": MetricRecord(metrics)}  # type: ignore[arg-type]
        )
        return Message(reply, reply_to=msg)

    return app


def train_reply(runtime: ClientRuntime, outcome: TrainOutcome) -> RecordDict:
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
    check_reply(content, phase="train", private=private)
    records = {
        name: MetricRecord(values) if name == "metrics" else ConfigRecord(values)  # type: ignore[arg-type]
        for name, values in content.items()
    }
    return RecordDict(records)  # type: ignore[arg-type]


#: The ClientApp that ``flwr run`` loads (``[tool.flwr.app.components]``).
app = make_client_app()
