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
import json
import os
import random
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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


async def _van(spec: FleetSpec, device: str, password: str, ctx: ssl.SSLContext, gate: asyncio.Semaphore,
               connected: asyncio.Event, ready: list[int], offset: float, rng: random.Random) -> VanResult:
    import aiomqtt

    from simulator.soak import SENSORS, make_batch

    epoch = f"af{spec.seed:04d}{rng.randrange(16**6):06x}"
    res = VanResult(device, epoch)
    sent: dict[str, float] = {}
    acked: set[str] = set()
    client = aiomqtt.Client(spec.host, spec.port, username=device, password=password, identifier=device,
                            tls_context=ctx, protocol=aiomqtt.ProtocolVersion.V311, clean_session=True,
                            keepalive=120, max_inflight_messages=20)
    try:
        async with gate:
            await client.__aenter__()
    except Exception as exc:  # noqa: BLE001 - reported per van, the fleet goes on
        res.connect_error = f"{type(exc).__name__}: {exc}"
        ready[0] += 1
        if ready[0] >= len(spec.devices):
            connected.set()
        return res
    try:
        await client.subscribe(f"{PREFIX}/{device}/ack", qos=1)

        async def acks() -> None:
            async for msg in client.messages:
                try:
                    ack = decode_ack(bytes(msg.payload))  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001 - a bad ack counts as none
                    continue
                if ack.committed and ack.batch_id in sent and ack.batch_id not in acked:
                    acked.add(ack.batch_id)
                    res.lags.append(time.monotonic() - sent[ack.batch_id])

        reader = asyncio.create_task(acks())
        ready[0] += 1
        if ready[0] >= len(spec.devices):
            connected.set()
        await connected.wait()
        start_wall = spec.start_wall or time.time()
        n = len(SENSORS)
        k = 0
        while offset + k * spec.interval_s < spec.seconds:
            due = start_wall + offset + k * spec.interval_s
            await asyncio.sleep(max(0.0, due - time.time()))
            # The batch ends now: its samples are the last interval_s seconds, as a van seals by age.
            t0_ms = int(time.time() * 1000) - spec.interval_s * 1000
            batch = make_batch(device, epoch, 1 + k * spec.interval_s * n, t0_ms, spec.interval_s, rng)
            payload = encode_batch(batch)
            sent[batch.batch_id] = time.monotonic()
            await client.publish(f"{PREFIX}/{device}/batch", payload, qos=1)
            res.published += 1
            res.last_seq = batch.last_seq
            k += 1
        if device == spec.intruder:
            await _intrude(client, spec, device, rng)
        deadline = time.monotonic() + spec.ack_wait_s
        while len(acked) < res.published and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        reader.cancel()
    finally:
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
    connected = asyncio.Event()
    ready = [0]
    rng = random.Random(spec.seed)
    # A real fleet is not in step: each van's batches fall at its own offset in the interval.
    offsets = [rng.uniform(0, spec.interval_s) for _ in spec.devices]
    tasks = [_van(spec, d, passwords[d], ctx, gate, connected, ready, off, random.Random(f"{spec.seed}-{d}"))
             for d, off in zip(spec.devices, offsets)]
    return list(await asyncio.gather(*tasks))


def main(spec_path: str) -> None:
    spec = FleetSpec(**json.loads(Path(spec_path).read_text()))
    results = asyncio.run(run_fleet(spec))
    Path(spec.out).write_text(json.dumps([r.__dict__ for r in results]))


if __name__ == "__main__":
    main(sys.argv[1])
