"""The agent's loop with a simulated clock, fake sensors and an in-memory link."""

from __future__ import annotations

import pytest

from buffer.store import Buffer
from drivers.base import Reading
from edge.agent import Agent
from core.clock import SimClock
from edge.config import parse_config
from core.errors import ChecksumError
from core.sample import TimeSource
from core.wire import Ack, decode_batch

T0 = 1_790_000_000.0


class Counter:
    name = "pm"

    def __init__(self):
        self.n = 0

    def read(self):
        self.n += 1
        return Reading("pm", {"pm25": float(self.n)})

    def close(self):
        pass


class Flaky:
    name = "no2"

    def __init__(self):
        self.n = 0

    def read(self):
        self.n += 1
        if self.n % 3 == 0:
            raise ChecksumError("bad frame")
        if self.n % 5 == 0:
            raise RuntimeError("driver bug")
        return Reading("no2", {"no2_ppb": 12.0})

    def close(self):
        pass


class FakeLink:
    def __init__(self):
        self.connected = True
        self.published: list[tuple[str, bytes]] = []
        self._acks: list[Ack] = []

    def start(self):
        pass

    def stop(self):
        pass

    def publish(self, batch_id, payload):
        if not self.connected:
            return False
        self.published.append((batch_id, payload))
        return True

    def acks(self):
        out, self._acks = self._acks, []
        return out

    statuses: list = []
    syncs: list = []
    new_connection = False

    def publish_status(self, status):
        self.statuses = [*self.statuses, status]
        return self.connected

    def publish_sync(self, epoch, ids):
        self.syncs = [*self.syncs, (epoch, ids)]
        return self.connected

    def take_connected_event(self):
        was, self.new_connection = self.new_connection, False
        return was

    def ack(self, batch_id, status="stored", reason=""):
        self._acks.append(Ack(batch_id, status, reason))


class Timer:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(tmp_path, drivers=None, **over):
    data = {
        "device": {"id": "van-007", "data_dir": str(tmp_path)},
        "batch": {"max_samples": 50, "max_age_s": 1000.0},
        "uplink": {"window": 2, "ack_timeout_s": 10.0},
        "sampling": {"commit_interval_s": 5.0},
    }
    for k, v in over.items():
        data.setdefault(k, {}).update(v)
    cfg = parse_config(data)
    clock = SimClock(T0, trusted_after=3.0)
    link, timer = FakeLink(), Timer()
    agent = Agent(cfg, drivers or [Counter()], clock, Buffer(cfg.buffer_path, cfg.device.id), link,
                  timer=timer, boot_id="boot-1")
    return agent, clock, link, timer


def test_samples_are_stamped_and_group_committed(tmp_path):
    agent, clock, link, _ = make(tmp_path)
    commits = []
    real_commit = agent.buffer.commit
    agent.buffer.commit = lambda s: commits.append(len(s)) or real_commit(s)
    agent.run(duration_s=20)
    # 20 ticks at 1 Hz, committed every 5 s: four groups, not twenty transactions
    assert agent.stats.taken == 20 and sum(commits) == 20
    assert len(commits) == 4
    agent.maybe_seal(force=True)
    batch = decode_batch(agent.buffer.pending(10)[0].payload)
    first, fourth = batch.samples[0], batch.samples[3]
    assert first.t_utc_ms == int(T0 * 1000) and fourth.t_utc_ms == int((T0 + 3) * 1000)
    assert fourth.t_mono_ms - first.t_mono_ms == 3000
    # stamped before the clock was trusted, corrected from the monotonic clock before sealing
    assert first.time_src == TimeSource.CORRECTED and fourth.time_src == TimeSource.NTP
    assert first.boot_id == "boot-1"


def test_sensor_errors_are_counted_and_other_sensors_go_on(tmp_path):
    agent, clock, link, _ = make(tmp_path, drivers=[Flaky(), Counter()])
    agent.run(duration_s=15)
    assert agent.stats.read_errors["no2"] == 7  # 5 checksum errors, 3 bugs, one overlap at 15
    assert agent.stats.taken == 15 + 8
    assert agent.buffer.last_seq() == agent.stats.taken


def test_window_acks_resend_and_delete(tmp_path):
    agent, clock, link, timer = make(tmp_path)
    agent.run(duration_s=200)  # 200 samples -> 4 batches of 50
    agent.maybe_seal()  # the last 50 were committed as the run ended
    assert agent.buffer.stats().batches == 4
    assert len(link.published) == 2  # the window holds two un-acked batches
    first_id = link.published[0][0]
    link.ack(first_id)
    agent.pump()
    assert agent.buffer.stats().batches == 3
    assert len(link.published) == 3  # room for the next one
    # no ack for the second: after the timeout it goes again, same id, same bytes
    timer.t += 11
    agent.pump()
    assert agent.stats.resent == 2
    second = link.published[1]
    assert second in link.published[3:]
    # a duplicate ack deletes too
    link.ack(second[0], "duplicate")
    agent.pump()
    assert agent.stats.duplicate_acks == 1
    assert agent.buffer.get(int(second[0].split("/")[2].split("-")[0])) is None


