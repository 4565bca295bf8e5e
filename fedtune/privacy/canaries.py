"""Gradient canaries for one-run privacy auditing (simulations only).

With ``audit-canaries = m`` every simulated client trains as usual plus ``m``
white-box *Dirac* gradient canaries, the strongest canaries for DP-SGD (Nasr et al.,
"Tight Auditing of Differentially Private Machine Learning", USENIX Security 2023;
Steinke, Nasr & Jagielski, NeurIPS 2023, section 7). Canary ``i`` owns one trainable
coordinate ``j_i`` (distinct for all canaries) and, when it takes part, its
per-example gradient is ``-16 C e_(j_i)``, which clipping brings to ``-C e_(j_i)``, the
largest any record can contribute (and which a broken clip would let through 16x).

* **Coins.** The auditor's fair coin ``included[i]`` decides once per run whether
  canary ``i`` takes part. A canary left out keeps its slot with a zero gradient, so
  the data set has the same size either way: neighbouring runs differ by *replacing*
  one record, the relation the ledger declares (``replace-one``).
* **Sampling.** In every DP-SGD step each canary slot is drawn independently with
  the step's sampling rate ``q``, like every real example (Poisson sampling), from the
  auditor's generator; a drawn, included canary adds ``-C e_j`` to the clipped sum
  before the noise (:class:`fedtune.privacy.dpsgd` ``add_noise``). Without DP it adds
  ``-C e_j / batch`` to the mean gradient before the optimiser's step.
* **Scores.** After each release the client adds the released update along each
  canary's coordinate, ``(trained - start)[j_i]``, to the canary's score: a canary
  that took part pushed its coordinate up.
* **A round released twice.** An honest client replays its stored reply and never
  releases a round again; if a round *is* released again (a broken mechanism), the
  auditor scores by ``|second - first|`` along each canary's coordinate instead, summed
  over the repeated rounds. Were the noise drawn again, the two releases would only
  average it down (ε grows by about √2 for that round, far below what ``m`` <= a few
  thousand canaries can resolve); were it reused, as a round-keyed noise seed does,
  the difference cancels it and shows every canary that was drawn in one training and
  not the other. Which score is used depends only on which rounds were released, never
  on the scores or the coins, so the guesses stay fixed in advance as the theorem needs.

The coins, coordinates and scores live in ``PRIVACY_DIR/<client>.canaries.json`` and
never in the client's data files; the ledger is unchanged (every record, canary or
not, gets the same per-record guarantee from the same σ, ``q`` and steps, so the
claimed ε is the run's ε). :func:`fedtune.privacy.empirical.audit_scores` turns the
scores into a lower bound on ε (``fedtune audit``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from fedtune.privacy.empirical import EmpiricalBound, audit_scores

__all__ = ["CANARY_NORM", "GUESS_FRACTION", "CanaryState", "canary_file", "load_canaries"]

#: A canary's per-example gradient has norm ``CANARY_NORM * C``: clipping brings it to
#: ``C`` (the strongest a record can be), and a broken clip lets it through 16x larger.
CANARY_NORM = 16.0

#: Guesses fixed before the scores are seen: "in" for the top 10% of scores, "out"
#: for the bottom 10% (20% of the canaries guessed, the rest abstained on).
GUESS_FRACTION = 0.1

FORMAT = "fedtune-canaries-2"


def canary_file(privacy_dir: Path, client: str) -> Path:
    """Where a client's canary state is kept."""
    return Path(privacy_dir) / f"{client}.canaries.json"


