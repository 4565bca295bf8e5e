"""Every field a client sends, with its privacy status: the one list to keep honest.

``fedtune/apps/client/app.py`` builds replies only from these fields and checks each reply against
this list before it leaves (:func:`check_reply`); ``tests/test_reply_fields.py`` fails
when a field appears that is not here. A field is one of:

``"dp"``
    DP-protected and accounted in the client's ledger: the noised update, and with DP
    on the held-out metrics (a Gaussian release of bounded per-example sums,
    :mod:`fedtune.privacy.evaluation`), unless the node's policy opts out.
``"public"``
    A public constant of the configuration or a function of public parameters
    only. ``num-examples`` (``n_k``) is public by declaration: it is the FedAvg weight,
    so fedtune accounts every release under the **replace-one** relation (neighbouring
    data sets have the same size), never add/remove. The held-out count of a DP
    evaluation is ``round(test-fraction · n)`` of the node's own fraction: public too.
``"plain"``
    A training-set statistic with no protection: sent only with DP off.
``"held-out"``
    Exact metrics of the client's held-out test split, which DP-SGD never trains on:
    sent with DP off, or with DP on by a node whose own policy says ``evaluation =
    "exact"`` (its ledger records an unaccounted ``"eval-exact"`` release). Not
    covered by the ledger's ε; the README says so.

Texts are the usual leak besides metrics: a refusal text built from decrypted
values lets a server that cannot decrypt read them. The only free-form strings a
node sends are ``info.client`` (its configured name) and ``update.fingerprint`` (the
public context's id); ``info.declined`` is ``""`` or one of the fixed codes of
:data:`fedtune.node.codes.CODES` (:func:`check_reply` refuses anything else), and an
error leaves a node as a code too (:class:`fedtune.node.codes.NodeRefusal`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from fedtune.node.codes import CODES

__all__ = [
    "CEREMONY_FIELDS",
    "EVALUATE_FIELDS",
    "EVALUATION_MODES",
    "STATUSES",
    "TRAIN_FIELDS",
    "check_reply",
]

STATUSES = ("dp", "public", "plain", "held-out")

#: How a reply's held-out metrics were computed: ``"dp"`` (a noised, accounted release)
#: or ``"held-out"`` (exact: DP off, or the node's policy opted out).
EVALUATION_MODES = ("dp", "held-out")

#: (record, key) -> status, for a train reply.
TRAIN_FIELDS: dict[tuple[str, str], str] = {
    ("update", "chunks"): "dp",
    ("update", "length"): "public",  # the adapter's size: a constant of the config
    ("update", "fingerprint"): "public",  # the public CKKS context's (or plain codec's) id
    ("update", "tag"): "dp",  # HMAC of the upload under the run's key: post-processing of it
    ("info", "client"): "public",  # the node's configured name
    ("info", "declined"): "public",  # "" or a fixed code (fedtune.node.codes.CODES)
    ("metrics", "num-examples"): "public",  # n_k: public under replace-one (1 at client level)
    ("metrics", "epsilon"): "public",  # a function of (σ, q, steps, δ), all public
    ("metrics", "partition-id"): "public",  # the simulation's partition index (node config)
    ("metrics", "train-loss"): "plain",
    ("metrics", "train-seconds"): "plain",
}

#: (record, key) -> status, for an evaluate reply.
EVALUATE_FIELDS: dict[tuple[str, str], str] = {
    ("info", "client"): "public",
    ("info", "declined"): "public",  # a fixed refusal code (evaluation budget, replayed round)
    ("metrics", "num-examples"): "held-out",  # size of the test split ("public" under DP eval)
    ("metrics", "partition-id"): "public",
    # the blame step (fedtune/secure/blame.py, dp = "example" only): positions of the round's
    # uploads found out of bounds, post-processing of those uploads (each a DP release)
    ("info", "blame"): "dp",
    # + the task's own held-out metrics (``Task.eval_metrics``: eval-loss, eval-accuracy, ...)
}

#: (record, key) -> status, for a reply to a key-ceremony message (``ckks-multiparty`` in a
#: deployment, :mod:`fedtune.node.ceremony`): public keys, hiding commitments (SHA-256 over
#: a fresh 32-byte nonce), signatures, and shares sealed to another node's X25519 key
#: (ciphertexts only that node opens). None depends on the node's data.
CEREMONY_FIELDS: dict[tuple[str, str], str] = {
    ("info", "client"): "public",
    ("ceremony", "name"): "public",
    ("ceremony", "kex-key"): "public",
    ("ceremony", "x"): "public",
    ("ceremony", "verify-key"): "public",
    ("ceremony", "commitment-names"): "public",
    ("ceremony", "commitments"): "public",
    ("ceremony", "signature"): "public",
    ("ceremony", "node-key"): "public",  # the node's registered public key (fedtune.identity)
    ("ceremony", "node-signature"): "public",  # its ECDSA signature over its announcement
    ("ceremony", "recipients"): "public",
    ("ceremony", "packets"): "public",  # each sealed to its recipient
    ("ceremony", "roster-digest"): "public",
}

#: A train reply's ``evaluation`` record (when the server asked for the held-out metrics
#: of the global state it sent): the evaluate reply's ``metrics``, computed before training.
TRAIN_FIELDS.update(
    {
        ("evaluation", key): status
        for (record, key), status in EVALUATE_FIELDS.items()
        if record == "metrics"
    }
)


def check_reply(
    content: Mapping[str, Mapping[str, object]],
    *,
    phase: str,
    private: bool,
    held_out: Collection[str] = (),
    evaluation: str = "held-out",
) -> None:
    """Raise ``ValueError`` if ``content`` holds a field a client may not send.

    Parameters
    ----------
    content
        record name -> {key: value}, as the reply's ``RecordDict`` holds them.
    phase
        ``"train"`` or ``"evaluate"``.
    private
        DP is on: ``"plain"`` fields are refused too.
    held_out
        The task's held-out metric keys (``Task.eval_metrics``): computed on the test
        split, status ``"held-out"``, in an evaluate reply's ``metrics`` and a train
        reply's ``evaluation``.
    evaluation
        ``"dp"``: the held-out metrics are a DP release (status ``"dp"``, their count
        ``"public"``), and a field of status ``"held-out"`` is refused; ``"held-out"``:
        exact metrics.
    """
    if evaluation not in EVALUATION_MODES:
        raise ValueError(f"`evaluation` must be one of {EVALUATION_MODES}, got {evaluation!r}.")

    declined = content.get("info", {}).get("declined", "")
    if declined != "" and declined not in CODES:
        raise ValueError(
            f"{phase} reply field info.declined is {str(declined)[:80]!r}, not one of the "
            f"fixed codes {sorted(CODES)}; a refusal leaves a node as a code, its details "
            "go to the node's log."
        )
    schema = dict({"train": TRAIN_FIELDS, "evaluate": EVALUATE_FIELDS}[phase])
    record = "metrics" if phase == "evaluate" else "evaluation"
    schema.update({(record, key): "held-out" for key in held_out})
    if evaluation == "dp":
        schema.update({(record, key): "dp" for key in held_out})
        schema[(record, "num-examples")] = "public"
    for record, values in content.items():
        for key in values:
            status = schema.get((record, key))
            if status is None:
                raise ValueError(
                    f"{phase} reply field {record}.{key} has no declared privacy status in "
                    "fedtune/messages.py; declare it before a client may send it."
                )
            if evaluation == "dp" and status == "held-out":
                raise ValueError(
                    f"{phase} reply field {record}.{key} is an exact held-out statistic; "
                    "this node's evaluation replies are DP releases, so it must not send it."
                )
            if private and status == "plain":
                raise ValueError(
                    f"{phase} reply field {record}.{key} is an unprotected training "
                    "statistic; a DP client must not send it."
                )
