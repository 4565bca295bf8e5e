"""Append-only privacy ledger: one JSON line per release a client made.

A release is keyed by what the client itself controls: ``run_nonce`` (random, made by
the client the first time it sees a run, see :mod:`fedtune.privacy.releases`) and the
round, and it carries ``input_hash``, the SHA-256 of the global state the client trained
from. The server names neither, so it cannot make two releases share one entry.

The ledger **is** the accountant state. There is no second state file to keep in sync:
:meth:`PrivacyLedger.history` rebuilds the :class:`~fedtune.privacy.accountant.AccountantState`
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

What one line holds, and how a line read back is validated, is
:class:`fedtune.privacy.record.LedgerRecord`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from fedtune.errors import LedgerConflictError, LedgerCorruptError
from fedtune.privacy.accountant import AccountantState, proven_accountant
from fedtune.privacy.record import LedgerRecord

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "PrivacyLedger",
    "counted_for",
    "exact_releases",
    "history_of",
]


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
    """The composition history of ``records`` (one client's), in order.

    A DP evaluation (kind ``"eval"``) is a Gaussian mechanism of L2 sensitivity Δ
    and noise std σΔ: for the accountants one entry ``(σ, q = 1, 1 step)``, composed
    with the training rounds in file order. An exact evaluation (``"eval-exact"``)
    has no finite ε and is left out; :func:`exact_releases` lists them.
    """
    _single(records, "client")
    _single(records, "relation")
    state = AccountantState()
    for r in records:
        if not r.accounted:
            continue
        state = state.compose(
            noise_multiplier=r.noise_multiplier,
            sample_rate=r.sample_rate,
            steps=r.steps,
            mechanism=r.mechanism,
        )
    return state


def exact_releases(records: list[LedgerRecord]) -> list[LedgerRecord]:
    """The records of exact held-out metrics a node sent outside its guarantee."""
    return [r for r in records if not r.accounted]


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

    def release(
        self, *, run_nonce: str, round: int, client: str, kind: str = "train"
    ) -> LedgerRecord | None:
        """The recorded release of ``(run_nonce, round, client)`` of this ``kind``, if any.

        ``"eval"`` and ``"eval-exact"`` share one key: round ``t``'s state is
        evaluated once per run, whichever way.
        """
        key = (run_nonce if kind == "train" else f"{run_nonce}/eval", round, client)
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
        mechanism: str = "gaussian",
    ) -> LedgerRecord:
        """Append one release, computing its cumulative ε; idempotent per release.

        ``mechanism`` is the noise that ran (``"discrete-gaussian"`` for grid DP-SGD
        and client-level shares); ``accountant`` the run's choice, replaced by the one
        proven for every composed release where it is not (see :meth:`append`).

        If ``(run_nonce, round, client)`` is already recorded with the same input and
        parameters, the stored record is returned and nothing is written (a replayed
        reply is not a new release). If it is recorded with another ``input_hash`` or
        other parameters, :class:`LedgerConflictError` is raised: that would be a
        second, different release under one key.
        """
        if not run_nonce:
            raise ValueError("`run_nonce` must be the client's own nonce for the run, got ''.")
        candidate = LedgerRecord(
            mechanism=mechanism,
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
            accountant=proven_accountant(accountant, (mechanism,)),
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
        return self.append(candidate)

    def append(self, candidate: LedgerRecord) -> LedgerRecord:
        """Append ``candidate`` (any kind) with its cumulative ε; idempotent as :meth:`record`.

        Its ``epsilon`` is ignored and recomputed from the file's history, with its
        ``accountant`` replaced by ``"discrete-rdp"`` when the history it composes holds
        a release that the requested accountant is not proven for (a float evaluation
        after grid rounds): the ledger never states an ε not proven for what ran.
        """
        if not candidate.run_nonce:
            raise ValueError("`run_nonce` must be the client's own nonce for the run, got ''.")
        client, level = candidate.client, candidate.level
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _lock(fd)
            records, good_bytes = self._read()
            prior = counted_for([r for r in records if r.client == client], level)
            state = history_of([*prior, candidate])
            candidate = replace(candidate, accountant=state.proven_accountant(candidate.accountant))
            accountant, relation = candidate.accountant, candidate.relation
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
    if fcntl is None:  # pragma: no cover - non-POSIX
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
