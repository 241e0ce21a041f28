"""Delivery figures: draining a day's backlog end to end, and agent memory with a week of backlog.

Run: ``python -m bench.bench_delivery`` (or through ``python -m bench``).

* drain: one van offline for 24 simulated hours (four sensors at 1 Hz), then
  a local Mosquitto and a receiver process appear; seconds until every batch
  is acknowledged as committed in the store. Baseline, same run: publishing
  the same payloads at QoS 1 to the broker with nobody storing them (the
  transport's floor).
* memory: the agent's resident memory as its buffer grows from one to seven
  days of backlog (value-level sensors, no broker); flat means the backlog
  lives on disk, not in memory.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from buffer.store import Buffer
from edge.agent import Agent
from core.clock import SimClock
from edge.config import parse_config
from simulator.broker import LocalBroker
from simulator.value_sensors import SIM_DRIVERS
from simulator.world import VanWorld
from uplink.mqtt import MqttLink

T0 = 1_795_000_000.0


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_agent(data_dir: Path, port: int) -> tuple[Agent, MqttLink]:
    cfg = parse_config({
        "device": {"id": "van-bench", "data_dir": str(data_dir)},
        "uplink": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2},
    })
    clock = SimClock(T0)
    world = VanWorld(clock, shift_start_utc=T0)
    drivers = [SIM_DRIVERS[k](world) for k in ("sim-pm", "sim-no2", "sim-noise", "sim-gps")]
    link = MqttLink(cfg.uplink, cfg.device.id)
    return Agent(cfg, drivers, clock, Buffer(cfg.buffer_path, cfg.device.id), link), link


def drain_day() -> list[dict]:
    # The drained day is ~160 MB of buffer and store: never left in the temp dir.
    tmp = Path(tempfile.mkdtemp(prefix="bench-drain-"))
    try:
        return _drain_day(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drain_day(tmp: Path) -> list[dict]:
    broker = LocalBroker("mosquitto", workdir=tmp)
    agent, link = make_agent(tmp / "van", broker.port)
    agent.run(duration_s=86400)
    agent.maybe_seal(force=True)
    backlog = agent.backlog()
    payloads = [b.payload for b in agent.buffer.pending(100_000)]
    broker.start()
    # Baseline: the same payloads through the broker at QoS 1, nobody storing them.
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="baseline")
    c.connect(broker.host, broker.port)
    c.loop_start()
    t0 = time.perf_counter()
    infos = [c.publish("bench/baseline", p, qos=1) for p in payloads]
    for i in infos:
        i.wait_for_publish(30)
    baseline = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    ready = tmp / "rx.ready"
    rx = subprocess.Popen(
        [sys.executable, "-m", "receiver.cli", "run", "--store", str(tmp / "store.sqlite"),
         "--host", broker.host, "--port", str(broker.port), "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    while not ready.exists():
        time.sleep(0.02)
    link.start()
    t0 = time.perf_counter()
    ok = agent.drain(timeout_s=600, poll_s=0.005)
    drain = time.perf_counter() - t0
    link.stop()
    rx.terminate()
    rx.wait(30)
    broker.close()
    return [
        {"name": "drain 24 h backlog end to end", "value": round(drain, 1), "unit": "s",
         "baseline": round(baseline, 2), "baseline_name": "QoS 1 publish only",
         "target": "<= 30", "ok": ok and drain <= 30,
         "note": f"{backlog:,} samples in {len(payloads)} batches"},
    ]


def memory_week() -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    try:
        return _memory_week(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _memory_week(tmp: Path) -> list[dict]:
    agent, link = make_agent(tmp / "van", 1)  # no broker: everything stays in the backlog
    start = rss_mb()
    readings = {}
    for day in range(1, 8):
        agent.run(duration_s=86400)
        agent.maybe_seal()
        if day in (1, 3, 7):
            readings[day] = rss_mb()
    growth = readings[7] - readings[1]
    return [
        {"name": f"agent memory, {d} day(s) of backlog", "value": round(mb, 1), "unit": "MB RSS",
         "baseline": round(start, 1), "baseline_name": "at start", "target": "<= 50, flat",
         "ok": mb <= 50 and growth <= 5,
         "note": f"backlog {agent.backlog():,} samples" if d == 7 else ""}
        for d, mb in readings.items()
    ]


def memory_week_isolated() -> list[dict]:
    """memory_week in a fresh process: the figure is the agent's, not the bench runner's imports."""
    import json as _json

    out = subprocess.run(
        [sys.executable, "-c", "import json; from bench.bench_delivery import memory_week; "
                               "print(json.dumps(memory_week()))"],
        capture_output=True, text=True, check=True, cwd=str(Path(__file__).resolve().parents[1]),
    )
    return _json.loads(out.stdout.strip().splitlines()[-1])


def run() -> list[dict]:
    return drain_day() + memory_week_isolated()


if __name__ == "__main__":
    from bench import print_table

    print_table(run())
