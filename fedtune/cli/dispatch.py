"""The ``fedtune`` command: its parser, dispatch to a subcommand, and the exit codes.

Subcommands
-----------
simulate   run a simulated federation and write a run directory
evaluate   reload a run's adapter with stock PEFT and re-score the clients' held-out data
keygen     make a CKKS key pair (secret context for clients, public for the server)
audit      recompute every client's epsilon from its ledger and check budgets
export     decrypt a run's checkpoint and write the final PEFT adapter
deploy     run a real federation: certificates, node keys, SuperLink, SuperNodes, flwr run
generate   answer a prompt with a causal-LM run's base model and final adapter
predict    label new text with a classification run's base model and final adapter

Exit codes
----------
A subcommand returns its own code. A :class:`~fedtune.errors.FederationError` (a run
that stopped) prints ``fedtune COMMAND: stopped: ...`` and exits 1; any other
:class:`~fedtune.errors.FedtuneError` prints ``fedtune COMMAND: error: ...`` and exits 2;
Ctrl-C exits 130. No user error ends in a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable, Mapping, Sequence

from fedtune.cli import audit, generate, run_commands, use_commands
from fedtune.deploy import cli as deploy_cli
from fedtune.errors import FederationError, FedtuneError

__all__ = ["Handler", "build_parser", "handlers", "main"]

#: A command's function: the parsed arguments in, the exit code out.
Handler = Callable[[argparse.Namespace], int]


def _version() -> str:
    """The installed distribution's version (``pyproject.toml``'s ``version``)."""
    try:
        return importlib.metadata.version("fedtune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``fedtune`` and its subcommands."""
    parser: argparse.ArgumentParser = run_commands.OneLineParser(
        prog="fedtune",
        description=(
            "Privacy-preserving federated LoRA fine-tuning of Transformers on Flower. "
            "Run `fedtune COMMAND --help` for a command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fedtune {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run_commands.add_parsers(sub)
    use_commands.extend_parsers(sub)  # evaluate --data, export --base-model
    audit.add_parser(sub)
    deploy_cli.add_parser(sub)
    generate.add_parser(sub)
    use_commands.add_parser(sub)
    return parser


def _quiet_libraries() -> None:
    """No per-file progress bars from datasets / transformers in the CLI's output."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def handlers() -> dict[str, Handler]:
    """The library's command functions, looked up when a command runs.

    A test replaces one by monkeypatching the real function in its module (e.g.
    ``fedtune.cli.use_commands.run_evaluate``) and still goes through :func:`main`'s
    error handling. ``simulate`` is not here: its function starts the simulation driver,
    which imports both apps, so the ``fedtune`` program (:mod:`fedtune.apps.cli`) adds it.
    """
    return {
        "evaluate": use_commands.run_evaluate,
        "keygen": run_commands.run_keygen,
        "export": use_commands.run_export,
        "audit": audit.run,
        "deploy": deploy_cli.run,
        "generate": generate.run,
        "predict": use_commands.run_predict,
    }


def main(argv: Sequence[str] | None = None, *, extra: Mapping[str, Handler] | None = None) -> int:
    """Parse ``argv`` and run the command; ``extra`` adds the program's own commands.

    The ``fedtune`` console script is :func:`fedtune.apps.cli.main`, which passes
    ``simulate`` in ``extra``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {**handlers(), **(extra or {})}
    if args.command not in commands:
        parser.error(f"`{args.command}` runs from the `fedtune` program (fedtune.apps.cli).")
    _quiet_libraries()
    try:
        return commands[args.command](args)
    except FederationError as err:
        print(f"fedtune {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    except FedtuneError as err:
        print(f"fedtune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedtune {args.command}: interrupted", file=sys.stderr)
        return 130
