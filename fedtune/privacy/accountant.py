"""Stateful privacy accounting: a data owner's composition history and its ε.

A client's privacy loss is the composition of every DP-SGD step it has ever run on its
data. :class:`AccountantState` keeps that whole history as a list of compositions
``(noise_multiplier, sample_rate, steps)`` -- one per round -- and evaluates it with
Opacus' own accountants (or their replace-one counterparts in
:mod:`fedtune.privacy.analysis`) on the whole history, so ε composes over the whole run
instead of restarting with a fresh ``PrivacyEngine`` every round.

Two accountants are offered, both upper bounds on ε for a given δ:

``"prv"``
    Numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz,
    NeurIPS 2021, https://arxiv.org/abs/2106.02848). Tightest; the value returned is
    Opacus' ``eps_upper`` = estimate + ``PRV_EPS_ERROR``, i.e. it already includes the
    discretisation error (:mod:`fedtune.privacy.analysis.prv`).
``"rdp"``
    Rényi DP of the sampled Gaussian mechanism (Mironov, Talwar & Zhang 2019,
    https://arxiv.org/abs/1908.10530) converted to (ε, δ). Looser, analytic, fast
    (:mod:`fedtune.privacy.analysis.rdp`).

``"discrete-rdp"``
    Rényi DP proven for the Poisson-subsampled **discrete** Gaussian that grid DP-SGD
    releases (``dp-noise = "grid"``), and for any mechanism with the Gaussian's RDP
    curve, the float Gaussian included: Canonne, Kamath & Steinke 2020 (Theorem 14),
    Zhu & Wang 2019 (Theorem 6), Mironov 2017 (Proposition 11) for replace-one
    (:mod:`fedtune.privacy.analysis.discrete_rdp`). The only one of the three that is
    proven for the grid mechanism; looser than both others. A history holding any
    discrete-Gaussian release is evaluated with it (:data:`MECHANISM_ACCOUNTANTS`).

Gaussian DP (Opacus' ``"gdp"`` accountant) is deliberately **not** offered. It rests on
a central-limit approximation of the composed privacy loss (Bu, Dong, Long & Su 2020,
https://arxiv.org/abs/1911.11607) that only becomes exact as the number of steps goes
to infinity with ``q·sqrt(steps)`` fixed; for the finite, often small step counts of a
federated round it can *underestimate* ε (Opacus itself warns "GDP accounting is
experimental and can underestimate privacy expenditure", and Gopi et al. 2021, Fig. 1,
show the gap). A budget must be enforced with an upper bound, so GDP is not one.

Budget checks and σ calibration on top of this live in :mod:`fedtune.privacy.budget`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedtune.privacy._checks import (
    check_delta,
    check_positive,
    check_positive_int,
    check_sample_rate,
)
from fedtune.privacy.analysis import (
    RELATIONS,
    Relation,
    discrete_rdp_epsilon,
    prv_epsilon,
    rdp_epsilon,
)

__all__ = [
    "ACCOUNTANTS",
    "MECHANISMS",
    "MECHANISM_ACCOUNTANTS",
    "Accountant",
    "AccountantState",
    "Composition",
    "compute_epsilon",
    "epsilon_after",
    "proven_accountant",
]

Accountant = Literal["prv", "rdp", "discrete-rdp"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp", "discrete-rdp")

MECHANISMS: tuple[str, ...] = ("gaussian", "discrete-gaussian")
"""The noise a release added: ``"gaussian"`` (float64 normals, ``dp-noise = "float"``,
and the float DP evaluations) or ``"discrete-gaussian"`` (exact integer noise on a
power-of-two grid: grid DP-SGD and every client-level share)."""

MECHANISM_ACCOUNTANTS: dict[str, tuple[str, ...]] = {
    "gaussian": ACCOUNTANTS,
    "discrete-gaussian": ("discrete-rdp",),
}
"""The accountants whose ε is proven for each mechanism."""


def proven_accountant(requested: str, mechanisms: Sequence[str]) -> str:
    """The accountant to evaluate a history of releases of ``mechanisms`` with.

    ``requested`` (the run's ``accountant``) when it is proven for every mechanism in
    the history, else ``"discrete-rdp"``, the one proven for all of them. An unknown
    ``requested`` is an error, never silently replaced.
    """
    if requested not in ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {requested!r}.")
    if all(requested in MECHANISM_ACCOUNTANTS[m] for m in mechanisms):
        return requested
    return "discrete-rdp"


@dataclass(frozen=True)
class Composition:
    """``steps`` steps of the Gaussian mechanism with Poisson sampling rate ``sample_rate``.

    Each step releases ``sum_i clip(g_i) + noise`` over a batch in which every example
    is included independently with probability ``sample_rate``; the noise is
    ``N(0, (noise_multiplier·C)² I)`` (``mechanism = "gaussian"``) or its discrete
    counterpart on a grid with at least that multiplier with respect to the rounded
    sensitivity (``"discrete-gaussian"``, :mod:`fedtune.privacy.optimizer`).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    mechanism: str = "gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "noise_multiplier", check_positive("noise_multiplier", self.noise_multiplier)
        )
        object.__setattr__(self, "sample_rate", check_sample_rate("sample_rate", self.sample_rate))
        object.__setattr__(self, "steps", check_positive_int("steps", self.steps))
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"`mechanism` must be one of {MECHANISMS}, got {self.mechanism!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (``mechanism`` only when not ``"gaussian"``)."""
        out: dict[str, Any] = {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }
        if self.mechanism != "gaussian":
            out["mechanism"] = self.mechanism
        return out


