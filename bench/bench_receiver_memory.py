"""Receiver memory: RSS of a running receiver when the largest batches arrive at once.

Issue 13 point 5. A ``datalab-receiver run`` process (SQLite store, derive
inline: the default) behind a real Mosquitto with the shipped in-flight window
(100) and queue limits; its RSS is sampled from /proc every 20 ms. In the same
run:

* baseline: the idle receiver, then 64 ordinary batches (2000 samples, the
  van's default, from the value-level simulator) published at once;
* 64 maximal batches published at once: the most decoded values the format
  allows (core/wire.py, core/codec_v2.py: MAX_SAMPLES_PER_BATCH samples
  and MAX_VALUE_CELLS values, distinct integers, which version 2's delta
  coding packs into a few hundred bytes). The same payload 64 times: the
  first is stored, the other 63 are decoded in full and answered
  ``duplicate``, so the memory is that of 64 maximal uploads while the run
  stays within a few minutes;
* 64 batches as large on the wire as the format allows (just under
  MAX_PAYLOAD_BYTES: random floats, which compress little), ~60 MiB
  arriving at once; again one payload 64 times (encoding takes seconds each).

* the tester's adversarial shapes (issue 13, probe 5), which cost little in
  values but much in bytes: ``STRINGS_UPLOADS`` uploads of one sample whose 250
  values are distinct 16,000-character strings, and ``GAPS_UPLOADS`` uploads of
  no samples and 4,000 gaps with distinct 1,000-character reasons (7-35 KB on
  the wire, ~4 MiB inflated each). All with one batch id per shape, so each is
  decoded and held in its group in full, then refused by the store (same id,
  other bytes) without writing megabytes of text: the memory is the group's.
  The byte budget (``group_bytes``, receiver/budget.py) bounds these.

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
from core.sample import Sample, TimeSource
from core import codec_v2
from core.codec_v2 import MAX_VALUE_CELLS
from core.wire import MAGIC, MAX_PAYLOAD_BYTES, MAX_SAMPLES_PER_BATCH, Batch, Gap, decode_ack, encode_batch

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


STRINGS_UPLOADS = 130  # the tester's worst counts (308-355 MB before the byte budget)
GAPS_UPLOADS = 130


def _v2(batch: Batch) -> bytes:
    return MAGIC + b"\x02" + codec_v2.pack(codec_v2.encode_plain(batch), 1)  # zlib: fast to build


def strings_upload(device: str, variant: int) -> bytes:
    """One sample, 250 distinct 16,000-character strings (~4 MB decoded, ~250 values of budget)."""
    vals = {f"k{i:03d}": f"{i:05d}{variant:08d}" + "x" * 15_987 for i in range(250)}
    return _v2(Batch(device, "same", 1, 1, [Sample("pm", 1_795_000_000_000, 1, TimeSource.GPS, vals, (), 1, "b")]))


def gaps_upload(device: str, variant: int) -> bytes:
    """No samples, 4,000 gaps with distinct 1,000-character reasons (0 values of budget)."""
    gaps = [Gap(2 + i, 2 + i, f"{i:06d}{variant:08d}" + "r" * 986) for i in range(4000)]
    return _v2(Batch(device, "same", 1, 5000, [], gaps))


GPSLESS_UPLOADS = 40  # the re-tester's count (341 MB before positions reopened only near new fixes)


def gpsless_upload(device: str, k: int, uploads: int = GPSLESS_UPLOADS) -> bytes:
    """20,000 samples with empty values and distinct times, no GPS fix (~170 bytes on the wire; the tester sent 338).

    Upload ``k`` of ``uploads`` interleaves its times with the others' (one ms apart), so every
    upload's time range covers what the van already stored: a receiver that re-reads the open
    (no-fix) samples of a batch's time range re-read everything with each batch (issue 13).
    """
    n = MAX_SAMPLES_PER_BATCH
    first = k * n + 1
    samples = [Sample("pm", 1_795_000_000_000 + i * uploads + k, i, TimeSource.NTP, {}, (), first + i, "b")
               for i in range(n)]
    return _v2(Batch(device, "e-nofix", first, first + n - 1, samples))


def vm_hwm_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), MB: the kernel's own high-water mark."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


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
    client.on_message = lambda c, u, m: got.append(decode_ack(m.payload, m.topic.split("/")[-2]).status)
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


class ReceiverRig:
    """A real Mosquitto (shipped limits) and a real ``datalab-receiver run`` (SQLite), RSS probed."""

    def __enter__(self) -> ReceiverRig:
        from simulator.broker import LocalBroker

        self._tmp = tempfile.TemporaryDirectory(prefix="bench-rx-mem-")
        root = Path(self._tmp.name)
        (root / "broker").mkdir()
        self.broker = LocalBroker("mosquitto", workdir=root / "broker", extra_config=SHIPPED_LIMITS).start()
        ready = root / "ready"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "receiver.cli", "run", "--store", str(root / "store.sqlite"), "--port",
             str(self.broker.port), "--client-id", "bench-mem", "--ready-file", str(ready)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.probe = RssProbe(self.proc.pid)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("the receiver did not come up")
            time.sleep(0.05)
        time.sleep(1.0)
        return self

    def phase(self, payloads: list[tuple[str, bytes]], timeout: float = 300) -> tuple[float, float]:
        """Publish all at once, wait for every ack: (peak RSS MB during it, seconds)."""
        self.probe.reset()
        took = publish_and_wait(self.broker.port, payloads, len(payloads), timeout)
        return self.probe.peak(), took

    def hwm(self) -> float:
        return vm_hwm_mb(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        self.probe.close()
        self.proc.terminate()
        self.proc.wait(30)
        self.broker.close()
        self._tmp.cleanup()


def adversarial(n_strings: int = STRINGS_UPLOADS, n_gaps: int = GAPS_UPLOADS) -> tuple[list[tuple[str, bytes]], ...]:
    return ([("van-str", strings_upload("van-str", i)) for i in range(n_strings)],
            [("van-gap", gaps_upload("van-gap", i)) for i in range(n_gaps)])


def measure() -> dict[str, float]:
    strings, gaps = adversarial()
    with ReceiverRig() as rig:
        idle = rig.probe.now()
        ordinary = [(b.device, encode_batch(b)) for b in ordinary_batches(AT_ONCE)]
        ord_peak, t_ord = rig.phase(ordinary)
        big = encode_batch(maximal_batch("van-max"))
        max_peak, t_max = rig.phase([("van-max", big)] * AT_ONCE)
        wide = encode_batch(wire_maximal_batch("van-wire"))
        if len(wide) > MAX_PAYLOAD_BYTES:
            raise RuntimeError("the wire-maximal batch came out over the payload limit")
        wide_peak, t_wide = rig.phase([("van-wire", wide)] * AT_ONCE)
        after = rig.probe.now()
        str_peak, t_str = rig.phase(strings)
        gap_peak, t_gap = rig.phase(gaps)
        gpsless = [("van-nofix", gpsless_upload("van-nofix", k)) for k in range(GPSLESS_UPLOADS)]
        nofix_peak, t_nofix = rig.phase(gpsless, timeout=900)
        hwm = rig.hwm()
    return {"idle": idle, "ordinary_peak": ord_peak, "ordinary_s": t_ord, "max_peak": max_peak,
            "max_s": t_max, "after": after, "max_bytes": len(big), "wide_peak": wide_peak, "wide_s": t_wide,
            "wide_bytes": len(wide), "strings_peak": str_peak, "strings_s": t_str, "gaps_peak": gap_peak,
            "gaps_s": t_gap, "hwm": hwm, "strings_bytes": max(len(p) for _, p in strings),
            "gaps_bytes": max(len(p) for _, p in gaps), "nofix_peak": nofix_peak, "nofix_s": t_nofix,
            "nofix_bytes": max(len(p) for _, p in gpsless)}


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
        {"name": f"receiver RSS, {STRINGS_UPLOADS} uploads of 250 distinct 16,000-char strings",
         "value": round(m["strings_peak"], 1), "unit": "MB", "baseline": round(m["ordinary_peak"], 1),
         "baseline_name": "ordinary batches", "target": f"<= {TARGET_MB:.0f} MB", "ok": m["strings_peak"] <= TARGET_MB,
         "note": f"{m['strings_bytes'] / 1024:.0f} KB on the wire each; answered in {m['strings_s']:.0f} s"},
        {"name": f"receiver RSS, {GAPS_UPLOADS} uploads of 4,000 gaps with 1,000-char reasons",
         "value": round(m["gaps_peak"], 1), "unit": "MB", "baseline": round(m["ordinary_peak"], 1),
         "baseline_name": "ordinary batches", "target": f"<= {TARGET_MB:.0f} MB", "ok": m["gaps_peak"] <= TARGET_MB,
         "note": f"{m['gaps_bytes'] / 1024:.0f} KB on the wire each; answered in {m['gaps_s']:.0f} s; "
                 f"VmHWM over the whole run {m['hwm']:.0f} MB"},
        {"name": f"receiver RSS, {GPSLESS_UPLOADS} GPS-less uploads of {MAX_SAMPLES_PER_BATCH:,} samples",
         "value": round(m["nofix_peak"], 1), "unit": "MB", "baseline": round(m["ordinary_peak"], 1),
         "baseline_name": "ordinary batches", "target": f"<= {TARGET_MB:.0f} MB", "ok": m["nofix_peak"] <= TARGET_MB,
         "note": f"empty values, distinct interleaved times, {m['nofix_bytes']} bytes each; "
                 f"all answered in {m['nofix_s']:.0f} s (341 MB when every batch re-read the van's open samples)"},
    ]


if __name__ == "__main__":
    from bench import print_table

    print_table(run())
