"""Reading one client reply: which node it answers for, what it calls itself, its metrics.

Replies are untrusted. A reply is keyed by the node it came from (the destination
of the server's own message, else the reply's source node id), never by what a
client calls itself: a self-reported name is a display label, bound by
:class:`NodeNames` to the first node that used it for the rest of the run, and a
node keeps its first name. Each metric the server reads is range-checked
(:data:`RANGES`) and held under an absurdity limit (:data:`LIMITS`: a finite
1.7e308 would make a weighted mean ``Infinity``); a bad one is a
:class:`fedtune.secure.codec.PayloadError` that drops the reply. Every text a reply
carries (a decline or error reason) goes through :func:`clean_reason` before it is
logged or stored: at most :data:`MAX_REASON` characters, no control characters or
terminal escape sequences.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import Message

from fedtune.errors import WirePayloadError as PayloadError
from fedtune.node.codes import known_code

__all__ = [
    "LIMITS",
    "MAX_REASON",
    "RANGES",
    "NodeNames",
    "RoundOutcome",
    "clean_reason",
    "declined_reason",
    "error_code",
    "read_metric",
    "reply_node",
    "stated_name",
]

#: What a client may call itself: a short, readable label. ``@`` is not allowed, so
#: the labels the strategy makes for dropped replies (``name@node``) never collide.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: Allowed range of each metric the server reads: (low, high, as words).
RANGES: dict[str, tuple[float, float, str]] = {
    "epsilon": (0.0, math.inf, "finite and >= 0"),
    "train-loss": (0.0, math.inf, "finite and >= 0"),
    "eval-loss": (0.0, math.inf, "finite and >= 0"),
    "eval-accuracy": (0.0, 1.0, "in [0, 1]"),
}

#: The largest magnitude an honest client reports for a metric; above it the value is
#: absurd and its reply dropped. A loss is in nats per example or token: 500 is 46
#: times a uniform guess over a 50,000-token vocabulary, and ``exp(500)`` (the
#: perplexity derived from it) is still a finite float. Other metrics: 1e6.
#: ``num-examples`` is capped by the strategy instead (the node's registered limit).
LIMITS: dict[str, float] = {"train-loss": 500.0, "eval-loss": 500.0, "num-examples": math.inf}
_DEFAULT_LIMIT = 1e6

#: The most characters of a client's reason the server logs or stores.
MAX_REASON = 200

#: Terminal escape sequences: CSI (``ESC [ ... final``), OSC/DCS/PM/APC strings up to
#: BEL or ``ESC \``, and any other two-character ``ESC x``.
_ESCAPE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[\]P^_X][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?|\x9b[0-?]*[ -/]*[@-~]"
)


@dataclass
class RoundOutcome:
    """What the strategy saw in one phase of one round."""

    accepted: dict[str, dict[str, float]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)


def reply_node(msg: Message, sent_to: dict[str, int]) -> int:
    """The node a reply answers for: where the server sent the message, else its source.

    An error reply made by the SuperLink for a node that vanished carries the
    SuperLink as its source; ``sent_to`` (message id -> destination node) names
    the node the original message went to.
    """
    return int(sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))


def stated_name(msg: Message) -> str | None:
    """The client's self-reported name if it is a valid label (untrusted), else None."""
    if not msg.has_content():
        return None
    try:
        name = msg.content.config_records["info"]["client"]
    except (KeyError, TypeError):
        return None
    return name if isinstance(name, str) and _NAME.fullmatch(name) else None


def clean_reason(text: object, limit: int = MAX_REASON) -> str:
    """A client-supplied reason made safe to log and store.

    Terminal escape sequences are removed, every other control, format or separator
    character (newlines, bidi overrides, ...) becomes a space, runs of spaces are
    folded, and the result is cut to ``limit`` characters (ending in ``…`` when cut).
    Only the first ``8 * limit`` characters are looked at, so a 1 MiB reason costs
    no more than a short one.
    """
    raw = text if isinstance(text, str) else str(text)
    head = _ESCAPE.sub("", raw[: 8 * limit])
    kept = "".join(
        " " if unicodedata.category(c)[0] in "CZ" else c  # C*: control/format, Z*: separators
        for c in head
    )
    words = " ".join(kept.split())
    if len(words) > limit or len(raw) > 8 * limit:
        return words[: limit - 1].rstrip() + "…"
    return words


