"""Recompute and check every ε figure in privacy ledger records.

For each client, the audit rebuilds the composition history from the records in file
order -- the same convention :class:`~fedtune.privacy.ledger.PrivacyLedger` uses
(:func:`~fedtune.privacy.ledger.counted_for`: an example-level ε composes every
release of the data, a client-level ε the client-level ones) -- and recomputes ε with
two independent accountants (PRV and RDP) under the replace-one relation -- and, for a
history holding a discrete-Gaussian release (grid DP-SGD, client-level shares), with
``"discrete-rdp"``, the accountant proven for it, which then decides the verdict -- at the
**audit's** δ (the node's own δ, ``STATE_DIR/policy.toml``), never at the δ a record
states: a ledger written at δ = 0.05 would otherwise pass with a tiny ε. The relation
is pinned, not read from the records: every fedtune train reply publishes the node's
example count ``n_k``, so a ledger that declares add-remove (ε 2.53 instead of 4.00
for one history) is inconsistent, and so is an audit δ that is not below ``1 / n_k``.

Verdicts, worst first:

``"overrun"``
    The final recomputed PRV ε at the audit δ, or the final reported ε, exceeds the
    budget by more than :data:`BUDGET_SLACK` (float round-off only).
``"under-reported"``
    Some record's reported ε is below the PRV ε recomputed for it (at its own δ) by
    more than ``tolerance``.
``"inconsistent"``
    A record's δ is not the audit δ, it declares add-remove, the audit δ is not below
    ``1 / num_examples``, its composition does not follow from what it
    says ran (``q = batch_size / num_examples`` and ``steps = local_epochs · int(1/q)``
    at example level, ``q = 1`` and one step at client level), or it disagrees with
    the run's configuration.
``"ok"``
    None of these. Notes (legacy records, noise from a seeded PRNG: not for real data,
    example-level releases beside a client-level ε) are listed as problems but do not
    fail the audit.

Why ``tolerance`` defaults to ``2 * PRV_EPS_ERROR`` (0.02): the PRV accountant returns
``estimate + eps_error`` with ``eps_error = 0.01``, and its estimate depends on the
discretisation grid, which moves with the history's grouping and the Opacus version. Two
honest PRV computations of one history can therefore differ by up to about
``2 * eps_error``; anything beyond that is not numerics. A client that reported with RDP
reports more than PRV, never less, so it passes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fedtune.privacy._checks import check_delta, check_epsilon, check_non_negative
from fedtune.privacy.accountant import AccountantState, compute_epsilon
from fedtune.privacy.analysis import PRV_EPS_ERROR
from fedtune.privacy.ledger import counted_for, history_of
from fedtune.privacy.record import LedgerRecord

#: The relation every fedtune release is audited under: a node publishes its example
#: count ``n_k`` (the FedAvg weight), so neighbouring data sets have the same size.
RELATION = "replace-one"

__all__ = [
    "BUDGET_SLACK",
    "AuditReport",
    "ClientAudit",
    "RunExpectation",
    "audit_records",
    "exact_evaluations",
]

BUDGET_SLACK = 1e-9
"""Absolute slack on the budget comparison, for float round-off only."""


@dataclass(frozen=True)
class RunExpectation:
    """What the run's configuration says every record must show (``None``: not checked)."""

    batch_size: int | None = None
    local_epochs: int | None = None
    max_grad_norm: float | None = None
    mechanism: str | None = None
    """The example-level training noise the run config chose (``dp-noise``:
    ``"discrete-gaussian"`` for ``"grid"``, ``"gaussian"`` for ``"float"``)."""


