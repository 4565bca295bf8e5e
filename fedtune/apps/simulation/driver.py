"""Drive a simulated federation on Flower's simulation engine (Ray backend).

The driver is the key holder of a simulated run: it checks the configuration
before any process starts, writes the run directory, starts Flower's
simulation engine in this process tree (ServerApp in a thread, ClientApps in Ray
actors), and when the run ends decodes the last checkpoint and writes the final
PEFT adapter, the metrics plot and a summary. Ray is shut down by Flower before
:func:`run_simulation` returns, so nothing is left running.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.apps.server.app import make_server_app
from fedtune.apps.server.context import ADAPTER_LENGTH
from fedtune.apps.simulation.clients import observed_client_app
from fedtune.apps.simulation.flower_patches import flower_patches
from fedtune.apps.simulation.hooks import ClientFailuresToLog, server_hooks
from fedtune.apps.simulation.preflight import check_run
from fedtune.apps.simulation.progress import CLIENTS_LOG, RunProgress
from fedtune.apps.simulation.resume import checkpoint_round, prepare_resume
from fedtune.apps.simulation.signals import RunStop
from fedtune.config import RunConfig
from fedtune.errors import ConfigError, FederationError
from fedtune.model.quantize import check_quantization_backend
from fedtune.privacy.policy import NodePolicy
from fedtune.privacy.policy_file import write_policy
from fedtune.resolve import resolve
from fedtune.run.card import run_settings
from fedtune.run.export import export_adapter
from fedtune.run.metrics import plot_metrics, read_records
from fedtune.secure import get_backend
from fedtune.secure.multiparty.backend import write_keys
from fedtune.secure.multiparty.global_file import has_pending_decryption
from fedtune.tasks import get_task
from fedtune.train.shared import process_model

log = logging.getLogger("fedtune")


@dataclass(frozen=True)
class SimulationResult:
    """Where a finished simulation left its outputs."""

    run_dir: Path
    records: list[dict[str, Any]]
    adapter_dir: Path
    seconds: float


def preflight(cfg: RunConfig) -> RunConfig:
    """Check data, partitions and model before any process starts.

    Returns the config with ``label-names`` resolved from the data, so that every
    client and the server agree on the label order.
    """
    cuda = False if cfg.train.device == "cpu" else None  # None: whether CUDA is available
    check_quantization_backend(cfg.model.base_quantization, cuda=cuda)
    return get_task(cfg.model.task).preflight(cfg)


def new_run_dir(base: Path = Path("runs")) -> Path:
    """A fresh ``runs/<timestamp>`` directory name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / stamp
    i = 1
    while path.exists():
        path = base / f"{stamp}-{i}"
        i += 1
    return path


