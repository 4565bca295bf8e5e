"""What CKKS encryption costs a federated round of the default model.

Run on demand::

    python benchmarks/bench_encryption.py                       # 1.5 min on 2 idle cores
    python benchmarks/bench_encryption.py --examples-per-label 250 --rounds 3
    python benchmarks/bench_encryption.py --threads 1           # on a busy shared machine

Simulates ``--clients`` clients for ``--rounds`` rounds in one process, twice
side by side: once with plaintext updates (:class:`fedtune.secure.plain.PlainCodec`)
and once encrypted (:class:`fedtune.secure.ckks.CkksCodec`, clients on ``secret.ctx``,
the server on ``public.ctx`` from :func:`fedtune.crypto.save_keys`). Each
client is a :class:`fedtune.train.runtime.ClientRuntime` on the bundled MiniLM-L6 and
WordNet data; per round every client decodes the last aggregate and trains
(``runtime.train``), then the "server" validates and adds the payloads
(``codec.validate``, ``codec.add``), as ``fedtune/apps/server/strategy.py`` does.

The two federations run interleaved client by client (the order alternating),
after an untimed warm-up, so both see the same machine state. Clients run one
after another, so a round's wall time is the sum of its clients' times plus the
server's. Codecs are wrapped in :class:`TimedCodec` to split out the time of
each cryptographic operation. Printed: trainable parameters; wire bytes per
trainable parameter, upload and aggregate (plaintext float64 is 8; NVIDIA
FLARE's TenSEAL setup sends about 57-81); encrypt, aggregate and decrypt
throughput; round wall time encrypted / plain (goal <= 1.10), measured and
as charged to the codecs alone (training time is noisy on a shared machine);
and the largest ``|decrypted mean - plaintext mean|`` over the same updates
(goal <= 1e-6): each client's update ``n_k w_k`` is captured when its codec encodes
it (:attr:`TimedCodec.encoded`), not re-read from the model afterwards: the clients
of one process share one model (:mod:`fedtune.train.shared`), so reading it back
gave the last client's adapter for every client.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from numpy.typing import NDArray

from fedtune import crypto
from fedtune.aggregation import add_updates
from fedtune.config import DataConfig, FederationConfig, RunConfig, TrainConfig
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.codec import Codec, WirePayload, payload_nbytes
from fedtune.secure.plain import PlainCodec
from fedtune.train.runtime import ClientRuntime, GlobalState

T = TypeVar("T")

FLARE_BYTES_PER_PARAM = "57-81"  # NVIDIA FLARE's TenSEAL CKKS setup, for reference
GOAL_TIME_RATIO = 1.10
GOAL_ERROR = 1e-6


class TimedCodec:
    """A codec that forwards every call and adds up seconds and values per method.

    ``encoded`` keeps a copy of every vector it encoded (a client's ``n_k w_k``, as
    sent), for the check of the decrypted mean against the same updates.
    """

    def __init__(self, inner: Codec) -> None:
        self.inner = inner
        self.fingerprint = inner.fingerprint
        self.seconds: dict[str, float] = defaultdict(float)
        self.values: dict[str, int] = defaultdict(int)
        self.encoded: list[NDArray[np.float64]] = []

    def _timed(self, name: str, values: int, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        out = call()
        self.seconds[name] += time.perf_counter() - start
        self.values[name] += values
        return out

    def encode(self, vector: NDArray[np.floating]) -> WirePayload:
        self.encoded.append(np.array(vector, dtype=np.float64, copy=True))  # untimed
        return self._timed("encode", vector.size, lambda: self.inner.encode(vector))

    def validate(self, payload: object, *, aggregate: bool = False) -> WirePayload:
        return self._timed("validate", 0, lambda: self.inner.validate(payload, aggregate=aggregate))

    def add(self, payloads: Sequence[WirePayload]) -> WirePayload:
        count = sum(p["length"] for p in payloads)
        return self._timed("add", count, lambda: self.inner.add(payloads))

    def decode(self, payload: WirePayload) -> NDArray[np.float64]:
        return self._timed("decode", payload["length"], lambda: self.inner.decode(payload))


@dataclass
class Federation:
    """One simulated federation: its clients, the server's codec and what it measured."""

    name: str
    clients: list[ClientRuntime]
    client_codecs: list[TimedCodec]
    server: TimedCodec
    state: GlobalState | None = None
    round_seconds: list[float] = field(default_factory=list)
    client_seconds: list[float] = field(default_factory=list)
    upload_bytes: list[int] = field(default_factory=list)
    aggregate_bytes: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    means: list[NDArray[np.float64]] = field(default_factory=list)