@dataclass(frozen=True)
class AccountantState:
    """The full composition history of one data owner, oldest first.

    Immutable: :meth:`compose` returns a new state. Floats survive the JSON round trip
    exactly, so ``AccountantState.from_dict(s.to_dict()) == s``.
    """

    compositions: tuple[Composition, ...] = ()

    def compose(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        mechanism: str = "gaussian",
    ) -> AccountantState:
        """Return the state after ``steps`` more steps of ``(noise_multiplier, sample_rate)``."""
        step = Composition(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            mechanism=mechanism,
        )
        return AccountantState(self.compositions + (step,))

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The distinct mechanisms of the history, sorted."""
        return tuple(sorted({c.mechanism for c in self.compositions}))

    def proven_accountant(self, requested: str) -> str:
        """``requested`` if it is proven for every release of the history, else
        ``"discrete-rdp"`` (:func:`proven_accountant`)."""
        return proven_accountant(requested, self.mechanisms)

    @property
    def total_steps(self) -> int:
        """Number of mechanism invocations composed so far."""
        return sum(c.steps for c in self.compositions)

    def opacus_history(self) -> list[tuple[float, float, int]]:
        """Return the history as Opacus accountants store it.

        Adjacent compositions with the same ``(noise_multiplier, sample_rate)`` are
        merged exactly as ``PRVAccountant.step`` / ``RDPAccountant.step`` merge them, so
        the ε computed here is the one a single long-lived Opacus accountant would
        report after running every round.
        """
        history: list[tuple[float, float, int]] = []
        for c in self.compositions:
            if history and history[-1][0] == c.noise_multiplier and history[-1][1] == c.sample_rate:
                sigma, q, n = history[-1]
                history[-1] = (sigma, q, n + c.steps)
            else:
                history.append((c.noise_multiplier, c.sample_rate, c.steps))
        return history

    def epsilon(self, *, delta: float, accountant: Accountant, relation: Relation) -> float:
        """Return the ε (an upper bound) spent so far at ``delta``; 0.0 for no history.

        ``accountant`` is replaced by ``"discrete-rdp"`` when it is not proven for some
        release of the history (:meth:`proven_accountant`): the figure returned is
        always one proven for the mechanisms that ran.
        """
        return compute_epsilon(
            self.opacus_history(),
            delta=delta,
            accountant=self.proven_accountant(accountant),  # type: ignore[arg-type]
            relation=relation,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (``{"history": [{...}, ...]}``)."""
        return {"history": [c.to_dict() for c in self.compositions]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccountantState:
        """Inverse of :meth:`to_dict`; validates every entry."""
        history = data.get("history") if isinstance(data, Mapping) else None
        if not isinstance(history, Sequence) or isinstance(history, str):
            raise ValueError(f"`history` must be a list of compositions, got {history!r}.")
        comps = []
        for i, entry in enumerate(history):
            keys = {"noise_multiplier", "sample_rate", "steps"}
            if not isinstance(entry, Mapping) or not keys <= set(entry) <= keys | {"mechanism"}:
                raise ValueError(
                    f"`history[{i}]` must have exactly the keys noise_multiplier, "
                    f"sample_rate, steps (and optionally mechanism); got {entry!r}."
                )
            comps.append(Composition(**entry))
        return cls(tuple(comps))

    def __len__(self) -> int:
        return len(self.compositions)


def compute_epsilon(
    history: Sequence[tuple[float, float, int]],
    *,
    delta: float,
    accountant: Accountant,
    relation: Relation,
) -> float:
    """Return ε at ``delta`` for an Opacus-style history ``[(sigma, q, steps), ...]``.

    Parameters
    ----------
    history
        Compositions as Opacus accountants store them.
    delta
        Target δ in (0, 1).
    accountant
        ``"prv"``, ``"rdp"`` or ``"discrete-rdp"`` (see the module docstring for why not
        ``"gdp"``).
    relation
        ``"replace-one"`` (what fedtune clients run: :mod:`fedtune.privacy.analysis`)
        or ``"add-remove"`` (Opacus' own accountants).

    Returns
    -------
    float
        An upper bound on ε, never negative; ``inf`` when the PRV grid would be too large (see
        :data:`~fedtune.privacy.analysis.prv.MAX_PRV_DOMAIN_POINTS`) or the PRV numerics fail.
    """
    delta = check_delta("delta", delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}.")
    if relation not in RELATIONS:
        raise ValueError(f"`relation` must be one of {RELATIONS}, got {relation!r}.")
    history = [(float(s), float(q), int(n)) for s, q, n in history]
    if not history:
        return 0.0
    # Import Opacus outside the filter below, so its own import-time warnings still show.
    import opacus.accountants  # noqa: F401

    # Opacus' RDP code warns when the optimal order sits at the edge of its alpha grid:
    # the bound is then merely looser, never wrong, so the warning is noise here.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        if accountant == "rdp":
            epsilon = rdp_epsilon(history, delta=delta, relation=relation, coarse=False)
        elif accountant == "discrete-rdp":
            epsilon = discrete_rdp_epsilon(history, delta=delta, relation=relation)
        else:
            epsilon = prv_epsilon(history, delta=delta, relation=relation)
    return _as_bound(float(epsilon))


def _as_bound(epsilon: float) -> float:
    """ε as a usable upper bound: never negative, never NaN.

    At a large δ the PRV estimate can dip below 0 (δ = 0.3: ε ≈ -0.05); a mechanism
    that is (ε, δ)-DP for some ε < 0 is also (0, δ)-DP, so 0 is the tight valid bound.
    NaN (failed numerics) becomes ``inf``: a budget check must fail closed.
    """
    if math.isnan(epsilon):
        return math.inf
    return max(0.0, epsilon)


def epsilon_after(
    state: AccountantState,
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant,
    relation: Relation,
    mechanism: str = "gaussian",
) -> float:
    """Return the ε ``state`` would have after one more round of ``steps`` steps.

    Use it before training: if the result exceeds the budget, refuse the round. The
    accountant is the proven one for the history plus the planned ``mechanism``.
    """
    after = state.compose(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        mechanism=mechanism,
    )
    return after.epsilon(delta=delta, accountant=accountant, relation=relation)
