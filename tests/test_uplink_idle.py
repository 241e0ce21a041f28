"""The network thread does not poll (issue #18): it sleeps until there is work or a ping is due.

Against the shipped broker configuration (TLS, per-device account), because TLS
is where a select-based loop can go wrong (bytes pending inside the SSL object).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from buffer.store import Buffer
from edge.agent import Agent
from core.clock import SimClock
from edge.config import parse_config
from receiver.mqtt_consumer import ReceiverService
from simulator.broker import LocalBroker, SecureSetup, mosquitto_path
from tests.test_agent import Counter
from tests.test_uplink import T0, wait_until
from uplink.mqtt import MqttLink

pytestmark = pytest.mark.skipif(not mosquitto_path(), reason="needs mosquitto")


class CountingClient(mqtt.Client):
    """paho's client, counting how often the network thread returns from select."""

    loops = 0

    def _loop(self, timeout: float = 1.0) -> mqtt.MQTTErrorCode:
        CountingClient.loops += 1
        return super()._loop(timeout)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    (tmp_path / "broker").mkdir()
    b = LocalBroker("mosquitto", workdir=tmp_path / "broker", secure=SecureSetup(devices=("van-001",)))
    b.start()
    yield b
    b.close()


def test_idle_link_sleeps_and_still_pings_on_time(broker: LocalBroker) -> None:
    # keepalive 5 s: a ping later than 7.5 s after the last packet and Mosquitto drops us.
    link = MqttLink(broker.uplink_config("van-001", keepalive_s=5), "van-001", client_factory=CountingClient)
    link.start()
    try:
        assert wait_until(lambda: link.connected, timeout=15)
        CountingClient.loops = 0
        time.sleep(12.0)
        # Two pings and their answers: a handful of wake-ups, where the 0.2-s poll made 60.
        assert CountingClient.loops <= 10, CountingClient.loops
        assert link.connected and link.counters["connects"] == 1, "the broker dropped an idle link"
    finally:
        link.stop()


def test_long_sleep_still_uploads_and_acks_at_once(broker: LocalBroker, tmp_path: Path) -> None:
    """With a 60-s keepalive the thread sleeps a minute; a batch must not wait for that."""
    rx = ReceiverService(broker.receiver_config(str(tmp_path / "store.sqlite")))
    rx.start()
    assert rx.subscribed.wait(10)
    cfg = parse_config({
        "device": {"id": "van-001", "data_dir": str(tmp_path / "van")},
        "batch": {"max_samples": 50, "max_age_s": 1000.0},
        "uplink": {"ack_timeout_s": 30.0},
    })
    cfg.uplink = broker.uplink_config("van-001", keepalive_s=60)
    link = MqttLink(cfg.uplink, "van-001", client_factory=CountingClient)
    agent = Agent(cfg, [Counter()], SimClock(T0), Buffer(cfg.buffer_path, "van-001"), link)
    link.start()
    try:
        assert wait_until(lambda: link.connected, timeout=15)
        agent.pump()  # the hello and resync after connecting
        time.sleep(1.0)  # the network thread is asleep in select now
        agent.run(duration_s=50)
        agent.maybe_seal()
        sent = time.monotonic()
        # "at once": well inside the 60-s sleep, with a margin for a loaded machine
        assert wait_until(lambda: (agent.pump() or True) and agent.buffer.stats().batches == 0, timeout=10)
        assert time.monotonic() - sent < 10
        assert rx.store.counts()["samples"] == 50
    finally:
        link.stop()
        rx.stop()
