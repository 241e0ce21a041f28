"""Receiver memory: RSS of a running receiver when the largest batches arrive at once.

Issue 13 point 5. A ``datalab-receiver run`` process (SQLite store, derive
inline: the default) behind a real Mosquitto with the shipped in-flight window
(100) and queue limits; its RSS is sampled from /proc every 20 ms. In the same
run:

* baseline: the idle receiver, then 64 ordinary batches (2000 samples, the
  van's default, from the value-level simulator) published at once;
* 64 maximal batches published at once: the most decoded values the format
  allows (uplink/wire.py, uplink/codec_v2.py: MAX_SAMPLES_PER_BATCH samples
  and MAX_VALUE_CELLS values, distinct integers, which version 2's delta
  coding packs into a few hundred bytes). The same payload 64 times: the
  first is stored, the other 63 are decoded in full and answered
  ``duplicate``, so the memory is that of 64 maximal uploads while the run
  stays within a few minutes;
* 64 batches as large on the wire as the format allows (just under
  MAX_PAYLOAD_BYTES: random floats, which compress little), ~60 MiB
  arriving at once; again one payload 64 times (encoding takes seconds each).

Target: peak RSS at most 300 MB (the documented bound, docs/architecture.md).

    python bench/bench_receiver_memory.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as mqtt

from bench.bench_wire import simulated_batch
from edge.model import Sample, TimeSource
from uplink.codec_v2 import MAX_VALUE_CELLS
from uplink.wire import MAX_PAYLOAD_BYTES, MAX_SAMPLES_PER_BATCH, Batch, decode_ack, encode_batch

ROOT = Path(__file__).resolve().parent.parent
AT_ONCE = 64
TARGET_MB = 300.0
SHIPPED_LIMITS = "max_queued_messages 200000\nmax_inflight_messages 100\n"


def maximal_batch(device: str) -> Batch:
    """As many values as the format takes, in as few bytes as it allows."""
    n = MAX_SAMPLES_PER_BATCH
    keys = [f"k{j}" for j in range(MAX_VALUE_CELLS // n)]
    samples = [Sample("pm", 1_795_000_000_000 + i * 1000, i * 1000, TimeSource.NTP,
                      {k: i + j for j, k in enumerate(keys)}, (), i + 1, "boot") for i in range(n)]
    return Batch(device, "e-max", 1, n, samples)


def wire_maximal_batch(device: str) -> Batch:
    """Random floats just under the payload limit: the most bytes in flight per upload."""
    import random

    rnd = random.Random(13)
    keys = [f"k{j}" for j in range(7)]  # 20,000 x 7 random floats: ~0.93 MiB compressed
    n = MAX_SAMPLES_PER_BATCH
    samples = [Sample("pm", 1_795_000_000_000 + i * 1000, i * 1000, TimeSource.NTP,
                      {k: rnd.random() for k in keys}, (), i + 1, "boot") for i in range(n)]
    return Batch(device, "e-wire", 1, n, samples)


def ordinary_batches(n: int) -> list[Batch]:
    run = simulated_batch(2000, skip_s=600, seed=5)
    out = []
    for i in range(n):
        device = f"van-{i % 8:03d}"
        first = (i // 8) * 2000 + 1
        samples = [Sample(s.sensor, s.t_utc_ms, s.t_mono_ms, s.time_src, s.values, s.flags, first + k, s.boot_id)
                   for k, s in enumerate(run.samples)]
        out.append(Batch(device, "e-ord", first, first + 1999, samples))
    return out


class RssProbe:
    """Samples a process's RSS (MB) in a thread; ``peak()`` since the last ``reset()``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, self.now())

    def reset(self) -> None:
        self._peak = self.now()

    def peak(self) -> float:
        return max(self._peak, self.now())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)