def build_federation(
    name: str, cfg: RunConfig, *, secret: Path | None, server_codec: Callable[[int], Codec]
) -> Federation:
    """``cfg.federation.num_clients`` runtimes with timed codecs, and the server's codec."""
    k = cfg.federation.num_clients
    clients = [
        ClientRuntime(cfg, partition_id=i, num_partitions=k, secret_context=secret)
        for i in range(k)
    ]
    codecs = [TimedCodec(c.codec) for c in clients]
    for client, codec in zip(clients, codecs, strict=True):
        client.codec = codec  # wrapped, not replaced: the runtime still calls its own codec
    server = TimedCodec(server_codec(clients[0].initial.size))
    return Federation(name, clients, codecs, server)


#: One client's upload: its payload, its example count and the vector it encoded.
Upload = tuple[WirePayload, int, NDArray[np.float64]]


def train_client(fed: Federation, i: int, server_round: int) -> Upload:
    """Client ``i`` decodes the global state and trains; its upload, count and update.

    The update is the one vector the client's codec encoded during this call
    (``n_k w_k``), captured then: the clients share one model, so it cannot be read
    back from the model later.
    """
    codec = fed.client_codecs[i]
    codec.encoded.clear()
    outcome = fed.clients[i].train(fed.state, server_round=server_round)
    if outcome.payload is None:
        raise RuntimeError(f"{fed.name} client {i} declined round {server_round}.")
    if len(codec.encoded) != 1:
        raise RuntimeError(
            f"{fed.name} client {i} encoded {len(codec.encoded)} vectors in round "
            f"{server_round}; expected its one update."
        )
    return outcome.payload, outcome.num_examples, codec.encoded.pop()


def serve(fed: Federation, uploads: list[Upload]) -> None:
    """Validate and add the uploads; the sum becomes the next round's global state."""
    payloads = [fed.server.validate(p) for p, _, _ in uploads]
    total = fed.server.add(payloads)
    fed.state = GlobalState(payload=total, num_examples=sum(n for _, n, _ in uploads))
    fed.upload_bytes += [payload_nbytes(p) for p in payloads]
    fed.aggregate_bytes.append(payload_nbytes(total))


def check_mean(fed: Federation, key_holder: Codec, uploads: list[Upload]) -> None:
    """Compare the decoded aggregate with numpy's weighted mean of the same updates.

    The updates are the vectors the clients encoded (:func:`train_client`).
    """
    if fed.state is None:
        raise RuntimeError(f"{fed.name}: no aggregate to check before the first round.")
    expected = add_updates([(update, n) for _, n, update in uploads]).mean()
    mean = key_holder.decode(fed.state.payload) / fed.state.num_examples
    fed.errors.append(float(np.max(np.abs(mean - expected))))
    fed.means.append(mean)


