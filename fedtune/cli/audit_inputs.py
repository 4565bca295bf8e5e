"""What ``fedtune audit`` reads: the ledgers under a path, the budget, δ and run config.

A path is a run directory (ledgers in ``PATH/privacy/*.jsonl``), a node's state
directory (``PATH/privacy/*.jsonl`` or ``PATH/*.jsonl``) or one ``.jsonl`` ledger.
Each ledger file is audited on its own: a record's cumulative ε composes the earlier
records of the same client *in the same file* (see :mod:`fedtune.privacy.ledger`), so
that is the history the audit must recompute to compare like with like.

Every problem with the input is a :class:`~fedtune.config.ConfigError` naming the path.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtune.config import load_toml, parse_run_config
from fedtune.errors import ConfigError, LedgerCorruptError, PolicyError
from fedtune.privacy.audit import AuditReport, ClientAudit, RunExpectation, audit_records
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.privacy.policy import DEFAULT_DELTA
from fedtune.privacy.policy_file import load_policy, policy_path
from fedtune.privacy.record import LedgerRecord

__all__ = [
    "BUDGET_KEYS",
    "NOT_LEDGERS",
    "Budget",
    "Ledger",
    "RunFacts",
    "audit_ledgers",
    "find_budget",
    "find_ledgers",
    "read_ledgers",
    "run_facts",
    "shared_clients",
]

NOT_LEDGERS = frozenset({"metrics.jsonl"})
"""``*.jsonl`` files of a run directory that are not ledgers."""

BUDGET_KEYS = ("target-epsilon", "epsilon-budget")

_CHECKED_KEYS = ("target-delta", "batch-size", "local-epochs", "max-grad-norm")
"""The run-config keys that fix something every ledger record must agree with."""


@dataclass(frozen=True)
class Budget:
    """The ε no client may exceed (None: not checked)."""

    epsilon: float | None
    source: str
    """Where ``epsilon`` came from, in words (or why there is none)."""


@dataclass(frozen=True)
class RunFacts:
    """The δ to audit at, where it came from, and what the run config fixes."""

    delta: float | None
    delta_source: str
    expect: RunExpectation


@dataclass(frozen=True)
class Ledger:
    """One ledger file and its records."""

    path: Path
    records: tuple[LedgerRecord, ...]


def find_ledgers(path: Path) -> tuple[list[Path], Path | None]:
    """Return the ledger files under ``path`` and the folder holding them (None: a file)."""
    if not path.exists():
        raise ConfigError(
            f"{str(path)!r} does not exist; expected a run directory, a node's state "
            "directory or a .jsonl privacy ledger."
        )
    if path.is_file():
        if path.suffix != ".jsonl":
            raise ConfigError(f"{str(path)!r} is not a .jsonl privacy ledger.")
        return [path], None
    for folder in (path / "privacy", path):
        found = sorted(p for p in folder.glob("*.jsonl") if p.name not in NOT_LEDGERS)
        if found:
            return found, folder
    raise ConfigError(
        f"no privacy ledgers in {str(path)!r}: looked for {str(path / 'privacy')}/*.jsonl "
        f"and {str(path)}/*.jsonl. Was the run made with dp = off?"
    )


def read_ledgers(files: Sequence[Path]) -> tuple[list[Ledger], list[str]]:
    """Read every file; a torn last line or an empty file becomes a note, not an error."""
    ledgers: list[Ledger] = []
    notes: list[str] = []
    for f in files:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                records = PrivacyLedger(f).records()
            except LedgerCorruptError as err:
                raise ConfigError(str(err)) from err
            except OSError as err:
                raise ConfigError(f"cannot read privacy ledger {str(f)!r}: {err}") from err
        notes += [str(w.message) for w in caught]
        if records:
            ledgers.append(Ledger(f, tuple(records)))
        else:
            notes.append(f"privacy ledger {str(f)!r} holds no records; skipped.")
    if not ledgers:
        names = ", ".join(repr(str(f)) for f in files)
        raise ConfigError(f"no ledger records in {names}.")
    return ledgers, notes


def run_facts(given: float | None, path: Path) -> RunFacts:
    """The δ to audit at and what the run's ``config.toml`` fixes for every record.

    δ is ``--delta``, else the node's own (``PATH/policy.toml``: a node's state
    directory, or a simulation's run directory), else the run's ``target-delta`` when
    it is at most the default node δ 1e-5, else 1e-5. A larger ``target-delta`` in
    ``config.toml`` is never used: on a node that file is the server's proposal.
    """
    config = path / "config.toml"
    flat: dict[str, object] = {}
    if path.is_dir() and config.is_file():
        flat = load_toml(config)
    checked = {k: flat[k] for k in _CHECKED_KEYS if k in flat}
    try:
        cfg = parse_run_config(checked)
    except ConfigError as err:
        raise ConfigError(f"{str(config)!r}: {err}") from err
    expect = RunExpectation(
        batch_size=cfg.train.batch_size if "batch-size" in checked else None,
        local_epochs=cfg.train.local_epochs if "local-epochs" in checked else None,
        max_grad_norm=cfg.privacy.max_grad_norm if "max-grad-norm" in checked else None,
        # the example-level noise that ran: its records are audited as that mechanism
        mechanism=cfg.privacy.mechanism if "dp-noise" in checked else None,
    )
    if given is not None:
        return RunFacts(given, "--delta", expect)
    if path.is_dir() and policy_path(path).exists():
        try:
            own = load_policy(path)
        except PolicyError as err:
            raise ConfigError(str(err)) from err
        return RunFacts(own.delta, f"delta in {policy_path(path)} (the node's policy)", expect)
    if "target-delta" in checked and cfg.privacy.target_delta <= DEFAULT_DELTA:
        return RunFacts(cfg.privacy.target_delta, f"target-delta in {config}", expect)
    # config.toml of a node's state directory is the server's run config: its δ is a
    # proposal, never the δ a node's guarantee is stated at.
    where = "a single ledger file" if path.is_file() else f"no {str(policy_path(path))!r}"
    if "target-delta" in checked:
        where += f", and target-delta = {cfg.privacy.target_delta:g} in {config} is above it"
    return RunFacts(DEFAULT_DELTA, f"the default node δ (no --delta, {where})", expect)


def find_budget(given: float | None, path: Path) -> Budget:
    """The budget: ``--budget``, else the node's (``PATH/policy.toml``), else
    ``epsilon-budget`` / ``target-epsilon`` of the run's ``config.toml``, else none."""
    if given is not None:
        return Budget(given, "--budget")
    if path.is_file():
        return Budget(None, "none: no --budget, and a single ledger file has no config.toml")
    if policy_path(path).exists():
        try:
            own = load_policy(path)
        except PolicyError as err:
            raise ConfigError(str(err)) from err
        return Budget(own.epsilon_budget, f"epsilon-budget in {policy_path(path)}")
    config = path / "config.toml"
    if not config.is_file():
        return Budget(None, f"none: no --budget and no {str(config)!r}")
    flat = load_toml(config)
    keys = {k: flat[k] for k in BUDGET_KEYS if k in flat}
    if not keys:
        return Budget(None, f"none: no --budget and no {' / '.join(BUDGET_KEYS)} in {config}")
    try:
        budget = parse_run_config(keys).privacy.budget
    except ConfigError as err:
        raise ConfigError(f"{str(config)!r}: {err}") from err
    if keys.get("epsilon-budget"):
        key = "epsilon-budget"
    elif "target-epsilon" in keys:
        key = (
            "target-epsilon (epsilon-budget = 0)" if "epsilon-budget" in keys else "target-epsilon"
        )
    else:
        key = "the default target-epsilon (epsilon-budget = 0)"
    return Budget(budget, f"{key} in {config}")


