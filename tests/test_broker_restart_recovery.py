"""Fast recovery after a broker restart, the van half (issue 14, point 5).

A restarted broker forgets what it held and the receiver subscribes again only
after it reconnects; a van that waited for its ack timeout (30 s) before
re-sending left the store without news for that long. The agent now re-sends
what is unacknowledged as soon as it reconnects, and again after 1, 2, 4 ... s
until an ack proves the path. With the DEFAULT reconnect policy (full jitter
capped at 3 s) the van is back within 3 s of the broker's return, where the old
60 s cap left it away for up to a minute; the fleet's spread is worked out from
the same policy for 10,000 vans.
"""

from __future__ import annotations

import sqlite3
import statistics
import threading
import time

import pytest

from buffer.store import Buffer
from edge.agent import FAST_RETRY_S, Agent
from core.clock import SimClock
from edge.config import UplinkConfig, parse_config
from simulator.oracle import check
from simulator.reconnect_herd import herd_figures
from simulator.value_sensors import OracleSensor
from simulator.world import VanWorld
from tests.delivery_harness import Receiver, report
from tests.test_agent import make
from tests.test_delivery_faults import assert_all_delivered
from uplink.mqtt import MqttLink


def test_in_flight_batches_go_again_at_reconnect_not_after_the_ack_timeout(tmp_path):
    agent, clock, link, timer = make(tmp_path, uplink={"window": 2, "ack_timeout_s": 30.0})
    agent.run(duration_s=200)
    agent.maybe_seal()
    assert len(link.published) == 2  # the window: two batches wait for their acks
    in_flight = [bid for bid, _ in link.published]
    # the broker goes away and comes back; nothing acknowledged the two
    link.connected = False
    timer.t += 3
    agent.pump()
    link.connected, link.new_connection = True, True
    agent.pump()  # the first pump after the reconnection, not a second later
    resent_now = [bid for bid, _ in link.published[2:]]
    report("reconnect-resend", in_flight=len(in_flight), resent_at_reconnect=len(resent_now), syncs=len(link.syncs))
    assert resent_now == in_flight and agent.stats.resent == 2
    assert link.syncs and set(in_flight) <= set(link.syncs[-1][1])  # and the sync names them
    # no ack yet (the receiver may subscribe only after us): again after 1 s, then 2 s, ...
    timer.t += FAST_RETRY_S
    agent.pump()
    assert agent.stats.resent == 4
    timer.t += FAST_RETRY_S  # 1 s later: the next try waits 2 s
    agent.pump()
    assert agent.stats.resent == 4
    timer.t += FAST_RETRY_S
    agent.pump()
    assert agent.stats.resent == 6
    # an ack proves the path: the other batch falls back to the normal 30 s timeout
    link.ack(in_flight[0])
    agent.pump()
    timer.t += 10
    agent.pump()
    assert agent.stats.resent == 6 and agent.buffer.stats().batches == 3


def test_batches_sealed_after_the_resync_do_not_wait_for_its_answer(tmp_path):
    agent, clock, link, timer = make(tmp_path, uplink={"window": 4, "ack_timeout_s": 30.0})
    link.connected = False
    agent.run(duration_s=200)  # offline: 4 batches of 50 wait
    agent.maybe_seal()
    link.connected, link.new_connection = True, True
    agent.pump()
    named = set(link.syncs[-1][1])
    assert len(named) == 4 and link.published == []  # the receiver may hold them: wait for its answer
    agent.run(duration_s=50)  # still within the grace (real time has not moved)
    agent.maybe_seal()
    agent.pump()
    sent = [bid for bid, _ in link.published]
    report("fresh-after-resync", named=len(named), sent_within_grace=len(sent))
    assert len(sent) == 1 and sent[0] not in named  # new since the resync: it cannot be a duplicate
    timer.t += 2.5  # the grace is over: the named ones fill the rest of the window
    agent.pump()
    later = [bid for bid, _ in link.published[1:] if bid != sent[0]]
    assert len(later) == 3 and set(later) <= named