@dataclass(frozen=True)
class ClientAudit:
    """Audit of one client's records at one level."""

    client: str
    level: str
    relation: str
    rounds: int
    total_steps: int
    noise_multipliers: tuple[float, ...]
    """Distinct σ values, in order of first use."""
    sample_rates: tuple[float, ...]
    """Distinct q values, in order of first use."""
    delta: float
    """The audit δ, at which the recomputed ε figures are stated."""
    reported_epsilon: float
    """Cumulative ε in the last record (at that record's δ)."""
    epsilon_rdp: float
    epsilon_prv: float
    budget_epsilon: float | None
    verdict: str
    noise: str
    """``csprng``, ``seeded`` (not for real data) or ``mixed``."""
    problems: tuple[str, ...] = field(default=())
    epsilon_proven: float = math.nan
    """ε at the audit δ from ``accountant``, the one proven for every release composed
    (equal to ``epsilon_prv`` for float-Gaussian histories); the budget and
    under-report checks use it. ``epsilon_prv`` / ``epsilon_rdp`` are then the
    continuous-Gaussian figures, shown for comparison."""
    accountant: str = "prv"
    mechanisms: tuple[str, ...] = ()
    """The noise mechanisms the audited history composes (as audited)."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (non-finite floats as strings)."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = str(value)
            else:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class AuditReport:
    """Result of :func:`audit_records`."""

    clients: tuple[ClientAudit, ...]
    budget_epsilon: float | None
    tolerance: float
    delta: float | None = None

    @property
    def ok(self) -> bool:
        """True when every client's verdict is ``"ok"``."""
        return all(c.verdict == "ok" for c in self.clients)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "ok": self.ok,
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "tolerance": self.tolerance,
            "clients": [c.to_dict() for c in self.clients],
        }


