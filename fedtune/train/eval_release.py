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
from numpy.typing import NDArray

from fedtune.privacy import PrivacyLedger, check_budget
from fedtune.privacy.evaluation import release_metrics
from fedtune.privacy.policy import NodePolicy
from fedtune.privacy.record import LedgerRecord
from fedtune.run.files import read_private, write_private
from fedtune.train.keys import ReleaseKeys, state_digest
from fedtune.train.plan import RELATION
from fedtune.train.trainer import Trainer

if TYPE_CHECKING:
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


def exact(trainer: Trainer, vector: NDArray[np.float64]) -> EvalOutcome:
    """Exact held-out metrics of ``vector`` (DP off, or the node's policy opted out)."""
    result = trainer.score(vector)
    return EvalOutcome(metrics=result.metrics(), num_examples=result.num_examples)


def evaluate_release(
    trainer: Trainer,
    vector: NDArray[np.float64],
    state: GlobalState | None,
    *,
    server_round: int,
    keys: ReleaseKeys,
    ledger: PrivacyLedger,
    policy: NodePolicy,
) -> EvalOutcome:
    """Held-out metrics of round ``server_round``'s global state ``vector``, as a DP release.

    ``state`` is what the server sent (its digest keys the release); ``keys``,
    ``ledger`` and ``policy`` are the client's (see the module docstring).
    """
    name = keys.client
    nonce = keys.nonce()
    digest = state_digest(state)
    released = ledger.release(run_nonce=nonce, round=server_round, client=name, kind="eval")
    store = _Answers(keys.privacy_dir / f"{name}.evals.json")
    book = _Book(trainer, keys, ledger, policy, nonce, digest, server_round)
    if policy.evaluation == "exact":
        if released is not None and (released.input_hash, released.kind) != (digest, "eval-exact"):
            return _decline(name, DECLINE_EVAL_ROUND)
        outcome = exact(trainer, vector)
        if released is None:
            book.record(kind="eval-exact", sigma=0.0, n=outcome.num_examples)
        return outcome
    stored = store.get(nonce, digest)
    if stored is not None:
        log.info("%s replays its evaluation of this state (round %d)", name, server_round)
        return EvalOutcome(
            metrics=stored["metrics"],
            num_examples=stored["num-examples"],
            status="dp",
            replayed=True,
        )
    if released is not None:
        return _decline(name, DECLINE_EVAL_ROUND)
    if not hasattr(trainer.task, "example_metrics"):
        return _decline(name, DECLINE_EVAL_TASK)
    sigma = policy.eval_noise_multiplier
    if book.over_budget(sigma):
        return _decline(name, DECLINE_EVAL_BUDGET)
    per_example = trainer.example_metrics(vector)
    values = {k: np.asarray(per_example[k], dtype=np.float64) for k in trainer.task.eval_metrics}
    noise = keys.noise(nonce, f"eval/{digest}")
    release = release_metrics(values, noise_multiplier=sigma, noise=noise)
    book.record(kind="eval", sigma=sigma, n=release.num_examples, sensitivity=release.sensitivity)
    store.put(nonce, digest, {"metrics": release.metrics, "num-examples": release.num_examples})
    return EvalOutcome(metrics=release.metrics, num_examples=release.num_examples, status="dp")


def _decline(name: str, code: str) -> EvalOutcome:
    log.warning("%s: %s", name, code)
    return EvalOutcome(status="dp", declined=code)


@dataclass(frozen=True)
class _Book:
    """One evaluation release's budget check and ledger record."""

    trainer: Trainer
    keys: ReleaseKeys
    ledger: PrivacyLedger
    policy: NodePolicy
    nonce: str
    digest: str
    server_round: int

    def over_budget(self, sigma: float) -> bool:
        """Would one more evaluation release take the data's ε over the node's budget?"""
        p = self.trainer.cfg.privacy
        check = check_budget(
            self.ledger.history(client=self.keys.client, level="example"),
            budget_epsilon=p.budget,
            delta=self.policy.delta,
            noise_multiplier=sigma,
            sample_rate=1.0,
            steps=1,
            accountant=p.accountant,
            relation=RELATION,
        )
        return bool(check.would_exceed)

    def record(self, *, kind: str, sigma: float, n: int, sensitivity: float = 1.0) -> None:
        """Append the release (``kind`` ``"eval"`` or ``"eval-exact"``) to the ledger."""
        p = self.trainer.cfg.privacy
        record = LedgerRecord(
            run_id=self.keys.run_id,
            run_nonce=self.nonce,
            input_hash=self.digest,
            round=self.server_round,
            client=self.keys.client,
            noise_multiplier=sigma,
            sample_rate=1.0,
            steps=1,
            max_grad_norm=sensitivity,
            delta=self.policy.delta,
            accountant=p.accountant,
            relation=RELATION,
            epsilon=0.0,
            level="example",
            noise="seeded" if p.seeded_noise else "csprng",
            num_examples=n,
            kind=kind,
            timestamp=time.time(),
        )
        self.ledger.append(record)


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