def _store_count(store) -> int:
    try:
        db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT count(*) FROM samples").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0


class RecordingLink(MqttLink):
    """The real MQTT link, noting when each batch went out (real time)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sent: list[tuple[float, str]] = []
        self.connected_at: list[float] = []

    def take_connected_event(self) -> bool:
        new = super().take_connected_event()
        if new:
            self.connected_at.append(time.monotonic())
        return new

    def publish(self, batch_id: str, payload: bytes) -> bool:
        ok = super().publish(batch_id, payload)
        if ok:
            self.sent.append((time.monotonic(), batch_id))
        return ok


def _wait_for_new_sample(store, since: float, before: int) -> float:
    """Real seconds from ``since`` until the store holds more than ``before`` samples."""
    while _store_count(store) <= before:
        assert time.monotonic() < since + 30, "no new sample reached the store"
        time.sleep(0.05)
    return round(time.monotonic() - since, 2)


# Of the 5 s from the broker's return to the first stored sample, what the rest takes
# (connect, resync, upload, the receiver's own reconnect and commit): the end-to-end test below
# measures 0.4-1.7 s; the van's wait for its next attempt must fit in what is left.
REST_OF_RECOVERY_S = 1.5


@pytest.mark.parametrize("down_s", [2.0, 10.0, 60.0, 600.0])
def test_a_fleet_is_back_within_the_default_cap_and_spread_over_it(down_s):
    """10,000 vans under the default reconnect policy: when does each reach the returned broker?"""
    d = UplinkConfig()
    f = herd_figures(10_000, down_s, d.reconnect_min_s, d.reconnect_max_s)
    report("fleet-reconnect", cap_s=d.reconnect_max_s, **vars(f))
    # the last van of the fleet is back in time for the 5 s target (with the old 60 s cap: up to 59 s)
    assert f.max_s + REST_OF_RECOVERY_S <= 5.0
    # and they do not come in one wave: full jitter spreads them over the cap, the busiest moment
    # near the theory's 2 N / cap per second (the residual of a uniform sleep is triangular)
    assert f.first_second < 0.7 * f.vans and f.max_s > 0.8 * d.reconnect_max_s
    assert f.peak_per_s <= 1.3 * 2 * f.vans / d.reconnect_max_s


BROKER_DOWN_S = (1.0, 3.0, 6.0, 1.5, 4.0)  # several outages: short ones, and ones long enough to reach the cap


def test_broker_restart_first_sample_stored_soon_after_its_return(tmp_path, mosquitto):
    rx = Receiver(tmp_path / "store.sqlite", mosquitto.port)
    rx.start()
    cfg = parse_config({
        "device": {"id": "van-rst", "data_dir": str(tmp_path / "van-rst")},
        "sampling": {"rate_hz": 1.0, "commit_interval_s": 1.0},
        "batch": {"max_samples": 500, "max_age_s": 1.0},
        # The DEFAULT uplink settings, as a van in the field runs them (reconnect backoff, ack
        # timeout, window, keepalive): the recovery must not depend on test-only tuning.
        "uplink": {"port": mosquitto.port},
    })
    defaults = UplinkConfig()
    assert (cfg.uplink.reconnect_min_s, cfg.uplink.reconnect_max_s) == (defaults.reconnect_min_s,
                                                                      defaults.reconnect_max_s)
    clock = SimClock(1_795_000_000.0, speedup=5.0)  # 5 samples per sensor and real second
    world = VanWorld(clock, shift_start_utc=1_795_000_000.0)
    link = RecordingLink(cfg.uplink, cfg.device.id)
    agent = Agent(cfg, [OracleSensor(world, name="oracle1"), OracleSensor(world, name="oracle2")], clock,
                  Buffer(cfg.buffer_path, cfg.device.id), link)
    link.start()
    runner = threading.Thread(target=agent.run, name="agent", daemon=True)
    runner.start()
    fig: dict[str, float] = {}
    broker_s: list[float] = []
    reconnect_s: list[float] = []
    try:
        deadline = time.monotonic() + 30
        while _store_count(rx.store) < 50:
            assert time.monotonic() < deadline, "nothing reached the store before the outage"
            time.sleep(0.1)

        # 1. The broker alone restarts (SIGKILL: sessions and queued messages not saved are gone),
        # several times, after outages short and long (long ones take the backoff to its cap).
        for down_s in BROKER_DOWN_S:
            time.sleep(1.0)
            mosquitto.kill()
            killed = time.monotonic()
            time.sleep(down_s)
            mosquitto.start()
            back = time.monotonic()
            broker_s.append(_wait_for_new_sample(rx.store, back, _store_count(rx.store)))
            reconnect_s.append(round(next(t for t in link.connected_at if t > killed) - back, 2))
            print(f"broker down {down_s:.1f} s: van reconnected {reconnect_s[-1]:.2f} s and first new sample "
                  f"stored {broker_s[-1]:.2f} s after its return", flush=True)

        # 2. The central side restarts while batches wait for acks: the receiver dies first, so
        # the window fills with batches nobody acknowledges; then the broker; then both return.
        time.sleep(1.0)
        rx.kill()
        rx_killed = time.monotonic()
        while len({bid for t, bid in link.sent if t >= rx_killed}) < cfg.uplink.window:
            assert time.monotonic() < rx_killed + 30, "the window never filled"
            time.sleep(0.05)  # a window of 8 fills in about two seconds
        time.sleep(0.5)
        mosquitto.kill()
        killed = time.monotonic()
        waiting = {bid for t, bid in link.sent if rx_killed <= t <= killed}
        time.sleep(1.0)
        mosquitto.start()
        before = _store_count(rx.store)
        rx.start()  # returns once subscribed
        rx_back = time.monotonic()
        fig["central_first_store_s"] = _wait_for_new_sample(rx.store, rx_back, before)
        reconnect = next(t for t in link.connected_at if t > killed)
        again = [t for t, bid in link.sent if t >= reconnect and bid in waiting]
        fig["unacked_at_outage"] = len(waiting)
        fig["window_full"] = int(len(waiting) >= cfg.uplink.window)
        fig["resent_after_reconnect_s"] = round(min(again) - reconnect, 3) if again else -1.0
        time.sleep(2.0)
        agent.request_stop()
        runner.join(30)
        assert agent.drain(timeout_s=60)
    finally:
        agent.request_stop()
        link.stop()
        rx.stop()
    fig["broker_first_store_median_s"] = statistics.median(broker_s)
    fig["broker_first_store_max_s"] = max(broker_s)
    fig["max_reconnect_delay_drawn_s"] = round(max(link.delays), 2)
    report("broker-restart", resent=agent.stats.resent, syncs=agent.stats.syncs, restarts=len(broker_s),
           broker_first_store_s=broker_s, van_reconnect_s=reconnect_s, **fig)
    # The default backoff was what ran: a delay before every attempt after a loss, none above its cap.
    assert len(link.delays) > len(BROKER_DOWN_S) and fig["max_reconnect_delay_drawn_s"] <= defaults.reconnect_max_s
    # End to end, the 5 s from the broker's (or receiver's) return: the median holds it; a
    # margin on the worst one for a loaded machine (the van's share of it is at most the 3 s cap).
    assert fig["broker_first_store_median_s"] <= 5.0, broker_s
    assert fig["broker_first_store_max_s"] <= 8.0 and fig["central_first_store_s"] <= 8.0, fig
    # the van half: what waited for an ack went again at the first pump after reconnecting
    assert fig["window_full"] and 0.0 <= fig["resent_after_reconnect_s"] < 1.0
    assert agent.stats.resent >= fig["unacked_at_outage"]
    assert_all_delivered(check(rx.store, [agent.buffer.path]))
