"""Append-only privacy ledger: one JSON line per release a client made.

A release is keyed by what the client itself controls: ``run_nonce`` (random, made by
the client the first time it sees a run, see :mod:`fedtune.privacy.releases`) and the
round, and it carries ``input_hash``, the SHA-256 of the global state the client trained
from. The server names neither, so it cannot make two releases share one entry.

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

from fedtune.errors import FedtuneError
from fedtune.privacy._checks import (
    check_delta,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_sample_rate,
)
from fedtune.privacy.accounting import ACCOUNTANTS, RELATIONS, AccountantState

__all__ = [
    "LEVELS",
    "NOISE_SOURCES",
    "LedgerConflictError",
    "LedgerCorruptError",
    "LedgerRecord",
    "PrivacyLedger",
]

LEVELS: tuple[str, ...] = ("example", "client")
NOISE_SOURCES: tuple[str, ...] = ("csprng", "seeded")
"""Where a release's noise came from: a CSPRNG keyed from OS entropy, or a seeded key
(reproducible simulations only; :func:`fedtune.privacy.audit.audit_records` flags it)."""

#: Fields a ledger written before releases were nonce-keyed lacks, with the values a
#: reader fills in (the mechanism published n_k, so it is re-audited as replace-one;
#: its noise came from a seeded PRNG).
_LEGACY_DEFAULTS: dict[str, Any] = {
    "run_nonce": "",
    "input_hash": "",
    "relation": "replace-one",
    "noise": "seeded",
    "batch_size": 0,
    "local_epochs": 0,
    "num_examples": 0,
    "sampled_clients": 0,
    "tolerance": 0,
}


class LedgerConflictError(FedtuneError, ValueError):
    """A (run_nonce, round, client) is recorded again with another input or parameters."""


class LedgerCorruptError(FedtuneError, ValueError):
    """A ledger line other than a torn last line cannot be read."""


@dataclass(frozen=True)
class LedgerRecord:
    """One release of one client.

    ``noise_multiplier``, ``sample_rate`` and ``steps`` describe the release's
    composition, read from the Opacus objects that ran (example level) or the
    DP-FedAvg step (client level: ``sample_rate = 1``, one step; the server picks
    the clients, so there is no amplification against it). ``epsilon`` is the
    cumulative ε at ``delta`` under ``relation`` after it (see the module docstring).
    ``batch_size``, ``local_epochs`` and ``num_examples`` (example level) and
    ``sampled_clients`` / ``tolerance`` (client level: the noise shares were sized so
    that ``sampled_clients - tolerance`` of them carry the full σ) let an auditor
    cross-check the composition against the run's configuration. ``0`` means "not
    recorded" (legacy records).
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
    run_nonce: str = ""
    input_hash: str = ""
    relation: str = "replace-one"
    noise: str = "csprng"
    batch_size: int = 0
    local_epochs: int = 0
    num_examples: int = 0
    sampled_clients: int = 0
    tolerance: int = 0

    def __post_init__(self) -> None:
        for name in ("run_id", "client"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{name}` must be a non-empty string, got {value!r}.")
        for name in ("run_nonce", "input_hash"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > 128 or not value.isprintable():
                raise ValueError(f"`{name}` must be a short printable string, got {value!r}.")
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
        if self.relation not in RELATIONS:
            raise ValueError(f"`relation` must be one of {RELATIONS}, got {self.relation!r}.")
        if self.noise not in NOISE_SOURCES:
            raise ValueError(f"`noise` must be one of {NOISE_SOURCES}, got {self.noise!r}.")
        for name in ("batch_size", "local_epochs", "num_examples", "sampled_clients", "tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
        check_non_negative("timestamp", self.timestamp)

    @property
    def key(self) -> tuple[str, int, str]:
        """The release key ``(run_nonce, round, client)``; legacy records use ``run_id``."""
        return (self.run_nonce or f"legacy:{self.run_id}", self.round, self.client)

    @property
    def legacy(self) -> bool:
        """True for a record written before releases were nonce-keyed."""
        return not self.run_nonce

    def same_round(self, other: LedgerRecord) -> bool:
        """True when ``other`` records the same release (same input, same parameters)."""
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
        if isinstance(data, Mapping) and set(data) == names - set(_LEGACY_DEFAULTS):
            data = {**_LEGACY_DEFAULTS, **data}
        if not isinstance(data, Mapping) or set(data) != names:
            got = sorted(data) if isinstance(data, Mapping) else data
            raise ValueError(
                f"a ledger record must have exactly the keys {sorted(names)}, got {got!r}."
            )
        values = dict(data)
        if values["epsilon"] == "inf":
            values["epsilon"] = math.inf
        return cls(**values)


def counted_for(records: list[LedgerRecord], level: str) -> list[LedgerRecord]:
    """The records that spend the ``level`` guarantee of one client's data, in file order.

    A client-level release (DP-FedAvg, one clipped update) is also a replace-one
    mechanism on any single example of that client (replacing one example moves the
    clipped update by at most ``2C``, as replacing the whole data set does), so an
    example-level ε composes *every* release of the data. Example-level DP-SGD gives
    no client-level guarantee at all; the client-level ε composes client-level
    releases only (:func:`fedtune.privacy.audit.audit_records` says when example-level
    releases of the same data exist beside them).
    """
    if level == "example":
        return list(records)
    return [r for r in records if r.level == level]


def history_of(records: list[LedgerRecord]) -> AccountantState:
    """The composition history of ``records`` (one client's), in order."""
    _single(records, "client")
    _single(records, "relation")
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
            f"into one history would be meaningless."
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

    def history(self, *, client: str, level: str) -> AccountantState:
        """The composition history that spends ``client``'s ``level`` guarantee.

        Every run counts: the budget belongs to the data (see :func:`counted_for`).
        """
        mine = [r for r in self.records() if r.client == client]
        return history_of(counted_for(mine, level))

    def release(self, *, run_nonce: str, round: int, client: str) -> LedgerRecord | None:
        """The recorded release of ``(run_nonce, round, client)``, if any."""
        key = (run_nonce, round, client)
        return next((r for r in self.records() if r.key == key), None)

    # -- writing ---------------------------------------------------------------------
    def record(
        self,
        *,
        run_id: str,
        run_nonce: str,
        input_hash: str,
        round: int,
        client: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
        delta: float,
        accountant: str,
        relation: str,
        level: str,
        noise: str,
        batch_size: int = 0,
        local_epochs: int = 0,
        num_examples: int = 0,
        sampled_clients: int = 0,
        tolerance: int = 0,
        timestamp: float | None = None,
    ) -> LedgerRecord:
        """Append one release, computing its cumulative ε; idempotent per release.

        If ``(run_nonce, round, client)`` is already recorded with the same input and
        parameters, the stored record is returned and nothing is written (a replayed
        reply is not a new release). If it is recorded with another ``input_hash`` or
        other parameters, :class:`LedgerConflictError` is raised: that would be a
        second, different release under one key.
        """
        if not run_nonce:
            raise ValueError("`run_nonce` must be the client's own nonce for the run, got ''.")
        candidate = LedgerRecord(
            run_id=run_id,
            run_nonce=run_nonce,
            input_hash=input_hash,
            round=round,
            client=client,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            max_grad_norm=max_grad_norm,
            delta=delta,
            accountant=accountant,
            relation=relation,
            epsilon=0.0,
            level=level,
            noise=noise,
            batch_size=batch_size,
            local_epochs=local_epochs,
            num_examples=num_examples,
            sampled_clients=sampled_clients,
            tolerance=tolerance,
            timestamp=time.time() if timestamp is None else timestamp,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _lock(fd)
            records, good_bytes = self._read()
            for existing in records:
                if existing.key == candidate.key:
                    if existing.same_round(candidate):
                        return existing
                    raise LedgerConflictError(
                        f"release {candidate.key} is already in {self.path} with another "
                        f"input or parameters: stored {existing.to_dict()}, "
                        f"new {candidate.to_dict()}."
                    )
            self._repair_tail(fd, good_bytes)
            prior = counted_for([r for r in records if r.client == client], level)
            state = history_of([*prior, candidate])
            eps = state.epsilon(
                delta=candidate.delta,
                accountant=accountant,  # type: ignore[arg-type]
                relation=relation,  # type: ignore[arg-type]
            )
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