def run_round(feds: list[Federation], key_holders: list[Codec], server_round: int) -> None:
    """One round of every federation, interleaved client by client."""
    k = len(feds[0].clients)
    uploads: list[list[Upload]] = [[] for _ in feds]
    seconds = [0.0 for _ in feds]
    for i in range(k):
        order = range(len(feds)) if (server_round + i) % 2 else reversed(range(len(feds)))
        for f in order:
            start = time.perf_counter()
            uploads[f].append(train_client(feds[f], i, server_round))
            elapsed = time.perf_counter() - start
            feds[f].client_seconds.append(elapsed)
            seconds[f] += elapsed
    for f in reversed(range(len(feds))) if server_round % 2 else range(len(feds)):
        start = time.perf_counter()
        serve(feds[f], uploads[f])
        seconds[f] += time.perf_counter() - start
    for fed, holder, up, s in zip(feds, key_holders, uploads, seconds, strict=True):
        fed.round_seconds.append(s)
        check_mean(fed, holder, up)


def warm_up(feds: list[Federation]) -> None:
    """Untimed: first calls into torch and SEAL pay one-off costs."""
    feds[0].clients[0].train(None, server_round=0)
    for fed in feds:
        fed.client_codecs[0].encode(fed.clients[0].initial)
        fed.server.seconds.clear()
        fed.server.values.clear()
        for codec in fed.client_codecs:
            codec.seconds.clear()
            codec.values.clear()
            codec.encoded.clear()


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: all cores; 1 is faster on a machine busy with other jobs)",
    )
    ap.add_argument("--examples-per-label", type=int, default=60)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = RunConfig(
        data=DataConfig(examples_per_label=args.examples_per_label),
        train=TrainConfig(local_epochs=args.local_epochs),
        federation=FederationConfig(
            num_rounds=args.rounds,
            num_clients=args.clients,
            min_clients=1,
            seed=args.seed,
        ),
    )
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-encryption-") as tmp:
        start = time.perf_counter()
        keys = crypto.save_keys(crypto.make_secret_context(), Path(tmp) / "keys")
        public = crypto.load_context(keys.public)
        secret = crypto.load_context(keys.secret)
        plain = build_federation(
            "plain", cfg, secret=None, server_codec=lambda n: PlainCodec(length=n)
        )
        ckks = build_federation(
            "ckks", cfg, secret=keys.secret, server_codec=lambda n: CkksCodec(public, length=n)
        )
        setup = time.perf_counter() - start
        length = plain.clients[0].initial.size
        feds = [plain, ckks]
        holders: list[Codec] = [PlainCodec(length=length), CkksCodec(secret, length=length)]
        warm_up(feds)
        for r in range(1, args.rounds + 1):
            run_round(feds, holders, r)
    print(
        f"machine load (1-minute average) before {load_before:.2f}, after "
        f"{os.getloadavg()[0]:.2f}, on {os.cpu_count()} cores"
    )
    report(args, cfg, plain, ckks, length=length, setup=setup)


