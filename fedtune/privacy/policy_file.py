"""``STATE_DIR/policy.toml``: a deployed node's privacy policy on disk.

The file is the node owner's; ``fedtune deploy supernode`` writes the effective policy
(the file's values, overridden by its command-line flags) before the worker starts,
the worker reads it for every run, and ``fedtune audit STATE_DIR`` audits at its δ.
A node without the file gets :class:`~fedtune.privacy.policy.NodePolicy`'s safe
defaults (δ = 1e-5, ε budget 8, replace-one, test-fraction 0.2, max-seq-length 48,
the bundled model only; never the server's values). A file looks like::

    delta = 1e-05
    epsilon-budget = 2.0
    test-fraction = 0.2
    evaluation = "dp"
    eval-noise-multiplier = 10.0
    max-step-slack = 2.0
    max-seq-length = 48
    peers = ["ecdsa-sha2-nistp384 AAAAE2Vj...", "ecdsa-sha2-nistp384 AAAAE2Vj..."]

    [[models]]
    path = "/srv/models/minilm"
    sha256 = "3f5c..."

The file is read back like any file a process did not just write (STYLE 13): no
symlink, at most :data:`MAX_POLICY_BYTES`, known keys only, each value checked by
:class:`~fedtune.privacy.policy.NodePolicy`.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from fedtune.errors import PolicyError
from fedtune.identity import ANY, public_key_text
from fedtune.privacy.policy import DEFAULT_MAX_SEQ_LENGTH, ModelPin, NodePolicy

__all__ = [
    "MAX_POLICY_BYTES",
    "POLICY_FILE",
    "POLICY_KEYS",
    "load_policy",
    "policy_path",
    "policy_toml",
    "write_policy",
]

POLICY_FILE = "policy.toml"
MAX_POLICY_BYTES = 64 * 1024

#: File / node-config key -> NodePolicy field (``models`` is a list of tables).
POLICY_KEYS: dict[str, str] = {
    "delta": "delta",
    "epsilon-budget": "epsilon_budget",
    "relation": "relation",
    "test-fraction": "test_fraction",
    "evaluation": "evaluation",
    "eval-noise-multiplier": "eval_noise_multiplier",
    "max-seq-length": "max_seq_length",
    "max-step-slack": "max_step_slack",
    "models": "models",
    "peers": "peers",
}


def policy_path(state_dir: Path) -> Path:
    """Where a node keeps its policy."""
    return Path(state_dir) / POLICY_FILE


def _read(path: Path) -> dict[str, object]:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return {}
    if not stat.S_ISREG(info.st_mode):
        raise PolicyError(f"{str(path)!r} is not a regular file (a link?); refusing to read it.")
    if info.st_size > MAX_POLICY_BYTES:
        raise PolicyError(
            f"{str(path)!r} is {info.st_size} bytes, over {MAX_POLICY_BYTES}; not a policy."
        )
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PolicyError(f"{str(path)!r} is not valid TOML: {err}") from err


def _models(value: object, where: str) -> tuple[ModelPin, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise PolicyError(f"{where}: `models` must be a list of {{path, sha256}}, got {value!r}.")
    pins = []
    for entry in value:
        if not isinstance(entry, Mapping) or set(entry) != {"path", "sha256"}:
            raise PolicyError(
                f"{where}: each of `models` needs exactly `path` and `sha256`, got {entry!r}."
            )
        pins.append(ModelPin(path=entry["path"], sha256=entry["sha256"]))
    return tuple(pins)


def _peers(value: object, where: str) -> tuple[str, ...] | str:
    if value == ANY:
        return ANY
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise PolicyError(
            f'{where}: `peers` must be a list of node public keys or "{ANY}", got {value!r}.',
            key="peers",
        )
    return tuple(public_key_text(v, where=f"{where}: `peers`") for v in value)


def _fields(values: Mapping[str, object], where: str) -> dict[str, object]:
    unknown = sorted(set(values) - set(POLICY_KEYS))
    if unknown:
        raise PolicyError(
            f"{where}: unknown policy key(s) {unknown}; a node policy has {', '.join(POLICY_KEYS)}."
        )
    out: dict[str, object] = {}
    for key, value in values.items():
        if key == "models":
            out["models"] = _models(value, where)
        elif key == "peers":
            out["peers"] = _peers(value, where)
        elif key in (
            "delta",
            "epsilon-budget",
            "test-fraction",
            "eval-noise-multiplier",
            "max-step-slack",
        ):
            # TOML and JSON may write 1 for 1.0; a bool is never a number here.
            out[POLICY_KEYS[key]] = (
                float(value) if isinstance(value, int) and not isinstance(value, bool) else value
            )
        else:
            out[POLICY_KEYS[key]] = value
    return out


def load_policy(
    state_dir: Path | None, overrides: Mapping[str, object] | None = None
) -> NodePolicy:
    """A deployed node's policy: defaults, then ``STATE_DIR/policy.toml``, then ``overrides``.

    ``overrides`` are the node's own settings (its command line / node config), with
    the file's keys; unknown keys of ``overrides`` are ignored (a node config holds
    other settings too). A node with no limit of its own on ``max-seq-length`` gets
    :data:`~fedtune.privacy.policy.DEFAULT_MAX_SEQ_LENGTH`.
    """
    values: dict[str, object] = {"max_seq_length": DEFAULT_MAX_SEQ_LENGTH}
    if state_dir is not None:
        path = policy_path(state_dir)
        values.update(_fields(_read(path), str(path)))
    given = {k: v for k, v in (overrides or {}).items() if k in POLICY_KEYS}
    for key in ("models", "peers"):  # a node config carries a list as JSON text
        if isinstance(given.get(key), str) and given[key] != ANY:
            try:
                given[key] = json.loads(str(given[key]))
            except ValueError as err:
                raise PolicyError(f"node config: `{key}` is not JSON: {err}") from err
    values.update(_fields(given, "node config"))
    return replace(NodePolicy(), **values)  # type: ignore[arg-type]


def policy_toml(policy: NodePolicy) -> str:
    """The policy as ``policy.toml`` text (what :func:`load_policy` reads back)."""
    lines = [
        "# This node's privacy policy (fedtune deploy supernode); the server never sets it.",
        f"delta = {policy.delta!r}",
        f"epsilon-budget = {float(policy.epsilon_budget)!r}",
        f"relation = {json.dumps(policy.relation)}",
        f"test-fraction = {policy.test_fraction!r}",
        f"evaluation = {json.dumps(policy.evaluation)}",
        f"eval-noise-multiplier = {float(policy.eval_noise_multiplier)!r}",
        f"max-step-slack = {float(policy.max_step_slack)!r}",
    ]
    if policy.max_seq_length is not None:
        lines.append(f"max-seq-length = {policy.max_seq_length}")
    if policy.peers == ANY:
        lines.append(f'peers = "{ANY}"  # trusts the server\'s multiparty roster')
    elif policy.peers:
        lines += ["peers = [", *[f'    "{p}",' for p in policy.peers], "]"]
    for pin in policy.models:
        lines += ["", "[[models]]", f"path = {json.dumps(pin.path)}", f'sha256 = "{pin.sha256}"']
    return "\n".join(lines) + "\n"


def write_policy(state_dir: Path, policy: NodePolicy) -> Path:
    """Write ``STATE_DIR/policy.toml`` (mode 0600, replaced atomically; no link followed)."""
    path = policy_path(state_dir)
    tmp = path.with_name(f".{POLICY_FILE}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(policy_toml(policy))
    os.replace(tmp, path)
    return path
