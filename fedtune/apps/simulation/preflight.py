"""Checks of a simulated run that used to fail inside every client, made before Ray starts.

Each of these failed in the clients' first message, after Ray and the model had
started (tens of seconds), once per client, as a Ray trace: ``device = "cuda"`` on a
machine without CUDA, a DP ``batch-size`` larger than a client's training data, and
``num-rounds`` that the privacy budget cannot afford. :func:`check_run` makes the same
checks in the driver, with the same code the clients run (the client's data split and
:func:`fedtune.train.plan.privacy_plan` on the simulated client's policy), and raises
one :class:`~fedtune.config.ConfigError` naming the key, its value and the fix.
"""

from __future__ import annotations

from fedtune import data as fdata
from fedtune.config import RunConfig
from fedtune.errors import ConfigError
from fedtune.privacy.policy import NodePolicy
from fedtune.tasks import get_task
from fedtune.train.plan import check_evaluations_fit

__all__ = ["check_run", "client_train_sizes"]


def check_run(cfg: RunConfig) -> None:
    """Raise a ``ConfigError`` for a run that every (or some) client would refuse."""
    check_device(cfg)
    if not cfg.privacy.enabled:
        return
    sizes = client_train_sizes(cfg)
    if sizes is None:
        return
    if cfg.privacy.dp == "example":
        check_dp_batch(cfg, sizes)
    check_budget(cfg, sizes)


def check_device(cfg: RunConfig) -> None:
    """``device = "cuda"`` needs a CUDA device in this machine."""
    if cfg.train.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "`device` = 'cuda', but this machine has no CUDA device "
            "(torch.cuda.is_available() is False); set `device` = 'auto' (CUDA when "
            "present, else the CPU) or 'cpu'."
        )


def client_train_sizes(cfg: RunConfig) -> dict[str, int] | None:
    """Each simulated client's training examples (classification; ``None`` for other tasks).

    The same split the clients make (:func:`fedtune.data.client_data`), from the data
    the preflight has already loaded (it is memoised per process).
    """
    if not get_task(cfg.model.task).uses_labels:
        return None

    fed = cfg.federation
    dataset = fdata.load_data(cfg.data, seed=fed.seed)
    return {
        f"client-{k}": len(
            fdata.client_data(
                dataset, cfg.data, partition_id=k, num_partitions=fed.num_clients, seed=fed.seed
            ).train_texts
        )
        for k in range(fed.num_clients)
    }


def check_dp_batch(cfg: RunConfig, sizes: dict[str, int]) -> None:
    """Under example-level DP, ``batch-size`` is the expected Poisson batch: at most n_k."""
    name, smallest = min(sizes.items(), key=lambda item: item[1])
    if cfg.train.batch_size > smallest:
        raise ConfigError(
            f"`batch-size` = {cfg.train.batch_size} is larger than {name}'s {smallest} "
            "training examples (DP-SGD samples batches of about `batch-size` from them); "
            f"set `batch-size` <= {smallest}, or give each client more data (fewer "
            "`num-clients`, a larger `max-examples`)."
        )


def check_budget(cfg: RunConfig, sizes: dict[str, int]) -> None:
    """The planned rounds must fit the privacy budget, as each client checks first.

    A client with DP held-out evaluation (its policy's default) refuses a run whose
    ``num-rounds + 1`` evaluations alone would spend ``target-epsilon``
    (:func:`fedtune.train.plan.privacy_plan`); the same check, made here once. The
    calibration of σ itself is left to the clients (it takes seconds, and it succeeds
    whenever this check passes).
    """
    del sizes  # the evaluations' cost does not depend on n_k

    policy = NodePolicy.from_run_config(cfg)
    if policy.evaluation != "dp" or cfg.privacy.noise_multiplier:
        return
    evaluations = [(policy.eval_noise_multiplier, 1.0, cfg.federation.num_rounds + 1)]
    try:
        check_evaluations_fit(cfg, evaluations, delta=policy.delta)
    except ConfigError as err:
        raise ConfigError(
            f"`num-rounds` = {cfg.federation.num_rounds} does not fit the privacy budget: "
            f"{err} Or plan fewer `num-rounds`."
        ) from err
