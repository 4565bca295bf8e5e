"""The Fleet gateway under 20 concurrent unauthenticated 200 MiB bodies (issue 27).

    python benchmarks/bench_gateway.py [--attackers 20] [--attack-seconds 25]

Starts, on 127.0.0.1 only, what ``fedtune deploy superlink`` starts: Flower's own
``flower-superlink`` (TLS, ``--enable-supernode-auth``) and the gateway in front of it
(``python -m fedtune.deploy.gateway``, default limits), then registers one node key
with ``fedtune deploy register``. An honest client signs its calls with that key as
Flower's SuperNode does and, in a loop, sends a heartbeat (``send-node-heartbeat``,
~40 B) and an 8 MiB ``push-object`` (the size of an encrypted update of ~1M LoRA
parameters; the SuperLink refuses its junk content after reading it all, which is
what costs). Meanwhile a separate process runs ``--attackers`` concurrent clients
that hold only ``ca.crt`` and each, over and over, stream a 200 MiB body generated on
the fly (never held in memory): a quarter with no signature, a quarter signed with a
key of their own, a quarter chunked, a quarter trickling a small body.

It prints the gateway's resident memory (VmRSS sampled every 0.1 s, and the kernel's
peak VmHWM), the SuperLink's peak, what the attackers got through, and the honest
calls' latency before and during the attack.

No full federation runs (a training round of the tiny model under this attack would
mostly measure the shared 2-core machine): the honest traffic is Flower's real Fleet
calls against the real SuperLink, through the real gateway. Every process it starts
is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import multiprocessing
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from base64 import b64encode
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.fleet_pb2 import ActivateNodeRequest  # type: ignore[attr-defined]
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest  # type: ignore[attr-defined]
from flwr.proto.message_pb2 import PushObjectRequest  # type: ignore[attr-defined]
from flwr.proto.node_pb2 import Node  # type: ignore[attr-defined]
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
ATTACK_BODY = 200 * MiB
HONEST_UPLOAD = 8 * MiB
_PIECE = b"\0" * (64 * 1024)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"{what} did not listen on 127.0.0.1:{port}")


def _status(pid: int, field: str) -> float:
    """``field`` (VmRSS, VmHWM) of ``/proc/PID/status`` in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


def _bytes_read(pid: int) -> int:
    """Bytes the process has read with read()/recv() calls, sockets included (``rchar``)."""
    text = Path(f"/proc/{pid}/io").read_text()
    match = re.search(r"^rchar:\s+(\d+)", text, re.M)
    return int(match.group(1)) if match else 0


def _auth(private: ec.EllipticCurvePrivateKey, public_pem: bytes) -> dict[str, str]:
    """Flower's signed-timestamp headers (``NodeAuthHttpInterceptor``)."""
    stamp = datetime.datetime.now(datetime.UTC).isoformat()
    return {
        "flwr-public-key": b64encode(public_pem).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": b64encode(sign_message(private, stamp.encode())).decode(),
        "content-type": "application/protobuf",
    }


# -- the attackers (a process of their own) -------------------------------------------------


async def _attacker(i: int, port: int, ca: str, until: float, stats: dict[str, int]) -> None:
    context = ssl.create_default_context(cafile=ca)
    own = ec.generate_private_key(ec.SECP384R1())
    own_pem = public_key_to_bytes(own.public_key())
    variant = i % 4
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        except OSError:
            stats["connect-failed"] += 1
            await asyncio.sleep(0.05)
            continue
        stats["connections"] += 1
        lines = ["POST /v1/fleet/push-messages HTTP/1.1", "Host: gateway"]
        if variant:
            lines += [f"{k}: {v}" for k, v in _auth(own, own_pem).items()]
        if variant == 2:
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append(f"Content-Length: {512 * 1024 if variant == 3 else ATTACK_BODY}")
        sent = 0
        answer = asyncio.create_task(reader.readline())  # the gateway's reply, or its close
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            while sent < ATTACK_BODY and time.monotonic() < until and not answer.done():
                if variant == 3:  # a slow body: 1 KiB a second
                    writer.write(_PIECE[:1024])
                    sent += 1024
                    await asyncio.sleep(1.0)
                elif variant == 2:
                    writer.write(b"%x\r\n" % len(_PIECE) + _PIECE + b"\r\n")
                    sent += len(_PIECE)
                else:
                    writer.write(_PIECE)
                    sent += len(_PIECE)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError, ValueError, IndexError):
            line = await asyncio.wait_for(answer, 1.0)
            if line:
                stats[f"status-{int(line.split()[1])}"] += 1
            else:
                stats["closed-without-answer"] += 1
        if not answer.done():
            answer.cancel()
            stats["still-sending-at-the-end"] += 1
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        await asyncio.sleep(0.05)  # a gentler attacker than real: this machine is shared


