"""Append-only privacy ledger: one JSON line per (run, round, client).

The ledger **is** the accountant state. There is no second state file to keep in sync:
:meth:`PrivacyLedger.history` rebuilds the :class:`~fedtune.privacy.accounting.AccountantState`
from the records, so whatever the ledger says was spent is exactly what the next budget
check composes with -- a crash can never leave the two disagreeing.

Cumulative ε in a record composes **every** earlier record of the same client and level
in the file, across runs: privacy loss on one data set adds up whichever run spent it.
A simulation keeps one file per run (``runs/<id>/privacy/<client>.jsonl``), where that is
the per-run figure; a real node keeps one file in its state dir, where it is the lifetime
figure that the client's budget must bound.

Durability: the file is opened with ``O_APPEND``, every record is written with one
``write`` call and ``fsync``'d before :meth:`PrivacyLedger.record` returns. A crash
mid-write can only leave a torn *final* line; readers skip it with a warning and the
next :meth:`~PrivacyLedger.record` cuts it off before appending (the one write that is
not an append, and it only removes bytes no reader ever accepted). A malformed line
anywhere else is not a crash artefact and raises :class:`LedgerCorruptError`.
One process writes a ledger at a time (each client owns its own); an advisory
``flock`` guards against accidents where the platform has one.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedtune.privacy._checks import (
    check_delta,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_sample_rate,
)
from fedtune.privacy.accounting import ACCOUNTANTS, AccountantState

__all__ = ["LEVELS", "LedgerConflictError", "LedgerCorruptError", "LedgerRecord", "PrivacyLedger"]

LEVELS: tuple[str, ...] = ("example", "client")


class LedgerConflictError(ValueError):
    """A (run_id, round, client) is recorded again with different parameters."""


class LedgerCorruptError(ValueError):
    """A ledger line other than a torn last line cannot be read."""


@dataclass(frozen=True)
class LedgerRecord:
    """One client's privacy expenditure in one round.

    ``noise_multiplier``, ``sample_rate`` and ``steps`` describe the round's composition;
    ``epsilon`` is the cumulative ε at ``delta`` after it (see the module docstring).
    ``level`` is ``"example"`` (DP-SGD inside the client) or ``"client"`` (DP-FedAvg:
    one step per round, ``sample_rate`` = fraction of clients sampled).
    """

    run_id: str
    round: int
    client: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon: float
    level: str
    timestamp: float

    def __post_init__(self) -> None:
        for name in ("run_id", "client"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{name}` must be a non-empty string, got {value!r}.")
        check_positive_int("round", self.round)
        check_positive("noise_multiplier", self.noise_multiplier)
        check_sample_rate("sample_rate", self.sample_rate)
        check_positive_int("steps", self.steps)
        check_positive("max_grad_norm", self.max_grad_norm)
        check_delta("delta", self.delta)
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {self.accountant!r}.")
        if not (isinstance(self.epsilon, (int, float)) and not isinstance(self.epsilon, bool)):
            raise ValueError(f"`epsilon` must be a number, got {self.epsilon!r}.")
        if math.isnan(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"`epsilon` must be >= 0 (inf allowed), got {self.epsilon!r}.")
        if self.level not in LEVELS:
            raise ValueError(f"`level` must be one of {LEVELS}, got {self.level!r}.")
        check_non_negative("timestamp", self.timestamp)

    @property
    def key(self) -> tuple[str, int, str]:
        """The idempotency key ``(run_id, round, client)``."""
        return (self.run_id, self.round, self.client)

    def same_round(self, other: LedgerRecord) -> bool:
        """True when ``other`` records the same round with the same parameters."""
        skip = {"epsilon", "timestamp"}
        return all(
            getattr(self, f.name) == getattr(other, f.name)
            for f in fields(self)
            if f.name not in skip
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (``inf`` ε is written as the string "inf")."""
        out = asdict(self)
        if math.isinf(self.epsilon):
            out["epsilon"] = "inf"
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerRecord:
        """Inverse of :meth:`to_dict`; validates every field."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, Mapping) or set(data) != names:
            got = sorted(data) if isinstance(data, Mapping) else data
            raise ValueError(
                f"a ledger record must have exactly the keys {sorted(names)}, got {got!r}."
            )
        values = dict(data)
        if values["epsilon"] == "inf":
            values["epsilon"] = math.inf
        return cls(**values)


def _history_of(records: list[LedgerRecord]) -> AccountantState:
    state = AccountantState()
    for r in records:
        state = state.compose(
            noise_multiplier=r.noise_multiplier, sample_rate=r.sample_rate, steps=r.steps
        )
    return state


def _single(records: list[LedgerRecord], attr: str) -> None:
    values = sorted({getattr(r, attr) for r in records})
    if len(values) > 1:
        raise ValueError(
            f"the selected records span several values of `{attr}` ({values}); composing them "
            f"into one history would be meaningless. Pass `{attr}=` to choose one."
        )


class PrivacyLedger:
    """Append-only JSON-lines ledger at ``path`` (created on first record).

    Parameters
    ----------
    path
        The ``.jsonl`` file. Its parent directory is created if missing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # -- reading ---------------------------------------------------------------------
    def _read(self) -> tuple[list[LedgerRecord], int]:
        """Return the records and the byte length of the well-formed prefix."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0
        records: list[LedgerRecord] = []
        offset = 0
        lines = data.split(b"\n")
        for i, raw in enumerate(lines):
            last = i == len(lines) - 1
            if last and raw == b"":
                break
            try:
                record = LedgerRecord.from_dict(json.loads(raw.decode("utf-8")))
            except (ValueError, UnicodeDecodeError) as err:
                if last:  # torn final line: a crash mid-write, nothing was acknowledged
                    warnings.warn(
                        f"ignoring a torn last line in privacy ledger {self.path} "
                        f"({len(raw)} bytes, {err}); it will be cut off on the next record.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    break
                raise LedgerCorruptError(
                    f"privacy ledger {self.path}: line {i + 1} is not a valid record ({err}). "
                    "Only a torn last line is repaired automatically; restore this file "
                    "from a backup."
                ) from err
            records.append(record)
            # a complete record missing only its newline counts; repair adds the newline
            offset += len(raw) + (0 if last else 1)
        return records, offset

    def records(self) -> list[LedgerRecord]:
        """Return every valid record, in file order."""
        return self._read()[0]

    def history(
        self, run_id: str | None = None, *, client: str | None = None, level: str | None = None
    ) -> AccountantState:
        """Return the composition history of the selected records, in file order.

        Raises ``ValueError`` if the selection spans several clients or levels.
        """
        selected = [
            r
            for r in self.records()
            if (run_id is None or r.run_id == run_id)
            and (client is None or r.client == client)
            and (level is None or r.level == level)
        ]
        _single(selected, "client")
        _single(selected, "level")
        return _history_of(selected)

    # -- writing ---------------------------------------------------------------------
    def record(
        self,
        *,
        run_id: str,
        round: int,
        client: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
        delta: float,
        accountant: str = "prv",
        level: str = "example",
        timestamp: float | None = None,
    ) -> LedgerRecord:
        """Append the round's record, computing its cumulative ε; idempotent per key.

        If ``(run_id, round, client)`` is already recorded with the same parameters, the
        stored record is returned and nothing is written (a retried or resumed round is
        never counted twice). If it is recorded with different parameters,
        :class:`LedgerConflictError` is raised.
        """
        candidate = LedgerRecord(
            run_id=run_id,
            round=round,
            client=client,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            max_grad_norm=max_grad_norm,
            delta=delta,
            accountant=accountant,
            epsilon=0.0,
            level=level,
            timestamp=time.time() if timestamp is None else timestamp,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _lock(fd)
            records, good_bytes = self._read()
            for existing in records:
                if existing.key == candidate.key:
                    if existing.same_round(candidate):
                        return existing
                    raise LedgerConflictError(
                        f"round {candidate.key} is already in {self.path} with different "
                        f"parameters: stored {existing.to_dict()}, new {candidate.to_dict()}."
                    )
            self._repair_tail(fd, good_bytes)
            prior = [r for r in records if r.client == client and r.level == level]
            state = _history_of(prior).compose(
                noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
            )
            eps = state.epsilon(delta=candidate.delta, accountant=accountant)  # type: ignore[arg-type]
            final = LedgerRecord(**{**asdict(candidate), "epsilon": eps})
            line = json.dumps(final.to_dict(), sort_keys=True, allow_nan=False) + "\n"
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
            return final
        finally:
            os.close(fd)

    def _repair_tail(self, fd: int, good_bytes: int) -> None:
        size = os.fstat(fd).st_size
        if size > good_bytes:  # torn final line: cut it off
            os.ftruncate(fd, good_bytes)
            os.fsync(fd)
            size = good_bytes
        if size > 0:
            with open(self.path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":  # complete last record that lost only its newline
                    os.write(fd, b"\n")


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
