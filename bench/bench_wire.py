"""Bytes per value on the wire: wire version 2 against one JSON message per sample.

The shipped figure (issue #18) is the captured one: ``upload_rows`` counts what a
real van (bench/bench_agent.py's shipped configuration: real agent and drivers,
default settings, 60-s batches, heartbeats, wire v4) published, sniffed on the
broker, and the acks it received, every packet with its PUBACK. The rows below it
are the format's own figure on one synthetic batch.

A realistic sealed batch of 2000 samples (500 ticks of pm, no2, noise and gps
from the value-level simulator, stamped by the agent's TimeKeeper on a
SimClock, mid-shift with a GPS fix) is encoded with wire version 2 and, for
reference, version 1. Every figure counts the whole MQTT 3.1.1 PUBLISH packet
at QoS 1 on ``datalab/v1/van-001/batch``: fixed header, remaining length,
topic, packet id, payload.

The baseline is what a naive agent would send: each sample as its own PUBLISH
with a compact JSON body (device, epoch, seq, sensor, times, source, values,
flags), also counted with its MQTT overhead.

"Values" are the measured quantities, the entries of ``Sample.values``.
A second batch adds 0-20 ms of read jitter to the times (the simulator's
clock is exact; a Pi's reads are not) to show the format does not depend on
perfectly regular clocks.

    python bench/bench_wire.py
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.clock import SimClock
from core.sample import Sample
from core.timekeeping import TimeKeeper
from simulator.value_sensors import SIM_DRIVERS
from simulator.world import VanWorld
from core.wire import VERSION_COLUMNAR, VERSION_JSON, Batch, decode_batch, encode_batch

TOPIC = "datalab/v1/van-001/batch"
SHIFT_START_UTC = 1_795_588_200.0  # a weekday 07:30 in Alphen (CET)
BATCH_SAMPLES = 2000


def mqtt_publish_size(topic: str, payload_len: int, qos: int = 1) -> int:
    """Bytes of one MQTT 3.1.1 PUBLISH packet on the wire (TCP/TLS not counted).

    Fixed header: 1 byte of type and flags, then the remaining length as a
    1-4 byte varint. Variable header: 2-byte topic length, the topic in UTF-8,
    and a 2-byte packet id for QoS 1 and 2. Then the payload.
    """
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + payload_len
    length_bytes = 1
    while remaining >= 128**length_bytes:
        length_bytes += 1
    if length_bytes > 4:
        raise ValueError("payload too large for one MQTT packet")
    return 1 + length_bytes + remaining


def json_message(device: str, epoch: str, s: Sample) -> bytes:
    """The naive baseline: one self-describing JSON document per sample."""
    return json.dumps(
        {
            "device": device,
            "epoch": epoch,
            "seq": s.seq,
            "sensor": s.sensor,
            "t_utc_ms": s.t_utc_ms,
            "t_mono_ms": s.t_mono_ms,
            "time_src": str(s.time_src),
            "values": s.values,
            "flags": list(s.flags),
        },
        separators=(",", ":"),
    ).encode()


def simulated_batch(
    n_samples: int = BATCH_SAMPLES, *, skip_s: int = 600, seed: int = 1, first_seq: int | None = None
) -> Batch:
    """A batch as the agent would seal it, from the value-level simulator.

    ``skip_s`` seconds of the shift pass first (warm-up, GPS cold start), so
    the batch is a typical one from the middle of a shift.
    """
    clock = SimClock(SHIFT_START_UTC, trusted_after=0.0)
    world = VanWorld(clock, shift_start_utc=SHIFT_START_UTC, seed=seed)
    drivers = [SIM_DRIVERS[k](world) for k in ("sim-pm", "sim-no2", "sim-noise", "sim-gps")]
    keeper = TimeKeeper(clock, [d for d in drivers if hasattr(d, "time_fix")])
    clock.advance(skip_s)
    samples: list[Sample] = []
    seq = first_seq if first_seq is not None else skip_s * len(drivers) + 1
    while len(samples) < n_samples:
        keeper.update()
        for d in drivers:
            reading = d.read()
            stamp = keeper.stamp()
            samples.append(
                Sample(reading.sensor, stamp.t_utc_ms, stamp.t_mono_ms, stamp.source,
                       dict(reading.values), reading.flags, seq, "3f9c2a71-5d7e-4b0e-9a53-0c1f4e2d8b66")
            )
            seq += 1
        clock.advance(1.0)
    samples = samples[:n_samples]
    return Batch("van-001", "5b47e51bc31f3c38", samples[0].seq or 1, samples[-1].seq or 1, samples)


def jittered(batch: Batch, max_ms: int = 20, seed: int = 7) -> Batch:
    """The same batch with each read 0-``max_ms`` ms late, as on a busy Pi."""
    rng = random.Random(seed)
    out = []
    for s in batch.samples:
        j = rng.randint(0, max_ms)
        out.append(replace(s, t_mono_ms=s.t_mono_ms + j,
                           t_utc_ms=None if s.t_utc_ms is None else s.t_utc_ms + j))
    return replace(batch, samples=out)


def _best_time(fn: Callable[[], object], repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(batch: Batch) -> dict[str, float]:
    n_values = sum(len(s.values) for s in batch.samples)
    v2 = encode_batch(batch, VERSION_COLUMNAR)
    v1 = encode_batch(batch, VERSION_JSON)
    per_sample = sum(
        mqtt_publish_size(TOPIC, len(json_message(batch.device, batch.epoch, s))) for s in batch.samples
    )
    return {
        "values": n_values,
        "v2_payload": len(v2),
        "v2_wire": mqtt_publish_size(TOPIC, len(v2)),
        "v1_wire": mqtt_publish_size(TOPIC, len(v1)),
        "json_wire": per_sample,
        "encode_s": _best_time(lambda: encode_batch(batch, VERSION_COLUMNAR)),
        "decode_s": _best_time(lambda: decode_batch(v2)),
        "v1_encode_s": _best_time(lambda: encode_batch(batch, VERSION_JSON)),
        "v1_decode_s": _best_time(lambda: decode_batch(v1)),
    }


PUBACK_BYTES = 4  # MQTT 3.1.1 PUBACK: type, remaining length 2, packet id


def upload_rows(messages: list[tuple[str, bytes]], device: str) -> list[dict]:
    """Bytes per value of what one van's traffic put on the wire, captured (issue #18).

    Counts, each as its whole MQTT 3.1.1 packet at QoS 1 plus the 4-byte PUBACK that
    answers it: every batch PUBLISH (re-sends too), every heartbeat but the goodbye at
    shutdown, every sync request, and every message the van received (the receiver's
    acks, recorded by the van). Not counted: TLS records, TCP/IP headers, the CONNECT
    and SUBSCRIBE of each connection, keepalive pings (none while the van publishes
    every minute). Values are those of the decoded batches. Baselines: the same samples
    as one JSON message each, the heartbeats as plain JSON, the acks as JSON (ack v1).
    """
    from core.wire import Ack, content_hash, decode_ack, decode_status, encode_ack, encode_status

    def packet(topic: str, payload: bytes) -> int:
        return mqtt_publish_size(topic, len(payload)) + PUBACK_BYTES

    batches = [(t, p) for t, p in messages if t.endswith(f"/{device}/batch")]
    beats = [(t, p) for t, p in messages if t.endswith(f"/{device}/status")]
    beats = [(t, p) for t, p in beats if decode_status(p)["online"]]
    syncs = [(t, p) for t, p in messages if t.endswith(f"/{device}/sync")]
    acks = [(t, p) for t, p in messages if t.endswith(f"/{device}/ack")]
    decoded = [decode_batch(p) for _, p in batches]
    n = sum(len(s.values) for b in decoded for s in b.samples)
    if not n:
        raise RuntimeError(f"no batch of {device} captured")
    batch_bytes = sum(packet(t, p) for t, p in batches)
    beat_bytes = sum(packet(t, p) for t, p in beats)
    sync_bytes = sum(packet(t, p) for t, p in syncs)
    ack_bytes = sum(packet(t, p) for t, p in acks)
    plain_beats = sum(packet(t, encode_status(
        {k: v for k, v in decode_status(p).items() if k != "v"}, compact=False)) for t, p in beats)
    json_acks = 0
    for t, p in acks:
        a = decode_ack(p, device)
        full = a.sha256 if len(a.sha256) == 64 else next(
            (content_hash(bp) for _, bp in batches if content_hash(bp).startswith(a.sha256)), "0" * 64)
        json_acks += packet(t, encode_ack(Ack(a.batch_id, a.status, a.reason, full)))
    json_bytes = sum(packet(batches[0][0], json_message(b.device, b.epoch, s)) for b in decoded for s in b.samples)
    total = (batch_bytes + beat_bytes + sync_bytes + ack_bytes) / n
    note = (f"{len(batches)} batches ({sum(len(b.samples) for b in decoded)} samples, {n} values), "
            f"{len(beats)} heartbeats, {len(syncs)} sync requests and {len(acks)} acks of {device}, "
            "real agent and drivers, default settings; MQTT packets with their PUBACKs")
    return [
        {"name": "wire.upload_bytes_per_value (batches + heartbeats + syncs + acks, captured)",
         "value": round(total, 3), "unit": "B/value, MQTT packets",
         "baseline": round((json_bytes + plain_beats + sync_bytes + json_acks) / n, 2),
         "target": "<= 1.0", "ok": total <= 1.0,
         "note": note + "; baseline: JSON per sample + plain-JSON heartbeats + JSON acks"},
        {"name": "wire.upload_batches_bytes_per_value (captured)", "value": round(batch_bytes / n, 3),
         "unit": "B/value, MQTT packets", "baseline": round(json_bytes / n, 2), "target": None, "ok": None,
         "note": "batches alone; baseline JSON per sample"},
        {"name": "wire.heartbeat_bytes (captured)", "value": round(beat_bytes / max(1, len(beats))),
         "unit": "B per heartbeat PUBLISH + PUBACK", "baseline": round(plain_beats / max(1, len(beats))),
         "target": None, "ok": None, "note": "baseline: the same heartbeats as plain JSON (status v1)"},
        {"name": "wire.ack_bytes (captured)", "value": round(ack_bytes / max(1, len(acks))),
         "unit": "B per ack PUBLISH + PUBACK", "baseline": round(json_acks / max(1, len(acks))),
         "target": None, "ok": None, "note": "binary ack (v2) against the same acks as JSON (v1)"},
    ]


def captured_upload(seconds: float = 120.0) -> list[dict]:
    """Rows from a real van's upload: bench_agent's shipped configuration, sniffed."""
    from bench.bench_agent import measure as run_vans

    messages: list[tuple[str, bytes]] = []
    run_vans(seconds, kinds=("module",), captured=messages)
    return upload_rows(messages, "van-module-0")


def run() -> list[dict]:
    """Benchmark rows: name, value, unit, baseline, target, ok (None where only informative)."""
    import os

    return synthetic_rows() + captured_upload(float(os.environ.get("BENCH_WIRE_SECONDS", "150")))


def synthetic_rows() -> list[dict]:
    """One 2000-sample batch from the value-level simulator (the format's own figure)."""
    batch = simulated_batch()
    m = measure(batch)
    mj = measure(jittered(batch))
    n = m["values"]
    bpv = m["v2_wire"] / n
    base_bpv = m["json_wire"] / n
    ratio = m["json_wire"] / m["v2_wire"]
    jbpv = mj["v2_wire"] / n
    jratio = mj["json_wire"] / mj["v2_wire"]

    def row(name: str, value: float, unit: str, baseline: float | None = None,
            target: str | None = None, ok: bool | None = None) -> dict:
        return {"name": name, "value": value, "unit": unit, "baseline": baseline,
                "target": target, "ok": ok}

    return [
        row("wire.values_per_batch", n, f"values in {len(batch.samples)} samples"),
        row("wire.v2_bytes_per_value", round(bpv, 3), "B/value on the wire", round(base_bpv, 2),
            "<= 2.0", bpv <= 2.0),
        row("wire.v2_vs_json_per_sample", round(ratio, 1), "x smaller", 1.0, ">= 20", ratio >= 20),
        row("wire.v2_bytes_per_value_jitter", round(jbpv, 3), "B/value, 0-20 ms jitter",
            round(mj["json_wire"] / n, 2), "<= 2.0", jbpv <= 2.0),
        row("wire.v2_vs_json_jitter", round(jratio, 1), "x smaller, 0-20 ms jitter", 1.0, ">= 20",
            jratio >= 20),
        row("wire.v2_packet_bytes", m["v2_wire"], "B per batch PUBLISH", m["json_wire"]),
        row("wire.v1_bytes_per_value", round(m["v1_wire"] / n, 3), "B/value on the wire (reference)"),
        row("wire.json_per_sample_bytes_per_value", round(base_bpv, 2), "B/value on the wire (baseline)"),
        row("wire.v2_encode_ms", round(m["encode_s"] * 1e3, 2), "ms per batch",
            round(m["v1_encode_s"] * 1e3, 2)),
        row("wire.v2_decode_ms", round(m["decode_s"] * 1e3, 2), "ms per batch",
            round(m["v1_decode_s"] * 1e3, 2)),
    ]


def main() -> None:
    from bench import print_table

    print_table(run())
    print("\nbaseline column: JSON per sample for sizes, wire v1 for times (v1 encodes at zlib 6).")


if __name__ == "__main__":
    main()
