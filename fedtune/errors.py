"""Every error class of fedtune, and the fixed codes a node's refusal may carry.

This module imports nothing of fedtune, so every layer (``config/`` at the bottom, the
apps at the top) can raise these without importing any other layer.

Every error a user can cause is a :class:`FedtuneError`. The ``fedtune`` console script
catches it and prints its message (exit 2; :class:`FederationError`, a run that stopped,
exits 1), so no user error ends in a traceback. The built-in base each class had before
it moved here (``ValueError``, ``RuntimeError``, ``OSError``) is kept as a second base, so
callers that catch those still work, and :func:`fedtune.node.codes.code_of` maps each to
the same code as before.

Groups
------
root          FedtuneError, FederationError, NotEnoughClients
configuration ConfigError, ModelError, PolicyError
cryptography  CryptoError, PayloadError, WirePayloadError, BoundError, AggregationError,
              GlobalRefused, KeyFileError, KeyFileExists
privacy       LedgerConflictError, LedgerCorruptError, UnsupportedLayerError
run directory CheckpointError
node          NodeRefusal (and :data:`CODES`), NodeConfigError, NodeConfigKeyError,
              ServerMessageError, WorkerUnavailable, WorkerError, GuardKeyError
deployment    BodyRefused (the gateway's answer to a body stopped mid-way)
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "KeygenAborted",
    "MetricsFileError",
    "MultipartyFileError",
    "CODES",
    "AggregationError",
    "BodyRefused",
    "BoundError",
    "CheckpointError",
    "ConfigError",
    "CryptoError",
    "FederationError",
    "FedtuneError",
    "GlobalRefused",
    "GuardKeyError",
    "KeyFileError",
    "KeyFileExists",
    "LedgerConflictError",
    "LedgerCorruptError",
    "ModelError",
    "NodeConfigError",
    "NodeConfigKeyError",
    "NodeRefusal",
    "NotEnoughClients",
    "PayloadError",
    "PolicyError",
    "ServerMessageError",
    "UnsupportedLayerError",
    "WirePayloadError",
    "WorkerError",
    "WorkerUnavailable",
    "known_code",
]


# -- The root ----------------------------------------------------------------------------


class FedtuneError(Exception):
    """Something fedtune was asked to do cannot be done; the message says what and why."""


class FederationError(FedtuneError, RuntimeError):
    """A federated run cannot go on (e.g. too few clients took part)."""


class NotEnoughClients(FederationError):
    """Fewer clients than ``min-clients`` connected or took part in a round."""


# -- Configuration -----------------------------------------------------------------------


class ConfigError(FedtuneError, ValueError):
    """A configuration key or value is invalid; the message names both."""


class ModelError(ConfigError):
    """The model or the adapter cannot be built as configured."""


class PolicyError(ConfigError):
    """A run config asks for something outside the node's policy (one line: key, values).

    ``key`` names the run-config key refused (``""`` when the policy itself is at
    fault); the line goes to the node's own log, and the server gets the fixed code
    ``policy:KEY`` (:func:`fedtune.node.codes.code_of`): which key, not the node's value.
    """

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


# -- Cryptography, payloads and sums -----------------------------------------------------


class CryptoError(FedtuneError):
    """A cryptographic operation cannot be carried out with what it was given.

    Raised, for example, when a context without the secret key is asked to
    decrypt or encrypt, or when a key file is malformed.
    """


class PayloadError(CryptoError, ValueError):
    """Untrusted input (a client reply, a wire dictionary) is malformed.

    The message names the offending field and the value that came. The
    server drops such a reply from the round; it never crashes on one.
    """


class WirePayloadError(PayloadError):
    """An untrusted codec payload is malformed; the message names the field and value.

    What a :class:`~fedtune.secure.codec.Codec` raises (exported there as
    ``PayloadError``); the crypto layer's own :class:`PayloadError` is its base.
    """


class BoundError(FedtuneError, ValueError):
    """A vector leaves the range :data:`fedtune.bounds.VALUE_BOUND` allows (or is not finite)."""


class AggregationError(FedtuneError, ValueError):
    """Updates cannot be combined (wrong shapes or counts)."""


class GlobalRefused(FedtuneError, ValueError):
    """A key holder refuses a global; ``str(err)`` is the fixed code (:data:`CODES`)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class KeyFileError(OSError):
    """A key file or its directory cannot be written safely; the message says why."""


class KeyFileExists(KeyFileError, FileExistsError):
    """Something (a file, a symbolic link) is already where a key file would go."""


# -- Privacy -----------------------------------------------------------------------------


class LedgerConflictError(FedtuneError, ValueError):
    """A (run_nonce, round, client) is recorded again with another input or parameters."""


