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

__all__ = [
    "ClientFacts",
    "Deciding",
    "Provenance",
    "client_facts",
    "deciding",
    "deciding_text",
    "provenance",
    "run_settings_of",
]

#: How the page and the table name each accountant.
LABEL = {"prv": "PRV", "rdp": "RDP", "discrete-rdp": "discrete-rdp"}

#: How the page and the table name each noise mechanism a ledger composes.
MECHANISM_TEXT = {
    "discrete-gaussian": "discrete Gaussian noise on a grid",
    "gaussian": "float Gaussian noise",
}

#: Why each accountant's ε is the one compared with the budget.
WHY = {
    "discrete-rdp": (
        "Rényi DP proven for the Poisson-subsampled discrete Gaussian (Canonne, Kamath & "
        "Steinke 2020; Zhu & Wang 2019; Mironov 2017 for replace-one), the only accountant "
        "proven for a history holding a discrete-Gaussian release; the PRV and RDP ε are "
        "the continuous Gaussian's figures, shown for comparison only"
    ),
    "prv": (
        "numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz "
        "2021; exact to ±0.01); the RDP ε (Rényi DP, Mironov 2017) is an independent, "
        "looser upper bound shown as a cross-check, and an RDP ε above the budget does not "
        "fail the audit"
    ),
}


#: Where each mechanism comes from in a fedtune run.
_WHERE = {
    "discrete-gaussian": "grid DP-SGD, the default, or client-level shares",
    "gaussian": 'dp-noise = "float", DP evaluations',
}


@dataclass(frozen=True)
class Deciding:
    """The clients one accountant decided for, and the mechanisms their ledgers compose."""

    accountant: str
    clients: tuple[str, ...]
    mechanisms: tuple[str, ...]

    @property
    def label(self) -> str:
        """The accountant as the table names it ("PRV", "discrete-rdp")."""
        return LABEL.get(self.accountant, self.accountant)

    @property
    def noise(self) -> str:
        """The mechanisms in words ("float Gaussian noise", "discrete Gaussian noise on a grid")."""
        return " and ".join(MECHANISM_TEXT.get(m, m) for m in self.mechanisms) or "no noise"

    @property
    def noise_where(self) -> str:
        """The mechanisms in words, each with where it runs in fedtune."""
        return (
            " and ".join(
                f"{MECHANISM_TEXT.get(m, m)}" + (f" ({_WHERE[m]})" if m in _WHERE else "")
                for m in self.mechanisms
            )
            or "no noise"
        )


def deciding(report: AuditReport) -> tuple[Deciding, ...]:
    """The accountants whose ε decides the verdicts, each with its clients and mechanisms.

    The audit evaluates each history with the accountant proven for every mechanism it
    composes (:attr:`~fedtune.privacy.audit.ClientAudit.accountant`): ``discrete-rdp``
    where a discrete-Gaussian release ran, PRV where the noise was float Gaussian only.
    """
    groups: dict[str, tuple[list[str], set[str]]] = {}
    for c in report.clients:
        who, mechanisms = groups.setdefault(c.accountant, ([], set()))
        who.append(f"{c.client} ({c.level})")
        mechanisms.update(c.mechanisms)
    return tuple(
        Deciding(name, tuple(who), tuple(sorted(mechs)))
        for name, (who, mechs) in sorted(groups.items())
    )


def deciding_text(report: AuditReport) -> str:
    """The provenance row "accountant that decides": per accountant, for whom and why."""
    groups = deciding(report)
    parts = []
    for g in groups:
        who = "every client" if len(groups) == 1 else ", ".join(g.clients)
        parts.append(
            f"{g.label} ε decides for {who}, whose ledgers compose {g.noise_where}: "
            f"the recomputed {g.label} ε is "
            f"compared with the budget; {WHY.get(g.accountant, '')}."
        )
    return " ".join(parts) or "—"


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
    rows.append(("accountant that decides", deciding_text(report)))
    rows.append(("accountant the clients reported with", ", ".join(reporting) or "—"))
    return Provenance(tuple(rows), tuple(_notes(report)))


def _notes(report: AuditReport) -> list[str]:
    """Where the accountant shown beside the deciding one would have judged otherwise.

    Float-noise clients: an RDP ε above the budget while the PRV ε is not (PRV decides).
    Grid clients: a continuous-Gaussian PRV ε within the budget while the proven
    discrete-rdp ε is not (discrete-rdp decides). Identical clients share one note.
    """
    limit = report.budget_epsilon
    if limit is None:
        return []
    same: dict[tuple[str, str, str, str, str], list[str]] = {}
    for c in report.clients:
        if c.accountant == "prv" and c.epsilon_rdp > limit >= c.epsilon_prv:
            key = ("rdp", c.level, f"{c.epsilon_rdp:.3f}", f"{c.epsilon_prv:.3f}", c.verdict)
        elif c.accountant != "prv" and c.epsilon_proven > limit >= c.epsilon_prv:
            key = ("prv", c.level, f"{c.epsilon_prv:.3f}", f"{c.epsilon_proven:.3f}", c.verdict)
        else:
            continue
        same.setdefault(key, []).append(c.client)
    notes = []
    for (kind, level, shown, decides, verdict), who in same.items():
        if kind == "rdp":
            notes.append(
                f"{', '.join(who)} ({level}): RDP ε {shown} is above the budget {limit:g}, "
                f"PRV ε {decides} is not: the verdict is {verdict!r} because PRV decides."
            )
        else:
            notes.append(
                f"{', '.join(who)} ({level}): the continuous-Gaussian PRV ε {shown} is within "
                f"the budget {limit:g}, the proven discrete-rdp ε {decides} is not: the "
                f"verdict is {verdict!r} because discrete-rdp decides (discrete Gaussian "
                "noise ran)."
            )
    return notes
