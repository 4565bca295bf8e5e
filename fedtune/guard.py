"""A key holder's movement guard: use a decrypted global only if it moved within the bound.

Each decrypted global is compared with the last global this node accepted: every
entry finite and within :data:`fedtune.bounds.VALUE_BOUND`, and its largest
coordinate move at most ``bound * rounds`` (``bound`` from
:func:`fedtune.movement.round_bound` times the node policy's ``max-step-slack``;
``rounds`` since the accepted one). It is enforced from round 1 (the seeded initial
adapter is round 0's accepted global) and the run config cannot switch it off.

A refused global is **not observable**: the node logs why, locally, and carries on
from the last accepted global, training and evaluating as usual. Whether a global
was refused depends on decrypted values; a refusal the server could see (an error,
a code, a missing reply, a different reply shape) would be a bit about them for
free, and by bisection any coordinate of a client's update to any precision.

The remembered state (round and vector) is kept in one file, signed with
HMAC-SHA256 under a node-local key created once beside it (mode 0600). A file whose
tag does not verify, or that does not parse, is refused: the guard falls back to
the previous signed state, else to the initial adapter as round 0 (never to "accept
anything").
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from fedtune.bounds import VALUE_BOUND, within_bound
from fedtune.errors import GuardKeyError, NodeRefusal
from fedtune.movement import round_bound

if TYPE_CHECKING:
    from fedtune.train.runtime import ClientRuntime

__all__ = ["MovementGuard", "load_key", "node_guard", "payload_digest"]

log = logging.getLogger("fedtune.client")

_KEY_BYTES = 32
_TAG_BYTES = 32


def load_key(path: Path) -> bytes:
    """The node-local HMAC key at ``path``, created (mode 0600, 32 random bytes) once.

    Raises
    ------
    GuardKeyError
        When ``path`` is a link, not a regular file, open to other users, or not 32
        bytes: the operator should inspect it (a replaced key would make every signed
        state invalid).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(_KEY_BYTES))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise GuardKeyError(
            f"guard key {str(path)!r} cannot be opened ({err}); it must be a regular file "
            "of this node (mode 0600). Remove it only together with the guard state."
        ) from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        key = fh.read(_KEY_BYTES + 1)
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise GuardKeyError(
            f"guard key {str(path)!r} is open to other users (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); `chmod 600` it (and ask who could read it)."
        )
    if not stat.S_ISREG(info.st_mode) or len(key) != _KEY_BYTES:
        raise GuardKeyError(
            f"guard key {str(path)!r} is not a {_KEY_BYTES}-byte regular file "
            f"({len(key)} bytes read); restore it, or remove it together with the guard state."
        )
    return key