class LedgerCorruptError(FedtuneError, ValueError):
    """A ledger line other than a torn last line cannot be read."""


class UnsupportedLayerError(FedtuneError, ValueError):
    """The model cannot be trained with per-example DP-SGD as configured."""


# -- The run directory -------------------------------------------------------------------


class CheckpointError(FedtuneError, ValueError):
    """A checkpoint is missing, damaged, or not written with this key."""


# -- A node ------------------------------------------------------------------------------

#: Code -> what it means (the operator's reading; the node's log has the details). A node
#: sends one of these instead of an error text (:mod:`fedtune.node.codes` says why).
CODES: Final[dict[str, str]] = {
    "budget-spent": "the node's privacy budget does not cover this round",
    "round-already-released": "this round was released before from another input",
    "reply-not-stored": "this round was released before and its reply is no longer stored",
    "dp-level-refused": "the DP level's own conditions refuse this round (e.g. client count)",
    "policy": "the run config is outside the node's own policy",
    "bad-request": "the server's message is malformed",
    "worker-unavailable": "the node's worker is not running",
    "node-error": "the node failed this message; see the node's log",
    "keygen-aborted": (
        "a check of the multiparty key ceremony failed (a roster, signature or sealed share "
        "that does not verify, or the node lost its ceremony state); the node's log says which"
    ),
    "global-refused": (
        "the decrypted global is outside the value or movement bound; sent only under "
        'dp = "example", where the global is a sum of DP releases (post-processing)'
    ),
}

#: Codes of verified aggregation (:mod:`fedtune.secure.verify`): each depends only on
#: the receipts, the tags (keyed from the secret) and the global's ``c1``, never on
#: decrypted values; ``bad-tags`` names receipt positions, so the server can drop them.
_VERIFY = re.compile(
    r"global-unverified:(?:no-receipts|malformed-receipts|duplicate-name|too-few-uploads"
    r"|examples-mismatch|c1-mismatch|second-global-for-round"
    r"|bad-tags:[0-9]{1,6}(?:,[0-9]{1,6}){0,9999})"
    r"|blame-refused:not-example-level-dp"
    # A policy refusal names the run-config key (a public name), never a value.
    r"|policy:(?:target-delta|delta|test-fraction|max-seq-length|model-path|evaluation"
    r"|eval-noise-multiplier|audit-canaries|peers)"
)


def known_code(code: object) -> str:
    """``code`` if it is one of :data:`CODES` or a verification code, else ``"node-error"``."""
    if isinstance(code, str) and (code in CODES or _VERIFY.fullmatch(code)):
        return code
    return "node-error"


class NodeRefusal(RuntimeError):
    """What leaves a node instead of an exception: its text is exactly one code.

    Flower turns an exception raised in a ClientApp into an error reply whose reason
    is ``"<class ...>:<'str(exception)'>"``; raising this keeps that reason a
    public constant.
    """

    def __init__(self, code: str) -> None:
        super().__init__(known_code(code))
        self.code = known_code(code)


class NodeConfigError(RuntimeError):
    """This node's own setup is wrong (its node config); the server sees ``node-error``."""


class NodeConfigKeyError(FedtuneError, ValueError):
    """A node-config key of this node is unknown or missing; the message names it."""


class ServerMessageError(FedtuneError, ValueError):
    """The server's message is malformed or out of order; the node answers ``bad-request``."""


class WorkerUnavailable(RuntimeError):
    """The ClientApp cannot reach this node's worker (the node drops out of the round)."""


class WorkerError(RuntimeError):
    """The worker refused or failed the message; its text is one fixed code.

    The worker sends a code of :data:`CODES` (the details stay in its log); anything
    else becomes ``"node-error"``.
    """

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class GuardKeyError(RuntimeError):
    """The node's guard key exists but is not a 32-byte regular file of its own."""


# -- Runs and multiparty keys -----------------------------------------------------------


class MetricsFileError(ConfigError):
    """A ``metrics.jsonl`` that cannot be read: named, with the line and the fix."""


class KeygenAborted(FedtuneError, ValueError):
    """The multiparty key ceremony stops: a dealt share does not match its commitment, or
    the roster a party is shown is not the one it announced itself in."""


class MultipartyFileError(KeygenAborted):
    """A multiparty key file is malformed or does not belong to this roster."""


# -- Deployment --------------------------------------------------------------------------


class BodyRefused(Exception):
    """The gateway stopped a request body mid-way: answer ``status`` (0: the client is gone).

    A signal inside :mod:`fedtune.deploy.gateway`, never shown to a user.
    """

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status