@dataclass
class CanaryState:
    """One client's canaries: coordinates, the auditor's coins, running scores."""

    coords: NDArray[np.int64]
    included: NDArray[np.bool_]
    scores: NDArray[np.float64]
    clip_norm: float
    seed: int
    rounds: list[int]
    #: The first release of every round along the canary coordinates (round -> m values).
    first: dict[int, NDArray[np.float64]] = field(default_factory=dict)
    #: ``sum |repeat - first|`` over every repeated release (zeros while there is none).
    repeat_scores: NDArray[np.float64] | None = None

    @classmethod
    def create(cls, *, m: int, num_coords: int, clip_norm: float, seed: int) -> CanaryState:
        """``m`` canaries on distinct coordinates of ``num_coords``, coins from ``seed``."""
        if m > num_coords:
            raise ValueError(
                f"`audit-canaries` = {m} needs as many trainable coordinates, the adapter "
                f"has {num_coords}."
            )
        rng = np.random.default_rng([seed, 0xC4A7])
        coords = np.sort(rng.choice(num_coords, size=m, replace=False)).astype(np.int64)
        included = rng.random(m) < 0.5
        return cls(coords, included, np.zeros(m), float(clip_norm), int(seed), [])

    def step_source(self, server_round: int) -> CanaryStep:
        """The canary draws of one round's training (reproducible from the seed)."""
        return CanaryStep(self, np.random.default_rng([self.seed, 0x57E9, server_round]))

    def add_release(self, server_round: int, update: NDArray[np.floating]) -> None:
        """Score the update a client released in ``server_round`` (``trained - start``)."""
        values = np.asarray(update, dtype=np.float64)[self.coords]
        rnd = int(server_round)
        if rnd in self.first:  # released again: only a broken mechanism gets here
            if self.repeat_scores is None:
                self.repeat_scores = np.zeros(len(self.coords))
            self.repeat_scores += np.abs(values - self.first[rnd])
        else:
            self.first[rnd] = values
            self.scores += values
        self.rounds.append(rnd)

    @property
    def repeated(self) -> bool:
        """Whether some round was released more than once."""
        return len(self.rounds) > len(set(self.rounds))

    def bound(self, *, delta: float, confidence: float = 0.95) -> EmpiricalBound:
        """The ε lower bound the scores prove (guesses fixed by :data:`GUESS_FRACTION`)."""
        k = int(GUESS_FRACTION * len(self.coords))
        scores = self.repeat_scores if self.repeated else self.scores
        assert scores is not None  # a repeated release always sets repeat_scores
        return audit_scores(
            scores, self.included, k_plus=k, k_minus=k, delta=delta, confidence=confidence
        )

    def save(self, path: Path) -> None:
        """Write the state (0600, atomically)."""
        data = {
            "format": FORMAT,
            "seed": self.seed,
            "clip-norm": self.clip_norm,
            "coords": self.coords.tolist(),
            "included": self.included.astype(int).tolist(),
            "scores": self.scores.tolist(),
            "rounds": self.rounds,
            "first": {str(r): v.tolist() for r, v in self.first.items()},
            "repeat-scores": None if self.repeat_scores is None else self.repeat_scores.tolist(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)


def load_canaries(path: Path) -> CanaryState:
    """Read a canary file written by :meth:`CanaryState.save`.

    Raises
    ------
    ValueError
        Naming the file and what is wrong with it.
    """
    try:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        coords = np.asarray(data["coords"], dtype=np.int64)
        included = np.asarray(data["included"], dtype=bool)
        scores = np.asarray(data["scores"], dtype=np.float64)
        if not (coords.shape == included.shape == scores.shape and coords.ndim == 1):
            raise ValueError("coords, included and scores differ in length")
        first = {int(r): np.asarray(v, dtype=np.float64) for r, v in dict(data["first"]).items()}
        repeat = data["repeat-scores"]
        repeat_scores = None if repeat is None else np.asarray(repeat, dtype=np.float64)
        rounds = [int(r) for r in data["rounds"]]
        if any(v.shape != coords.shape for v in first.values()) or set(first) != set(rounds):
            raise ValueError("first releases do not match the canaries or the rounds")
        if (len(rounds) > len(set(rounds))) != (repeat_scores is not None) or (
            repeat_scores is not None and repeat_scores.shape != coords.shape
        ):
            raise ValueError("repeat-scores do not match the repeated rounds")
        return CanaryState(
            coords,
            included,
            scores,
            float(data["clip-norm"]),
            int(data["seed"]),
            rounds,
            first,
            repeat_scores,
        )
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a fedtune canary file: {err}") from None


class CanaryStep:
    """Adds the drawn, included canaries' gradients in each step of one round."""

    def __init__(self, state: CanaryState, rng: np.random.Generator) -> None:
        self.state = state
        self.rng = rng
        self._where: list[tuple[int, int]] | None = None

    def _locate(self, sizes: Sequence[int]) -> list[tuple[int, int]]:
        """``(parameter index, flat offset)`` of every canary coordinate."""
        if self._where is None:
            ends = np.cumsum(sizes)
            if int(ends[-1]) <= int(self.state.coords.max(initial=-1)):
                raise ValueError("canary coordinates lie beyond the trainable parameters")
            index = np.searchsorted(ends, self.state.coords, side="right")
            starts = np.concatenate([[0], ends[:-1]])
            self._where = [
                (int(i), int(c - starts[i])) for i, c in zip(index, self.state.coords, strict=True)
            ]
        return self._where

    def _hits(self, sizes: Sequence[int], sample_rate: float) -> list[tuple[int, int]]:
        """Draw every slot with ``sample_rate``; the included ones' ``(param, offset)``."""
        where = self._locate(sizes)
        drawn = self.rng.random(len(where)) < sample_rate
        return [where[i] for i in np.flatnonzero(drawn & self.state.included)]

    def rows(self, params: Sequence[torch.Tensor], *, sample_rate: float) -> list[torch.Tensor]:
        """Per-example gradients of this step's drawn, included canaries, one per parameter.

        Row ``k`` of every returned ``(h, *p.shape)`` tensor belongs to canary ``k``:
        ``-CANARY_NORM * C`` at its coordinate, zero elsewhere. They are appended to
        Opacus' per-example gradients, so they are clipped (to exactly ``C``, unless
        clipping is broken) and noised like any example.
        """
        hits = self._hits([p.numel() for p in params], sample_rate)
        out = [torch.zeros((len(hits), p.numel()), dtype=p.dtype, device=p.device) for p in params]
        for k, (index, offset) in enumerate(hits):
            out[index][k, offset] = -CANARY_NORM * self.state.clip_norm
        return [o.view(len(hits), *p.shape) for o, p in zip(out, params, strict=True)]

    def add(self, grads: Sequence[torch.Tensor], *, sample_rate: float, scale: float) -> int:
        """Without DP: add ``-scale * C`` at each drawn, included canary's coordinate.

        ``grads`` are the trainable parameters' mean gradients in ``named_parameters``
        order (the adapter vector's); returns how many canaries were added.
        """
        hits = self._hits([g.numel() for g in grads], sample_rate)
        with torch.no_grad():
            for index, offset in hits:
                grads[index].view(-1)[offset] -= scale * self.state.clip_norm
        return len(hits)
