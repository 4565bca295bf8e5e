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

from fedtune.errors import (
    CODES,
    ConfigError,
    GlobalRefused,
    NodeRefusal,
    PolicyError,
    WirePayloadError,
    known_code,
)

__all__ = ["CODES", "NodeRefusal", "code_of", "known_code"]


def code_of(err: BaseException) -> str:
    """The fixed code for an exception leaving a node's round code.

    Configuration and policy refusals (``ConfigError``) are ``"policy"``; a
    malformed message or payload (``PayloadError``, other ``ValueError``) is
    ``"bad-request"``; anything else is ``"node-error"``. Never the text.
    """
    if isinstance(err, NodeRefusal):
        return err.code
    if isinstance(err, GlobalRefused):
        return known_code(err.code)
    if isinstance(err, PolicyError) and err.key:
        return known_code(f"policy:{err.key}")
    if isinstance(err, ConfigError):
        return "policy"
    if isinstance(err, (WirePayloadError, ValueError)):
        return "bad-request"
    return "node-error"
