"""The server's side of a run, resolved once: config, wiring, task, codec, run directory.

:func:`resolve_server` turns the flat run config the ServerApp receives into a
:class:`ServerRun`: the :class:`~fedtune.config.RunConfig` (``label-names`` filled in
for the default data), the :class:`~fedtune.config.Wiring`, the task, the codec on
the *public* context, the CKKS capacity and the run directory. The payload length
comes with the config (:data:`ADAPTER_LENGTH`, measured by the simulation driver's
preflight), so the server builds no model to learn it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from flwr.serverapp import Grid

from fedtune import bounds
from fedtune.apps.server.ceremony import KEYS_DIR, run_ceremony
from fedtune.config import RunConfig, Wiring, parse_wiring
from fedtune.data import default_label_names
from fedtune.errors import ConfigError
from fedtune.model import adapter_layout, build_model
from fedtune.resolve import resolve
from fedtune.secure import get_backend, run_codec
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.codec import Codec
from fedtune.secure.multiparty.backend import MultipartyBackend
from fedtune.tasks import get_task
from fedtune.tasks.base import Task

__all__ = [
    "ADAPTER_LENGTH",
    "ServerRun",
    "check_keys",
    "resolve_server",
    "server_capacity",
    "server_codec",
    "with_default_labels",
]

#: Internal run-config key: the adapter's payload length, measured once in the
#: simulation driver's preflight and handed to the server with its config. A wrong
#: value only makes the server refuse every reply (the codec checks the length).
ADAPTER_LENGTH = "adapter-length"


@dataclass(frozen=True)
class ServerRun:
    """Everything the server's loop needs, resolved once from its run config."""

    cfg: RunConfig
    wiring: Wiring
    task: Task
    codec: Codec
    #: The CKKS range the strategy keeps the sum in (``None`` in plaintext).
    capacity: float | None
    run_dir: Path


def resolve_server(
    flat: Mapping[str, object], *, run_id: int, grid: Grid | None = None
) -> ServerRun:
    """Parse, check and size the server's side of a run (once per ServerApp run).

    Writes ``run_dir/config.toml`` when it is not there yet (a deployment:
    ``fedtune export`` reads it). A deployed ``ckks-multiparty`` run without a
    ``public-context`` first runs the key ceremony over ``grid``
    (:func:`fedtune.apps.server.ceremony.run_ceremony`); its public files go to
    ``run_dir/keys``.
    """
    flat = dict(flat)
    length = _adapter_length(flat.pop(ADAPTER_LENGTH, None))
    context = resolve(flat)
    cfg, wiring = with_default_labels(context.config), context.wiring
    check_keys(cfg, wiring)
    # Each Flower run gets its own directory unless the run config names one.
    run_dir = wiring.run_dir_for(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.toml").exists():
        (run_dir / "config.toml").write_text(cfg.to_toml())
    kept = run_dir / KEYS_DIR / "public.ctx"
    if _needs_ceremony(cfg, wiring) and wiring.resume and kept.is_file():
        wiring = replace(wiring, public_context=kept)  # the ceremony of the run resumed
    if _needs_ceremony(cfg, wiring):
        if grid is None:
            raise ConfigError(
                '`encryption-backend` = "ckks-multiparty" without `public-context`: the key '
                "ceremony runs over a deployed federation (`fedtune deploy run`); "
                "`fedtune simulate` runs it itself."
            )
        public = run_ceremony(
            grid,
            num_clients=cfg.federation.num_clients,
            run=wiring.run_name(run_id),
            keys_dir=run_dir / KEYS_DIR,
            timeout=cfg.federation.round_timeout,
        )
        wiring = replace(wiring, public_context=public)
    codec = server_codec(cfg, wiring, adapter_length=length)
    return ServerRun(
        cfg=cfg,
        wiring=wiring,
        task=get_task(cfg.model.task),
        codec=codec,
        capacity=server_capacity(cfg, codec),
        run_dir=run_dir,
    )


def _adapter_length(value: object) -> int | None:
    if value is None:
        return None
    try:
        length = int(str(value))
    except ValueError:
        length = 0
    if length <= 0:
        raise ConfigError(
            f"`{ADAPTER_LENGTH}` must be a positive integer (the driver sets it), got "
            f"{value!r}; remove it and the server measures the adapter itself."
        )
    return length


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


def _needs_ceremony(cfg: RunConfig, wiring: Wiring) -> bool:
    return cfg.crypto.codec_name == MultipartyBackend.name and wiring.public_context is None


def check_keys(cfg: RunConfig, wiring: Wiring) -> None:
    """Refuse an encrypted run without the server's ``public-context`` (no silent plaintext).

    ``ckks-multiparty`` needs none: its ceremony makes it (:func:`resolve_server`).
    """
    if _needs_ceremony(cfg, wiring):
        return
    if get_backend(cfg.crypto.codec_name).uses_keys and wiring.public_context is None:
        raise ConfigError(
            "`encryption` = true needs the server's `public-context` (and the clients' "
            "`secret-context`): make them with `fedtune keygen --out DIR` and pass both "
            "paths in the run config, or use `fedtune simulate`, which makes a run's keys."
        )


def server_codec(
    cfg: RunConfig, wiring: Wiring | Mapping[str, object], *, adapter_length: int | None = None
) -> Codec:
    """The run's codec on the *public* context (never a secret one), or a plain one.

    ``wiring`` is the run's :class:`~fedtune.config.Wiring` (a flat run config is
    parsed into one first); its ``public-context`` selects encryption.
    ``adapter_length`` is the payload length the driver's preflight measured
    (:data:`ADAPTER_LENGTH`); without it (``flwr run``, a deployment) the server
    builds the model once to measure it.
    """
    if not isinstance(wiring, Wiring):
        wiring = parse_wiring(wiring)
    num_labels = len(cfg.data.labels)
    if num_labels < 2 and get_task(cfg.model.task).uses_labels:
        raise ValueError(
            "The server needs `label-names` (comma-separated) to know the head's size; "
            f"got {cfg.data.label_names!r}."
        )
    length = adapter_length
    if length is None:
        model = build_model(cfg.model, num_labels=num_labels, seed=cfg.federation.seed)
        length = adapter_layout(model).size
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