def report(
    args: argparse.Namespace,
    cfg: RunConfig,
    plain: Federation,
    ckks: Federation,
    *,
    length: int,
    setup: float,
) -> None:
    """Print the measurements."""
    p = crypto.DEFAULT_PARAMS
    n_train = [c.num_train_examples for c in plain.clients]
    print(
        f"Default model (MiniLM-L6, LoRA r={cfg.model.lora_rank} on "
        f"{cfg.model.lora_target_modules}, {len(plain.clients[0].label_names)} labels), "
        f"WordNet {args.examples_per_label}/label, {args.clients} clients "
        f"(train examples {n_train}), {args.rounds} rounds, {args.local_epochs} local "
        f"epoch(s), torch threads {torch.get_num_threads()}; setup {setup:.1f} s"
    )
    print(
        f"CKKS N={p.poly_modulus_degree} q={p.data_modulus_bits} bits scale=2^"
        f"{p.global_scale_bits} (fedtune.crypto.DEFAULT_PARAMS)"
    )
    print(f"trainable parameters: {length:,d}")
    print("wire bytes per trainable parameter:")
    for fed in (plain, ckks):
        up = np.mean(fed.upload_bytes) / length
        agg = np.mean(fed.aggregate_bytes) / length
        print(f"  {fed.name:5s}  upload {up:6.2f}  aggregate {agg:6.2f}")
    print(f"  (NVIDIA FLARE TenSEAL: ~{FLARE_BYTES_PER_PARAM})")

    def total(codecs: list[TimedCodec], name: str) -> tuple[int, float]:
        return sum(c.values[name] for c in codecs), sum(c.seconds[name] for c in codecs)

    enc_v, enc_s = total(ckks.client_codecs, "encode")
    dec_v, dec_s = total(ckks.client_codecs, "decode")
    add_v, add_s = total([ckks.server], "add")
    print("CKKS throughput (params/s):")
    print(f"  encrypt   {enc_v / enc_s:12,.0f}   ({enc_v:,d} params in {enc_s:.2f} s)")
    print(f"  aggregate {add_v / add_s:12,.0f}   per input ({add_v:,d} in {add_s:.2f} s)")
    if dec_v:
        print(f"  decrypt   {dec_v / dec_s:12,.0f}   ({dec_v:,d} params in {dec_s:.2f} s)")
    else:
        print("  decrypt   (no round decoded an aggregate; use --rounds >= 2)")

    print("round wall time (s), clients one after another + server:")
    print(f"  {'round':>5s} {'plain':>8s} {'ckks':>8s} {'ratio':>6s}")
    for r, (a, b) in enumerate(zip(plain.round_seconds, ckks.round_seconds, strict=True), 1):
        print(f"  {r:5d} {a:8.2f} {b:8.2f} {b / a:6.3f}")
    plain_s, ckks_s = sum(plain.round_seconds), sum(ckks.round_seconds)
    ratio = ckks_s / plain_s
    verdict = "met" if ratio <= GOAL_TIME_RATIO else "NOT met"
    print(
        f"  all   {plain_s:8.2f} {ckks_s:8.2f} {ratio:6.3f}   goal <= {GOAL_TIME_RATIO:.2f}: "
        f"{verdict}"
    )
    pairs = np.array(ckks.client_seconds) / np.array(plain.client_seconds)
    print(
        f"  same client and round, ckks / plain: median {np.median(pairs):.3f} "
        f"(min {pairs.min():.3f}, max {pairs.max():.3f}, {pairs.size} pairs)"
    )
    # Training dominates and its time varies from call to call on a shared machine;
    # the codecs are the only code that differs, so also charge the difference to them.
    codec_s = {
        fed.name: sum(s for c in [*fed.client_codecs, fed.server] for s in c.seconds.values())
        for fed in (plain, ckks)
    }
    base = (plain_s - codec_s["plain"] + ckks_s - codec_s["ckks"]) / 2
    attributed = (base + codec_s["ckks"]) / (base + codec_s["plain"])
    print(
        f"  codec time (encode, validate, add, decode): plain {codec_s['plain']:.2f} s, "
        f"ckks {codec_s['ckks']:.2f} s ({codec_s['ckks'] / ckks_s:.1%} of the encrypted rounds)"
    )
    print(
        f"  ratio from codec time alone, (training + ckks codec) / (training + plain codec): "
        f"{attributed:.3f}"
    )
    err = max(ckks.errors)
    verdict = "met" if err <= GOAL_ERROR else "NOT met"
    print(
        f"max |decrypted mean - plaintext mean| (same updates, {args.rounds} rounds): "
        f"{err:.2e}   goal <= {GOAL_ERROR:g}: {verdict}"
    )
    print(f"  plaintext codec on its own updates: {max(plain.errors):.2e}")
    drift = [float(np.max(np.abs(a - b))) for a, b in zip(plain.means, ckks.means, strict=True)]
    print(
        "  max |encrypted-run mean - plain-run mean| after each round: "
        + ", ".join(f"{d:.2e}" for d in drift)
        + " (later rounds train from starts that differ by the CKKS error)"
    )


if __name__ == "__main__":
    main()
