"""Thousands of vans, each its own MQTT connection over TLS with its own account, in one process.

Issue 18 point 4: a fleet bench that shares a connection among 1,250 vans, without TLS and
with the ACL off, measures a broker that does not exist. Here every van dials the shipped
device listener (TLS, password account, ACL ``datalab/v1/%u/...``) as a real van does, and
sends real wire-format batches (``core.wire.encode_batch`` of 1 Hz samples, one batch per
``interval_s``, the vans staggered over the interval). Lag is the time from a batch's
PUBLISH to the receiver's committed ack for it on the van's ack topic.

Why aiomqtt: one asyncio loop holds thousands of connections (a paho client per van with
its own network thread would be thousands of threads); it drives paho's packet code, which
the project already trusts, from the loop, so nothing of MQTT is ours to get wrong.

Accounts: ``write_accounts`` adds the vans to the broker's device password file in one
write (``provision.set_password`` rewrites the file per account: quadratic at 10,000),
hashed as ``mosquitto_passwd`` does; the broker reads it again on SIGHUP.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import ssl
import sys
import time
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from core.wire import decode_ack, encode_batch

PREFIX = "datalab/v1"


def write_accounts(passwd_file: Path, devices: list[str], seed: int | None = None) -> dict[str, str]:
    """Append one random-password account per device to a Mosquitto password file; the passwords."""
    from receiver.provision import generate_password, hash_password

    del seed  # passwords are always random: a test must not be able to guess another van's
    passwords = {d: generate_password() for d in devices}
    lines = "".join(f"{d}:{hash_password(p)}\n" for d, p in passwords.items())
    with open(passwd_file, "a", encoding="ascii") as f:
        f.write(lines)
    os.chmod(passwd_file, 0o600)
    return passwords


@dataclass
class FleetSpec:
    """What one fleet process runs (JSON between processes; passwords stay in a 0600 file)."""

    host: str
    port: int
    ca_file: str
    accounts_file: str  # JSON {device: password}, 0600
    devices: list[str]
    seconds: float
    interval_s: int = 60
    start_wall: float = 0.0  # common start (time.time()); 0: as soon as connected
    out: str = ""
    connect_concurrency: int = 64  # TLS handshakes at once (the broker is one thread)
    ack_wait_s: float = 60.0
    seed: int = 1
    # A van that also publishes on another van's topic, to prove the ACL refuses it (tests).
    intruder: str = ""


@dataclass
class VanResult:
    device: str
    epoch: str
    published: int = 0
    acked: int = 0
    last_seq: int = 0
    lags: list[float] = field(default_factory=list)
    connect_error: str = ""
    error: str = ""  # what ended the van early after it connected


async def _connect(spec: FleetSpec, device: str, password: str, ctx: ssl.SSLContext,
                   gate: asyncio.Semaphore, rng: random.Random) -> object:
    """Dial until the broker takes the van, with full-jitter backoff as a real van does
    (uplink/backoff.py): a broker busy with thousands of handshakes may drop some."""
    import aiomqtt

    delay = 1.0
    for attempt in range(CONNECT_ATTEMPTS):
        # timeout: how long a SUBSCRIBE or PUBLISH may wait for the broker's answer; under a
        # connection storm Mosquitto answers late, and a van does not give up on a batch for that.
        client = aiomqtt.Client(spec.host, spec.port, username=device, password=password, identifier=device,
                                tls_context=ctx, protocol=aiomqtt.ProtocolVersion.V311, clean_session=True,
                                keepalive=120, max_inflight_messages=20, timeout=OP_TIMEOUT_S)
        try:
            async with gate:
                await client.__aenter__()
            return client
        except aiomqtt.MqttError:
            if attempt == CONNECT_ATTEMPTS - 1:
                raise
            await asyncio.sleep(rng.uniform(0, delay))
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


CONNECT_ATTEMPTS = 6
OP_TIMEOUT_S = 120.0


class _Start:
    """Every van of the process connected (or given up): the load starts then, not before,
    so a slow connection storm is not counted as lag."""

    def __init__(self, vans: int, start_wall: float, out: str) -> None:
        self.left = vans
        self.start_wall = start_wall
        self.out = out
        self.event = asyncio.Event()

    def one_ready(self) -> None:
        self.left -= 1
        if self.left <= 0 and not self.event.is_set():
            self.start_wall = max(self.start_wall, time.time() + 1.0)
            if self.out:
                tmp = Path(self.out + ".started.tmp")  # renamed whole: the bench never reads half
                tmp.write_text(repr(self.start_wall))
                tmp.replace(self.out + ".started")
            self.event.set()


async def _van(spec: FleetSpec, device: str, password: str, ctx: ssl.SSLContext, gate: asyncio.Semaphore,
               start: _Start, offset: float, rng: random.Random) -> VanResult:
    from simulator.soak import SENSORS, make_batch

    epoch = f"af{spec.seed:04d}{rng.randrange(16**6):06x}"
    res = VanResult(device, epoch)
    sent: dict[str, float] = {}
    digests: dict[str, str] = {}  # payload SHA-256 -> batch id: a binary ack names only a digest
    acked: set[str] = set()
    try:
        client: Any = await _connect(spec, device, password, ctx, gate, rng)
    except Exception as exc:  # noqa: BLE001 - reported per van, the fleet goes on
        res.connect_error = f"{type(exc).__name__}: {exc}"
        start.one_ready()
        return res
    reader = None
    announced = False
    try:
        await client.subscribe(f"{PREFIX}/{device}/ack", qos=1)

        async def acks() -> None:
            async for msg in client.messages:
                try:
                    ack = decode_ack(bytes(msg.payload), device)
                except Exception:  # noqa: BLE001 - a bad ack counts as none
                    continue
                bid = ack.batch_id if ack.batch_id in sent else next(
                    (b for h, b in digests.items() if ack.names_payload(h)), "")
                if ack.committed and bid in sent and bid not in acked:
                    acked.add(bid)
                    res.lags.append(time.monotonic() - sent[bid])

        reader = asyncio.create_task(acks())
        start.one_ready()
        announced = True
        await start.event.wait()
        n = len(SENSORS)
        k = 0
        while offset + k * spec.interval_s < spec.seconds:
            due = start.start_wall + offset + k * spec.interval_s
            await asyncio.sleep(max(0.0, due - time.time()))
            # The batch ends now: its samples are the last interval_s seconds, as a van seals by age.
            t0_ms = int(time.time() * 1000) - spec.interval_s * 1000
            batch = make_batch(device, epoch, 1 + k * spec.interval_s * n, t0_ms, spec.interval_s, rng)
            payload = encode_batch(batch)
            sent[batch.batch_id] = time.monotonic()
            digests[hashlib.sha256(payload).hexdigest()] = batch.batch_id
            res.published += 1  # counted before the PUBACK: a batch lost after this is the oracle's to find
            res.last_seq = batch.last_seq
            await client.publish(f"{PREFIX}/{device}/batch", payload, qos=1)
            k += 1
        if device == spec.intruder:
            await _intrude(client, spec, device, rng)
        deadline = time.monotonic() + spec.ack_wait_s
        while len(acked) < res.published and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    except Exception as exc:  # noqa: BLE001 - one van's failure is reported, not the fleet's end
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not announced:
            start.one_ready()  # the others must not wait for a van that is out
        if reader is not None:
            reader.cancel()
        res.acked = len(acked)
        try:
            await client.__aexit__(None, None, None)
        except Exception:  # noqa: BLE001 - the run is over; a failed DISCONNECT changes nothing
            pass
    return res


INTRUDER_EPOCH = "intruder"


async def _intrude(client: object, spec: FleetSpec, device: str, rng: random.Random) -> None:
    """Publish, with this van's account, a well-formed batch of another van on that van's topic."""
    from simulator.soak import make_batch

    victim = next(d for d in spec.devices if d != device)
    batch = make_batch(victim, INTRUDER_EPOCH, 1, int(time.time() * 1000) - 5000, 5, rng)
    await client.publish(f"{PREFIX}/{victim}/batch", encode_batch(batch), qos=1)  # type: ignore[attr-defined]


async def run_fleet(spec: FleetSpec) -> list[VanResult]:
    passwords: dict[str, str] = json.loads(Path(spec.accounts_file).read_text())
    ctx = ssl.create_default_context(cafile=spec.ca_file)
    gate = asyncio.Semaphore(spec.connect_concurrency)
    # aiomqtt dials (TCP + TLS handshake) in the loop's executor: as many threads as handshakes
    # allowed at once, or the default handful would pace the whole fleet's connecting.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=spec.connect_concurrency))
    start = _Start(len(spec.devices), spec.start_wall or time.time(), spec.out)
    rng = random.Random(spec.seed)
    # A real fleet is not in step: each van's batches fall at its own offset in the interval.
    offsets = [rng.uniform(0, spec.interval_s) for _ in spec.devices]
    tasks = [_van(spec, d, passwords[d], ctx, gate, start, off, random.Random(f"{spec.seed}-{d}"))
             for d, off in zip(spec.devices, offsets)]
    return list(await asyncio.gather(*tasks))


def main(spec_path: str) -> None:
    spec = FleetSpec(**json.loads(Path(spec_path).read_text()))
    results = asyncio.run(run_fleet(spec))
    Path(spec.out).write_text(json.dumps([r.__dict__ for r in results]))


if __name__ == "__main__":
    main(sys.argv[1])
