"""A node's held-out evaluation as a release: exact without DP, else noised, counted, replayed.

With DP on, an evaluation reply is a release of the held-out examples, which belong
to the same data set as the training examples (and may be trained on in another
run). So, unless the node's own policy says ``evaluation = "exact"``:

* it is a Gaussian release of bounded per-example sums
  (:mod:`fedtune.privacy.evaluation`), its noise from the CSPRNG
  (:class:`fedtune.privacy.noise.CsprngNoise`; seeded only with ``seeded-noise`` in a
  simulation);
* it is keyed like a training release (:mod:`fedtune.privacy.releases`): the node's
  run nonce, and the SHA-256 of the global state evaluated. The same state asked
  again -- under any round number -- gets the stored noisy answer back: fresh noise
  per repeat would let the server average it away. A second, different state for an
  already evaluated round is declined;
* a new release is budget-checked with everything else on the data (the ledger
  history at example level), declined with a fixed code if it would exceed the
  budget, and appended to the ledger (kind ``"eval"``) before its answer leaves.

With ``evaluation = "exact"`` the node sends exact metrics and the ledger records an
``"eval-exact"`` record: unaccounted, shown by the audit.

Stored answers: ``PRIVACY_DIR/<client>.evals.json`` (``run_nonce -> state digest ->
answer``), written with :func:`fedtune.run.files.write_private`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune import model as fmodel
from fedtune.privacy import check_budget
from fedtune.privacy.evaluation import release_metrics
from fedtune.privacy.noise import CsprngNoise, SeededNoise
from fedtune.privacy.record import LedgerRecord
from fedtune.privacy.releases import input_hash, run_nonce
from fedtune.run.files import read_private, write_private
from fedtune.train.loop import make_loader
from fedtune.train.plan import RELATION
from fedtune.train.seeds import release_seed

if TYPE_CHECKING:
    from fedtune.train.runtime import ClientRuntime
    from fedtune.train.state import GlobalState

__all__ = [
    "DECLINE_EVAL_BUDGET",
    "DECLINE_EVAL_ROUND",
    "DECLINE_EVAL_TASK",
    "EvalOutcome",
    "evaluate_release",
    "state_digest",
]

log = logging.getLogger("fedtune.client")

#: Fixed refusal codes: they depend on nothing but the ledger and public parameters.
DECLINE_EVAL_BUDGET = "evaluation declined: it would exceed this node's privacy budget"
DECLINE_EVAL_ROUND = (
    "evaluation declined: this round's state was already evaluated from another input, "
    "or its answer is no longer stored"
)

DECLINE_EVAL_TASK = (
    "evaluation declined: this task has no per-example held-out metrics for a DP evaluation"
)

_EVALS_MAX_BYTES = 16 << 20
_EVAL_BATCH = 64


@dataclass(frozen=True)
class EvalOutcome:
    """A node's answer to one evaluation request.

    ``status`` is ``"dp"`` (a noised, accounted release) or ``"held-out"`` (exact
    metrics: DP off, or the node's policy opted out). ``declined`` is a fixed code,
    and then ``metrics`` is empty.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    num_examples: int = 0
    status: str = "held-out"
    declined: str = ""
    replayed: bool = False


def state_digest(state: GlobalState | None) -> str:
    """SHA-256 (hex) of the global state evaluated, independent of its round number."""
    return input_hash(
        server_round=0,
        payload=None if state is None else state.payload,
        num_examples=0 if state is None else state.num_examples,
        sampled_clients=0,
    )


def _loader(runtime: ClientRuntime) -> Any:
    return make_loader(runtime.test_set, batch_size=_EVAL_BATCH, shuffle=False, by_length=True)


def _exact(runtime: ClientRuntime) -> tuple[dict[str, float], int]:
    result = runtime.task.evaluate(
        runtime.model, _loader(runtime), device=runtime.device, cfg=runtime.cfg
    )
    return result.metrics(), result.num_examples


def evaluate_release(
    runtime: ClientRuntime, state: GlobalState | None, *, server_round: int
) -> EvalOutcome:
    """Held-out metrics of round ``server_round``'s global state, as this node may send them."""
    vector = runtime.global_vector(state, server_round=server_round)
    if not runtime.cfg.privacy.enabled:
        fmodel.set_adapter_vector(runtime.model, vector)
        metrics, n = _exact(runtime)
        return EvalOutcome(metrics=metrics, num_examples=n)

    if runtime.privacy_dir is None:  # pragma: no cover - ClientRuntime refuses it
        raise ValueError("DP is on but the client has no directory for its privacy ledger.")
    nonce = run_nonce(
        runtime.privacy_dir,
        client=runtime.name,
        run_id=runtime.run_id,
        config=runtime.cfg.to_flat(),
    )
    digest = state_digest(state)
    ledger = runtime.ledger()
    released = ledger.release(run_nonce=nonce, round=server_round, client=runtime.name, kind="eval")
    store = _Answers(runtime.privacy_dir / f"{runtime.name}.evals.json")
    if runtime.policy.evaluation == "exact":
        if released is not None and (released.input_hash, released.kind) != (digest, "eval-exact"):
            return _decline(runtime, DECLINE_EVAL_ROUND)
        fmodel.set_adapter_vector(runtime.model, vector)
        metrics, n = _exact(runtime)
        if released is None:
            _record(runtime, nonce, digest, server_round, kind="eval-exact", sigma=0.0, n=n)
        return EvalOutcome(metrics=metrics, num_examples=n)
    stored = store.get(nonce, digest)
    if stored is not None:
        log.info("%s replays its evaluation of this state (round %d)", runtime.name, server_round)
        return EvalOutcome(
            metrics=stored["metrics"],
            num_examples=stored["num-examples"],
            status="dp",
            replayed=True,
        )
    if released is not None:
        return _decline(runtime, DECLINE_EVAL_ROUND)
    if not hasattr(runtime.task, "example_metrics"):
        return _decline(runtime, DECLINE_EVAL_TASK)
    sigma = runtime.policy.eval_noise_multiplier
    if _over_budget(runtime, sigma):
        return _decline(runtime, DECLINE_EVAL_BUDGET)

    fmodel.set_adapter_vector(runtime.model, vector)
    per_example = runtime.task.example_metrics(
        runtime.model, _loader(runtime), device=runtime.device, cfg=runtime.cfg
    )
    values = {k: np.asarray(per_example[k], dtype=np.float64) for k in runtime.task.eval_metrics}
    release = release_metrics(values, noise_multiplier=sigma, noise=_noise(runtime, nonce, digest))
    _record(
        runtime,
        nonce,
        digest,
        server_round,
        kind="eval",
        sigma=sigma,
        n=release.num_examples,
        sensitivity=release.sensitivity,
    )
    store.put(nonce, digest, {"metrics": release.metrics, "num-examples": release.num_examples})
    return EvalOutcome(metrics=release.metrics, num_examples=release.num_examples, status="dp")


def _decline(runtime: ClientRuntime, code: str) -> EvalOutcome:
    log.warning("%s: %s", runtime.name, code)
    return EvalOutcome(status="dp", declined=code)


def _noise(runtime: ClientRuntime, nonce: str, digest: str) -> Any:
    if runtime.cfg.privacy.seeded_noise:
        return SeededNoise(release_seed(runtime.cfg.federation.seed, nonce, f"eval/{digest}"))
    return CsprngNoise()


def _over_budget(runtime: ClientRuntime, sigma: float) -> bool:
    """Would one more evaluation release take the data's ε over the node's budget?"""
    p = runtime.cfg.privacy
    check = check_budget(
        runtime.ledger().history(client=runtime.name, level="example"),
        budget_epsilon=p.budget,
        delta=runtime.policy.delta,
        noise_multiplier=sigma,
        sample_rate=1.0,
        steps=1,
        accountant=p.accountant,
        relation=RELATION,
    )
    return bool(check.would_exceed)


def _record(
    runtime: ClientRuntime,
    nonce: str,
    digest: str,
    server_round: int,
    *,
    kind: str,
    sigma: float,
    n: int,
    sensitivity: float = 1.0,
) -> None:
    p = runtime.cfg.privacy
    record = LedgerRecord(
        run_id=runtime.run_id,
        run_nonce=nonce,
        input_hash=digest,
        round=server_round,
        client=runtime.name,
        noise_multiplier=sigma,
        sample_rate=1.0,
        steps=1,
        max_grad_norm=sensitivity,
        delta=runtime.policy.delta,
        accountant=p.accountant,
        relation=RELATION,
        epsilon=0.0,
        level="example",
        noise="seeded" if p.seeded_noise else "csprng",
        num_examples=n,
        kind=kind,
        timestamp=time.time(),
    )
    runtime.ledger().append(record)


class _Answers:
    """The noisy answers this node sent, by run nonce and state digest (read back checked)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            raw = read_private(self.path, _EVALS_MAX_BYTES)
            data = {} if raw is None else json.loads(raw)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, nonce: str, digest: str) -> dict[str, Any] | None:
        run = self._load().get(nonce)
        entry = run.get(digest) if isinstance(run, Mapping) else None
        if not isinstance(entry, Mapping):
            return None
        metrics, n = entry.get("metrics"), entry.get("num-examples")
        if (
            not isinstance(metrics, Mapping)
            or not isinstance(n, int)
            or not all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
        ):
            return None
        return {"metrics": {str(k): float(v) for k, v in metrics.items()}, "num-examples": n}

    def put(self, nonce: str, digest: str, answer: Mapping[str, Any]) -> None:
        data = self._load()
        runs = data.setdefault(nonce, {})
        if not isinstance(runs, dict):
            runs = data[nonce] = {}
        runs[digest] = dict(answer)
        write_private(self.path, json.dumps(data, sort_keys=True).encode())