def _attack(port: int, ca: str, n: int, seconds: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from collections import Counter

    stats: Counter[str] = Counter()
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "socket.send() raised exception."
    out.put("started")
    until = time.monotonic() + seconds

    async def main() -> None:
        await asyncio.gather(*(_attacker(i, port, ca, until, stats) for i in range(n)))

    asyncio.run(main())
    out.put(dict(stats))


# -- the honest node ---------------------------------------------------------------------------


class Honest:
    """One registered node's real Fleet calls, timed."""

    def __init__(self, port: int, ca: Path, key: Path) -> None:
        loaded = serialization.load_ssh_private_key(key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise SystemExit(f"{key} is not an EC key")
        self.private = loaded
        self.public = public_key_to_bytes(loaded.public_key())
        self.client = httpx.Client(
            base_url=f"https://127.0.0.1:{port}",
            verify=ssl.create_default_context(cafile=str(ca)),
            timeout=60.0,
        )
        self.node_id = 0
        self.samples: list[tuple[float, str, float, int]] = []  # (t, call, seconds, status)
        self.upload = os.urandom(HONEST_UPLOAD)

    def call(self, path: str, body: bytes) -> httpx.Response:
        for _ in range(20):  # Flower retries 502/503/504 with backoff; so does this node
            started = time.monotonic()
            try:
                reply = self.client.post(
                    path, content=body, headers=_auth(self.private, self.public)
                )
            except httpx.TransportError:
                self.samples.append((started, path, time.monotonic() - started, 0))
                time.sleep(0.2)
                continue
            self.samples.append((started, path, time.monotonic() - started, reply.status_code))
            if reply.status_code not in (502, 503, 504):
                return reply
            time.sleep(0.2)
        return reply

    def activate(self) -> None:
        from flwr.proto.fleet_pb2 import ActivateNodeResponse  # type: ignore[attr-defined]

        reply = self.call(
            "/v1/fleet/activate-node",
            ActivateNodeRequest(public_key=self.public, heartbeat_interval=30).SerializeToString(),
        )
        if reply.status_code != 200:
            raise SystemExit(f"activate-node: {reply.status_code} {reply.text[:200]}")
        self.node_id = ActivateNodeResponse.FromString(reply.content).node_id

    def loop(self, stop: threading.Event) -> None:
        node = Node(node_id=self.node_id)
        beat = SendNodeHeartbeatRequest(node=node, heartbeat_interval=30).SerializeToString()
        push = PushObjectRequest(
            node=node, run_id=1, object_id="0" * 64, object_content=self.upload
        ).SerializeToString()
        while not stop.is_set():
            self.call("/v1/fleet/send-node-heartbeat", beat)
            self.call("/v1/fleet/push-object", push)
            stop.wait(0.5)


def _summary(samples: list[tuple[float, str, float, int]], start: float, end: float) -> str:
    out = []
    for path, name in (
        ("/v1/fleet/send-node-heartbeat", "heartbeat"),
        ("/v1/fleet/push-object", "8 MiB push"),
    ):
        got = [s for s in samples if s[1] == path and start <= s[0] < end]
        times = sorted(s[2] for s in got)
        codes = sorted({s[3] for s in got})
        if not times:
            out.append(f"{name}: no calls")
            continue
        p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
        out.append(
            f"{name}: {len(times)} calls, median {statistics.median(times) * 1000:.0f} ms, "
            f"p95 {p95 * 1000:.0f} ms, statuses {codes}"
        )
    return "; ".join(out)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--attackers", type=int, default=20)
    p.add_argument("--attack-seconds", type=float, default=25.0)
    p.add_argument("--baseline-seconds", type=float, default=8.0)
    args = p.parse_args()

    from fedtune.deploy import pki, roles

    root = Path(tempfile.mkdtemp(prefix="fedtune-bench-gateway-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        files = pki.make_tls(root / "certs", ca_dir=root / "ca", hosts=["127.0.0.1"])
        key = pki.make_node_key(root / "keys", "honest")
        control, fleet = _free_port(), _free_port()
        env_extra = {"PYTHONPATH": str(ROOT)}
        link = roles.superlink(
            certs=root / "certs", state_dir=root / "server", control_port=control
        )
        gateway = roles.fleet_gateway(
            certs=root / "certs", host="127.0.0.1", port=fleet, control_port=control
        )
        log = (root / "superlink.log").open("ab")
        procs.append(
            subprocess.Popen(
                link.argv,
                env={**link.env, **env_extra},
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        )
        _wait_port(control, procs[0], "flower-superlink")
        gwlog = (root / "gateway.log").open("ab")
        procs.append(
            subprocess.Popen(
                gateway.argv,
                env={**gateway.env, **env_extra},
                stdout=gwlog,
                stderr=gwlog,
                start_new_session=True,
            )
        )
        _wait_port(fleet, procs[1], "the gateway")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedtune.cli",
                "deploy",
                "register",
                "--superlink",
                f"127.0.0.1:{control}",
                "--ca",
                str(files.ca_cert),
                "--home",
                str(root / "operator"),
                str(key.public),
            ],
            env={**os.environ, **env_extra},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"register failed: {done.stdout}{done.stderr}")
        gw_pid, link_pid = procs[1].pid, procs[0].pid

        honest = Honest(fleet, files.ca_cert, key.private)
        honest.activate()
        rss: list[tuple[float, float]] = []
        link_rss: list[tuple[float, float]] = []
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.is_set():
                with contextlib.suppress(OSError):
                    now = time.monotonic()
                    rss.append((now, _status(gw_pid, "VmRSS")))
                    link_rss.append((now, _status(link_pid, "VmRSS")))
                stop_sampling.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stop = threading.Event()
        worker = threading.Thread(target=honest.loop, args=(stop,), daemon=True)
        t0 = time.monotonic()
        worker.start()
        time.sleep(args.baseline_seconds)
        rss_before = max(r for _, r in rss)
        spawn = multiprocessing.get_context("spawn")
        queue = spawn.Queue()
        attack = spawn.Process(
            target=_attack,
            args=(fleet, str(files.ca_cert), args.attackers, args.attack_seconds, queue),
        )
        attack.start()
        queue.get(timeout=120)
        t1, read_before = time.monotonic(), _bytes_read(gw_pid)
        stats = queue.get(timeout=args.attack_seconds + 120)
        read_during = _bytes_read(gw_pid) - read_before
        attack.join(30)
        t2 = time.monotonic()
        time.sleep(2.0)
        stop.set()
        worker.join(120)
        stop_sampling.set()
        sampler.join(5)
        during = [r for t, r in rss if t1 <= t < t2]

        print(
            f"gateway (pid {gw_pid}) before the attack: VmRSS {rss_before:.0f} MiB (max of samples)"
        )
        print(
            f"during {args.attackers} concurrent unauthenticated 200 MiB bodies for "
            f"{t2 - t1:.0f} s: VmRSS max {max(during):.0f} MiB (samples every 0.1 s), "
            f"peak VmHWM over the whole run {_status(gw_pid, 'VmHWM'):.0f} MiB"
        )
        print(
            f"flower-superlink (pid {link_pid}): VmRSS max "
            f"{max(r for t, r in link_rss if t < t1):.0f} MiB before the attack, "
            f"{max(r for t, r in link_rss if t1 <= t < t2):.0f} MiB during; "
            f"peak VmHWM {_status(link_pid, 'VmHWM'):.0f} MiB"
        )
        print(
            f"attackers (connections, and the gateway's answers): {stats}; the gateway read "
            f"{read_during / MiB:.0f} MiB in all during the attack (rchar of /proc/PID/io, "
            "the honest uploads included)"
        )
        print("honest before: " + _summary(honest.samples, t0, t1))
        print("honest during: " + _summary(honest.samples, t1, t2))
        refused = [s for s in honest.samples if t1 <= s[0] < t2 and s[3] in (0, 502, 503, 504)]
        print(f"honest calls refused or failed during the attack (retried): {len(refused)}")
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        subprocess.run(["rm", "-rf", str(root)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
