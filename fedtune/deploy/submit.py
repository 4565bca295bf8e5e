"""Submit a run to a deployed SuperLink with ``flwr run`` and wait for its real outcome.

``flwr run --stream`` exits 0 even when the ServerApp fails, so :func:`submit_run`
submits with ``--format json`` (for the run id), streams the run's log with
``flwr log``, and then reads the final status with ``flwr ls``. The Flower App is
this source tree (``pyproject.toml``'s ``[tool.flwr.app]``); its run config is
the checked fedtune config plus the wiring keys of a deployment (``run-dir``,
``run-id``, ``public-context``, ``resume``), passed as a TOML file.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedtune.config import _toml_value
from fedtune.deploy.roles import CONNECTION, flwr_cli
from fedtune.errors import ConfigError
from fedtune.resolve import resolve


@dataclass(frozen=True)
class RunOutcome:
    """How a submitted run ended, as Flower's SuperLink reports it."""

    run_id: str
    status: str
    details: str

    @property
    def ok(self) -> bool:
        """True when the ServerApp returned normally."""
        return self.status == "finished:completed"


def app_dir() -> Path:
    """The Flower App's directory: the source tree fedtune is installed from."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "app" not in tomllib.loads(pyproject.read_text()).get(
        "tool", {}
    ).get("flwr", {}):
        raise ConfigError(
            f"{str(root)!r} holds no Flower App (pyproject.toml with [tool.flwr.app]); "
            "`fedtune deploy run` needs fedtune installed from its source tree (pip install -e)."
        )
    return root


def format_node_limits(limits: Mapping[int, int]) -> str:
    """``{7: 100, 9: 50}`` -> ``"7=100,9=50"`` (the ``node-limits`` wiring key)."""
    return ",".join(f"{node}={limit}" for node, limit in sorted(limits.items()))


def run_config(
    flat: Mapping[str, object],
    *,
    run_dir: Path,
    run_id: str = "",
    public_context: Path | None = None,
    resume: bool = False,
    node_limits: Mapping[int, int] | None = None,
) -> dict[str, object]:
    """The checked config plus wiring keys, as the ServerApp and ClientApps read it.

    ``node_limits`` (node id -> the most examples it may claim, set at registration)
    travels as ``node-limits`` (``"ID=N,ID=N"``); each must be within
    ``max-client-examples``, the bound the CKKS capacity check uses.
    """
    run = resolve(flat, wiring=False)
    cfg = run.config
    cap = cfg.federation.max_client_examples
    for node, limit in sorted((node_limits or {}).items()):
        if not 1 <= limit <= cap:
            raise ConfigError(
                f"node {node} was registered with --max-examples {limit}, outside [1, {cap}] "
                f"(`max-client-examples` of this run); raise `max-client-examples` or "
                "register the node again with a smaller limit."
            )
    if run.task.uses_labels and len(cfg.data.labels) < 2:
        raise ConfigError(
            "A deployment needs `label-names` (comma-separated, in the order every node "
            f"uses): nodes hold different data and must agree on the head; got "
            f"{cfg.data.label_names!r}."
        )
    multiparty = cfg.crypto.codec_name == "ckks-multiparty"  # its ceremony makes the keys
    if cfg.crypto.encryption and public_context is None and not multiparty:
        raise ConfigError("`encryption` is on: pass the server's --public-context (public.ctx).")
    run_dir = Path(run_dir).expanduser().resolve()
    wiring: dict[str, object] = {
        "run-dir": str(run_dir),
        "run-id": run_id or run_dir.name,
        "resume": resume,
    }
    if node_limits:
        wiring["node-limits"] = format_node_limits(node_limits)
    if cfg.crypto.encryption and public_context is not None:
        wiring["public-context"] = str(Path(public_context).expanduser().resolve())
    return {**cfg.to_flat(), **wiring}


def submit_run(
    home: Path,
    config: Mapping[str, object],
    *,
    stream: bool = True,
    timeout: float | None = None,
) -> RunOutcome:
    """``flwr run`` this app with ``config``, stream its log, return its final status."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write("".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items()))
        overrides = fh.name
    try:
        launch = flwr_cli(
            home,
            "run",
            str(app_dir()),
            CONNECTION,
            "--format",
            "json",
            "--run-config",
            overrides,
        )
        done = subprocess.run(
            launch.argv, env=launch.env, capture_output=True, text=True, check=False
        )
    finally:
        Path(overrides).unlink(missing_ok=True)
    try:
        reply = json.loads(done.stdout)
        run_id = str(reply["run-id"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"`flwr run` did not start the run (exit {done.returncode}): "
            f"{(done.stdout + done.stderr).strip()[-2000:]}"
        ) from None
    log = flwr_cli(home, "log", run_id, CONNECTION, "--stream")
    subprocess.run(
        log.argv,
        env=log.env,
        check=False,
        timeout=timeout,
        stdout=None if stream else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    return run_status(home, run_id)


def run_status(home: Path, run_id: str) -> RunOutcome:
    """The SuperLink's record of one run (``flwr ls --run-id``)."""
    ls = flwr_cli(home, "ls", CONNECTION, "--run-id", run_id, "--format", "json")
    done = subprocess.run(ls.argv, env=ls.env, capture_output=True, text=True, check=False)
    try:
        row = json.loads(done.stdout)["runs"][0]
        return RunOutcome(run_id, str(row["status"]), str(row.get("status-details", "")))
    except (ValueError, KeyError, IndexError, TypeError):
        return RunOutcome(run_id, "unknown", (done.stdout + done.stderr).strip()[-2000:])
