"""The fixed codes a node sends instead of texts: refusals and errors say *which*, never *why*.

A refusal or error text that leaves a node travels to the server's log and to
``metrics.jsonl``. Texts built from decrypted values ("moved 18.08 ...", "holds an
entry of magnitude 779.9") let a server that cannot decrypt read a client's update
one refusal at a time: it adds a plaintext offset to one coordinate of ``c0``, sends
the result back as the global, and learns from the text (or from the refusal bit
alone, by bisection) where the decrypted value lies. Such refusals cost no ε.

So a node sends one of the :data:`CODES` below and nothing else: each is a public
constant, and which one is sent depends only on public parameters, the node's own
ledger (itself a function of public parameters and earlier accounted releases) or a
failure that does not read decrypted values. The details go to the node's own log.
A decrypted global the node refuses produces no code at all: the node carries on
from the last global it accepted (:mod:`fedtune.guard`).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["CODES", "NodeRefusal", "code_of", "known_code"]

#: Code -> what it means (the operator's reading; the node's log has the details).
CODES: Final[dict[str, str]] = {
    "budget-spent": "the node's privacy budget does not cover this round",
    "round-already-released": "this round was released before from another input",
    "reply-not-stored": "this round was released before and its reply is no longer stored",
    "dp-level-refused": "the DP level's own conditions refuse this round (e.g. client count)",
    "policy": "the run config is outside the node's own policy",
    "bad-request": "the server's message is malformed",
    "worker-unavailable": "the node's worker is not running",
    "node-error": "the node failed this message; see the node's log",
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
    r"|eval-noise-multiplier|audit-canaries)"
)


class NodeRefusal(RuntimeError):
    """What leaves a node instead of an exception: its text is exactly one code.

    Flower turns an exception raised in a ClientApp into an error reply whose reason
    is ``"<class ...>:<'str(exception)'>"``; raising this keeps that reason a
    public constant.
    """

    def __init__(self, code: str) -> None:
        super().__init__(known_code(code))
        self.code = known_code(code)


def known_code(code: object) -> str:
    """``code`` if it is one of :data:`CODES` or a verification code, else ``"node-error"``."""
    if isinstance(code, str) and (code in CODES or _VERIFY.fullmatch(code)):
        return code
    return "node-error"


def code_of(err: BaseException) -> str:
    """The fixed code for an exception leaving a node's round code.

    Configuration and policy refusals (``ConfigError``) are ``"policy"``; a
    malformed message or payload (``PayloadError``, other ``ValueError``) is
    ``"bad-request"``; anything else is ``"node-error"``. Never the text.
    """
    from fedtune.config import ConfigError  # noqa: PLC0415
    from fedtune.privacy.policy import PolicyError  # noqa: PLC0415
    from fedtune.secure.codec import PayloadError  # noqa: PLC0415
    from fedtune.secure.verify import GlobalRefused  # noqa: PLC0415

    if isinstance(err, NodeRefusal):
        return err.code
    if isinstance(err, GlobalRefused):
        return known_code(err.code)
    if isinstance(err, PolicyError) and err.key:
        return known_code(f"policy:{err.key}")
    if isinstance(err, ConfigError):
        return "policy"
    if isinstance(err, (PayloadError, ValueError)):
        return "bad-request"
    return "node-error"
