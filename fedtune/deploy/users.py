"""Who runs what on a node: the runtime user, the worker user, and what each may read.

Every check runs as the user it is about (coreutils' ``test``, i.e. ``access(2)`` with
their ids), and nothing written into the runtime directory follows a link.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import ConfigError

__all__ = [
    "USERS_HINT",
    "RuntimeUser",
    "prepare_runtime",
    "flower_program",
    "readable_by",
    "runtime_user",
    "worker_user",
]


#: How to separate a node's two sides: the worker (who owns the node's files) and the
#: SuperNode with its ClientApps (a user of their own).
USERS_HINT = (
    "create two users, `useradd --system --no-create-home fedtune-node` (owns the data, "
    "secret.ctx and --state-dir) and `useradd --system --no-create-home fedtune-app` (runs the "
    "SuperNode and its ClientApps), and start the node as root with `--worker-user "
    "fedtune-node --runtime-user fedtune-app --runtime-dir DIR` (DIR outside --state-dir)"
)


@dataclass(frozen=True)
class RuntimeUser:
    """The OS user the SuperNode and its ClientApps run as."""

    name: str
    uid: int
    gid: int
    home: str


def runtime_user(name: str | None) -> RuntimeUser | None:
    """The checked ``--runtime-user`` (``None`` without one: no separation, say so)."""
    if not name:
        print(
            "fedtune deploy supernode: note: the SuperNode and its ClientApps run as your own "
            "user, so an app the SuperLink sends could read this node's data, secret context "
            f"and ledger. To separate them, {USERS_HINT}.",
            file=sys.stderr,
        )
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"--runtime-user {name!r} does not exist; {USERS_HINT}.") from None
    if os.geteuid() != 0:
        raise ConfigError(
            f"--runtime-user {name!r}: starting the SuperNode as another user needs root "
            f"(this command runs as uid {os.geteuid()}). Run it as root (e.g. a systemd "
            "unit), or leave --runtime-user out and accept that the SuperNode runs as you."
        )
    if entry.pw_uid in (0, os.geteuid()):
        raise ConfigError(
            f"--runtime-user {name!r} has uid {entry.pw_uid}, the worker's own or root's; "
            "it must be a user without access to this node's files."
        )
    return RuntimeUser(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def worker_user(name: str, *, state: Path, runtime: RuntimeUser | None) -> RuntimeUser:
    """The checked ``--worker-user``: it gets ``state`` (created by now) as its own."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"--worker-user {name!r} does not exist.") from None
    if os.geteuid() != 0:
        raise ConfigError(
            f"--worker-user {name!r}: dropping the worker to another user needs root."
        )
    if runtime is not None and entry.pw_uid == runtime.uid:
        raise ConfigError(
            f"--worker-user and --runtime-user are both {name!r}; the worker must be a user "
            "the SuperNode is not."
        )
    owner = state.stat().st_uid
    fresh = owner == os.geteuid() and not any(state.iterdir())  # just made for this node
    if owner != entry.pw_uid and not fresh:
        raise ConfigError(
            f"--state-dir {str(state)!r} belongs to uid {owner}, not to --worker-user "
            f"{name!r}; `chown -R {name} {state}` first."
        )
    os.chown(state, entry.pw_uid, entry.pw_gid)
    return RuntimeUser(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _test_as(user: RuntimeUser, *checks: str) -> bool:
    """coreutils' ``test CHECKS`` run as ``user`` (``access(2)`` with their ids).

    It needs no interpreter that ``user`` may not be able to run.
    """
    done = subprocess.run(
        ["test", *checks],
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin"},
        cwd="/",
        check=False,
        capture_output=True,
        timeout=60,
    )
    return done.returncode == 0


def _runs(user: RuntimeUser, program: Path) -> bool:
    """Whether ``user`` may execute ``program`` and the interpreter its ``#!`` line names."""
    paths = [Path(program)]
    with contextlib.suppress(OSError):
        first = Path(program).read_bytes()[:256].split(b"\n")[0]
        if first.startswith(b"#!"):
            paths.append(Path(first[2:].decode(errors="replace").split()[0]))
    return all(_test_as(user, "-x", str(path)) for path in paths)


def readable_by(user: RuntimeUser, path: Path) -> bool:
    """Whether ``user`` can read ``path`` (a directory: list and enter it), tried as them."""
    if Path(path).is_dir():
        return _test_as(user, "-r", str(path), "-a", "-x", str(path))
    return _test_as(user, "-r", str(path))


def _own_dir(path: Path, option: str) -> None:
    """Refuse ``path`` unless it is a real directory of this user that no one else may write."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{option} {str(path)!r} must be a directory, not a link or a file.")
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise ConfigError(
            f"{option} {str(path)!r} must belong to uid {os.geteuid()} and be writable by it "
            f"alone (it holds the worker's socket); `chown {os.geteuid()} {path} && chmod 711 "
            f"{path}`."
        )


def _write_for(user: RuntimeUser, source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` (never through a link), mode 0600, owned by ``user``."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        raise ConfigError(f"cannot write {str(target)!r} (a link, or not ours): {err}") from None
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)
        os.fchown(out.fileno(), user.uid, user.gid)
        out.write(Path(source).read_bytes())
    return target


def flower_program(name: str = "flower-supernode") -> Path:
    """The Flower program ``name`` this environment runs: on PATH, else beside this Python."""
    program = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if program is None:
        raise ConfigError(f"{name} is not on PATH; activate fedtune's environment.")
    return Path(program)


def prepare_runtime(
    runtime: Path,
    user: RuntimeUser | None,
    *,
    private: dict[str, Path],
    key: Path,
    ca: Path,
) -> tuple[Path, Path]:
    """Make the runtime directory; return the SuperNode's copies of its key and CA.

    With a runtime user the directory stays this (root) user's, mode 0711, so the
    runtime user can plant nothing in it: the worker's socket, the node's auth key and
    the CA certificate (copied in, theirs, mode 0600: the SuperNode reads both) and
    ``flwr-home/`` (theirs, 0700: the SuperNode's FLWR_HOME and HOME). Each of
    ``private`` (option -> path: the data, the secret context, the state directory)
    must be closed to them, else a :class:`ConfigError` says which and how to close it.
    """
    if user is None:
        runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        runtime.chmod(0o700)
        return key, ca
    runtime.mkdir(parents=True, exist_ok=True, mode=0o711)
    _own_dir(runtime, "--runtime-dir")
    runtime.chmod(0o711)
    for option, path in private.items():
        if readable_by(user, path):
            raise ConfigError(
                f"{option} {str(path)!r} can be read by --runtime-user {user.name!r}, who "
                "runs the SuperNode and every app the SuperLink sends; close it first "
                f"(`chmod go-rwx {path}`) so that only the worker reads it."
            )
    program = flower_program()
    if not _runs(user, program):
        raise ConfigError(
            f"--runtime-user {user.name!r} cannot run {program} (or the Python it starts "
            "with): the SuperNode would not start. Install fedtune with a Python every user "
            "may run (a system Python, or one under /opt), or leave --runtime-user out."
        )
    copies = [_write_for(user, key, runtime / "node.key"), _write_for(user, ca, runtime / "ca.crt")]
    home = runtime / "flwr-home"
    if home.is_symlink() or (home.exists() and not home.is_dir()):
        raise ConfigError(f"{str(home)!r} is not a directory; remove it.")
    home.mkdir(exist_ok=True, mode=0o700)
    os.chown(home, user.uid, user.gid, follow_symlinks=False)
    home.chmod(0o700)
    if not (_test_as(user, "-x", str(runtime)) and readable_by(user, home)):
        raise ConfigError(
            f"--runtime-user {user.name!r} cannot enter --runtime-dir {str(runtime)!r}: a "
            "directory above it is closed to them (each parent needs `chmod o+x`)."
        )
    return copies[0], copies[1]
