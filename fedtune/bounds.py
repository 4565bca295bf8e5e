"""Bounded influence: how far one client's update, and the sum of all, may reach.

CKKS stores every value as ``round(x * Delta) mod q``: a sum beyond the usable
range (:attr:`fedtune.crypto.CkksParams.max_abs_value`, ``2 ** 24`` with the
default parameters) wraps around the modulus and decrypts to garbage that looks
like any other number. Measured with the old cap of 1e7 examples per client: four
honest clients with ``n_k = 1e7`` and ``w = 0.9`` sum to 3.6e7 per coordinate, past
the true half-modulus ``q / (2 Delta)`` (about 3.4e7), and the key holders
decrypt a mean of -0.78 instead of 0.9.

The server adds ``sum_k n_k w_k`` without reading it, so the only bound it can
enforce is on what it can see: the counts. With every adapter entry assumed to
satisfy ``|w| <= VALUE_BOUND``::

    sum_k n_k * max|w_k|  <=  num-clients * max-client-examples * VALUE_BOUND
                          <=  capacity (= max_abs_value)

:func:`check_capacity` refuses a configuration that breaks the second line; the
strategy refuses a count above ``max-client-examples`` and, in plaintext, an update
with an entry beyond ``VALUE_BOUND``; the key holders refuse a decrypted mean beyond
it (:func:`check_global_mean`).

What this does not do: it limits what a forged or scaled update can do to the
model (no entry of the mean can leave ``[-VALUE_BOUND, VALUE_BOUND]``, and an
encrypted sum that wrapped is caught when its garbage lands outside that range),
but a malicious key holder who stays within the bounds can still move the mean
anywhere inside them, and the server cannot see an encrypted update's values at
all. The cryptographic answer, zero-knowledge proofs that each encrypted update
has a bounded norm (RoFL, Lycklama et al., IEEE S&P 2023,
https://arxiv.org/abs/2107.03311; ACORN, Bell et al., USENIX Security 2023,
https://eprint.iacr.org/2022/1461), is not built.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from fedtune.config import ConfigError
from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from fedtune.crypto.params import CkksParams

log = logging.getLogger("fedtune.client")

#: Largest ``|w|`` any adapter entry may take (LoRA A/B and the head). Honest
#: entries are far smaller (LoRA's ``A`` starts within ``1 / sqrt(fan_in)``, ``B`` at
#: zero); 64 leaves room for client-level DP noise shares. The capacity check, the
#: server's plaintext check and the key holders' check all use it.
VALUE_BOUND = 64.0


class BoundError(FedtuneError, ValueError):
    """A vector leaves the range :data:`VALUE_BOUND` allows (or is not finite)."""


def ckks_capacity(params: CkksParams) -> float:
    """Largest ``|sum_k n_k w_k|`` per coordinate that decrypts correctly.

    ``2 ** (data_modulus_bits - global_scale_bits - 2)``: values live in
    ``(-q/2, q/2)`` once scaled by ``Delta``, with one more bit of headroom for
    noise and rounding (:attr:`CkksParams.max_abs_value`). ``2 ** 24`` for the
    default ``q = 59`` bits, ``Delta = 2 ** 33``.
    """
    return params.max_abs_value


def max_total_examples(*, capacity: float, value_bound: float = VALUE_BOUND) -> int:
    """Most examples (``sum_k n_k``) a round may add: ``floor(capacity / value_bound)``.

    >>> max_total_examples(capacity=2.0**24)
    262144
    """
    return math.floor(capacity / value_bound)


def check_capacity(
    *,
    num_clients: int,
    max_client_examples: int,
    capacity: float,
    value_bound: float = VALUE_BOUND,
) -> None:
    """Refuse a run whose largest possible encrypted sum would wrap the CKKS modulus.

    Raises
    ------
    ConfigError
        When ``num_clients * max_client_examples * value_bound > capacity``.
    """
    worst = num_clients * max_client_examples * value_bound
    if worst > capacity:
        most = max_total_examples(capacity=capacity, value_bound=value_bound)
        raise ConfigError(
            f"`num-clients` ({num_clients}) x `max-client-examples` ({max_client_examples}) "
            f"x the adapter value bound ({value_bound:g}) is {worst:.4g}, more than the "
            f"{capacity:.4g} the CKKS parameters can sum without wrapping the modulus "
            f"(the decrypted mean would be garbage). Lower `max-client-examples` to at most "
            f"{most // num_clients} (at most {most} examples in all), or use CKKS "
            "parameters with more modulus bits above the scale."
        )


def _describe(vector: NDArray[np.floating]) -> str:
    bad = int(np.count_nonzero(~np.isfinite(vector)))
    if bad:
        return f"{bad} NaN or infinite entries"
    return f"an entry of magnitude {float(np.max(np.abs(vector))):.4g}"


def within_bound(vector: NDArray[np.floating], value_bound: float = VALUE_BOUND) -> bool:
    """True when every entry is finite and ``|v_i| <= value_bound``."""
    v = np.asarray(vector, dtype=np.float64)
    return bool(np.isfinite(v).all() and (v.size == 0 or np.max(np.abs(v)) <= value_bound))


def check_update(
    prescaled: NDArray[np.floating], num_examples: int, value_bound: float = VALUE_BOUND
) -> None:
    """Plaintext only: ``n_k w_k / n_k`` must be finite and within ``value_bound``.

    Raises
    ------
    BoundError
        Naming what was found (non-finite entries or the largest magnitude).
    """
    w = np.asarray(prescaled, dtype=np.float64) / num_examples
    if not within_bound(w, value_bound):
        raise BoundError(
            f"update / num-examples holds {_describe(w)}; adapter entries must be finite "
            f"with |w| <= {value_bound:g}."
        )


def check_global_mean(mean: NDArray[np.floating], value_bound: float = VALUE_BOUND) -> None:
    """A key holder's check of a decrypted global adapter before using it.

    The mean of updates that each satisfy ``|w| <= value_bound`` satisfies it too,
    so a mean beyond it means a forged or scaled update, or an encrypted sum that
    wrapped the modulus. This bounds what such an update can do; it does not stop a
    malicious key holder who stays within the bound (see the module docstring).

    Raises
    ------
    BoundError
        Naming what was found and what to do.
    """
    if not within_bound(mean, value_bound):
        raise BoundError(
            f"The decrypted global adapter holds {_describe(np.asarray(mean))}, outside "
            f"|w| <= {value_bound:g} (fedtune.bounds.VALUE_BOUND): some client sent a "
            "forged or scaled update, or the encrypted sum wrapped the CKKS modulus. "
            "This client refuses to train or evaluate on it; the operator should find "
            "the node (metrics.jsonl lists each round's clients) and resume from the "
            "server's RUN_DIR/checkpoint.previous (one round back) without it."
        )


class StepGuard:
    """A key holder's norm-jump check: each decrypted global against the last one accepted.

    Honest FedAvg moves the global adapter by about the same distance each round
    (the mean of clipped, noised local steps). The guard remembers the last global
    it accepted (its round and vector) and the largest per-round step it accepted
    so far, and refuses a global whose step from the remembered one,
    ``||g_b - g_a|| / max(1, |b - a|)``, is more than ``factor`` times that largest
    step. The first step it sees sets the scale and is only held to
    :func:`check_global_mean`.

    What it stops: one round's scaled or replaced update (a jump far beyond the run's
    step size) before any key holder trains or evaluates on it. What it does not
    stop: a first-round attack (there is no scale yet), growth of at most ``factor``
    per round (each accepted step may raise the scale), or any update whose effect
    stays within the honest step size. Because the server cannot tell which
    encrypted update caused a jump, a refusal stops the round for every key holder;
    the operator resumes from the server's ``checkpoint.previous`` (one round back)
    without the suspected node. The
    cryptographic answer (zero-knowledge norm proofs on each encrypted update,
    RoFL / ACORN, see the module docstring) is not built.

    Parameters
    ----------
    factor : float
        ``max-step-factor``; ``0`` turns the check off.
    path : Path | None
        Where the memory is kept between processes (``.npz``, mode 0600; a deployed
        node starts a fresh process per message); ``None`` keeps it in memory.
    run : str
        The run it belongs to (run id and a digest of the config): memory from
        another run is ignored.
    """

    def __init__(self, factor: float, *, path: Path | None = None, run: str = "") -> None:
        self.factor = factor
        self.path = path
        self.run = run
        self._memory: tuple[int, NDArray[np.float64], float] | None = None
        #: ``(round, step per round)`` of every global accepted after the first.
        self.history: list[tuple[int, float]] = []

    def _load(self, length: int) -> tuple[int, NDArray[np.float64], float] | None:
        if self.path is None:
            return self._memory
        try:
            with np.load(self.path, allow_pickle=False) as data:
                run = str(data["run"])
                last_round = int(data["round"])
                vector = np.asarray(data["vector"], dtype=np.float64)
                largest = float(data["largest"])
                history = [
                    (int(r), float(v)) for r, v in np.asarray(data["history"]).reshape(-1, 2)
                ]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
            log.warning("Step check: ignoring unreadable %s (%s); starting afresh.", self.path, err)
            return None
        if run != self.run or vector.shape != (length,) or not np.isfinite(vector).all():
            return None
        self.history = history
        return last_round, vector, largest

    def _store(self, server_round: int, vector: NDArray[np.float64], largest: float) -> None:
        if self.path is None:
            self._memory = (server_round, vector.copy(), largest)
            return
        # With a file the memory is the file: no copy per client stays in the process.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                run=np.array(self.run),
                round=np.array(server_round),
                vector=vector,
                largest=np.array(largest),
                history=np.array(self.history, dtype=np.float64).reshape(-1, 2),
            )
        os.replace(tmp, self.path)

    def check(self, mean: NDArray[np.floating], *, server_round: int) -> None:
        """Accept ``mean`` as the global of ``server_round``, or raise :class:`BoundError`."""
        if self.factor == 0:
            return
        vector = np.asarray(mean, dtype=np.float64)
        previous = self._load(vector.size)
        if previous is None:
            self.history = []
            self._store(server_round, vector, 0.0)
            return
        last_round, last, largest = previous
        step = float(np.linalg.norm(vector - last)) / max(1, abs(server_round - last_round))
        if largest > 0 and step > self.factor * largest:
            raise BoundError(
                f"The decrypted global of round {server_round} moved {step:.4g} per round "
                f"from the one of round {last_round}, {step / largest:.3g} times the largest "
                f"step accepted so far ({largest:.4g}; `max-step-factor` is {self.factor:g}): "
                "some client sent a scaled or replaced update. This client refuses to train "
                "or evaluate on it; the operator should resume from the server's "
                "RUN_DIR/checkpoint.previous (one round back)."
            )
        log.info(
            "Step check: round %d moved %.4g per round from round %d (largest before %.4g)",
            server_round,
            step,
            last_round,
            largest,
        )
        if server_round != last_round:
            self.history.append((server_round, step))
        self._store(server_round, vector, max(largest, step))
