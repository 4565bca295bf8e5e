"""``fedtune simulate``, ``evaluate``, ``keygen`` and ``export``: make, score and unlock a run.

Each command has its parser in :func:`add_parsers` and a ``run_*`` function that takes
the parsed arguments and returns the exit code; a user error is raised as a
:class:`~fedtune.errors.FedtuneError` for :func:`fedtune.apps.cli.main` to print.
This module imports only the standard library and :mod:`fedtune.config` at module level:
the program reads a ``simulate`` command line with :func:`add_parsers` before it loads
torch (:func:`fedtune.apps.simulation.command.early_check`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import NoReturn

from fedtune.config.reference import KeysHelpFormatter, keys_epilog
from fedtune.errors import ConfigError, KeyFileError

__all__ = [
    "MULTIPARTY_KEYGEN",
    "OneLineParser",
    "add_parsers",
    "output_dir",
    "readable_text",
    "run_keygen",
]

RUN_DIR_HELP = """\
The run directory:
  config.toml             the fully resolved configuration
  metrics.jsonl           one JSON object per round (round 0 = initial adapter)
  metrics.png             accuracy and loss per round
  checkpoint/             the latest global sum and its round
  adapter/                the final adapter in standard PEFT format
  samples.jsonl           causal LM: held-out prompts answered by the base model and the adapter
  clients.log             the full trace of every client failure (one line each on the console)
  client-events.jsonl     what each client started and finished (the progress display reads it)

