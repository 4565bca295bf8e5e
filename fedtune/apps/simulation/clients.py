"""The simulated clients, observed: progress events and failures in the run directory.

:func:`observed_client_app` wraps fedtune's ClientApp for ``fedtune simulate``. Each
message a simulated client handles (in a Ray actor) appends small JSON events to
``RUN_DIR/client-events.jsonl`` (``start``, ``done``, ``error``: the client, the
message kind and round, and for an error one line naming the cause). The full trace
of a failure goes to ``RUN_DIR/clients.log``. The driver reads the events for its
progress display and prints one line per failure; nothing of a trace reaches the
terminal or ``metrics.jsonl``.

The error reply itself is unchanged: fedtune's ClientApp turns any failure into a
fixed code (:mod:`fedtune.node.codes`), so the server still sees no exception text. The
cause is read from the code's ``__context__``, which the ClientApp suppresses for
display only (``raise ... from None``); in a simulation the driver, the server and
every client are one process tree run by one person, so the run directory may hold it.

Each event is one ``write`` on a file opened with ``O_APPEND`` (under ``PIPE_BUF``
bytes), so events of several actors never interleave within a line.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.apps.client.app import make_client_app
from fedtune.apps.simulation.progress import CLIENTS_LOG, EVENTS

__all__ = ["CLIENTS_LOG", "EVENTS", "cause_line", "observed_client_app"]

#: The longest cause line kept (characters).
MAX_CAUSE = 300


def cause_line(err: BaseException) -> str:
    """``Type: first line of the message``, at most :data:`MAX_CAUSE` characters."""
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    return line if len(line) <= MAX_CAUSE else line[: MAX_CAUSE - 1] + "…"


def _append(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data.encode("utf-8", "replace"))
    finally:
        os.close(fd)


def _round(msg: Message) -> int | None:
    try:
        value = msg.content.config_records["config"]["server-round"]
    except (KeyError, TypeError):
        return None
    return int(value) if isinstance(value, int) else None


def _client(context: Context) -> str:
    part = dict(context.node_config).get("partition-id")
    return f"client-{part}" if part is not None else f"node-{context.node_id}"


def observed_client_app(config: Mapping[str, object], run_dir: Path) -> ClientApp:
    """fedtune's ClientApp on ``config``, writing events and traces under ``run_dir``."""

    inner = make_client_app(config)
    events, log_path = run_dir / EVENTS, run_dir / CLIENTS_LOG
    app = ClientApp()

    def event(context: Context, kind: str, rnd: int | None, name: str, **extra: Any) -> None:
        record = {"t": time.time(), "client": _client(context), "kind": kind, "round": rnd}
        record.update(event=name, **extra)
        _append(events, json.dumps(record) + "\n")

    def observed(kind: str, msg: Message, context: Context) -> Message:
        rnd = _round(msg)
        event(context, kind, rnd, "start")
        try:
            reply = inner(msg, context)
        except Exception as err:
            cause = err.__context__ if err.__context__ is not None else err
            trace = "".join(traceback.format_exception(cause))
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            _append(
                log_path,
                f"--- {stamp} {_client(context)} {kind} round {rnd}: {cause_line(cause)}\n"
                f"{trace}\n",
            )
            event(context, kind, rnd, "error", cause=cause_line(cause))
            raise
        event(context, kind, rnd, "done")
        return reply

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return observed("train", msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return observed("evaluate", msg, context)

    return app
