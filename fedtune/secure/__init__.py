"""Encryption backends for client updates, chosen by name, behind one codec factory.

A *backend* makes the run's keys (if it has any) and builds the :class:`Codec`
every party uses: clients encode and decode with it, the server only validates and
adds (:mod:`fedtune.secure.codec`). Built in: ``plain`` (no encryption) and
``ckks`` (CKKS through :mod:`fedtune.crypto`). ``encryption = false`` uses
``plain``; ``encryption = true`` uses ``encryption-backend`` (default ``ckks``).
The codec types live in ``codec`` (the protocol, ``PayloadError``), ``plain`` and
``ckks``. Adding a backend::

    from fedtune.secure import register_backend
    register_backend("my-he", MyBackend)   # MyBackend() implements CodecBackend

in one process, or for every process of a run (simulation workers, nodes) as an
entry point of an installed package::

    [project.entry-points."fedtune.codecs"]
    my-he = "my_package.my_he:MyBackend"

Client (:class:`fedtune.train.runtime.ClientRuntime`), server
(``fedtune/apps/server/app.py``), export and the simulation driver all call :func:`make_codec`
and :func:`get_backend`; none of them names a backend.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.secure.codec import Codec

__all__ = [
    "CodecBackend",
    "backend_names",
    "get_backend",
    "make_codec",
    "register_backend",
    "run_codec",
    "unregister_backend",
]


class CodecBackend(Protocol):
    """One way of protecting updates in transit and at the server."""

    #: Registered name (``encryption-backend``; ``plain`` when encryption is off).
    name: str
    #: Whether the backend needs key files (then a key holder makes them per run).
    uses_keys: bool

    def make_keys(self, directory: Path) -> Any:
        """Write a new run's keys under ``directory``; an object with ``secret`` and
        ``public`` paths (None for a backend without keys)."""
        ...

    def codec(self, *, length: int, context: Path | None = None, public: bool = False) -> Codec:
        """A codec for vectors of ``length`` on the key file at ``context``.

        ``public``: the caller must not hold a secret key (the server); refuse one.
        """
        ...


#: Entry-point group of backends that installed packages provide.
ENTRY_POINT_GROUP = "fedtune.codecs"

#: name -> ``"module:attribute"`` of a built-in backend (imported on first use).
_BUILTIN = {
    "plain": "fedtune.secure.plain:PlainBackend",
    "ckks": "fedtune.secure.ckks:CkksBackend",
    "ckks-multiparty": "fedtune.secure.multiparty.backend:MultipartyBackend",
}
_FACTORIES: dict[str, Callable[[], CodecBackend]] = {}


def register_backend(name: str, factory: Callable[[], CodecBackend]) -> None:
    """Make ``encryption-backend = name`` valid; ``factory()`` builds the backend."""
    if not name or name in _BUILTIN or name in _FACTORIES:
        raise ValueError(f"a backend named {name!r} is already registered (or the name is empty).")
    _FACTORIES[name] = factory


def unregister_backend(name: str) -> None:
    """Remove a backend added with :func:`register_backend` (tests use this to clean up)."""
    _FACTORIES.pop(name, None)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep for ep in found if ep.name not in _BUILTIN}


def backend_names() -> tuple[str, ...]:
    """Every known backend: built-ins, then installed entry points, then registered."""
    installed = [n for n in _entry_points() if n not in _FACTORIES]
    return (*_BUILTIN, *installed, *_FACTORIES)


def get_backend(name: str) -> CodecBackend:
    """The backend registered as ``name``."""
    if name in _BUILTIN:
        module, attribute = _BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), attribute)()  # type: ignore[no-any-return]
    if name in _FACTORIES:
        return _FACTORIES[name]()
    if name in (installed := _entry_points()):
        return installed[name].load()()  # type: ignore[no-any-return]

    raise ConfigError(
        f"`encryption-backend` must be one of {', '.join(backend_names())}, got {name!r}."
    )


def make_codec(
    name: str, *, length: int, context: Path | None = None, public: bool = False
) -> Codec:
    """The codec of backend ``name`` for vectors of ``length`` (on key file ``context``).

    ``public``: for the server, which must only ever hold a public key.
    """
    return get_backend(name).codec(length=length, context=context, public=public)


def run_codec(
    backend: str, *, length: int, context: Path | None = None, public: bool = False
) -> Codec:
    """A party's codec for a run: ``backend`` on its key file, ``plain`` without one.

    ``backend`` is the config's ``encryption-backend``. A party is given a key file
    exactly when the run encrypts (the key holder hands them out), so the file, not
    a flag beside it, decides.
    """
    name = backend if context is not None else "plain"
    return make_codec(name, length=length, context=context, public=public)
