"""The captured-upload bench row (issue #18), CI-sized: a real agent's uploads sniffed on the
shipped broker configuration, counted the way bench/bench_wire.py counts them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.bench_agent import Sniffer, record_received
from bench.bench_wire import PUBACK_BYTES, mqtt_publish_size, upload_rows
from buffer.store import Buffer
from edge.agent import Agent
from core.clock import SimClock
from edge.config import parse_config
from receiver.mqtt_consumer import ReceiverService
from simulator.broker import LocalBroker, SecureSetup, mosquitto_path
from tests.test_agent import Counter
from tests.test_uplink import T0, wait_until
from uplink.mqtt import MqttLink
from core.wire import decode_status

pytestmark = pytest.mark.skipif(not mosquitto_path(), reason="needs mosquitto")


def test_sniffed_upload_counts_every_batch_and_heartbeat(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    broker = LocalBroker("mosquitto", workdir=tmp_path / "broker", secure=SecureSetup(devices=("van-001",)))
    broker.start()
    rx = ReceiverService(broker.receiver_config(str(tmp_path / "store.sqlite")))
    rx.start()
    sniffer = Sniffer(broker.receiver_config(""))
    cfg = parse_config({"device": {"id": "van-001", "data_dir": str(tmp_path / "van")},
                        "batch": {"max_samples": 50, "max_age_s": 1000.0}})
    cfg.uplink = broker.uplink_config("van-001")
    link = MqttLink(cfg.uplink, "van-001")
    received = record_received(link)
    agent = Agent(cfg, [Counter()], SimClock(T0), Buffer(cfg.buffer_path, "van-001"), link)
    try:
        assert rx.subscribed.wait(10)
        link.start()
        assert wait_until(lambda: link.connected)
        agent.pump()  # hello heartbeat
        agent.run(duration_s=150)  # three batches of 50
        agent.maybe_seal()
        assert wait_until(lambda: (agent.pump() or True) and agent.buffer.stats().batches == 0)
        agent.send_heartbeat()
        assert wait_until(lambda: sum(t.endswith("/batch") for t, _ in sniffer.messages) >= 3
                          and sum(t.endswith("/status") for t, _ in sniffer.messages) >= 2)
        time.sleep(0.5)
    finally:
        link.stop()  # the goodbye (online: false) is published here
        time.sleep(0.5)
        sniffer.stop()
        rx.stop()
        broker.close()
    msgs = sniffer.messages + received
    acks = [(t, p) for t, p in received if t.endswith("/ack")]
    assert len(acks) >= 3 and all(p.startswith(b"DLA\x02") for _, p in acks), "binary acks, one a batch"
    assert any(t.endswith("/status") and not decode_status(p)["online"] for t, p in msgs), "goodbye seen"
    rows = {r["name"].split(" ")[0]: r for r in upload_rows(msgs, "van-001")}
    batches = [(t, p) for t, p in msgs if t.endswith("/batch")]
    beats = [(t, p) for t, p in msgs if t.endswith("/status") and decode_status(p)["online"]]
    n_values = 150  # one value a sample, 150 samples stored
    assert rx.store.counts()["samples"] == n_values
    def packets(ms: list[tuple[str, bytes]]) -> int:  # each PUBLISH at QoS 1 and its PUBACK
        return sum(mqtt_publish_size(t, len(p)) + PUBACK_BYTES for t, p in ms)

    syncs = [(t, p) for t, p in msgs if t.endswith("/sync")]
    expected_batches = packets(batches) / n_values
    expected_total = expected_batches + (packets(beats) + packets(acks) + packets(syncs)) / n_values
    assert rows["wire.upload_batches_bytes_per_value"]["value"] == round(expected_batches, 3)
    assert rows["wire.upload_bytes_per_value"]["value"] == round(expected_total, 3)
    # the heartbeats on the wire are the compact ones, several times smaller than their JSON
    assert rows["wire.heartbeat_bytes"]["value"] * 3 < rows["wire.heartbeat_bytes"]["baseline"]
    # ... and so are the acks, against the same acks in JSON
    assert rows["wire.ack_bytes"]["value"] * 2 < rows["wire.ack_bytes"]["baseline"]