def audit_ledgers(
    ledgers: Sequence[Ledger],
    *,
    budget: float | None,
    delta: float | None,
    tolerance: float,
    expect: RunExpectation,
) -> tuple[AuditReport, list[Path]]:
    """Audit each ledger on its own (its ε composes only its own records)."""
    clients: list[ClientAudit] = []
    sources: list[Path] = []
    for ledger in ledgers:
        try:
            part = audit_records(
                ledger.records,
                budget_epsilon=budget,
                delta=delta,
                tolerance=tolerance,
                expect=expect,
            )
        except ValueError as err:
            raise ConfigError(f"cannot audit {str(ledger.path)!r}: {err}") from err
        clients += part.clients
        sources += [ledger.path] * len(part.clients)
    report = AuditReport(
        clients=tuple(clients), budget_epsilon=budget, tolerance=tolerance, delta=delta
    )
    return report, sources


def shared_clients(report: AuditReport, sources: Sequence[Path]) -> list[str]:
    """A warning for each client found in more than one ledger."""
    where: dict[tuple[str, str], list[Path]] = {}
    for c, source in zip(report.clients, sources, strict=True):
        where.setdefault((c.client, c.level), []).append(source)
    return [
        f"client {client!r} ({level}-level) appears in {len(paths)} ledgers "
        f"({', '.join(p.name for p in paths)}); each is audited on its own, but privacy "
        "loss on one data set adds up across them."
        for (client, level), paths in where.items()
        if len(paths) > 1
    ]