class _DropRunSimulationDeprecation(logging.Filter):
    """Hide Flower's notice that ``run_simulation`` is deprecated (we know; see README)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def _backend_config(cfg: RunConfig, tmp: Path, *, verbose: bool) -> dict[str, Any]:
    import torch

    cores = os.cpu_count() or 1
    cpus = cfg.federation.client_cpus or cores
    gpus = cfg.federation.client_gpus
    if gpus < 0:
        gpus = 1.0 if torch.cuda.is_available() else 0.0
    return {
        "client_resources": {"num_cpus": min(cpus, cores), "num_gpus": gpus},
        "init_args": {
            "num_cpus": cores,
            "num_gpus": torch.cuda.device_count(),
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
            "include_dashboard": False,
            "_node_ip_address": "127.0.0.1",  # Ray's own servers stay on loopback
            "_temp_dir": str(tmp / "ray"),
        },
    }


def _quiet_environment(tmp: Path) -> dict[str, str | None]:
    """Keep Flower and Ray files out of ``~`` and the hub offline; return old values."""
    values = {
        "FLWR_HOME": str(tmp / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLCONFIGDIR": str(tmp / "mpl"),
    }
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    return old


def _restore(old: Mapping[str, str | None]) -> None:
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def simulate(
    flat: Mapping[str, object],
    *,
    run_dir: Path | None = None,
    verbose: bool = False,
    resume: bool = False,
    progress: RunProgress | None = None,
) -> SimulationResult:
    """Run a simulated federation and write the run directory.

    Parameters
    ----------
    flat : Mapping[str, object]
        Flat kebab-case config overrides (defaults fill the rest). With ``resume``,
        only ``num-rounds`` may be given (to extend the run).
    run_dir : Path | None
        Output directory; must not exist or be empty. Default: a new ``runs/<timestamp>``.
        With ``resume``: the run to continue (required).
    verbose : bool
        Show Flower's and Ray's own logs.
    resume : bool
        Continue ``run_dir`` after its last completed round (its checkpoint), as a
        deployed run resumes: no round is counted twice, in ``metrics.jsonl`` or in
        the clients' privacy ledgers (a repeated release is replayed from the ledger).
    progress : RunProgress | None
        The live display (default: one on stderr, live when it is a terminal).
    """
    own_progress = progress is None
    progress = progress if progress is not None else RunProgress().__enter__()
    try:
        return _simulate(flat, run_dir=run_dir, verbose=verbose, resume=resume, progress=progress)
    finally:
        if own_progress:
            progress.close()


def _simulate(
    flat: Mapping[str, object],
    *,
    run_dir: Path | None,
    verbose: bool,
    resume: bool,
    progress: RunProgress,
) -> SimulationResult:
    progress.phase("checking the configuration, the data and the model")
    first_round = 1
    if resume:
        if run_dir is None:
            raise ConfigError("--resume needs the run directory to continue.")
        run_dir = Path(run_dir)
        cfg = preflight(prepare_resume(flat, run_dir))
        check_run(cfg)
        done = checkpoint_round(run_dir)
        if done is not None and done >= cfg.federation.num_rounds:
            more = (
                "a DP run keeps its num-rounds: start a new run for more"
                if cfg.privacy.enabled
                else f"to train more, --set num-rounds={done + 1} (or more)"
            )
            raise ConfigError(
                f"--resume {str(run_dir)!r}: the run has all its {done} rounds; {more}."
            )
        first_round = (done or 0) + 1
        (run_dir / "config.toml").write_text(cfg.to_toml())  # num-rounds may have grown
    else:
        cfg = preflight(resolve(flat, wiring=False, given=True).config)
        check_run(cfg)  # what every client would refuse, before any process starts
        run_dir = Path(run_dir) if run_dir is not None else new_run_dir()
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(
                f"--run-dir {str(run_dir)!r} already exists and is not empty; choose a new "
                f"one, or continue it with `fedtune simulate --resume {run_dir}`."
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(cfg.to_toml())
    if cfg.privacy.enabled and not (resume and (run_dir / "policy.toml").exists()):
        # The simulated clients' policy (the run config's): `fedtune audit RUN_DIR` reads
        # δ and the budget from it, as from a node's STATE_DIR/policy.toml.

        write_policy(run_dir, NodePolicy.from_run_config(cfg))
    wiring = {**cfg.to_flat(), "run-dir": str(run_dir.resolve())}
    client_wiring, server_wiring = dict(wiring), dict(wiring)
    # A multiparty run stopped in round 1's decryption has no checkpoint, but a request.
    server_wiring["resume"] = first_round > 1 or (resume and has_pending_decryption(run_dir))
    # The preflight built this process's model: the server is told the adapter length.
    model = process_model(cfg.model, num_labels=len(cfg.data.labels), seed=cfg.federation.seed)
    server_wiring[ADAPTER_LENGTH] = int(model.initial.size)
    backend = get_backend(cfg.crypto.codec_name)
    secret: Path | None = None
    if backend.uses_keys:
        # The driver is the key holder of a simulated run: fresh keys per run; the
        # server side only ever gets the path of the public context.
        keys_dir = run_dir / "keys"
        if backend.name == "ckks-multiparty":
            # Every simulated client is a party; the ceremony runs here, in process
            # (docs/multiparty.md); each client opens its own <name>.party in keys/.
            secret, public = multiparty_keys(keys_dir, cfg, run=run_dir.name, resume=resume)
        elif resume and (keys_dir / "secret.ctx").is_file():
            secret, public = keys_dir / "secret.ctx", keys_dir / "public.ctx"
        else:
            keys = backend.make_keys(keys_dir)
            secret, public = Path(keys.secret), Path(keys.public)
        client_wiring["secret-context"] = str(secret.resolve())
        server_wiring["public-context"] = str(public.resolve())

    progress.phase("starting Flower's simulation engine (Ray)")
    from flwr.simulation import run_simulation  # heavy, Flower-only

    stop = RunStop(
        f"fedtune simulate: stopped; {run_dir} holds the last completed round. "
        f"Continue it with: fedtune simulate --resume {run_dir}",
        progress.say,
        progress.mute,
    )
    tmp = Path(tempfile.mkdtemp(prefix="fedtune-sim-"))
    old_env = _quiet_environment(tmp)
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    quiet = _DropRunSimulationDeprecation()
    to_log = ClientFailuresToLog(run_dir / CLIENTS_LOG)
    server_logger = logging.getLogger("fedtune.server")
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
        flwr_logger.addFilter(quiet)
        flwr_logger.addFilter(to_log)
        server_logger.addFilter(to_log)
    start = time.perf_counter()
    stopped: FederationError | None = None
    progress.phase("starting Ray; the clients load the model with their first message")
    progress.watch(run_dir, cfg.federation.num_rounds, first_round=first_round)
    try:
        with stop.installed(), server_hooks(stop, progress), flower_patches(cfg.federation.seed):
            try:
                run_simulation(
                    server_app=make_server_app(server_wiring),
                    client_app=observed_client_app(client_wiring, run_dir),
                    num_supernodes=cfg.federation.num_clients,
                    backend_config=_backend_config(cfg, tmp, verbose=verbose),  # type: ignore[arg-type]
                    verbose_logging=verbose,
                )
            except FederationError as err:
                stopped = err
            if stop.requested.is_set():  # the stop thread finishes and exits the process
                threading.Event().wait()
    finally:
        flwr_logger.setLevel(old_level)
        flwr_logger.removeFilter(quiet)
        flwr_logger.removeFilter(to_log)
        server_logger.removeFilter(to_log)
        _restore(old_env)
        shutil.rmtree(tmp, ignore_errors=True)
    progress.close()
    seconds = time.perf_counter() - start
    if stopped is not None:
        # Nothing lost: plot what ran and export the last completed round's adapter.
        if (run_dir / "checkpoint").is_dir():
            finish_run(run_dir, cfg, secret_context=secret)
        raise stopped
    adapter_dir = finish_run(run_dir, cfg, secret_context=secret)
    return SimulationResult(run_dir, read_records(run_dir / "metrics.jsonl"), adapter_dir, seconds)


def multiparty_keys(keys_dir: Path, cfg: RunConfig, *, run: str, resume: bool) -> tuple[Path, Path]:
    """The multiparty ceremony among the simulated clients (``client-<i>``), in process.

    Threshold: the smallest majority, ``n // 2 + 1``. Returns the key directory (each
    client opens its own ``<name>.party`` in it) and the server's ``public.ctx``.
    """

    if not (resume and (keys_dir / "public.ctx").is_file()):
        n = cfg.federation.num_clients
        write_keys(keys_dir, [f"client-{i}" for i in range(n)], run=run, threshold=n // 2 + 1)
    return keys_dir, keys_dir / "public.ctx"


def finish_run(run_dir: Path, cfg: RunConfig, *, secret_context: Path | None = None) -> Path:
    """Write ``metrics.png`` and, as the key holder, ``adapter/`` from the last checkpoint."""
    task = get_task(cfg.model.task)
    plot_metrics(
        read_records(run_dir / "metrics.jsonl"),
        run_dir / "metrics.png",
        headline=task.headline,
        settings=run_settings(cfg),
        noisy_eval=cfg.privacy.dp_evaluation,
    )
    adapter = export_adapter(run_dir, cfg, secret_context=secret_context)
    task.finish_run(run_dir)
    return adapter
