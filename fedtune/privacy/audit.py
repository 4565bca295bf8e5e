"""Recompute and check every ε figure in privacy ledger records.

For each (client, level), the audit rebuilds the composition history from the records in
file order -- the same convention :class:`~fedtune.privacy.ledger.PrivacyLedger` uses --
recomputes the cumulative ε after every record with two independent accountants (PRV
and RDP) and compares with what the client reported.

Verdicts, worst first:

``"overrun"``
    The final recomputed PRV ε, or the final reported ε, exceeds the budget by more than
    :data:`BUDGET_SLACK` (float round-off only).
``"under-reported"``
    Some record's reported ε is below the PRV ε recomputed for it by more than
    ``tolerance``.
``"ok"``
    Neither.

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
from dataclasses import dataclass, field
from typing import Any

from fedtune.privacy._checks import check_epsilon, check_non_negative
from fedtune.privacy.accounting import PRV_EPS_ERROR, AccountantState
from fedtune.privacy.ledger import LedgerRecord

__all__ = ["BUDGET_SLACK", "AuditReport", "ClientAudit", "audit_records"]

BUDGET_SLACK = 1e-9
"""Absolute slack on the budget comparison, for float round-off only."""


@dataclass(frozen=True)
class ClientAudit:
    """Audit of one client's records at one level."""

    client: str
    level: str
    rounds: int
    total_steps: int
    noise_multipliers: tuple[float, ...]
    """Distinct σ values, in order of first use."""
    sample_rates: tuple[float, ...]
    """Distinct q values, in order of first use."""
    delta: float
    """δ of the last record, at which the final ε figures are stated."""
    reported_epsilon: float
    """Cumulative ε in the last record."""
    epsilon_rdp: float
    epsilon_prv: float
    budget_epsilon: float | None
    verdict: str
    problems: tuple[str, ...] = field(default=())

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

    @property
    def ok(self) -> bool:
        """True when every client's verdict is ``"ok"``."""
        return all(c.verdict == "ok" for c in self.clients)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "ok": self.ok,
            "budget_epsilon": self.budget_epsilon,
            "tolerance": self.tolerance,
            "clients": [c.to_dict() for c in self.clients],
        }


def _unique(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(dict.fromkeys(values))


def _audit_one(
    records: list[LedgerRecord], *, budget: float | None, tolerance: float, every_record: bool
) -> ClientAudit:
    problems: list[str] = []
    under = False
    seen: set[tuple[str, int, str]] = set()
    state = AccountantState()
    last = records[-1]
    for i, r in enumerate(records):
        if r.key in seen:
            problems.append(f"round {r.key} appears more than once (each copy is counted)")
        seen.add(r.key)
        state = state.compose(
            noise_multiplier=r.noise_multiplier, sample_rate=r.sample_rate, steps=r.steps
        )
        if every_record or i == len(records) - 1:
            prv = state.epsilon(delta=r.delta, accountant="prv")
            if r.epsilon < prv - tolerance:
                under = True
                problems.append(
                    f"run {r.run_id!r} round {r.round}: reported ε={r.epsilon:.6g} but PRV "
                    f"recomputes {prv:.6g} (tolerance {tolerance:g})"
                )
    eps_prv = state.epsilon(delta=last.delta, accountant="prv")
    eps_rdp = state.epsilon(delta=last.delta, accountant="rdp")
    overrun = budget is not None and (
        eps_prv > budget + BUDGET_SLACK or last.epsilon > budget + BUDGET_SLACK
    )
    if overrun:
        problems.insert(
            0,
            f"budget ε={budget:g} exceeded: recomputed PRV ε={eps_prv:.6g}, "
            f"reported ε={last.epsilon:.6g}",
        )
    verdict = "overrun" if overrun else ("under-reported" if under else "ok")
    return ClientAudit(
        client=last.client,
        level=last.level,
        rounds=len(records),
        total_steps=state.total_steps,
        noise_multipliers=_unique(r.noise_multiplier for r in records),
        sample_rates=_unique(r.sample_rate for r in records),
        delta=last.delta,
        reported_epsilon=last.epsilon,
        epsilon_rdp=eps_rdp,
        epsilon_prv=eps_prv,
        budget_epsilon=budget,
        verdict=verdict,
        problems=tuple(problems),
    )


def audit_records(
    records: Iterable[LedgerRecord | Mapping[str, Any]],
    *,
    budget_epsilon: float | None,
    tolerance: float = 2 * PRV_EPS_ERROR,
    check_every_record: bool = True,
) -> AuditReport:
    """Recompute every client's ε from ledger records and judge it.

    Parameters
    ----------
    records
        Ledger records (or their dicts, e.g. straight from the JSON lines), in file order.
        Records are grouped by (client, level); each group is one history.
    budget_epsilon
        The ε budget each client must stay within, or ``None`` to skip the overrun check.
    tolerance
        How far a reported ε may sit below the recomputed PRV ε (see module docstring).
    check_every_record
        Check each record's cumulative ε, not just the last (one PRV evaluation per record).

    Returns
    -------
    AuditReport
        One :class:`ClientAudit` per (client, level), sorted by client then level.
    """
    budget = None if budget_epsilon is None else check_epsilon("budget_epsilon", budget_epsilon)
    tolerance = check_non_negative("tolerance", tolerance)
    groups: dict[tuple[str, str], list[LedgerRecord]] = {}
    for raw in records:
        rec = raw if isinstance(raw, LedgerRecord) else LedgerRecord.from_dict(raw)
        groups.setdefault((rec.client, rec.level), []).append(rec)
    audits = tuple(
        _audit_one(groups[key], budget=budget, tolerance=tolerance, every_record=check_every_record)
        for key in sorted(groups)
    )
    return AuditReport(clients=audits, budget_epsilon=budget, tolerance=tolerance)
