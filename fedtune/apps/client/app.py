"""The fedtune ClientApp: hand each Flower message to the node's round code.

On a real node this app is thin: it imports no torch and forwards each message to
the node's long-lived worker (:mod:`fedtune.node.worker`) over the Unix socket named
by the node config's ``worker`` key (``fedtune deploy supernode`` sets it), then
sends the worker's reply back. Flower starts a fresh ``flwr-clientapp`` process for
every message, so all that costs time (torch, the model, the data, the calibrated
noise) lives in the worker, and all that is secret (the data, ``secret.ctx``, the
ledger) too: this process may run as a user who cannot read them.

In a simulation (``fedtune simulate``, or ``flwr run`` on Flower's local simulation)
the same round code (:mod:`fedtune.node.round`) runs in this process, the Ray actor
that serves many clients. Message contents are documented there.

Whatever goes wrong, what leaves the node is one fixed code
(:data:`fedtune.node.codes.CODES`): Flower would otherwise put the exception's text,
which may hold values, into the error reply the server logs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune.errors import NodeConfigError, NodeRefusal, WorkerError, WorkerUnavailable
from fedtune.node.channel import forward, wait_ready
from fedtune.node.codes import code_of

log = logging.getLogger("fedtune.client")

#: The node config Flower's simulation engine gives each simulated SuperNode.
SIMULATION_NODE_KEYS = frozenset({"partition-id", "num-partitions"})

#: Node-config keys of a real node's SuperNode: the worker's socket, how long to wait
#: for it to be ready (seconds; a restarting worker), and the node's name.
WORKER_KEYS = frozenset({"worker", "worker-wait", "name"})

#: Seconds a message waits for a (re)starting worker before the node sits the round out.
WORKER_WAIT = 60.0


def simulated_node(node_config: Mapping[str, object]) -> bool:
    """Whether this ClientApp runs on Flower's simulation engine, not on a real node.

    ``flwr run`` on a local simulation (``--federation-config "num-supernodes=N"``
    or a ``:local:`` SuperLink connection) runs ClientApps in Ray actors with the
    node config ``partition-id`` / ``num-partitions`` and nothing else. A real node
    runs them in ``flwr-clientapp`` processes, never in a Ray actor, and a fedtune
    node always has a ``worker`` (``fedtune deploy supernode`` sets it). Only a
    simulated node takes paths (``data-path``, ``secret-context``, ``run-dir``) from
    the run config, as it does under ``fedtune simulate``.
    """
    if set(node_config) != SIMULATION_NODE_KEYS:
        return False
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().get_actor_id() is not None


def _forward(kind: str, msg: Message, context: Context) -> RecordDict:
    """A real node: the worker's reply (it holds the model, the data and the keys)."""
    node = dict(context.node_config)
    unknown = sorted(set(node) - WORKER_KEYS)
    if "worker" not in node or unknown:
        raise NodeConfigError(
            "This ClientApp runs on a real node but its node config "
            + (f"has unknown key(s) {unknown}" if unknown else "names no `worker`")
            + "; start the node with `fedtune deploy supernode`, which starts the node's "
            "worker and gives the SuperNode its socket."
        )
    address = str(node["worker"])
    wait = float(str(node.get("worker-wait", WORKER_WAIT)))
    if not wait_ready(address, timeout=wait):
        state = "is not ready" if Path(address).exists() else "is not running (no socket)"
        raise WorkerUnavailable(
            f"this node's fedtune worker at {address} {state} after waiting up to "
            f"{wait:.0f} s; the node sits out this round. Is `fedtune deploy supernode` "
            "running (see its log)?"
        )
    return forward(
        address,
        kind,
        msg.content,
        run_id=int(context.run_id),
        run_config=dict(context.run_config),
    )


def _in_process(
    kind: str, msg: Message, context: Context, config: Mapping[str, object] | None
) -> RecordDict:
    """A simulated client: the round code runs here (the actor keeps the model loaded)."""
    from fedtune.node import round as node_round  # imports torch

    flat = dict(config) if config is not None else dict(context.run_config)
    return node_round.handle(
        kind,
        msg.content,
        run_config=flat,
        node_config=dict(context.node_config),
        run_id=int(context.run_id),
        deployed=False,
    )


def _code(err: Exception, code_of: Callable[[BaseException], str]) -> str:
    """The fixed code an error leaves this node as (its text stays in the node's log)."""
    if isinstance(err, WorkerUnavailable):
        return "worker-unavailable"
    if isinstance(err, WorkerError):
        return err.code
    return code_of(err)


def make_client_app(config: Mapping[str, object] | None = None) -> ClientApp:
    """Build the ClientApp.

    Parameters
    ----------
    config : Mapping[str, object] | None
        Flat run config for Python-driven simulations (``run_simulation`` passes no
        run config); ``None`` reads ``context.run_config`` as ``flwr run`` sets it.
        ``None`` on a node that is not simulated means a real node: messages go to
        its worker.
    """
    app = ClientApp()

    def reply(kind: str, msg: Message, context: Context) -> Message:
        try:
            if config is None and not simulated_node(dict(context.node_config)):
                content = _forward(kind, msg, context)
            else:
                content = _in_process(kind, msg, context, config)
        except Exception as err:  # noqa: BLE001 - Flower would send str(err) to the server
            code = _code(err, code_of)
            log.warning("%s message refused (%s): %s", kind, code, err)
            raise NodeRefusal(code) from None
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return reply("train", msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return reply("evaluate", msg, context)

    return app


#: The ClientApp that ``flwr run`` loads (``[tool.flwr.app.components]``).
app = make_client_app()
