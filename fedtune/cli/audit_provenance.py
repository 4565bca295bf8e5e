"""Where an audit's numbers come from: the provenance block of ``fedtune audit --report``.

An auditor reading the page later must be able to tell which run it describes, which
fedtune produced it, what each client trained on (n_k, clip norm, batch, epochs), where
the budget and δ came from, and which accountant's ε decides the verdict.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtune.cli.audit_inputs import Budget, Ledger, RunFacts
from fedtune.config import load_toml
from fedtune.errors import ConfigError
from fedtune.privacy.audit import AuditReport
from fedtune.resolve import resolve
from fedtune.run.card import run_settings

__all__ = ["ClientFacts", "Provenance", "client_facts", "provenance", "run_settings_of"]

DECIDING = (
    "PRV ε decides every verdict: the recomputed PRV ε (numerical composition of privacy "
    "loss random variables, Gopi, Lee & Wutschitz 2021; exact to ±0.01) is compared with "
    "the budget. RDP ε (Rényi DP, Mironov 2017) is an independent, looser upper bound shown "
    "as a cross-check; an RDP ε above the budget does not fail the audit."
)


@dataclass(frozen=True)
class ClientFacts:
    """What one client's last training record says it ran on."""

    num_examples: int
    max_grad_norm: float
    batch_size: int
    local_epochs: int
    accountant: str


@dataclass(frozen=True)
class Provenance:
    """The page's provenance rows, ``(label, text)``, and any notes on the accountants."""

    rows: tuple[tuple[str, str], ...]
    accountant_notes: tuple[str, ...]


def fedtune_version() -> str:
    """The installed fedtune's version ("unknown" when run from a source tree)."""
    try:
        return importlib.metadata.version("fedtune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def client_facts(ledgers: Sequence[Ledger]) -> dict[tuple[str, str], ClientFacts]:
    """``(client, level)`` -> the facts of its last training record."""
    out: dict[tuple[str, str], ClientFacts] = {}
    for led in ledgers:
        for r in led.records:
            if r.kind == "train":
                out[(r.client, r.level)] = ClientFacts(
                    r.num_examples, r.max_grad_norm, r.batch_size, r.local_epochs, r.accountant
                )
    return out


def run_settings_of(path: Path) -> str | None:
    """The one-line settings of the run whose ``config.toml`` is in ``path`` (None: none)."""

    config = path / "config.toml"
    if not (path.is_dir() and config.is_file()):
        return None
    try:
        return run_settings(resolve(load_toml(config), wiring=False).config)
    except ConfigError:
        return None


def _utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def provenance(
    path: Path,
    *,
    report: AuditReport,
    ledgers: Sequence[Ledger],
    budget: Budget,
    facts: RunFacts,
    now: dt.datetime | None = None,
) -> Provenance:
    """The rows of the page's provenance table and the accountant notes."""
    now = now or dt.datetime.now(dt.UTC)
    records = [r for led in ledgers for r in led.records]
    run_ids = list(dict.fromkeys(r.run_id for r in records))
    stamps = [r.timestamp for r in records if r.timestamp > 0]
    rows: list[tuple[str, str]] = [
        ("report written", now.strftime("%Y-%m-%d %H:%M UTC")),
        ("fedtune version", fedtune_version()),
        ("audited path", str(path)),
        ("run id" + ("s" if len(run_ids) > 1 else ""), ", ".join(run_ids) or "—"),
    ]
    if stamps:
        rows.append(("ledger records", f"{_utc(min(stamps))} to {_utc(max(stamps))}"))
    settings = run_settings_of(path)
    if settings is not None:
        rows.append(("run settings", f"{settings} (from {path / 'config.toml'})"))
    rows.append(
        (
            "budget",
            f"ε = {budget.epsilon:g}, from {budget.source}"
            if budget.epsilon is not None
            else f"not checked: {budget.source}",
        )
    )
    rows.append(
        (
            "δ",
            f"{facts.delta:g}, from {facts.delta_source}"
            if facts.delta is not None
            else f"not fixed: {facts.delta_source}",
        )
    )
    reporting = sorted({r.accountant for r in records})
    rows.append(("accountant that decides", DECIDING))
    rows.append(("accountant the clients reported with", ", ".join(reporting) or "—"))
    # Clients with the same figures share one note (4 identical clients: one line).
    same: dict[tuple[str, str, str, str], list[str]] = {}
    limit = report.budget_epsilon
    for c in report.clients:
        if limit is not None and c.epsilon_rdp > limit >= c.epsilon_prv:
            key = (c.level, f"{c.epsilon_rdp:.3f}", f"{c.epsilon_prv:.3f}", c.verdict)
            same.setdefault(key, []).append(c.client)
    notes = [
        f"{', '.join(who)} ({level}): RDP ε {rdp} is above the budget {limit:g}, PRV ε "
        f"{prv} is not: the verdict is {verdict!r} because PRV decides."
        for (level, rdp, prv, verdict), who in same.items()
    ]
    return Provenance(tuple(rows), tuple(notes))
