"""What makes a DP client's release a release: its own run nonce, its input, its reply.

A server that resends round ``t`` with another global state, or starts a second run
under the same name, must not get a fresh release that the ledger never counts. So a
client keys each release on values it controls:

* ``run_nonce``: 16 random bytes the client makes the first time it sees a run (a run
  is the server's ``run-id`` plus the fully resolved configuration; a different
  configuration under the same ``run-id`` is a different run). Kept in
  ``PRIVACY_DIR/<client>.runs.json``.
* ``input_hash``: SHA-256 of everything the client trains from that the server chose
  (the round, the global payload and its count, the sampled-client count).

Then, per ``(run_nonce, round)``:

* nothing recorded: check the budget, train, record, store the reply, send it;
* recorded with the same ``input_hash``: send the stored reply verbatim (no training,
  nothing new is released); if it is gone, decline;
* recorded with another ``input_hash``: decline, with a log line. Counting it as one
  more release would also be sound, but a server that asks twice for one round is
  either broken or probing, and a refusal costs the data owner nothing.

A new run is a new nonce, so its rounds are new entries composed with every earlier
release of the same data (:func:`fedtune.privacy.ledger.counted_for`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.run.files import read_private, write_private

__all__ = ["MAX_REPLY_BYTES", "StoredReply", "input_hash", "load_reply", "run_nonce", "store_reply"]

MAX_REPLY_BYTES = 1 << 30
"""Largest stored reply read back (a CKKS update of a large adapter is a few hundred MB)."""


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_bytes_hex).encode()


def _bytes_hex(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(value).hexdigest()
    raise TypeError(f"cannot hash a {type(value).__name__}")


def input_hash(
    *, server_round: int, payload: Mapping[str, Any] | None, num_examples: int, sampled_clients: int
) -> str:
    """SHA-256 (hex) of what the server chose for this round (chunks hashed one by one)."""
    message = {
        "round": server_round,
        "payload": None if payload is None else {k: payload[k] for k in sorted(payload)},
        "num-examples": num_examples,
        "sampled-clients": sampled_clients,
    }
    return hashlib.sha256(_canonical(message)).hexdigest()


def run_nonce(directory: Path, *, client: str, run_id: str, config: Mapping[str, Any]) -> str:
    """This client's nonce for the run ``(run_id, config)``, made on first sight."""
    path = directory / f"{client}.runs.json"
    key = hashlib.sha256(_canonical({"run-id": run_id, "config": dict(config)})).hexdigest()
    raw = read_private(path, 16 << 20)
    runs: dict[str, str] = {}
    if raw is not None:
        loaded = json.loads(raw)
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()
        ):
            raise ValueError(f"{str(path)!r} must map run keys to nonces; restore or remove it.")
        runs = loaded
    if key not in runs:
        runs[key] = secrets.token_hex(16)
        write_private(path, _canonical(runs))
    return runs[key]


@dataclass(frozen=True)
class StoredReply:
    """The last reply a client sent in one run, kept to replay a retried round verbatim."""

    run_nonce: str
    round: int
    input_hash: str
    payload: dict[str, Any]
    num_examples: int
    epsilon: float


def store_reply(directory: Path, *, client: str, reply: StoredReply) -> None:
    """Keep ``reply`` as ``directory/<client>.reply.json`` (the last one only)."""
    payload = dict(reply.payload)
    payload["chunks"] = [base64.b64encode(c).decode() for c in payload["chunks"]]
    body = {
        "run-nonce": reply.run_nonce,
        "round": reply.round,
        "input-hash": reply.input_hash,
        "payload": payload,
        "num-examples": reply.num_examples,
        "epsilon": reply.epsilon,
    }
    write_private(directory / f"{client}.reply.json", json.dumps(body).encode())


def load_reply(directory: Path, *, client: str) -> StoredReply | None:
    """The stored reply, or None if there is none or it cannot be read back intact."""
    try:
        raw = read_private(directory / f"{client}.reply.json", MAX_REPLY_BYTES)
        if raw is None:
            return None
        body = json.loads(raw)
        payload = dict(body["payload"])
        payload["chunks"] = [base64.b64decode(c, validate=True) for c in payload["chunks"]]
        reply = StoredReply(
            run_nonce=str(body["run-nonce"]),
            round=int(body["round"]),
            input_hash=str(body["input-hash"]),
            payload=payload,
            num_examples=int(body["num-examples"]),
            epsilon=float(body["epsilon"]),
        )
    except (ValueError, KeyError, TypeError, OSError, RecursionError):
        return None
    return reply
