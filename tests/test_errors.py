"""One error root: every error a user can cause is a FedtuneError, and the CLI catches it."""

from __future__ import annotations

import pytest

from fedtune.errors import FederationError, FedtuneError


def test_every_fedtune_error_class_has_the_one_root() -> None:
    from fedtune.config import ConfigError
    from fedtune.errors import (
        AggregationError,
        BoundError,
        CheckpointError,
        CryptoError,
        LedgerConflictError,
        LedgerCorruptError,
        NodeConfigKeyError,
        PayloadError,
        ServerMessageError,
        UnsupportedLayerError,
        WirePayloadError,
    )
    from fedtune.model import ModelError

    for cls in (
        AggregationError,
        BoundError,
        CheckpointError,
        ConfigError,
        CryptoError,
        PayloadError,
        WirePayloadError,
        ModelError,
        UnsupportedLayerError,
        LedgerConflictError,
        LedgerCorruptError,
        FederationError,
        NodeConfigKeyError,
        ServerMessageError,
    ):
        assert issubclass(cls, FedtuneError), cls
    assert issubclass(ConfigError, ValueError) and issubclass(FederationError, RuntimeError)
    # A node's own node-config key and a malformed server message are ValueErrors: the
    # node answers ``bad-request`` for both (fedtune.node.codes.code_of).
    from fedtune.node.codes import code_of

    assert code_of(NodeConfigKeyError("`state-dir`")) == "bad-request"
    assert code_of(ServerMessageError("no 'config' record")) == "bad-request"


@pytest.mark.parametrize(
    ("error", "code", "word"),
    [(FedtuneError("no such thing"), 2, "error"), (FederationError("too few"), 1, "stopped")],
)
def test_the_cli_prints_a_fedtune_error_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: FedtuneError,
    code: int,
    word: str,
) -> None:
    from fedtune.apps.cli import main
    from fedtune.cli import use_commands

    def fail(_args: object) -> int:
        raise error

    monkeypatch.setattr(use_commands, "run_evaluate", fail)
    assert main(["evaluate", "some-run"]) == code
    err = capsys.readouterr().err
    assert err == f"fedtune evaluate: {word}: {error}\n"
