"""The device uplink against a real Mosquitto: resync, reconnect with jitter, heartbeat, last will."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest

from buffer.store import Buffer
from edge.agent import Agent
from core.clock import SimClock
from edge.config import parse_config
from receiver.config import ReceiverConfig
from receiver.mqtt_consumer import ReceiverService
from tests.test_agent import Counter
from uplink.backoff import FullJitterBackoff
from uplink.mqtt import MqttLink
from core.wire import content_hash, decode_batch

T0 = 1_795_000_000.0


def wait_until(cond, timeout=15.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def receiver(tmp_path, port, name="rx"):
    svc = ReceiverService(ReceiverConfig(store=str(tmp_path / "store.sqlite"), port=port, client_id=name))
    svc.start()
    assert svc.subscribed.wait(10)
    return svc


def agent_for(tmp_path, port, **uplink):
    cfg = parse_config({
        "device": {"id": "van-001", "data_dir": str(tmp_path / "van")},
        "batch": {"max_samples": 50, "max_age_s": 1000.0},
        "uplink": {"port": port, "ack_timeout_s": 30.0, **uplink},
    })
    clock = SimClock(T0)
    link = MqttLink(cfg.uplink, cfg.device.id)
    return Agent(cfg, [Counter()], clock, Buffer(cfg.buffer_path, cfg.device.id), link), link


def test_lost_ack_heals_by_resync_without_reupload(tmp_path, mosquitto):
    rx = receiver(tmp_path, mosquitto.port)
    agent, link = agent_for(tmp_path, mosquitto.port)
    try:
        agent.run(duration_s=100)
        agent.maybe_seal()
        held = agent.buffer.pending(10)
        assert len(held) == 2
        # The receiver committed the first batch, but its ack never reached the van.
        first = decode_batch(held[0].payload)
        rx.store.ingest(first, content_hash(held[0].payload), int(time.time() * 1000))
        link.start()
        assert wait_until(lambda: (agent.pump() or True) and agent.buffer.get(held[0].first_seq) is None)
        assert agent.stats.syncs == 1
        # ... and the second one is uploaded and stored as usual
        assert wait_until(lambda: (agent.pump() or True) and agent.buffer.stats().batches == 0)
        counts = rx.store.counts()
        assert counts["samples"] == 100
        assert counts.get("batches_duplicate", 0) == 0, "the healed batch was not sent again"
    finally:
        link.stop()
        rx.stop()


def test_reconnect_after_broker_restart_with_full_jitter(tmp_path, mosquitto):
    rx = receiver(tmp_path, mosquitto.port)
    agent, link = agent_for(tmp_path, mosquitto.port, reconnect_min_s=0.2, reconnect_max_s=1.0)
    link.backoff.rng = random.Random(42)
    link.start()
    try:
        assert wait_until(lambda: link.connected)
        mosquitto.kill()
        assert wait_until(lambda: not link.connected)
        agent.run(duration_s=60)  # the van keeps sampling while the broker is gone
        time.sleep(1.5)  # a few reconnect attempts fail meanwhile
        mosquitto.start()
        rx.client.reconnect()
        assert wait_until(lambda: link.connected, timeout=20)
        assert link.counters["connects"] == 2
        assert link.counters["connect_failures"] >= 1
        assert all(0 <= d <= 1.0 for d in link.delays) and len(set(link.delays)) == len(link.delays)
        agent.maybe_seal(force=True)
        assert wait_until(lambda: (agent.pump() or True) and agent.buffer.stats().batches == 0, 20)
        assert rx.store.counts()["samples"] == 60
    finally:
        link.stop()
        rx.stop()


def test_backoff_is_full_jitter():
    b = FullJitterBackoff(1.0, 8.0, random.Random(1))
    draws = [b.next_delay() for _ in range(200)]
    ceilings = [min(8.0, 2.0**i) for i in range(200)]
    assert all(0 <= d <= c for d, c in zip(draws, ceilings))
    late = draws[10:]
    assert min(late) < 1.0 and max(late) > 7.0  # spread over the whole range, not clustered
    b.reset()
    assert b.next_delay() <= 1.0


def test_heartbeat_and_last_will(tmp_path, mosquitto):
    rx = receiver(tmp_path, mosquitto.port)
    van_cfg = tmp_path / "van.toml"
    van_cfg.write_text(f"""
[device]
id = "van-009"
data_dir = "{tmp_path / 'van9'}"
[uplink]
port = {mosquitto.port}
keepalive_s = 5
heartbeat_s = 1.0
[sensors.pm]
driver = "sim-pm"
[simulation]
enabled = true
speedup = 1.0
shift_hours = 1.0
""")
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(van_cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: any(s["device"] == "van-009" and s["online"] for s in rx.store.fleet_status()),
                          timeout=20)
        st = next(s for s in rx.store.fleet_status() if s["device"] == "van-009")
        for key in ("backlog_samples", "oldest_unsent_age_s", "sensor_errors", "disk_free_bytes",
                    "cpu_temp_c", "time_source", "last_seq"):
            assert key in st
        assert st["disk_free_bytes"] > 0
        proc.kill()  # power cut: no goodbye, the broker sends the last will
        assert wait_until(lambda: any(s["device"] == "van-009" and not s["online"]
                                      for s in rx.store.fleet_status()), timeout=15)
    finally:
        proc.kill()
        proc.wait()
        rx.stop()