def publish_and_wait(port: int, payloads: list[tuple[str, bytes]], expect: int, timeout: float = 300) -> float:
    """Publish all at once (QoS 1) and wait for ``expect`` acks; seconds taken."""
    got: list[str] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-mem-{time.monotonic_ns()}")
    client.on_message = lambda c, u, m: got.append(decode_ack(m.payload).status)
    client.connect("127.0.0.1", port)
    client.subscribe("datalab/v1/+/ack", qos=1)
    client.loop_start()
    time.sleep(0.3)
    t0 = time.monotonic()
    for device, p in payloads:
        client.publish(f"datalab/v1/{device}/batch", p, qos=1)
    deadline = t0 + timeout
    while len(got) < expect and time.monotonic() < deadline:
        time.sleep(0.05)
    took = time.monotonic() - t0
    client.loop_stop()
    client.disconnect()
    if len(got) < expect:
        raise RuntimeError(f"only {len(got)} of {expect} acks within {timeout} s")
    return took


def measure() -> dict[str, float]:
    from simulator.broker import LocalBroker

    with tempfile.TemporaryDirectory(prefix="bench-rx-mem-") as tmp:
        root = Path(tmp)
        (root / "broker").mkdir()
        broker = LocalBroker("mosquitto", workdir=root / "broker", extra_config=SHIPPED_LIMITS).start()
        ready = root / "ready"
        proc = subprocess.Popen(
            [sys.executable, "-m", "receiver.cli", "run", "--store", str(root / "store.sqlite"), "--port",
             str(broker.port), "--client-id", "bench-mem", "--ready-file", str(ready)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = RssProbe(proc.pid)
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the receiver did not come up")
                time.sleep(0.05)
            time.sleep(1.0)
            idle = probe.now()
            ordinary = [(b.device, encode_batch(b)) for b in ordinary_batches(AT_ONCE)]
            probe.reset()
            t_ord = publish_and_wait(broker.port, ordinary, AT_ONCE)
            ord_peak = probe.peak()
            big = encode_batch(maximal_batch("van-max"))
            probe.reset()
            t_max = publish_and_wait(broker.port, [("van-max", big)] * AT_ONCE, AT_ONCE)
            max_peak = probe.peak()
            wide = encode_batch(wire_maximal_batch("van-wire"))
            if len(wide) > MAX_PAYLOAD_BYTES:
                raise RuntimeError("the wire-maximal batch came out over the payload limit")
            probe.reset()
            t_wide = publish_and_wait(broker.port, [("van-wire", wide)] * AT_ONCE, AT_ONCE)
            wide_peak = probe.peak()
            after = probe.now()
        finally:
            probe.close()
            proc.terminate()
            proc.wait(30)
            broker.close()
    return {"idle": idle, "ordinary_peak": ord_peak, "ordinary_s": t_ord, "max_peak": max_peak,
            "max_s": t_max, "after": after, "max_bytes": len(big), "wide_peak": wide_peak, "wide_s": t_wide,
            "wide_bytes": len(wide)}


def run() -> list[dict]:
    m = measure()
    cells = MAX_VALUE_CELLS
    return [
        {"name": f"receiver RSS, {AT_ONCE} ordinary batches at once", "value": round(m["ordinary_peak"], 1),
         "unit": "MB", "baseline": round(m["idle"], 1), "baseline_name": "idle receiver",
         "note": f"2000 samples each, all acked in {m['ordinary_s']:.1f} s"},
        {"name": f"receiver RSS, {AT_ONCE} maximal batches at once", "value": round(m["max_peak"], 1),
         "unit": "MB", "baseline": round(m["ordinary_peak"], 1), "baseline_name": "ordinary batches",
         "target": f"<= {TARGET_MB:.0f} MB", "ok": m["max_peak"] <= TARGET_MB,
         "note": f"{MAX_SAMPLES_PER_BATCH:,} samples, {cells:,} values in {m['max_bytes']:,} bytes each; "
                 f"acked in {m['max_s']:.0f} s"},
        {"name": f"receiver RSS, {AT_ONCE} largest-on-the-wire batches at once", "value": round(m["wide_peak"], 1),
         "unit": "MB", "baseline": round(m["ordinary_peak"], 1), "baseline_name": "ordinary batches",
         "target": f"<= {TARGET_MB:.0f} MB", "ok": m["wide_peak"] <= TARGET_MB,
         "note": f"{m['wide_bytes'] / 2**20:.2f} MiB each, random floats; acked in {m['wide_s']:.0f} s; "
                 f"{m['after']:.0f} MB after"},
    ]


if __name__ == "__main__":
    from bench import print_table

    print_table(run())
