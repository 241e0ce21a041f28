"""The whole spine with real processes: agents, Mosquitto, receiver, store."""

from __future__ import annotations

import sqlite3
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from receiver.config import ReceiverConfig
from receiver.mqtt_consumer import ReceiverService
from simulator.fleet import run_fleet
from core.wire import decode_ack, encode_batch
from tests.test_receiver_store import batch


def covered_without_position(db: sqlite3.Connection, max_gap_ms: int) -> int:
    """Sensor samples with a GPS fix on both sides within the gap, yet no position: must be 0."""
    return db.execute(
        """
        SELECT count(*) FROM samples s
        LEFT JOIN positions p USING (device, epoch, seq)
        WHERE s.sensor != 'gps'
          AND coalesce(p.state, '') NOT IN ('exact', 'interpolated')
          AND EXISTS (SELECT 1 FROM fixes f WHERE f.device = s.device
                      AND f.t_utc_ms BETWEEN s.t_utc_ms - ? AND s.t_utc_ms)
          AND EXISTS (SELECT 1 FROM fixes f WHERE f.device = s.device
                      AND f.t_utc_ms BETWEEN s.t_utc_ms AND s.t_utc_ms + ?)
          AND (SELECT min(f.t_utc_ms) FROM fixes f WHERE f.device = s.device AND f.t_utc_ms >= s.t_utc_ms)
            - (SELECT max(f.t_utc_ms) FROM fixes f WHERE f.device = s.device AND f.t_utc_ms <= s.t_utc_ms)
            <= ?
        """,
        (max_gap_ms, max_gap_ms, max_gap_ms),
    ).fetchone()[0]


def test_fleet_every_committed_sample_stored_once_with_positions(tmp_path, mosquitto):
    """Real drivers over simulated devices (ptys, fake I2C, audio), the demo's own path."""
    mosquitto.close()  # the fleet starts its own broker, as the demo does
    res = run_fleet(tmp_path / "fleet", vans=2, hours=0.25, broker_kind="mosquitto", seed=7,
                    microphones=1)
    assert res.broker == "mosquitto"
    db = sqlite3.connect(res.store)
    ticks = 900
    for v in res.vans:
        assert v.exit_code == 0
        assert v.committed == v.taken
        per_sensor = dict(db.execute(
            "SELECT sensor, count(*) FROM samples WHERE device=? GROUP BY sensor", (v.device,)))
        # every sensor delivered nearly every second (warm-up and corrupt frames excepted);
        # GPS only reports fixes, and the route has a tunnel and a start without a fix
        assert set(per_sensor) == {"pm", "no2", "noise", "gps", "calibration"}
        assert all(per_sensor[s] >= 0.95 * ticks for s in ("pm", "no2", "noise")), per_sensor
        assert 0.6 * ticks < per_sensor["gps"] < ticks, per_sensor
        # every NO2 value names the calibration that produced it, and the record arrived
        cal_ids = {r[0] for r in db.execute(
            "SELECT json_extract(vals, '$.cal') FROM samples WHERE device=? AND sensor='no2'", (v.device,))}
        assert cal_ids == {"no2:202-SIM-0001:v1"}
        # ... under this van: both simulated vans have a sensor of that serial, and each keeps its own
        assert db.execute("SELECT count(*) FROM calibrations WHERE device=? AND id='no2:202-SIM-0001:v1'",
                          (v.device,)).fetchone()[0] == 1
        # the oracle: every committed sequence number is in the store, exactly once
        seqs = [r[0] for r in db.execute("SELECT seq FROM samples WHERE device=? ORDER BY seq", (v.device,))]
        assert seqs == list(range(1, v.committed + 1))
        assert v.delivered == v.committed and v.lost == 0
    assert db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    # GPS really dropped out somewhere (tunnels), so the next check is not vacuous
    assert db.execute("SELECT count(*) FROM positions WHERE state='no_fix'").fetchone()[0] > 0
    assert res.positioned > 0.8 * res.sensor_samples
    assert covered_without_position(db, 10_000) == 0


def test_demo_runs_on_the_embedded_broker(tmp_path):
    res = run_fleet(tmp_path / "fleet", vans=1, hours=0.1, broker_kind="amqtt", devices="values")
    assert res.broker == "amqtt"
    assert res.vans[0].committed == res.vans[0].stored == 4 * 360
    assert res.lost == 0


class AckListener:
    def __init__(self, port: int, device: str):
        self.device = device
        self.acks = []
        self.got = threading.Event()
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"{device}-t")
        self.c.on_message = self._msg
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(f"datalab/v1/{device}/ack", qos=1)
        self.c.loop_start()
        time.sleep(0.3)

    def _msg(self, c, u, m):
        self.acks.append(decode_ack(m.payload, self.device))  # binary for v4 batches, JSON for the rest
        self.got.set()

    def publish(self, topic, payload):
        self.got.clear()
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)
        assert self.got.wait(10), "no answer from the receiver"
        return self.acks[-1]


def test_receiver_rejects_bad_uploads_and_keeps_running(tmp_path, mosquitto):
    cfg = ReceiverConfig(store=str(tmp_path / "store.sqlite"), port=mosquitto.port, client_id="rx-test")
    svc = ReceiverService(cfg)
    svc.start()
    assert svc.subscribed.wait(10)
    dev = AckListener(mosquitto.port, "van-001")
    try:
        topic = "datalab/v1/van-001/batch"
        garbage = dev.publish(topic, b"\xff" * 100)
        assert garbage.status == "rejected" and "bad magic" in garbage.reason
        future = dev.publish(topic, b"DLB\x07whatever")
        assert future.status == "rejected" and "unsupported wire version 7" in future.reason
        stolen = dev.publish(topic, encode_batch(batch(0, 3, device="van-002")))
        assert stolen.status == "rejected" and "claims device" in stolen.reason
        good = dev.publish(topic, encode_batch(batch(0, 3)))
        assert good.status == "stored" and good.batch_id == "van-001/e1/1-6"
        again = dev.publish(topic, encode_batch(batch(0, 3)))
        assert again.status == "duplicate"
        counts = svc.store.counts()
        assert counts["dead_letters"] == 3 and counts["samples"] == 6
    finally:
        dev.c.loop_stop()
        svc.stop()