Ctrl-C stops a run within seconds, keeps the last completed round and prints the command
that continues it (`fedtune simulate --resume RUN_DIR`); a second Ctrl-C forces the exit.
"""


class OneLineParser(argparse.ArgumentParser):
    """The ``fedtune`` parser's class: an argument mistake is one line, not a usage block.

    ``fedtune deploy supernode`` without its options printed five lines of usage before
    the one that says what is missing; here the line names the mistake and the command
    whose ``--help`` lists the options. Subparsers take their parent's class, so every
    command of the program answers the same way.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``simulate``, ``evaluate``, ``keygen`` and ``export`` on ``sub``."""
    sim = sub.add_parser(
        "simulate",
        help="run a simulated federation on Flower's simulation engine",
        description=(
            "Run a simulated federation on one machine (Flower simulation engine, Ray "
            "backend): every client trains a LoRA adapter on its own partition, the "
            "server adds their updates, clients evaluate on held-out data each round. "
            "Writes a run directory and the final PEFT adapter."
        ),
        formatter_class=KeysHelpFormatter,
        epilog=keys_epilog() + "\n\n" + RUN_DIR_HELP,
    )
    sim.add_argument(
        "config",
        nargs="?",
        type=Path,
        help="a TOML file of config keys, e.g. simulations/quickstart.toml (default: defaults)",
    )
    sim.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set num-rounds=3",
    )
    sim.add_argument(
        "--run-dir", type=Path, help="output directory (new or empty; default: runs/<timestamp>)"
    )
    sim.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help=(
            "continue RUN_DIR after its last completed round (after Ctrl-C or a crash); "
            "--set num-rounds=N extends a finished run"
        ),
    )
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")

    ev = sub.add_parser(
        "evaluate",
        help="reload a run's adapter with stock PEFT and re-score held-out data",
        description=(
            "Load the base model and RUN_DIR/adapter with peft.PeftModel.from_pretrained, "
            "rebuild every client's held-out split from RUN_DIR/config.toml and report the "
            "accuracy next to the one the run reported for its last round."
        ),
    )
    ev.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a directory written by `fedtune simulate`"
    )
    ev.add_argument("--json", action="store_true", help="print the result as JSON")

    kg = sub.add_parser(
        "keygen",
        help="make a CKKS key pair: secret context for clients, public context for the server",
        description=(
            "Write OUT/secret.ctx (mode 0600: give it to every client node, never to the "
            "server), OUT/public.ctx (for the server: it can add ciphertexts but not "
            "decrypt) and OUT/fingerprint.txt (the same for both; each side checks it). "
            "Existing keys are never overwritten."
        ),
    )
    kg.add_argument("--out", type=Path, metavar="DIR", help="directory for the key files")
    kg.add_argument(
        "--encryption-backend",
        choices=("ckks", "ckks-multiparty"),
        default="ckks",
        help="ckks (default): one shared key pair; ckks-multiparty: no keys are made here, "
        "the key ceremony runs where the run does (prints where)",
    )

    ex = sub.add_parser(
        "export",
        help="decrypt a run's checkpoint and write the final PEFT adapter (key holders only)",
        description=(
            "Read RUN_DIR/checkpoint (the global sum the server kept), decrypt it with the "
            "secret context if the run was encrypted, divide by the example count and write "
            "a standard PEFT adapter directory."
        ),
    )
    ex.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_DIR",
        help="a run directory with config.toml and checkpoint/",
    )
    ex.add_argument(
        "--key",
        type=Path,
        metavar="SECRET_CONTEXT",
        help="secret.ctx from `fedtune keygen` (encrypted runs)",
    )
    ex.add_argument(
        "--out", type=Path, metavar="DIR", help="output directory (default: RUN_DIR/adapter)"
    )


def output_dir(path: Path, flag: str) -> None:
    """Raise a :class:`ConfigError` naming ``path`` unless it is, or can become, a
    directory this process can write in.

    Checked before any work starts, so a mistyped ``--out`` / ``--run-dir`` costs no
    federation or decryption and ends in one line, not in an ``OSError`` traceback.
    Writability is tested by making (and removing) an empty temporary directory, the
    only test that also holds for root and for file systems such as ``/proc``.
    """
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{flag} {str(path)!r} is a broken symbolic link.")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a file; expected a directory.")
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise ConfigError(
            f"{flag} {str(path)!r}: {str(where)!r} is a file, so no directory can be made there."
        )
    try:
        tempfile.TemporaryDirectory(dir=where).cleanup()
    except OSError as err:
        raise ConfigError(
            f"{flag} {str(path)!r}: cannot make a directory in {str(where)!r} "
            f"({err.strerror or err})."
        ) from err


def readable_text(path: Path, what: str) -> None:
    """One line for a file that exists but cannot be read, or is not UTF-8 text."""
    if not path.exists():
        return  # the reader's own message names a missing file
    try:
        path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(
            f"cannot read {what} {str(path)!r}: {err.strerror or err}; give the user running "
            "fedtune read access (e.g. `chmod a+r`), or use a copy."
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {err.start}); TOML files are "
            "UTF-8: save it as UTF-8."
        ) from None


#: ``fedtune keygen --encryption-backend ckks-multiparty``: where its keys are made.
MULTIPARTY_KEYGEN = (
    "ckks-multiparty: no key to make here; each data owner makes its own in the key "
    "ceremony, which `fedtune simulate` runs in process and `fedtune deploy run` runs over "
    "the federation before round 1 (nodes need no --secret-context; docs/deployment.md, "
    '"Multiparty keys").'
)


def run_keygen(args: argparse.Namespace) -> int:
    """Write a new CKKS key pair to ``args.out`` (never over existing keys).

    With ``--encryption-backend ckks-multiparty`` it prints where the ceremony runs
    (:data:`MULTIPARTY_KEYGEN`) and writes nothing: no single process makes those keys.
    """
    if getattr(args, "encryption_backend", "ckks") == "ckks-multiparty":
        print(MULTIPARTY_KEYGEN)
        return 0
    if args.out is None:
        raise ConfigError("`fedtune keygen` needs --out DIR (where the key pair is written).")
    from fedtune import crypto  # numpy, TenSEAL: not for simulate's early check

    if (args.out / "secret.ctx").exists():
        raise ConfigError(f"{str(args.out / 'secret.ctx')!r} exists; keygen never overwrites keys.")
    output_dir(args.out, "--out")
    try:
        files = crypto.save_keys(crypto.make_secret_context(), args.out)
    except KeyFileError as err:  # a planted file or link, a directory others may write in
        raise ConfigError(str(err)) from None
    except OSError as err:  # a race with the checks above, a full disk
        raise ConfigError(f"cannot write the keys to {str(args.out)!r}: {err}") from err
    print(f"secret context (clients only, mode 0600): {files.secret}")
    print(f"public context (server, mode 0644): {files.public}")
    print(f"fingerprint: {files.fingerprint.read_text().strip()}")
    return 0