def declined_reason(msg: Message) -> str:
    """The code a client gave for declining the round ('' if it did not).

    A fedtune node declines with one of :data:`fedtune.node.codes.CODES` (the details
    stay in its own log); any other non-empty value is tabled as ``"node-error"``.
    """
    try:
        reason = msg.content.config_records["info"]["declined"]
    except (KeyError, TypeError):
        return ""
    if not isinstance(reason, str) or not reason:
        return ""
    return known_code(reason)


_REFUSAL = re.compile(r"<class '[\w.]*NodeRefusal'>:<'([a-z0-9:,-]{1,400})'>")


def error_code(reason: str) -> str:
    """The fixed code in an error reply's reason (``"node-error"`` if it names none).

    A fedtune node raises ``NodeRefusal(code)``, which Flower sends as
    ``"<class '...NodeRefusal'>:<'code'>"``; a reason the SuperLink wrote for a node
    that vanished (e.g. ``"Node Unavailable"``) has no code and is kept as it is.
    """
    found = _REFUSAL.search(reason)
    if found:
        return known_code(found.group(1))
    return reason if "NodeRefusal" not in reason else "node-error"


def read_metric(
    msg: Message,
    key: str,
    ranges: Mapping[str, tuple[float, float, str]] | None = None,
    *,
    record: str = "metrics",
) -> float:
    """A metric of a reply's ``record``, a number within its range (``ranges``, else
    :data:`RANGES`) and its absurdity limit (:data:`LIMITS`).

    Without a range for ``key`` the number must be finite.
    """
    records = msg.content.metric_records
    if record not in records or key not in records[record]:
        where = "" if record == "metrics" else f" in its {record!r} record"
        raise PayloadError(f"reply has no metric {key!r}{where}.")
    value = records[record][key]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise PayloadError(f"metric {key!r} must be a number, got {value!r}.")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    low, high, words = (RANGES if ranges is None else ranges).get(
        key, (-math.inf, math.inf, "finite")
    )
    if not (math.isfinite(number) and low <= number <= high):
        raise PayloadError(f"{key} must be {words}, got {value!r}.")
    limit = LIMITS.get(key, _DEFAULT_LIMIT)
    if abs(number) > limit:
        raise PayloadError(
            f"{key} = {number:.4g} is absurd: an honest client reports |{key}| <= {limit:g}."
        )
    return number


class NodeNames:
    """The run's binding of self-reported names to nodes.

    A name belongs to the first node that stated it, a node keeps its first name.
    """

    def __init__(self) -> None:
        self._node_of_name: dict[str, int] = {}
        self._name_of_node: dict[int, str] = {}

    def key(self, node: int) -> str:
        """A node's table key: its bound name, else ``node-<id>``.

        ``node-<id>@<id>`` if another node already took ``node-<id>`` as its name.
        """
        if node in self._name_of_node:
            return self._name_of_node[node]
        label = f"node-{node}"
        return label if self._node_of_name.get(label, node) == node else f"{label}@{node}"

    def identify(self, msg: Message, node: int, seen: set[int]) -> tuple[str, str]:
        """``(key, problem)`` of a reply: where to table it, and why to drop it ('' = keep).

        The first reply that states a name binds it to its node for the run.
        """
        if node in seen:
            return (
                f"{self.key(node)}@{node}",
                f"second reply from node {node} this round; the first was kept",
            )
        seen.add(node)
        name = stated_name(msg)
        if name is None:
            return self.key(node), ""
        bound = self._name_of_node.get(node)
        if bound is not None and bound != name:
            return (
                f"{name}@{node}",
                f"node {node} replied as {bound!r} before; a node keeps its first name",
            )
        owner = self._node_of_name.setdefault(name, node)
        if owner != node:
            return f"{name}@{node}", f"name {name!r} is already used by node {owner}"
        self._name_of_node[node] = name
        return name, ""
