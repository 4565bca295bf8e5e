"""The fedtune ClientApp: translate Flower messages into :class:`ClientRuntime` calls.

Message contents (keys in the ``RecordDict``):

* server -> client: ``config`` (ConfigRecord: ``server-round``), and from round 2
  on ``global`` (ConfigRecord: a wire payload of ``sum n_k w_k`` plus
  ``num-examples``).
* client -> server (train): ``update`` (ConfigRecord: the wire payload of
  ``n_k w_k``), ``info`` (ConfigRecord: ``client``, ``declined``), ``metrics``
  (MetricRecord: ``num-examples``, ``train-loss``, ``train-seconds``,
  ``partition-id``, and ``epsilon`` with DP on). A client that declines (its
  privacy budget would be exceeded) replies with ``info`` only, ``declined``
  saying why.
* client -> server (evaluate): ``info`` and ``metrics`` (``num-examples``,
  ``eval-loss``, ``eval-accuracy``, ``partition-id``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client import ClientRuntime, GlobalState
from fedtune.config import WIRING_KEYS, RunConfig, parse_run_config

_RUNTIMES: dict[tuple[object, ...], ClientRuntime] = {}


def _runtime(flat: Mapping[str, object], context: Context) -> ClientRuntime:
    """Build (once per process and partition) the client's runtime.

    Simulation actors serve many messages; rebuilding the model and re-tokenising
    the partition each time would dominate a round, so the runtime is kept in a
    process-local cache filled on first use (never at import).
    """
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    secret = str(flat.get("secret-context", "") or "")
    run_dir = str(flat.get("run-dir", "") or "")
    state_dir = str(context.node_config.get("state-dir", "") or flat.get("state-dir", "") or "")
    # A node keeps its ledger in its own state directory; a simulation in RUN_DIR/privacy.
    privacy_dir = Path(state_dir) / "privacy" if state_dir else Path(run_dir or ".") / "privacy"
    run_id = str(flat.get("run-id", "") or Path(run_dir or "run").name)
    key = (tuple(sorted((k, str(v)) for k, v in flat.items())), partition_id, num_partitions)
    if key not in _RUNTIMES:
        cfg: RunConfig = parse_run_config(flat, ignore=WIRING_KEYS)
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        _RUNTIMES[key] = ClientRuntime(
            cfg,
            partition_id=partition_id,
            num_partitions=num_partitions,
            secret_context=Path(secret) if secret else None,
            privacy_dir=privacy_dir,
            run_id=run_id,
        )
    return _RUNTIMES[key]


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
        runtime = _runtime(flat, context)
        server_round = _int(msg.content.config_records["config"], "server-round")
        outcome = runtime.train(_global_state(msg), server_round=server_round)
        info = ConfigRecord({"client": runtime.name, "declined": outcome.declined})
        if outcome.payload is None or outcome.result is None:  # declined: nothing to send
            return Message(RecordDict({"info": info}), reply_to=msg)
        metrics: dict[str, int | float | list[int] | list[float]] = {
            "num-examples": outcome.num_examples,
            "train-loss": outcome.result.loss,
            "train-seconds": outcome.result.seconds,
            "partition-id": runtime.partition_id,
        }
        if outcome.epsilon is not None:
            metrics["epsilon"] = outcome.epsilon
        reply = RecordDict(
            {
                "update": ConfigRecord(dict(outcome.payload)),
                "info": info,
                "metrics": MetricRecord(metrics),
            }
        )
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        flat = dict(config) if config is not None else dict(context.run_config)
        runtime = _runtime(flat, context)
        result = runtime.evaluate(_global_state(msg))
        reply = RecordDict(
            {
                "info": ConfigRecord({"client": runtime.name}),
                "metrics": MetricRecord(
                    {
                        "num-examples": result.num_examples,
                        "eval-loss": result.loss,
                        "eval-accuracy": result.accuracy,
                        "partition-id": runtime.partition_id,
                    }
                ),
            }
        )
        return Message(reply, reply_to=msg)

    return app


#: The ClientApp that ``flwr run`` loads (``[tool.flwr.app.components]``).
app = make_client_app()
