"""Differential privacy for fedtune: accounting, ledger, DP-SGD wiring, client-level DP, audit.

Pure maths and state, importable without Flower. The DP-SGD helpers (which need torch and
Opacus) are loaded on first use, so importing this package imports neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from fedtune.privacy.ledger import LedgerConflictError, LedgerCorruptError, PrivacyLedger
from fedtune.privacy.record import LedgerRecord

if TYPE_CHECKING:
    from fedtune.privacy.dpsgd import (
        DPTraining,
        UnsupportedLayerError,
        check_dp_compatible,
        make_dp_training,
        unwrap,
    )

_LAZY = {"DPTraining", "UnsupportedLayerError", "check_dp_compatible", "make_dp_training", "unwrap"}

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
    "DPTraining",
    "LedgerConflictError",
    "LedgerCorruptError",
    "LedgerRecord",
    "PrivacyLedger",
    "UnsupportedLayerError",
    "audit_records",
    "calibrate_noise",
    "check_budget",
    "check_dp_compatible",
    "clip_update",
    "compose_client_round",
    "compute_epsilon",
    "distributed_noise",
    "epsilon_after",
    "make_dp_training",
    "share_std",
    "unwrap",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from fedtune.privacy import dpsgd

        return getattr(dpsgd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