class MovementGuard:
    """Accept a decrypted global, or keep the last accepted one (see the module docstring).

    Parameters
    ----------
    bound : float
        The largest coordinate move per round (already times the node's slack).
    initial : NDArray
        The seeded initial adapter: the accepted global of round 0.
    max_rounds : int
        Cap on the rounds counted between two globals (the run's ``num-rounds``).
    path : Path | None
        The signed state file; ``None`` keeps the state in memory.
    key_path : Path | None
        The node-local HMAC key (created once); needed with ``path``.
    run : str
        The run it belongs to: state of another run is not used (round 0 again).
    observable : bool
        Refuse a global out loud (:class:`fedtune.node.codes.NodeRefusal`
        ``"global-refused"``) instead of carrying on silently. Only under
        ``dp = "example"``: there every upload is a DP release and the global, whatever
        offset a server adds to its ``c0`` (``c1`` is pinned by verification), is a
        function of them and of values the server knows, so the refusal bit is
        post-processing and costs no ε; it lets the server run the blame step
        (:mod:`fedtune.secure.blame`). Without DP or with client-level DP a refusal
        would tell the server about one update, so it stays silent.
    """

    def __init__(
        self,
        *,
        bound: float,
        initial: NDArray[np.floating],
        max_rounds: int,
        path: Path | None = None,
        key_path: Path | None = None,
        run: str = "",
        observable: bool = False,
    ) -> None:
        if not bound > 0:
            raise ValueError(f"movement bound must be > 0, got {bound!r}.")
        if path is not None and key_path is None:
            raise ValueError("a guard with a state file needs `key_path` for its HMAC key.")
        self.bound = bound
        self.initial = np.asarray(initial, dtype=np.float64).copy()
        self.max_rounds = max(1, max_rounds)
        self.path = path
        self.key_path = key_path
        self.run = run
        self.observable = observable
        self._memory: tuple[int, NDArray[np.float64]] = (0, self.initial.copy())
        #: ``(round, accepted)`` of every global checked by this object (local record).
        self.history: list[tuple[int, bool]] = []

    # -- the signed state ------------------------------------------------------------

    def _tag(self, key: bytes, body: bytes) -> bytes:
        context = f"fedtune-guard/v1/{self.run}\n".encode()
        return hmac.new(key, context + body, hashlib.sha256).digest()

    def _read(self, path: Path, key: bytes) -> tuple[int, NDArray[np.float64]] | None:
        limit = _TAG_BYTES + 8 * self.initial.size + 4096
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as err:
            log.warning("Movement guard: cannot open %s (%s); not used.", path, err)
            return None
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(limit + 1)
        if len(data) > limit or len(data) <= _TAG_BYTES:
            log.warning("Movement guard: %s has %d bytes; refused.", path, len(data))
            return None
        tag, body = data[:_TAG_BYTES], data[_TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(key, body)):
            log.warning("Movement guard: %s is not signed by this node; refused.", path)
            return None
        try:
            with np.load(io.BytesIO(body), allow_pickle=False) as npz:
                last_round = int(npz["round"])
                vector = np.asarray(npz["vector"], dtype=np.float64)
        except Exception as err:  # noqa: BLE001 - signed but unreadable: refuse it
            log.warning("Movement guard: %s does not parse (%s); refused.", path, err)
            return None
        if vector.shape != self.initial.shape or not within_bound(vector) or last_round < 0:
            log.warning("Movement guard: %s holds another adapter; refused.", path)
            return None
        return last_round, vector

    def _load(self) -> tuple[int, NDArray[np.float64]]:
        if self.path is None or self.key_path is None:
            return self._memory
        key = load_key(self.key_path)
        for candidate in (self.path, self._previous):
            state = self._read(candidate, key)
            if state is not None:
                return state
        return 0, self.initial.copy()

    @property
    def _previous(self) -> Path:
        assert self.path is not None  # only called with a file
        return self.path.with_name(self.path.name + ".previous")

    def _store(self, server_round: int, vector: NDArray[np.float64]) -> None:
        if self.path is None or self.key_path is None:
            self._memory = (server_round, vector.copy())
            return
        key = load_key(self.key_path)
        buffer = io.BytesIO()
        np.savez(buffer, round=np.array(server_round), vector=vector)
        body = buffer.getvalue()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self._tag(key, body) + body)
        if self.path.is_file() and not self.path.is_symlink():
            os.replace(self.path, self._previous)
        os.replace(tmp, self.path)

    # -- the check -------------------------------------------------------------------

    def last_accepted(self) -> tuple[int, NDArray[np.float64]]:
        """``(round, vector)`` of the last global this node accepted (round 0: initial)."""
        return self._load()

    def accept(self, mean: NDArray[np.floating], *, server_round: int) -> NDArray[np.float64]:
        """The global to use for ``server_round``: ``mean`` if within bounds, else the last
        accepted one. Which one it returned is logged here and nowhere else."""
        vector = np.asarray(mean, dtype=np.float64)
        last_round, last = self._load()
        problem = self._problem(vector, server_round, last_round, last)
        self.history.append((server_round, not problem))
        if problem:
            log.warning(
                "Movement guard: the global of round %d is refused (%s); this node carries "
                "on from its last accepted global (round %d).",
                server_round,
                problem,
                last_round,
            )
            if self.observable:
                raise NodeRefusal("global-refused")
            # The same work as an acceptance (one signed write of the same size), so
            # that the time a reply takes says nothing about which path ran.
            self._store(last_round, last)
            return last
        self._store(server_round, vector)
        return vector

    def _problem(
        self, vector: NDArray[np.float64], server_round: int, last_round: int, last: NDArray
    ) -> str:
        """Why ``vector`` cannot be the global of ``server_round`` ('' when it can)."""
        if vector.shape != last.shape:
            return f"length {vector.size}, not {last.size}"
        if not within_bound(vector):
            bad = int(np.count_nonzero(~np.isfinite(vector)))
            found = f"{bad} non-finite entries" if bad else f"|w| {np.max(np.abs(vector)):.4g}"
            return f"{found}, outside |w| <= {VALUE_BOUND:g}"
        if server_round < last_round:
            return f"older than the accepted round {last_round}"
        if server_round == last_round:
            same = np.array_equal(vector, last)
            return "" if same else f"a second, different global for round {server_round}"
        rounds = min(server_round - last_round, self.max_rounds)
        moved = float(np.max(np.abs(vector - last))) if vector.size else 0.0
        if moved > self.bound * rounds:
            return (
                f"moved {moved:.4g} (largest coordinate) in {rounds} round(s) from round "
                f"{last_round}, over {rounds} x {self.bound:.4g}"
            )
        return ""


def node_guard(runtime: ClientRuntime, *, directory: Path | None) -> MovementGuard:
    """A client's guard: :func:`fedtune.movement.round_bound` of its config and data, times
    its policy's ``max-step-slack``; state in ``directory`` (``STATE_DIR`` on a node, the
    privacy directory in simulation, with the client's name as prefix) or in memory."""
    cfg = runtime.cfg
    bound = round_bound(
        cfg,
        num_examples=runtime.num_train_examples,
        plan=runtime.plan if cfg.privacy.enabled else None,
        dimension=runtime.initial.size,
    )
    prefix = "" if runtime.state_dir is not None else f"{runtime.name}."
    digest = hashlib.sha256(cfg.to_toml().encode()).hexdigest()[:16]
    return MovementGuard(
        bound=bound * runtime.policy.max_step_slack,
        initial=runtime.initial,
        max_rounds=cfg.federation.num_rounds,
        path=None if directory is None else directory / f"{prefix}movement-guard.bin",
        key_path=None if directory is None else directory / f"{prefix}guard.key",
        run=f"{runtime.run_id}/{digest}",
        observable=cfg.privacy.dp == "example",
    )


def payload_digest(payload: object) -> str:
    """SHA-256 over a wire payload's chunks (what a global's decryption depends on)."""
    digest = hashlib.sha256()
    chunks = payload.get("chunks", []) if isinstance(payload, dict) else []
    for chunk in chunks if isinstance(chunks, list) else []:
        data = bytes(chunk) if isinstance(chunk, (bytes, bytearray)) else repr(chunk).encode()
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()
