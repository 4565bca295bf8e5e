"""The Flower strategy that adds (encrypted or plain) client updates.

Implementation of FedAvg (https://arxiv.org/abs/1602.05629) in its "server only
adds" form: clients send ``n_k w_k`` and ``n_k``; the strategy keeps the sums.
It never divides and never decodes, so with a CKKS codec built on a public
context it aggregates updates it cannot read. Replies are untrusted: each is
validated by the codec before anything is deserialised, and a bad reply is
dropped from the round with a log line naming the client.

Replies are keyed by the node they came from, never by what a client calls itself
(:mod:`fedtune.apps.server.replies`). A reply that states another node's name, or a second reply
from one node in one round, is dropped; train and evaluate replies pass the same
checks (:meth:`FedTuneStrategy._collect`). Metrics are range-checked, counts capped
at ``max-client-examples`` (or the node's own limit, set when the operator
registered it) and at ``max-weight-factor`` times the median count of the round's
other replies, and (see :mod:`fedtune.bounds`) the sum of counts kept inside the
CKKS range; plaintext updates are checked entry by entry against the adapter value
bound. Clients are sampled with :func:`fedtune.config.sample_size`, the formula the
clients size their client-level DP noise share by.

This module is longer than the ~400-line guideline on purpose: it is the whole of a
round as the server sees it (sampling, the one message per node, and every check a
reply passes before its payload is added), and an attacker's reply is easier to
reason about when every check it meets is in one class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune import bounds
from fedtune.apps.server.counts import check_weight, claimed_counts, count_record, finite_means
from fedtune.apps.server.replies import (
    NodeNames,
    RoundOutcome,
    clean_reason,
    declined_reason,
    read_metric,
    reply_node,
    stated_name,
)
from fedtune.config import FederationConfig, sample_size
from fedtune.errors import NotEnoughClients
from fedtune.errors import WirePayloadError as PayloadError
from fedtune.run.metrics import weighted_mean
from fedtune.secure.codec import Codec, WirePayload
from fedtune.secure.plain import PlainCodec
from fedtune.secure.verify import (
    Receipt,
    check_resumed,
    make_receipt,
    receipts_to_record,
    split_tag,
)
from fedtune.tasks.base import HELD_OUT_METRICS

__all__ = ["FedTuneStrategy", "NotEnoughClients", "RoundOutcome"]

log = logging.getLogger("fedtune.server")


class FedTuneStrategy(Strategy):
    """Sample clients, send the global sum, add the replies' payloads.

    Parameters
    ----------
    codec : Codec
        Validates and adds payloads; a public-context CKKS codec on a real server.
    fraction_train, fraction_evaluate : float
        Fraction of connected clients sampled per round (at least ``min_clients``).
    min_clients : int
        Clients that must be connected to start a round and must reply for it to count.
    seed : int
        Client sampling in round ``t`` draws from a generator seeded with
        ``(seed, t, phase)``, so a resumed run samples exactly as an uninterrupted one.
    connect_timeout : float
        Seconds to wait for ``min_clients`` to connect before giving up.
    max_client_examples : int
        Largest ``num-examples`` a reply may claim (``max-client-examples``).
    node_limits : Mapping[int, int] | None
        Node id -> the largest count that node may claim, set by the operator at
        registration (``fedtune deploy register --max-examples``); other nodes are
        held to ``max_client_examples``.
    max_weight_factor : float
        A count may be at most this many times the upper median of the counts the
        round's other replies (same phase) claim (``max-weight-factor``; 0 = off), so
        one node cannot outweigh the round's typical node by more than this factor.
        With two replies the other one's count is the reference.
    capacity : float | None
        With encryption: the largest ``|sum_k n_k w_k|`` the CKKS parameters hold
        (:func:`fedtune.bounds.ckks_capacity`); a reply whose count would take
        ``sum_k n_k * value_bound`` past it is dropped. ``None`` in plaintext.
    value_bound : float
        Bound on every adapter entry (:data:`fedtune.bounds.VALUE_BOUND`); with a
        plaintext codec each update ``n_k w_k / n_k`` is checked against it.
    client_dp_tolerance : int | None
        Client-level DP only: each sampled client's noise share is sized so that any
        ``m - t`` shares carry the round's σ; a round with fewer than ``m - t``
        accepted updates is refused (the state stays as it was), and every update must
        claim ``num-examples = 1``. ``None`` without client-level DP.
    """

    def __init__(
        self,
        *,
        codec: Codec,
        fraction_train: float,
        fraction_evaluate: float,
        min_clients: int,
        seed: int,
        connect_timeout: float = 300.0,
        client_dp_tolerance: int | None = None,
        max_client_examples: int = FederationConfig.max_client_examples,
        node_limits: Mapping[int, int] | None = None,
        max_weight_factor: float = FederationConfig.max_weight_factor,
        capacity: float | None = None,
        value_bound: float = bounds.VALUE_BOUND,
        eval_metrics: Mapping[str, tuple[float, float, str]] = HELD_OUT_METRICS,
    ) -> None:
        self.codec = codec
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_clients = min_clients
        self.seed = seed
        self.connect_timeout = connect_timeout
        self.client_dp_tolerance = client_dp_tolerance
        self.max_client_examples = max_client_examples
        self.node_limits = dict(node_limits or {})
        self.max_weight_factor = max_weight_factor
        self._claims: dict[int, float] = {}  # this phase's claimed counts, by node
        self.capacity = capacity
        self.value_bound = value_bound
        self.eval_metrics = dict(eval_metrics)  # the task's held-out metrics and ranges
        # Only a plaintext codec lets the server read, hence clip, an update.
        self._readable = isinstance(codec, PlainCodec)
        # A name is bound to the first node that used it, a node to its first name.
        self._names = NodeNames()
        self.global_payload: WirePayload | None = None
        self.global_examples = 0
        #: What the global sums, one receipt per upload (encrypted runs; sent with it).
        self.global_receipts: list[Receipt] = []
        #: The uploads summed, parallel to the receipts (to re-sum without some of them).
        self.global_uploads: list[WirePayload] = []
        #: More fields of the global record (``ckks-multiparty``: the quorum's signed
        #: partial decryptions, :mod:`fedtune.apps.server.multiparty`); empty otherwise.
        self.global_extra: dict[str, Any] = {}
        #: Names whose uploads key holders could not authenticate (dropped, logged).
        self.unverified: set[str] = set()
        #: Round -> {name: why} of uploads dropped from that round's sum after key holders
        #: named them (:mod:`fedtune.apps.server.verified`); written to that round's metrics line.
        self.dropped_after_sum: dict[int, dict[str, str]] = {}
        #: ``dp = "example"``: a broken verified sum may be blamed on single uploads
        #: (:func:`fedtune.apps.server.verified.blame`); set by the ServerApp.
        self.blame_allowed = False
        self.last_train = RoundOutcome()
        self.last_evaluate = RoundOutcome()
        self.last_refusal = ""
        self._sent_train: list[Message] = []  # this round's train messages
        self._sent_evaluate: list[Message] = []  # the messages that ask for an evaluation

    @property
    def train_messages(self) -> list[Message]:
        """The train messages of the last round configured."""
        return list(self._sent_train)

    def summary(self) -> None:
        """Log the sampling configuration."""
        log.info(
            "FedTuneStrategy: fraction train %.2f, evaluate %.2f, min clients %d, codec %s",
            self.fraction_train,
            self.fraction_evaluate,
            self.min_clients,
            type(self.codec).__name__,
        )

    def resume(
        self, payload: WirePayload, num_examples: int, receipts: list[Receipt] | None = None
    ) -> None:
        """Continue from a checkpointed global sum (validated by the codec first).

        An encrypted sum must come with the receipts of what it sums, and its ``c1``
        must be the sum of their seeds' expansions (no key needed to check): a
        near-transparent or key-less forgery is refused here, not by every key holder.
        """
        checked = self.codec.validate(payload, aggregate=True)

        check_resumed(self.codec, checked, num_examples, receipts or [])
        self.global_payload = checked
        self.global_examples = num_examples
        self.global_receipts = list(receipts or [])
        self.global_uploads = []  # not checkpointed: a resumed round cannot be re-summed

    def _sample(self, grid: Grid, fraction: float, server_round: int, phase: int) -> list[int]:
        deadline = time.monotonic() + self.connect_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_clients:
            if time.monotonic() > deadline:
                raise NotEnoughClients(
                    f"Only {len(nodes)} client(s) connected after {self.connect_timeout:.0f} s; "
                    f"`min-clients` is {self.min_clients}."
                )
            time.sleep(0.5)
        size = sample_size(len(nodes), fraction, self.min_clients)
        # Node ids are uint64; draw positions, not ids, so numpy never converts them.
        rng = np.random.default_rng([self.seed, server_round, phase])
        picks = rng.choice(len(nodes), size=size, replace=False)
        return sorted(int(nodes[i]) for i in picks)

    def _content(
        self, server_round: int, sampled: int | None = None, evaluate_round: int | None = None
    ) -> RecordDict:
        config: dict[str, int | float | str | bytes | bool] = {"server-round": server_round}
        if sampled is not None:  # train messages: client-level DP sizes its noise share by it
            config["sampled-clients"] = sampled
        if evaluate_round is not None:  # a train message that also asks for an evaluation
            config["evaluate-round"] = evaluate_round
        content = RecordDict({"config": ConfigRecord(config)})  # type: ignore[arg-type]
        if self.global_payload is not None:
            content["global"] = ConfigRecord(
                {
                    **self.global_payload,
                    "num-examples": self.global_examples,
                    **(receipts_to_record(self.global_receipts) if self.global_receipts else {}),
                    **self.global_extra,
                }
            )
        return content

    def _messages(self, server_round: int, nodes: list[int], kind: str) -> list[Message]:
        sampled = len(nodes) if kind == MessageType.TRAIN else None
        sent = [
            Message(content=self._content(server_round, sampled), dst_node_id=n, message_type=kind)
            for n in nodes
        ]
        if kind == MessageType.TRAIN:
            self._sent_train = sent
        else:
            self._sent_evaluate = sent
        return list(sent)

    @staticmethod
    def _sent_to(sent: list[Message]) -> dict[str, int]:
        """Message id (set by the grid when it sent them) -> destination node."""
        return {
            m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id
        }

    def split_replies(self, replies: Iterable[Message]) -> tuple[list[Message], list[Message]]:
        """A :meth:`configure_round` exchange's replies: (train replies, evaluation replies).

        A train reply of a node that was also asked for an evaluation is in both.
        """
        train_ids = set(self._sent_to(self._sent_train))
        evaluate_ids = set(self._sent_to(self._sent_evaluate))
        replies = list(replies)
        return (
            [m for m in replies if m.metadata.reply_to_message_id in train_ids],
            [m for m in replies if m.metadata.reply_to_message_id in evaluate_ids],
        )

    def _missing(
        self, outcome: RoundOutcome, replies: list[Message], phase: str, sent: list[Message]
    ) -> None:
        """Name the sampled nodes that sent nothing back before the round timed out."""
        answered = {m.metadata.reply_to_message_id for m in replies}
        for message_id, node in self._sent_to(sent).items():
            if message_id not in answered:
                self._drop(
                    outcome, self._names.key(node), "no reply before `round-timeout`", phase, node
                )

    def _count_limit(self, node: int) -> tuple[int, str]:
        """The largest count ``node`` may claim, and where that limit comes from."""
        if node in self.node_limits:
            return self.node_limits[node], f"`--max-examples` registered for node {node}"
        return self.max_client_examples, "`max-client-examples`"

    def _num_examples(
        self, msg: Message, node: int, record: str = "metrics", *, relative: bool = True
    ) -> int:
        """A reply's count: an integer within the node's limit and (``relative``) the
        relative cap (:meth:`_check_weight`)."""
        n = read_metric(msg, "num-examples", record=record)
        limit, source = self._count_limit(node)
        if not (n.is_integer() and 1 <= n <= limit):
            raise PayloadError(
                f"num-examples must be an integer in [1, {limit}] ({source}), got {n!r}."
            )
        if relative:
            self._check_weight(int(n), node)
        return int(n)

    def _check_weight(self, n: int, node: int) -> None:
        """The relative cap (:func:`.counts.check_weight`); off under client-level
        DP, where every count must be 1."""
        if self.client_dp_tolerance is None:
            check_weight(n, node, self._claims, self.max_weight_factor)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled client, carrying the current global sum."""
        return self._messages(
            server_round,
            self._sample(grid, self.fraction_train, server_round, 0),
            MessageType.TRAIN,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One evaluate message per sampled client."""
        nodes = self._sample(grid, self.fraction_evaluate, server_round, 1)
        self._sent_train = []
        return self._messages(server_round, nodes, MessageType.EVALUATE)

    def configure_round(self, server_round: int, grid: Grid) -> list[Message]:
        """Round ``server_round``'s messages: one per node, training and evaluating at once.

        The clients sampled for training get a train message; those of them sampled
        to evaluate the state it carries (round ``server_round - 1``'s, drawn as
        :meth:`configure_evaluate` would for that round) are asked to evaluate it
        first (``evaluate-round``); the other evaluation clients get an evaluate
        message. Split the replies with :meth:`split_replies`.
        """
        previous = server_round - 1
        train_nodes = self._sample(grid, self.fraction_train, server_round, 0)
        evaluate_nodes = self._sample(grid, self.fraction_evaluate, previous, 1)
        asked = set(evaluate_nodes)
        self._sent_train = [
            Message(
                content=self._content(
                    server_round, len(train_nodes), previous if n in asked else None
                ),
                dst_node_id=n,
                message_type=MessageType.TRAIN,
            )
            for n in train_nodes
        ]
        only_evaluate = [
            Message(
                content=self._content(previous), dst_node_id=n, message_type=MessageType.EVALUATE
            )
            for n in evaluate_nodes
            if n not in set(train_nodes)
        ]
        self._sent_evaluate = [
            m for m in self._sent_train if m.metadata.dst_node_id in asked
        ] + only_evaluate
        return self._sent_train + only_evaluate

    def _drop(
        self, outcome: RoundOutcome, who: str, reason: str, phase: str, node: int | None = None
    ) -> None:
        reason = clean_reason(reason, limit=400)  # it may quote what a client sent
        outcome.dropped[who] = reason
        where = f" (node {node})" if node is not None else ""
        log.warning("Dropped %s reply from %s%s: %s", phase, who, where, reason)

    def _collect(
        self,
        server_round: int,
        replies: Iterable[Message],
        phase: str,
        read: Callable[[Message, int], dict[str, float]],
        *,
        may_decline: bool = False,
    ) -> RoundOutcome:
        """Table each reply of one phase: accepted, dropped (with why) or declined.

        A reply is dropped when it is a second one from its node, states a name that is
        not its node's, is an error, or ``read(msg, node)`` (its metric values, having
        checked its content) raises; sampled nodes that sent nothing are dropped too.
        With ``may_decline`` a reply that gives a reason for declining is tabled as such.
        """
        outcome = RoundOutcome()
        replies = list(replies)
        sent = self._sent_train if phase == "train" else self._sent_evaluate
        sent_to = self._sent_to(sent)
        seen: set[int] = set()
        self._claims = claimed_counts(
            replies, sent_to, phase, lambda node: self._count_limit(node)[0]
        )
        self._missing(outcome, replies, phase, sent)
        for msg in replies:
            node = reply_node(msg, sent_to)
            who, problem = self._names.identify(msg, node, seen)
            if problem:
                self._drop(outcome, who, problem, phase, node)
                continue
            if msg.has_error():
                reason = clean_reason(msg.error.reason)
                self._drop(outcome, who, f"client error: {reason}", phase, node)
                continue
            reason = declined_reason(msg) if may_decline else ""
            if reason:
                outcome.declined[who] = reason
                log.info("Client %s declined round %d: %s", who, server_round, reason)
                continue
            try:
                values = read(msg, node)
            except (PayloadError, bounds.BoundError) as err:
                self._drop(outcome, who, str(err), phase, node)
                continue
            outcome.accepted[who] = values
        return outcome

    def _read_update(
        self, msg: Message, node: int, counted: int
    ) -> tuple[WirePayload, int, Receipt | None]:
        """A train reply's validated payload, count and receipt (``counted`` already added).

        An encrypted upload must carry its ``tag`` (the server cannot check it; key
        holders do, :mod:`fedtune.secure.verify`).
        """
        if "update" not in msg.content.config_records:
            raise PayloadError("reply has no 'update' record.")
        n = self._num_examples(msg, node)
        if self.client_dp_tolerance is not None and n != 1:
            raise PayloadError(f"client-level DP: num-examples must be 1, got {n}.")
        total_after = (counted + n) * self.value_bound
        if self.capacity is not None and total_after > self.capacity:
            raise PayloadError(
                f"num-examples {n} would take the encrypted sum past the CKKS range "
                f"({counted} + {n} examples x |w| <= {self.value_bound:g} > "
                f"{self.capacity:.4g})."
            )
        update, tag = split_tag(msg.content.config_records["update"])
        payload = self.codec.validate(update)
        receipt = make_receipt(self.codec, payload, tag, name=stated_name(msg), num_examples=n)
        if self._readable:
            bounds.check_update(self.codec.decode(payload), n, self.value_bound)
        return payload, n, receipt

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, add the good ones, keep the sums as the new global state."""
        payloads: list[WirePayload] = []
        counts: list[int] = []
        receipts: list[Receipt] = []
        uploads: list[WirePayload] = []

        def read(msg: Message, node: int) -> dict[str, float]:
            payload, n, receipt = self._read_update(msg, node, sum(counts))
            values = {"num-examples": float(n)}
            for key in ("train-loss", "epsilon"):  # DP clients send no train-loss
                if key in msg.content.metric_records["metrics"]:
                    values[key] = read_metric(msg, key)
            payloads.append(payload)
            counts.append(n)
            if receipt is not None:
                receipts.append(receipt)
                uploads.append(payload)
            return values

        outcome = self._collect(server_round, replies, "train", read, may_decline=True)
        self.last_train = outcome
        sampled = len(self._sent_train)
        tolerance = self.client_dp_tolerance
        if tolerance is not None and len(payloads) < sampled - tolerance:
            self.last_refusal = (
                f"{len(payloads)} of {sampled} sampled clients' noise shares arrived; "
                f"client-level DP needs at least {sampled - tolerance} "
                f"(`client-dp-tolerance` = {tolerance})"
            )
        elif len(payloads) < self.min_clients:
            self.last_refusal = (
                f"{len(payloads)} usable update(s), fewer than `min-clients` = {self.min_clients}"
            )
        else:
            self.last_refusal = ""
        if self.last_refusal:
            log.warning("Round %d: %s; state unchanged.", server_round, self.last_refusal)
            return None, None
        try:
            total = self.codec.add(payloads)
        except PayloadError as err:  # a payload passed the checks but would not deserialise
            log.warning(
                "Round %d: aggregation failed (%s); keeping the previous state.", server_round, err
            )
            self.last_train = RoundOutcome(
                dropped={**outcome.dropped, "aggregate": str(err)}, declined=outcome.declined
            )
            return None, None
        self.global_payload, self.global_examples = total, int(sum(counts))
        self.global_receipts, self.global_uploads = receipts, uploads
        self.global_extra = {}
        metrics: dict[str, int | float | list[int] | list[float]] = {
            "num-examples": self.global_examples
        }
        losses = [
            (m["train-loss"], int(m["num-examples"]))
            for m in outcome.accepted.values()
            if "train-loss" in m
        ]
        if len(losses) == len(outcome.accepted):  # DP off: every client sent its loss
            mean = {"train-loss": weighted_mean(losses)}
            metrics.update(finite_means(mean, server_round, "train"))
        return ArrayRecord(), MetricRecord(metrics)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted means of the task's held-out metrics over the clients that replied.

        An evaluate reply has them in its ``metrics``, a train reply that was asked for
        an evaluation (:meth:`configure_round`) in its ``evaluation``.
        """

        def read(msg: Message, node: int) -> dict[str, float]:
            record = count_record(msg, "evaluate")
            n = self._num_examples(msg, node, record, relative=False)
            values = {
                k: read_metric(msg, k, self.eval_metrics, record=record) for k in self.eval_metrics
            }
            self._check_weight(n, node)
            return {**values, "eval-examples": float(n)}

        outcome = self._collect(server_round, replies, "evaluate", read)
        self.last_evaluate = outcome
        if not outcome.accepted:
            return None
        pairs = list(outcome.accepted.values())
        means = {
            key: weighted_mean([(m[key], int(m["eval-examples"])) for m in pairs])
            for key in self.eval_metrics
        }
        return MetricRecord(
            {
                **finite_means(means, server_round, "evaluate"),
                "eval-examples": int(sum(m["eval-examples"] for m in pairs)),
            }
        )
