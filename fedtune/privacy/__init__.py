"""Differential privacy for fedtune: accounting, ledger, DP-SGD wiring, client-level DP, audit.

Pure maths and state, importable without Flower, torch or Opacus. The DP-SGD helpers,
which need torch and Opacus, are in :mod:`fedtune.privacy.dpsgd`, which this package does
not import.
"""

from __future__ import annotations

from fedtune.privacy.accountant import (
    ACCOUNTANTS,
    Accountant,
    AccountantState,
    Composition,
    compute_epsilon,
    epsilon_after,
)
from fedtune.privacy.analysis import PRV_EPS_ERROR, RELATIONS
from fedtune.privacy.audit import AuditReport, ClientAudit, audit_records
from fedtune.privacy.budget import BudgetCheck, calibrate_noise, check_budget
from fedtune.privacy.client_level import (
    ClippedUpdate,
    clip_update,
    compose_client_round,
    distributed_noise,
    share_std,
)
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.privacy.record import LedgerRecord

__all__ = [
    "ACCOUNTANTS",
    "RELATIONS",
    "PRV_EPS_ERROR",
    "Accountant",
    "AccountantState",
    "AuditReport",
    "BudgetCheck",
    "ClientAudit",
    "ClippedUpdate",
    "Composition",
    "LedgerRecord",
    "PrivacyLedger",
    "audit_records",
    "calibrate_noise",
    "check_budget",
    "clip_update",
    "compose_client_round",
    "compute_epsilon",
    "distributed_noise",
    "epsilon_after",
    "share_std",
]
