"""The empirical side of ``fedtune audit``: each canary client's lower bound on ε.

Runs made with ``audit-canaries = m`` leave ``*.canaries.json`` beside the ledgers.
One-run auditing (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023, https://arxiv.org/abs/2305.08846) turns the auditor's guesses about
those canaries into an ε lower bound at 95% confidence (the maths is in
:mod:`fedtune.privacy.canaries` and :mod:`fedtune.privacy.empirical`); a bound above
the ε a client's ledger claims refutes the claim.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from fedtune.errors import ConfigError
from fedtune.privacy.audit import AuditReport

__all__ = ["canary_dir", "empirical_bounds", "refutations", "worst"]


def canary_dir(path: Path) -> Path | None:
    """The folder holding ``*.canaries.json`` files under ``path`` (None: none)."""
    if not path.is_dir():
        return None
    for folder in (path / "privacy", path):
        if any(folder.glob("*.canaries.json")):
            return folder
    return None


def empirical_bounds(
    folder: Path | None, report: AuditReport | None, *, delta: float | None
) -> dict[str, dict[str, object]]:
    """Each canary client's ε lower bound beside its claimed ε (∞ without a ledger)."""
    if folder is None:
        return {}
    from fedtune.privacy.canaries import load_canaries

    claims = {
        c.client: c.reported_epsilon
        for c in (report.clients if report is not None else ())
        if c.level == "example"
    }
    audit_delta = delta
    if audit_delta is None and report is not None and report.clients:
        audit_delta = report.clients[0].delta
    out: dict[str, dict[str, object]] = {}
    for f in sorted(folder.glob("*.canaries.json")):
        client = f.name.removesuffix(".canaries.json")
        try:
            state = load_canaries(f)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        bound = state.bound(delta=audit_delta if audit_delta is not None else 1e-5)
        claimed = claims.get(client, math.inf)
        out[client] = {
            **bound.to_json(),
            "epsilon-claimed": claimed if math.isfinite(claimed) else "inf",
            "rounds": len(state.rounds),
            "refuted": bound.epsilon_lower_bound > claimed,
            "canary-file": str(f),
        }
    return out


def worst(empirical: dict[str, dict[str, object]]) -> dict[str, object]:
    """The client whose lower bound comes closest to (or beyond) its claim."""

    def margin(item: tuple[str, dict[str, object]]) -> float:
        claimed = item[1]["epsilon-claimed"]
        bound = float(item[1]["epsilon-lower-bound"])  # type: ignore[arg-type]
        return bound - (math.inf if claimed == "inf" else float(claimed))  # type: ignore[arg-type]

    client, values = max(empirical.items(), key=margin)
    return {"client": client, **values}


def refutations(empirical: dict[str, dict[str, object]]) -> list[str]:
    """Print (stderr) and return the clients whose lower bound exceeds the claimed ε."""
    refuted = []
    for client, e in empirical.items():
        if e["refuted"]:
            refuted.append(client)
            print(
                f"fedtune audit: client {client!r} refuted: {e['correct']} of {e['guesses']} "
                f"canary guesses right prove ε >= {float(e['epsilon-lower-bound']):.3f} "  # type: ignore[arg-type]
                f"(confidence {e['confidence']}, δ={e['delta']:g}), more than the claimed "  # type: ignore[str-format]
                f"ε = {float(e['epsilon-claimed']):.3f}: the mechanism leaks more than its "  # type: ignore[arg-type]
                "ledger says.",
                file=sys.stderr,
            )
    return refuted
