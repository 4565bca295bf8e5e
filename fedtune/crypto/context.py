"""CKKS contexts, keys, fingerprints and key files.

All clients share one secret key; the server holds the same context without
it. Since every encrypting party holds the secret key, encryption is
*symmetric*: no public key exists at all. Symmetric encryption has lower
noise than public-key encryption, and its ciphertexts serialise seeded (half
size). The server needs no key whatsoever to add ciphertexts; its "public"
context is the parameters plus the key's identifier, so that it can reject
ciphertexts made under another key generation.

Key randomness comes from SEAL's CSPRNG (the operating system's entropy), on
purpose not from a caller-supplied seed: a reproducible secret key is no
secret.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.crypto._seal import (
    expected_version,
    scratch_dir,
    seal_dump,
    seal_load,
    sealapi,
)
from fedtune.crypto.key_format import KeyLayout, parse_secret_key
from fedtune.crypto.params import DEFAULT_PARAMS, CkksParams
from fedtune.crypto.seal_format import CiphertextLayout
from fedtune.errors import CryptoError, PayloadError
from fedtune.keyfiles import PRIVATE_MODE, PUBLIC_MODE, private_dir, write_key_file

__all__ = [
    "CkksContext",
    "KeyFiles",
    "context_from_bytes",
    "context_to_bytes",
    "fingerprint",
    "has_secret_key",
    "load_context",
    "make_secret_context",
    "public_context",
    "save_keys",
]

_FORMAT = "fedtune-ckks-context"
_FORMAT_VERSION = 1
_KEY_ID_TAG = b"fedtune/ckks/key-id/v1\x00"
_MAX_HEADER_BYTES = 4096
_MAX_CONTEXT_FILE_BYTES = 16 * 2**20


class CkksContext:
    """Parameters, SEAL objects and (optionally) the secret key of one key generation.

    Build one with :func:`make_secret_context`, :func:`public_context` or
    :func:`load_context`; the constructor is internal.

    Attributes
    ----------
    params : CkksParams
        The encryption parameters.
    key_id : str
        SHA-256 (hex) of the serialised secret key, domain separated. It
        identifies the key generation without revealing anything about the key.
    fingerprint : str
        SHA-256 (hex) of the public parts: parameters, actual primes and
        ``key_id``. Equal for a secret context and its public copy.
    layout : CiphertextLayout
        What every serialised ciphertext of this context must look like,
        checked byte for byte by :func:`fedtune.crypto.seal_format.parse_ciphertext`.
    """

    __slots__ = (
        "_decryptor",
        "_encoder",
        "_encryptor",
        "_evaluator",
        "_seal_context",
        "_secret_key_bytes",
        "fingerprint",
        "key_id",
        "layout",
        "params",
        "primes",
    )

    def __init__(self, *, params: CkksParams, key_id: str, secret_key_bytes: bytes | None) -> None:
        sa = sealapi()
        parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(params.poly_modulus_degree)
        parms.set_coeff_modulus(
            sa.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes))
        )
        seal_context = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
        if not seal_context.parameters_set():
            raise CryptoError(f"SEAL rejects {params}: {seal_context.parameters_error_message()}.")
        self.params = params
        self.key_id = key_id
        self.primes: tuple[int, ...] = tuple(int(m.value()) for m in parms.coeff_modulus())
        self.fingerprint = _fingerprint(params, self.primes, key_id)
        parms_id = tuple(int(v) for v in seal_context.first_parms_id())
        key_parms = tuple(int(v) for v in seal_context.key_parms_id())
        key_layout = KeyLayout(
            version=expected_version(),
            parms_id=(key_parms[0], key_parms[1], key_parms[2], key_parms[3]),
            poly_modulus_degree=params.poly_modulus_degree,
            primes=self.primes,
        )
        self.layout = CiphertextLayout(
            version=expected_version(),
            parms_id=(parms_id[0], parms_id[1], parms_id[2], parms_id[3]),
            poly_modulus_degree=params.poly_modulus_degree,
            primes=self.primes[: params.data_prime_count],
            scale=params.scale,
        )
        self._seal_context = seal_context
        self._encoder = sa.CKKSEncoder(seal_context)
        self._evaluator = sa.Evaluator(seal_context)
        self._secret_key_bytes = secret_key_bytes
        self._encryptor: Any = None
        self._decryptor: Any = None
        if secret_key_bytes is not None:
            if _key_id(secret_key_bytes) != key_id:
                raise CryptoError(
                    f"secret key does not match its key_id {key_id!r}: the key file is corrupted."
                )
            try:  # every byte checked in Python; SEAL loads only the rebuild
                rebuilt = parse_secret_key(secret_key_bytes, key_layout)
            except PayloadError as exc:
                raise CryptoError(f"CKKS context: {exc}") from exc
            secret_key = sa.SecretKey()
            with scratch_dir() as tmp:
                try:
                    seal_load(
                        lambda p: secret_key.load(seal_context, p),
                        rebuilt,
                        tmp,
                    )
                except (RuntimeError, ValueError) as exc:
                    raise CryptoError(f"secret key does not load into {params}: {exc}") from exc
            self._encryptor = sa.Encryptor(seal_context, secret_key)
            self._decryptor = sa.Decryptor(seal_context, secret_key)

    def __repr__(self) -> str:
        kind = "secret" if self.has_secret_key else "public"
        return f"CkksContext({kind}, {self.params}, fingerprint={self.fingerprint[:16]}...)"

    @property
    def has_secret_key(self) -> bool:
        """Whether this context can encrypt and decrypt."""
        return self._secret_key_bytes is not None

    def require_secret_key(self, operation: str) -> None:
        """Raise :class:`CryptoError` naming ``operation`` if the secret key is absent."""
        if not self.has_secret_key:
            raise CryptoError(
                f"cannot {operation}: this CKKS context has no secret key (it is the public "
                f"context {self.fingerprint[:16]}...); load secret.ctx on a key holder."
            )


def _key_id(secret_key_bytes: bytes) -> str:
    return hashlib.sha256(_KEY_ID_TAG + secret_key_bytes).hexdigest()


def _fingerprint(params: CkksParams, primes: tuple[int, ...], key_id: str) -> str:
    doc = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "scheme": "ckks",
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_modulus": list(primes),
        "global_scale_bits": params.global_scale_bits,
        "key_id": key_id,
    }
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def make_secret_context(params: CkksParams = DEFAULT_PARAMS) -> CkksContext:
    """Generate a fresh secret key and return the context that holds it.

    Parameters
    ----------
    params : CkksParams
        Encryption parameters; :data:`DEFAULT_PARAMS` unless told otherwise.

    Returns
    -------
    CkksContext
        A context that can encrypt, decrypt and add.
    """
    sa = sealapi()
    probe = CkksContext(params=params, key_id="", secret_key_bytes=None)
    secret_key = sa.KeyGenerator(probe._seal_context).secret_key()
    with scratch_dir() as tmp:
        sk_bytes = seal_dump(secret_key.save, tmp)
    return CkksContext(params=params, key_id=_key_id(sk_bytes), secret_key_bytes=sk_bytes)


def public_context(ctx: CkksContext) -> CkksContext:
    """Return a copy of ``ctx`` without the secret key (what the server holds)."""
    return CkksContext(params=ctx.params, key_id=ctx.key_id, secret_key_bytes=None)


def has_secret_key(ctx: CkksContext) -> bool:
    """Whether ``ctx`` holds the secret key."""
    return ctx.has_secret_key


def fingerprint(ctx: CkksContext) -> str:
    """Stable SHA-256 (hex) of the public parts of ``ctx``; see :class:`CkksContext`."""
    return ctx.fingerprint


def context_to_bytes(ctx: CkksContext, *, include_secret_key: bool = False) -> bytes:
    """Serialise ``ctx``: one JSON header line, then the SEAL secret key if asked for.

    Raises
    ------
    CryptoError
        If ``include_secret_key`` is true and ``ctx`` has no secret key.
    """
    if include_secret_key:
        ctx.require_secret_key("serialise the secret key")
    sk = ctx._secret_key_bytes if include_secret_key else None
    header = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "params": {
            "poly_modulus_degree": ctx.params.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(ctx.params.coeff_mod_bit_sizes),
            "global_scale_bits": ctx.params.global_scale_bits,
        },
        "key_id": ctx.key_id,
        "fingerprint": ctx.fingerprint,
        "secret_key_bytes": 0 if sk is None else len(sk),
    }
    line = json.dumps(header, sort_keys=True).encode() + b"\n"
    return line + (sk or b"")


def context_from_bytes(data: bytes, *, public: bool = False) -> CkksContext:
    """Inverse of :func:`context_to_bytes`; checks the stored fingerprint.

    The bytes are untrusted (a file this process did not write): the JSON header
    is read within 4096 bytes, and the secret key, if any, is parsed byte for byte
    (:mod:`fedtune.crypto.key_format`) before SEAL sees it. With ``public`` (the
    server) a file that announces any key bytes is refused before they are read.

    Raises
    ------
    CryptoError
        If the header is malformed, the key does not match its ``key_id`` or
        the recomputed fingerprint differs from the stored one.
    """
    end = data.find(b"\n", 0, _MAX_HEADER_BYTES)
    if end < 0:
        raise CryptoError("CKKS context: no header line in the first 4096 bytes.")
    try:
        header = json.loads(data[:end])
        if header["format"] != _FORMAT or header["version"] != _FORMAT_VERSION:
            raise CryptoError(
                f"CKKS context: format {header['format']!r} v{header['version']!r}, "
                f"expected {_FORMAT!r} v{_FORMAT_VERSION}."
            )
        p = header["params"]
        params = CkksParams(
            poly_modulus_degree=p["poly_modulus_degree"],
            coeff_mod_bit_sizes=tuple(p["coeff_mod_bit_sizes"]),
            global_scale_bits=p["global_scale_bits"],
        )
        key_id, stored_fp, n_sk = (
            header["key_id"],
            header["fingerprint"],
            header["secret_key_bytes"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CryptoError(f"CKKS context: malformed header ({exc}).") from exc
    body = data[end + 1 :]
    if public and (n_sk != 0 or body):
        raise CryptoError(
            f"CKKS context: `public-context` holds a secret key ({len(body)} bytes after the "
            "header); the server must only get the public context (public.ctx from "
            "`fedtune keygen`)."
        )
    if isinstance(n_sk, bool) or not isinstance(n_sk, int) or n_sk != len(body):
        raise CryptoError(f"CKKS context: header announces {n_sk!r} key bytes, {len(body)} follow.")
    ctx = CkksContext(params=params, key_id=str(key_id), secret_key_bytes=body or None)
    if ctx.fingerprint != stored_fp:
        raise CryptoError(
            f"CKKS context: fingerprint {stored_fp!r} stored, {ctx.fingerprint!r} recomputed."
        )
    return ctx


@dataclass(frozen=True)
class KeyFiles:
    """Paths written by :func:`save_keys`."""

    secret: Path
    public: Path
    fingerprint: Path


def save_keys(ctx: CkksContext, out_dir: Path) -> KeyFiles:
    """Write ``secret.ctx`` (mode 0600), ``public.ctx`` and ``fingerprint.txt`` (0644).

    The modes are set explicitly, whatever the umask; ``out_dir`` and any parent it
    needs are made mode 0700 (an existing ``out_dir`` others may write in is refused).
    Existing key files are never overwritten and never written through a symbolic
    link (:func:`fedtune.keyfiles.write_key_file`): losing the key of a running
    federation makes its checkpoints unreadable.

    Raises
    ------
    CryptoError
        If ``ctx`` has no secret key.
    fedtune.keyfiles.KeyFileError
        If a key file (or a link) is already there, or ``out_dir`` is unsafe.
    """
    ctx.require_secret_key("save keys")
    out_dir = private_dir(Path(out_dir), "--out")
    files = KeyFiles(
        secret=out_dir / "secret.ctx",
        public=out_dir / "public.ctx",
        fingerprint=out_dir / "fingerprint.txt",
    )
    for path in (files.secret, files.public, files.fingerprint):  # refuse before writing any
        if path.exists() or path.is_symlink():
            write_key_file(path, b"", PRIVATE_MODE)  # raises, naming it
    write_key_file(files.secret, context_to_bytes(ctx, include_secret_key=True), PRIVATE_MODE)
    write_key_file(files.public, context_to_bytes(ctx), PUBLIC_MODE)
    write_key_file(files.fingerprint, (ctx.fingerprint + "\n").encode("ascii"), PUBLIC_MODE)
    return files


def load_context(path: Path, *, public: bool = False) -> CkksContext:
    """Load a context written by :func:`save_keys` (``secret.ctx`` or ``public.ctx``).

    ``public``: refuse a file that carries a secret key (the server's read path),
    before the key is parsed. Reads at most one byte more than any key file.
    """
    path = Path(path)
    with path.open("rb") as fh:
        data = fh.read(_MAX_CONTEXT_FILE_BYTES + 1)
    if len(data) > _MAX_CONTEXT_FILE_BYTES:
        raise CryptoError(
            f"CKKS context file {str(path)!r} is over {_MAX_CONTEXT_FILE_BYTES} bytes; more "
            "than any key file: pass the secret.ctx or public.ctx `fedtune keygen` wrote."
        )
    try:
        return context_from_bytes(data, public=public)
    except CryptoError as exc:
        if public and "holds a secret key" in str(exc):
            raise CryptoError(
                f"`public-context` {str(path)!r} holds a secret key; the server must only get "
                "the public context (public.ctx from `fedtune keygen`)."
            ) from exc
        raise