def _unique(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(dict.fromkeys(values))


def _inconsistencies(r: LedgerRecord, delta: float, expect: RunExpectation) -> list[str]:
    """What is wrong with one record's own figures (empty: nothing)."""
    where = f"run {r.run_id!r} round {r.round}"
    out = []
    if r.delta != delta:
        out.append(f"{where}: recorded at δ={r.delta:g}, not the audit δ={delta:g}")
    if r.relation != RELATION:
        out.append(
            f"{where}: declares relation {r.relation!r}, but a fedtune node publishes its "
            f"example count (num-examples = {r.num_examples or 'n_k'}), so its neighbours "
            f"have the same size: audited as {RELATION!r}"
        )
    if r.num_examples and delta * r.num_examples >= 1.0:
        out.append(
            f"{where}: the audit δ={delta:g} is not below 1 / n_k = 1/{r.num_examples}; "
            "such a δ promises nothing (it allows publishing an example in the clear)"
        )
    if r.legacy:
        return out
    if r.kind != "train":
        return out + _evaluation_inconsistencies(r, where)
    if r.level == "example":
        q = r.batch_size / r.num_examples if r.num_examples else math.nan
        if not (r.batch_size and r.num_examples and math.isclose(r.sample_rate, q, rel_tol=1e-9)):
            out.append(
                f"{where}: q={r.sample_rate:g} is not batch_size / num_examples = "
                f"{r.batch_size}/{r.num_examples}"
            )
        elif r.steps != r.local_epochs * int(1 / r.sample_rate):
            out.append(
                f"{where}: steps={r.steps} is not local_epochs · int(1/q) = "
                f"{r.local_epochs} · {int(1 / r.sample_rate)}"
            )
        for name in ("batch_size", "local_epochs"):
            want = getattr(expect, name)
            if want is not None and getattr(r, name) != want:
                out.append(f"{where}: {name}={getattr(r, name)}, the run config says {want}")
    else:
        if r.sample_rate != 1.0 or r.steps != 1:
            out.append(
                f"{where}: a client-level round is one step at q = 1 (the server picks the "
                f"clients), recorded q={r.sample_rate:g}, steps={r.steps}"
            )
        if not r.tolerance < r.sampled_clients:
            out.append(
                f"{where}: noise shares for {r.sampled_clients} sampled client(s) with "
                f"tolerance {r.tolerance} cannot carry σ"
            )
    if expect.max_grad_norm is not None and r.max_grad_norm != expect.max_grad_norm:
        out.append(
            f"{where}: max_grad_norm={r.max_grad_norm:g}, the run config says "
            f"{expect.max_grad_norm:g}"
        )
    return out


def _audit_one(
    mine: list[LedgerRecord],
    level: str,
    *,
    budget: float | None,
    delta: float | None,
    tolerance: float,
    every_record: bool,
    expect: RunExpectation,
) -> ClientAudit:
    records = counted_for(mine, level)
    last = [r for r in records if r.level == level][-1]
    audit_delta = last.delta if delta is None else delta
    # Pinned, not read from the ledger: every fedtune reply publishes num-examples.
    relation = RELATION
    problems: list[str] = []
    inconsistent: list[str] = []
    under = False
    seen: set[tuple[str, int, str]] = set()
    state = AccountantState()
    history_of([replace(r, relation=RELATION) for r in records])  # one client, or ValueError
    for r in records:
        if not r.accounted:  # an exact evaluation: listed below, in no ε
            continue
        if r.key in seen:
            problems.append(f"release {r.key} appears more than once (each copy is counted)")
        seen.add(r.key)
        inconsistent += _inconsistencies(r, audit_delta, expect)
        mechanism = _audited_mechanism(r, expect)
        if mechanism != r.mechanism:
            inconsistent.append(
                f"run {r.run_id!r} round {r.round}: records mechanism {r.mechanism!r}, but "
                f"{_MECHANISM_WHY[r.level]}: audited as {mechanism!r}"
            )
        state = state.compose(
            noise_multiplier=r.noise_multiplier,
            sample_rate=r.sample_rate,
            steps=r.steps,
            mechanism=mechanism,
        )
        if r.level == level and (every_record or r is last):
            # the accountant proven for every release so far (PRV for float ones only)
            name = _LABEL[state.proven_accountant("prv")]
            proven = state.epsilon(delta=r.delta, accountant="prv", relation=relation)  # type: ignore[arg-type]
            if r.epsilon < proven - tolerance:
                under = True
                problems.append(
                    f"run {r.run_id!r} round {r.round}: reported ε={r.epsilon:.6g} but "
                    f"{name} recomputes {proven:.6g} at its δ={r.delta:g} "
                    f"(tolerance {tolerance:g})"
                )
    accountant = state.proven_accountant("prv")
    eps_proven = state.epsilon(delta=audit_delta, accountant="prv", relation=relation)  # type: ignore[arg-type]
    eps_prv, eps_rdp = (
        compute_epsilon(state.opacus_history(), delta=audit_delta, accountant=a, relation=relation)  # type: ignore[arg-type]
        for a in ("prv", "rdp")
    )
    overrun = budget is not None and (
        eps_proven > budget + BUDGET_SLACK or last.epsilon > budget + BUDGET_SLACK
    )
    if overrun:
        problems.insert(
            0,
            f"budget ε={budget:g} exceeded: recomputed {_LABEL[accountant]} ε={eps_proven:.6g} at "
            f"δ={audit_delta:g}, reported ε={last.epsilon:.6g}",
        )
    problems += inconsistent
    sources = {r.noise for r in records}
    noise = sources.pop() if len(sources) == 1 else "mixed"
    if "seeded" in {r.noise for r in records}:
        problems.append("noise drawn from a seeded PRNG (`seeded-noise`): not for real data")
    if any(r.legacy for r in records):
        problems.append(
            "legacy records (no client nonce, no recorded batch size): keyed by run-id, "
            "not cross-checked"
        )
    exact = exact_evaluations(records).get(last.client, [])
    if exact:
        problems.append(
            f"exact held-out metrics sent outside the guarantee (node policy evaluation = "
            f"'exact') for round(s) {exact}: not in any ε"
        )
    if level == "client" and any(r.level == "example" for r in mine):
        problems.append(
            "this data also had example-level releases, which give no client-level guarantee"
        )
    if overrun:
        verdict = "overrun"
    elif under:
        verdict = "under-reported"
    elif inconsistent:
        verdict = "inconsistent"
    else:
        verdict = "ok"
    return ClientAudit(
        client=last.client,
        level=level,
        relation=relation,
        rounds=sum(1 for r in records if r.level == level and r.kind == "train"),
        total_steps=state.total_steps,
        noise_multipliers=_unique(r.noise_multiplier for r in records),
        sample_rates=_unique(r.sample_rate for r in records),
        delta=audit_delta,
        reported_epsilon=last.epsilon,
        epsilon_rdp=eps_rdp,
        epsilon_prv=eps_prv,
        budget_epsilon=budget,
        verdict=verdict,
        noise=noise,
        problems=tuple(problems),
        epsilon_proven=eps_proven,
        accountant=accountant,
        mechanisms=state.mechanisms,
    )


#: How the problems name an accountant.
_LABEL = {"prv": "PRV", "rdp": "RDP", "discrete-rdp": "discrete-rdp"}

#: Why a record's mechanism is pinned, per level (see :func:`_audited_mechanism`).
_MECHANISM_WHY = {
    "client": "client-level shares are always discrete Gaussian noise on a grid",
    "example": "the run config's dp-noise says otherwise",
}


def _audited_mechanism(r: LedgerRecord, expect: RunExpectation) -> str:
    """The mechanism a record is audited as: pinned where the code leaves no choice.

    A client-level round's shares are always exact discrete Gaussians
    (:mod:`fedtune.privacy.discrete`), and an example-level round follows the run
    config's ``dp-noise`` when the audit knows it; a ledger relabelled ``"gaussian"``
    (to be recomputed with the tighter PRV accountant) is audited as what ran.
    """
    if r.kind != "train":
        return r.mechanism
    if r.level == "client":
        return "discrete-gaussian"
    return expect.mechanism or r.mechanism


def exact_evaluations(records: Iterable[LedgerRecord]) -> dict[str, list[int]]:
    """client -> the rounds whose exact held-out metrics it sent (kind ``"eval-exact"``).

    A node whose own policy says ``evaluation = "exact"`` sends them outside its
    guarantee; the ledger records each so that the audit can show it.
    """
    out: dict[str, list[int]] = {}
    for r in records:
        if not r.accounted:
            out.setdefault(r.client, []).append(r.round)
    return out


def _evaluation_inconsistencies(r: LedgerRecord, where: str) -> list[str]:
    """A DP evaluation is one Gaussian release at q = 1 of ``num_examples`` bounded sums."""
    if r.kind == "eval" and not r.num_examples:
        return [f"{where}: an evaluation release without its held-out count"]
    return []


def audit_records(
    records: Iterable[LedgerRecord | Mapping[str, Any]],
    *,
    budget_epsilon: float | None,
    delta: float | None,
    tolerance: float = 2 * PRV_EPS_ERROR,
    check_every_record: bool = True,
    expect: RunExpectation | None = None,
) -> AuditReport:
    """Recompute every client's ε from ledger records and judge it.

    Parameters
    ----------
    records
        Ledger records (or their dicts, e.g. straight from the JSON lines), in file order.
        Records are grouped by client; each level a client released at is one audit.
    budget_epsilon
        The ε budget each client must stay within, or ``None`` to skip the overrun check.
    delta
        The δ to audit at: the run's configured ``target-delta``. ``None`` (no
        configuration known) states each client's figures at its last record's δ.
    tolerance
        How far a reported ε may sit below the recomputed PRV ε (see module docstring).
    check_every_record
        Check each record's cumulative ε, not just the last (one PRV evaluation per record).
    expect
        What the run configuration fixes (batch size, local epochs, clipping bound).

    Returns
    -------
    AuditReport
        One :class:`ClientAudit` per (client, level), sorted by client then level.
    """
    budget = None if budget_epsilon is None else check_epsilon("budget_epsilon", budget_epsilon)
    audit_delta = None if delta is None else check_delta("delta", delta)
    tolerance = check_non_negative("tolerance", tolerance)
    groups: dict[str, list[LedgerRecord]] = {}
    for raw in records:
        rec = raw if isinstance(raw, LedgerRecord) else LedgerRecord.from_dict(raw)
        groups.setdefault(rec.client, []).append(rec)
    audits = tuple(
        _audit_one(
            groups[client],
            level,
            budget=budget,
            delta=audit_delta,
            tolerance=tolerance,
            every_record=check_every_record,
            expect=expect or RunExpectation(),
        )
        for client in sorted(groups)
        for level in sorted({r.level for r in groups[client]})
    )
    return AuditReport(
        clients=audits, budget_epsilon=budget, tolerance=tolerance, delta=audit_delta
    )
