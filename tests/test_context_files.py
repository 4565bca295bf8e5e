"""Context files (``public.ctx``, ``secret.ctx``) are untrusted input (issue 27).

A ``public.ctx`` is one JSON line and, in a ``secret.ctx``, SEAL's serialised
secret key. The key's ``key_id`` is a public hash of its bytes, so anyone can
write a file whose "secret key" is any bytes at all, with a consistent
``key_id`` and fingerprint. Before this module's fixes such a file with a
tampered inner header aborted the process inside SEAL (exit -6) in
``make_codec(..., public=True)``, the server's own entry point. The cases that
used to abort run in a child process (``python tests/test_context_files.py CASE``)
so that a regression fails one test instead of killing pytest.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from fedtune import crypto
from fedtune.crypto.context import _key_id
from fedtune.secure import make_codec

LENGTH = 100
ARRAY_AT = 48  # the secret key's coefficient array header: parms_id, count, scale first


def _members(sk: bytes) -> bytearray:
    return bytearray(zstandard.ZstdDecompressor().decompress(sk[16:]))


def _rebuild(sk: bytes, inner: bytes) -> bytes:
    out = bytearray(sk[:16]) + zstandard.ZstdCompressor(level=1).compress(inner)
    struct.pack_into("<Q", out, 8, len(out))
    return bytes(out)


def _tamper_array_header(sk: bytes) -> bytes:
    """The key's inner array header claims zlib and more bytes than follow (no key needed:
    any secret key's bytes would do, e.g. a fresh one the attacker made)."""
    inner = _members(sk)
    inner[ARRAY_AT + 5] = 1
    struct.pack_into("<Q", inner, ARRAY_AT + 8, 40_000)
    return _rebuild(sk, bytes(inner))


def _tamper_version(sk: bytes) -> bytes:
    inner = _members(sk)
    inner[ARRAY_AT + 3] = 2
    inner[ARRAY_AT + 5] = 12
    return _rebuild(sk, bytes(inner))


def _big_coefficient(sk: bytes) -> bytes:
    inner = _members(sk)
    struct.pack_into("<Q", inner, ARRAY_AT + 24, 2**64 - 1)
    return _rebuild(sk, bytes(inner))


TAMPER = {
    "array-header": _tamper_array_header,
    "version": _tamper_version,
    "coefficient": _big_coefficient,
}


def forged_context_file(key_bytes: bytes) -> bytes:
    """A context file around ``key_bytes`` with a consistent key_id and fingerprint."""
    ctx = crypto.make_secret_context()
    key_id = _key_id(key_bytes)
    pub = crypto.CkksContext(params=ctx.params, key_id=key_id, secret_key_bytes=None)
    header = json.loads(crypto.context_to_bytes(pub).split(b"\n")[0])
    header["secret_key_bytes"] = len(key_bytes)
    return json.dumps(header, sort_keys=True).encode() + b"\n" + key_bytes


def child_main(case: str, directory: str) -> dict[str, str]:
    """Load a forged context file through the server's and a key holder's entry points."""
    ctx = crypto.make_secret_context()
    path = Path(directory) / f"{case}.ctx"
    path.write_bytes(forged_context_file(TAMPER[case](ctx._secret_key_bytes or b"")))
    out = {}
    for role, public in (("server", True), ("key-holder", False)):
        try:
            make_codec("ckks", length=LENGTH, context=path, public=public)
            out[role] = "accepted"
        except crypto.CryptoError as exc:
            out[role] = f"CryptoError: {exc}"
        except Exception as exc:  # reported; the test fails on it
            out[role] = f"{type(exc).__name__}: {exc}"
    return out


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_forged_secret_key_never_kills_the_process(case: str, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, __file__, case, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == 0, f"child died (rc {run.returncode}): {run.stderr[-2000:]}"
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    # The server refuses any file that carries a key, before the key is looked at.
    assert outcome["server"].startswith("CryptoError: `public-context`"), outcome
    assert "holds a secret key" in outcome["server"], outcome
    # A key holder parses the key itself and names the part that is wrong.
    assert outcome["key-holder"].startswith("CryptoError: CKKS context: `secret_key`"), outcome


def test_genuine_files_still_load(tmp_path: Path) -> None:
    files = crypto.save_keys(crypto.make_secret_context(), tmp_path)
    secret = make_codec("ckks", length=LENGTH, context=files.secret)
    public = make_codec("ckks", length=LENGTH, context=files.public, public=True)
    assert secret.fingerprint == public.fingerprint


def test_server_refuses_genuine_secret_context(tmp_path: Path) -> None:
    files = crypto.save_keys(crypto.make_secret_context(), tmp_path)
    with pytest.raises(crypto.CryptoError, match=r"`public-context` .* holds a secret key"):
        make_codec("ckks", length=LENGTH, context=files.secret, public=True)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda b: b[:-1], r"announces (\d+) key bytes, \d+ follow"),
        (lambda b: b + b"\x00", r"announces (\d+) key bytes, \d+ follow"),
        (
            lambda b: b.replace(b'"secret_key_bytes": ', b'"secret_key_bytes": true, "x": '),
            r"announces True key bytes",
        ),
        (lambda b: b"{}\n", r"malformed header"),
        (lambda b: b"x" * 5000, r"no header line"),
    ],
)
def test_malformed_files_name_the_problem(edit, match: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = crypto.save_keys(crypto.make_secret_context(), tmp_path)
    data = files.secret.read_bytes()
    files.secret.write_bytes(edit(data))
    with pytest.raises(crypto.CryptoError, match=match):
        make_codec("ckks", length=LENGTH, context=files.secret)


if __name__ == "__main__":
    print(json.dumps(child_main(sys.argv[1], sys.argv[2])))