def test_offline_keeps_everything_then_drains(tmp_path):
    agent, clock, link, timer = make(tmp_path)
    link.connected = False
    agent.run(duration_s=500)
    assert link.published == [] and agent.backlog() == 500
    link.connected = True

    # acknowledge everything that gets published, like a receiver would
    class AckingLink(FakeLink):
        pass

    def publish(bid, payload, _orig=link.publish):
        ok = _orig(bid, payload)
        link.ack(bid)
        return ok

    link.publish = publish
    assert agent.drain(timeout_s=5)
    assert agent.backlog() == 0
    delivered = sorted(
        s.seq for _, p in link.published for s in decode_batch(p).samples
    )
    assert delivered == list(range(1, 501))


def test_rejected_batch_becomes_a_gap(tmp_path):
    agent, clock, link, timer = make(tmp_path)
    agent.run(duration_s=50)
    agent.maybe_seal(force=True)
    agent.pump()
    bid = link.published[0][0]
    link.ack(bid, "rejected", "unsupported wire version")
    agent.pump()
    assert agent.stats.rejected_batches == 1
    agent.run(duration_s=10)
    agent.maybe_seal(force=True)
    agent.pump()
    nxt = decode_batch(link.published[-1][1])
    assert [(g.first_seq, g.last_seq) for g in nxt.gaps] == [(1, 50)]


def test_acks_for_other_epochs_or_devices_are_ignored(tmp_path):
    agent, clock, link, timer = make(tmp_path)
    agent.run(duration_s=50)
    agent.maybe_seal(force=True)
    agent.pump()
    bid = link.published[0][0]
    dev, epoch, rng = bid.split("/")
    link.ack(f"van-999/{epoch}/{rng}")
    link.ack(f"{dev}/0000000000000000/{rng}")
    link.ack("garbage")
    agent.pump()
    assert agent.buffer.stats().batches == 1


def test_stop_request_commits_what_is_in_memory(tmp_path):
    agent, clock, link, timer = make(tmp_path)

    class StopAfter(Counter):
        def read(self):
            r = super().read()
            if self.n == 7:
                agent.request_stop()
            return r

    agent.drivers = [StopAfter()]
    agent.run()
    assert agent.buffer.last_seq() == 7  # nothing taken was left uncommitted


@pytest.mark.parametrize("rate", [1.0, 2.0])
def test_rate_is_honoured(tmp_path, rate):
    agent, clock, link, _ = make(tmp_path, sampling={"rate_hz": rate})
    agent.run(duration_s=10)
    assert agent.stats.ticks == int(10 * rate)


def test_batches_are_sealed_by_age_too(tmp_path):
    agent, clock, link, _ = make(tmp_path, batch={"max_samples": 1000, "max_age_s": 30.0})
    agent.run(duration_s=100)
    sizes = [p.n_samples for p in agent.buffer.pending(10)]
    # commits every 5 s; a batch is sealed once its oldest sample is 30 s old
    assert sizes and all(30 <= n <= 35 for n in sizes)


def test_non_finite_values_become_unknown(tmp_path):
    class Nan(Counter):
        def read(self):
            return Reading("no2", {"no2_ppb": float("nan"), "no2_we_mv": 301.5, "x": float("inf")})

    agent, clock, link, _ = make(tmp_path, drivers=[Nan()])
    agent.run(duration_s=3)
    agent.maybe_seal(force=True)
    s = decode_batch(agent.buffer.pending(1)[0].payload).samples[0]
    assert s.values == {"no2_ppb": None, "no2_we_mv": 301.5, "x": None}
    assert "non_finite" in s.flags


def test_newest_data_flows_while_the_backlog_drains(tmp_path):
    agent, clock, link, timer = make(tmp_path, uplink={"window": 4})
    link.connected = False
    agent.run(duration_s=1000)  # 20 batches of backlog
    agent.maybe_seal()
    link.connected = True
    agent.pump()
    firsts = sorted(int(b.split("/")[2].split("-")[0]) for b, _ in link.published)
    # the window holds the newest batch and the three oldest
    assert firsts == [1, 51, 101, 951]
    # acknowledging everything published keeps both ends moving until all is gone
    while agent.buffer.stats().batches:
        for bid, _ in link.published:
            link.ack(bid)
        link.published.clear()
        agent.pump()
    assert agent.stats.acked_batches == 20


def test_full_disk_keeps_samples_in_memory_and_the_agent_running(tmp_path):
    from buffer.errors import BufferFullError

    agent, clock, link, _ = make(tmp_path)
    real = agent.buffer.commit
    full = {"on": True}

    def commit(samples):
        if full["on"]:
            raise BufferFullError("disk full")
        return real(samples)

    agent.buffer.commit = commit
    agent.run(duration_s=30)
    assert agent.stats.buffer_full >= 5 and agent.buffer.last_seq() == 0
    assert len(agent._pending) == 30  # nothing thrown away
    full["on"] = False
    agent.run(duration_s=10)
    assert agent.buffer.last_seq() == 40  # the held samples went in, in order
