"""The fedtune ServerApp: resolve the run once, build the strategy, run the loop.

The server holds no secret key and no data. Each round it samples clients and
sends each one message: the current global sum to train from, and (to the clients
sampled for evaluation) a request for the held-out metrics of that sum; it adds
the (possibly encrypted) updates and checkpoints the new sum. One evaluation
follows the last round. It writes one line of ``metrics.jsonl`` per round (round 0
evaluates the initial adapter).

Read in order: :func:`fedtune.apps.server.context.resolve_server` (config, wiring,
task, codec, capacity, run directory), :func:`build_strategy`, and
:func:`fedtune.apps.server.loop.run_federation` (resume, rounds, checkpoints, the
console).
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedtune.apps.server.context import (
    ServerRun,
    check_keys,
    resolve_server,
    server_capacity,
    server_codec,
    with_default_labels,
)
from fedtune.apps.server.loop import resume_round, run_federation, run_rounds
from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.config import (
    parse_node_limits,
)

__all__ = [
    "app",
    "build_strategy",
    "check_keys",
    "make_server_app",
    "parse_node_limits",
    "resume_round",
    "run_rounds",
    "server_capacity",
    "server_codec",
    "with_default_labels",
]


def build_strategy(run: ServerRun) -> FedTuneStrategy:
    """The strategy for a resolved run, its limits printed once."""
    cfg = run.cfg
    strategy = FedTuneStrategy(
        codec=run.codec,
        fraction_train=cfg.federation.fraction_train,
        fraction_evaluate=cfg.federation.fraction_evaluate,
        min_clients=cfg.federation.min_clients,
        seed=cfg.federation.seed,
        client_dp_tolerance=(
            cfg.privacy.client_dp_tolerance if cfg.privacy.dp == "client" else None
        ),
        max_client_examples=cfg.federation.max_client_examples,
        max_weight_factor=cfg.federation.max_weight_factor,
        node_limits=run.wiring.node_limits,
        capacity=run.capacity,
        eval_metrics=run.task.eval_metrics,
    )
    strategy.blame_allowed = cfg.privacy.dp == "example"  # each upload is a DP release
    strategy.summary()
    if strategy.node_limits:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            "per-node example limits (set at registration): "
            + ", ".join(f"node {k} <= {v}" for k, v in sorted(strategy.node_limits.items()))
        )
    return strategy


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
        run = resolve_server(flat, run_id=context.run_id, grid=grid)
        run_federation(grid, run, build_strategy(run))

    return app


#: The ServerApp that ``flwr run`` loads (``[tool.flwr.app.components]``).
app = make_server_app()
