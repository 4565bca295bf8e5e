"""What a client receives from the server and what its round gives back."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.secure.codec import WirePayload
from fedtune.train.loop import TrainResult

__all__ = ["GlobalState", "TrainOutcome"]


@dataclass(frozen=True)
class GlobalState:
    """The aggregate a client receives: a payload of ``sum n_k w_k`` and ``sum n_k``."""

    payload: WirePayload
    num_examples: int


@dataclass(frozen=True)
class TrainOutcome:
    """What a client sends back after training, or why it declined.

    ``result`` is the local training's statistics: never sent by a DP client, and
    ``None`` for a declined round or a replayed reply (``replayed``: a retried round
    answered with the reply already sent, nothing new released).
    """

    payload: WirePayload | None
    num_examples: int
    result: TrainResult | None
    epsilon: float | None = None
    declined: str = ""
    replayed: bool = False
