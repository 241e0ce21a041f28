"""Fleet soak: many vans against one broker and one receiver, until the receiver falls behind.

For large fleets the vans produce their batches directly (no drivers): each
simulated van seals a batch of ``interval_s`` seconds of four sensors at 1 Hz
every ``interval_s`` real seconds, stamped with real time, and publishes it at
QoS 1 on its own topic. Many vans share one MQTT connection per load process
(the broker's ACL is off in the soak). A van's batch counts as delivered when
the receiver's ack says it is committed; lag is the time from publish to that
ack. The oracle checks at the end that every published batch is in the store
exactly once.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from core.sample import Sample, TimeSource
from core.wire import Batch, decode_ack, encode_batch

SENSORS = (
    ("pm", lambda r: {"pm1": round(r.uniform(3, 9), 1), "pm25": round(r.uniform(5, 25), 1),
                      "pm10": round(r.uniform(10, 40), 1)}),
    ("no2", lambda r: {"no2_ppb": round(r.uniform(5, 60), 1)}),
    ("noise", lambda r: {"laeq": round(r.uniform(50, 75), 1), "lamax": round(r.uniform(60, 85), 1),
                         "lamin": round(r.uniform(40, 55), 1)}),
    ("gps", lambda r: {"lat": round(52.12 + r.uniform(0, 0.02), 7), "lon": round(4.64 + r.uniform(0, 0.03), 7),
                       "speed": round(r.uniform(0, 14), 2), "fix_quality": 1}),
)


def make_batch(device: str, epoch: str, first_seq: int, t0_ms: int, seconds: int, rng: random.Random) -> Batch:
    samples = []
    seq = first_seq
    for s in range(seconds):
        for sensor, gen in SENSORS:
            samples.append(Sample(sensor, t0_ms + s * 1000, 1000 * s, TimeSource.GPS, gen(rng), (), seq))
            seq += 1
    return Batch(device, epoch, first_seq, seq - 1, samples)


def load_process(first_van: int, n_vans: int, port: int, seconds: float, interval_s: int, out: str,
                 go_file: str | None = None) -> None:
    """One load process: ``n_vans`` vans on one connection for ``seconds``.

    Every batch of the run is built and encoded *before* the start, so that at 10,000 vans the load
    generator's own CPU does not starve the broker and receiver it measures:
    during the run it only publishes. With ``go_file``, the process writes
    ``out + ".ready"`` when its batches are built and starts when ``go_file``
    exists (it holds the common start time).
    """
    rng = random.Random(first_van)
    epoch = f"soak{first_van:06d}"
    vans = [f"sv-{first_van + i:05d}" for i in range(n_vans)]
    # Spread the vans' publishing over the interval, as a real fleet is not in step.
    offsets = [rng.uniform(0, interval_s) for _ in vans]
    per_van = max(1, int((seconds - 1e-9) // interval_s) + 1)
    plan: list[tuple[float, str, int]] = sorted(  # (due, van, k-th batch)
        (off + k * interval_s, v, k) for v, off in zip(vans, offsets) for k in range(per_van)
        if off + k * interval_s < seconds
    )
    # Stamped as if the run started now: the real start comes a little later (once every
    # load process has built its batches), which only makes the samples that much older.
    nominal = time.time()
    payloads: dict[tuple[str, int], tuple[str, bytes]] = {}
    for due, v, k in plan:
        b = make_batch(v, epoch, 1 + k * interval_s * len(SENSORS),
                       int((nominal + due) * 1000) - interval_s * 1000, interval_s, rng)
        payloads[(v, k)] = (b.batch_id, encode_batch(b))
    if go_file is not None:
        Path(out + ".ready").write_text("built")
        while not Path(go_file).exists():
            time.sleep(0.02)
        start_wall = float(Path(go_file).read_text())
    else:
        start_wall = time.time() + 0.5
    last_seq = {v: 0 for v in vans}
    for _, v, k in plan:
        last_seq[v] = max(last_seq[v], (k + 1) * interval_s * len(SENSORS))
    sent: dict[str, float] = {}
    lags: list[float] = []
    acked: set[str] = set()
    lock = threading.Lock()

    def on_message(c, u, msg):  # type: ignore[no-untyped-def]
        ack = decode_ack(msg.payload, msg.topic.split("/")[-2])  # the device: binary acks name it by topic
        now = time.monotonic()
        with lock:
            if ack.committed and ack.batch_id in sent and ack.batch_id not in acked:
                acked.add(ack.batch_id)
                lags.append(now - sent[ack.batch_id])

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"soak-{first_van}",
                         clean_session=True, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=60)
    client.subscribe("datalab/v1/+/ack", qos=1)
    client.loop_start()
    time.sleep(max(0.0, start_wall - time.time()))
    start = time.monotonic()
    published = 0
    for due, v, k in plan:
        wait = due - (time.monotonic() - start)
        if wait > 0:
            time.sleep(wait)
        bid, payload = payloads.pop((v, k))
        with lock:
            sent[bid] = time.monotonic()
        client.publish(f"datalab/v1/{v}/batch", payload, qos=1)
        published += 1
    # Give outstanding acks a moment.
    deadline = time.monotonic() + max(30.0, interval_s)
    while time.monotonic() < deadline:
        with lock:
            if len(acked) >= published:
                break
        time.sleep(0.1)
    client.loop_stop()
    client.disconnect()
    with lock:
        Path(out).write_text(json.dumps({
            "published": published, "acked": len(acked), "lags": lags,
            "vans": last_seq, "epoch": epoch,
        }))


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class SoakResult:
    vans: int
    published: int
    acked: int
    lag_p50_s: float
    lag_p99_s: float
    receiver_cpu_share: float  # of one core, summed over the ingest workers
    samples_per_s: float  # offered: samples published per second of the run
    missing: int
    doubled: int
    deriver_cpu_share: float = 0.0  # of one core, during the run (the deriver runs at nice 10)
    derive_backlog_end: int = 0  # batches stored but not derived when the load stopped
    derive_catchup_s: float | None = None  # from the load's end until nothing was queued (None: not within the wait)
    derive_rate: float = 0.0  # batches/s derived after the load stopped (the deriver alone)

    @property
    def derive_catchup_estimate_s(self) -> float | None:
        """Measured catch-up time, or (when the wait ended first) backlog / rate: an estimate."""
        if self.derive_catchup_s is not None:
            return self.derive_catchup_s
        return round(self.derive_backlog_end / self.derive_rate, 0) if self.derive_rate > 0 else None

    @property
    def keeps_up(self) -> bool:
        return self.acked == self.published and self.lag_p99_s < KEEP_UP_P99_S and self.missing == 0


# Lag p99 (publish to committed ack) under which a size counts as kept up: well below
# the 30 s a van waits between batches, so no backlog builds at the receiver.
KEEP_UP_P99_S = 5.0


def _spawn(args: list[str], log: Path, *, nice: int = 0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)


def run_size(vans: int, *, store_url: str, workdir: Path, seconds: float = 30.0, interval_s: int = 30,
             workers: int = 2, vans_per_process: int = 500, derive_wait_s: float = 120.0) -> SoakResult:
    """One soak size. The workers only store and acknowledge (``--derive separate``); one
    ``datalab-receiver derive --follow`` process at nice 10 derives beside them, so ingest
    wins the CPU and derivation catches up when the load eases (vans drive ~8 h a day)."""
    from receiver.store_factory import open_store
    from simulator.broker import LocalBroker

    workdir.mkdir(parents=True, exist_ok=True)
    broker = LocalBroker("mosquitto", workdir=workdir, persistence=False,
                         extra_config="max_connections -1\nmax_queued_messages 1000000")
    broker.start()
    rx: list[subprocess.Popen[bytes]] = []
    deriver = None
    loads = []
    try:
        for w in range(workers):
            ready = workdir / f"rx{w}.ready"
            args = [sys.executable, "-m", "receiver.cli", "run", "--store", store_url, "--host", broker.host,
                    "--port", str(broker.port), "--client-id", f"soak-rx-{w}", "--ready-file", str(ready),
                    "--derive", "separate"]
            if workers > 1:
                args += ["--share-group", "soak"]
            rx.append(_spawn(args, workdir / f"rx{w}.log"))
            while not ready.exists():
                if rx[-1].poll() is not None:
                    raise RuntimeError((workdir / f"rx{w}.log").read_text()[-2000:])
                time.sleep(0.05)
        deriver = _spawn([sys.executable, "-m", "receiver.cli", "derive", "--store", store_url, "--follow",
                          "--interval", "0.5"], workdir / "derive.log", nice=10)
        go = workdir / "go"
        for i, first in enumerate(range(0, vans, vans_per_process)):
            n = min(vans_per_process, vans - first)
            out = workdir / f"load{i}.json"
            loads.append((_spawn([sys.executable, "-c",
                "from simulator.soak import load_process as f; "
                f"f({first}, {n}, {broker.port}, {seconds}, {interval_s}, {str(out)!r}, {str(go)!r})"],
                workdir / f"load{i}.log"), out))
        # every load process has built its batches: start them together
        while not all(Path(str(out) + ".ready").exists() for _, out in loads):
            if any(p.poll() not in (None, 0) for p, _ in loads):
                raise RuntimeError("a load process failed: see " + str(workdir))
            time.sleep(0.1)
        start_wall = time.time() + 1.0
        go.write_text(repr(start_wall))
        time.sleep(1.0)
        cpu0, dcpu0 = sum(_proc_cpu(p.pid) for p in rx), _proc_cpu(deriver.pid)
        t0 = time.monotonic()
        for p, _ in loads:
            p.wait()
        elapsed = time.monotonic() - t0
        cpu = sum(_proc_cpu(p.pid) for p in rx) - cpu0
        dcpu = _proc_cpu(deriver.pid) - dcpu0
        # how far behind derivation is, and how long it takes to catch up
        store = open_store(store_url)
        try:
            backlog = left = store.derive_backlog()
            t_end, catchup = time.monotonic(), None
            while time.monotonic() - t_end < derive_wait_s:
                left = store.derive_backlog()
                if left == 0:
                    catchup = round(time.monotonic() - t_end, 1)
                    break
                time.sleep(0.5)
            derive_rate = (backlog - left) / max(1e-9, time.monotonic() - t_end)
        finally:
            store.close()
    finally:
        for p in [*rx, *([deriver] if deriver else [])]:
            p.terminate()
        for p in [*rx, *([deriver] if deriver else [])]:
            p.wait(30)
        broker.close()
    published = acked = 0
    lags: list[float] = []
    expected: dict[tuple[str, str], int] = {}
    for _, out in loads:
        d = json.loads(out.read_text())
        published += d["published"]
        acked += d["acked"]
        lags += d["lags"]
        for v, last in d["vans"].items():
            expected[(v, d["epoch"])] = last
    missing, doubled = _oracle(store_url, expected)
    lags.sort()
    q = (lambda p: lags[min(len(lags) - 1, int(p * len(lags)))] if lags else float("nan"))
    return SoakResult(vans, published, acked, round(q(0.5), 3), round(q(0.99), 3), round(cpu / elapsed, 3),
                      round(sum(expected.values()) / seconds, 1), missing, doubled,
                      round(dcpu / elapsed, 3), backlog, catchup, round(derive_rate, 1))


def _oracle(store_url: str, expected: dict[tuple[str, str], int]) -> tuple[int, int]:
    """Missing and doubled samples over all soak vans."""
    from receiver.store_factory import open_store

    store = open_store(store_url)
    try:
        conn = store.conn
        cur = conn.cursor()
        cur.execute("SELECT device, epoch, count(*), count(DISTINCT seq), max(seq) FROM samples GROUP BY device, epoch")
        have = {(d, e): (n, nd, mx) for d, e, n, nd, mx in cur.fetchall()}
    finally:
        store.close()
    missing = doubled = 0
    for key, last in expected.items():
        n, nd, _ = have.get(key, (0, 0, 0))
        missing += max(0, last - nd)
        doubled += n - nd
    return missing, doubled


def soak(sizes: list[int], *, store_for: callable, workdir: Path, **kw: object) -> list[SoakResult]:  # type: ignore[valid-type]
    out = []
    for n in sizes:
        r = run_size(n, store_url=store_for(n), workdir=workdir / f"n{n}", **kw)  # type: ignore[arg-type]
        out.append(r)
        if not r.keeps_up:
            break
    return out
