"""Time a van can trust: stale boot clocks, GPS time, NTP steps, receiver default dates."""

from __future__ import annotations

from buffer.store import Buffer
from drivers.base import Reading
from edge.agent import Agent
from edge.clock import SimClock
from edge.config import parse_config
from edge.model import TimeSource
from edge.timekeeping import TimeKeeper, plausible_utc_ms
from tests.test_agent import Counter, FakeLink, Timer
from uplink.wire import decode_batch

TRUE_T0 = 1_790_000_000.0  # 2026-09-21
THREE_YEARS = 3 * 365 * 86400.0


class FakeGps:
    """A GPS driver's time interface: true time once it has a fix (after ``fix_after`` s)."""

    name = "gps"

    def __init__(self, clock: SimClock, fix_after: float, default_date: float | None = None):
        self.clock, self.fix_after, self.default_date = clock, fix_after, default_date

    def time_fix(self):
        if self.clock.monotonic() - 1000.0 < self.fix_after:
            if self.default_date is not None:
                return (self.default_date, self.clock.monotonic())  # 1980-style garbage
            return None
        return (self.clock.true_utc(), self.clock.monotonic())

    def read(self):
        return Reading("gps", {"fix": self.time_fix() is not None})

    def close(self):
        pass


def run_agent(tmp_path, clock, drivers, seconds, final_seal=True, **cfg_over):
    data = {"device": {"id": "van-001", "data_dir": str(tmp_path)},
            "batch": {"max_samples": 10_000, "max_age_s": 30.0}}
    for k, v in cfg_over.items():
        data.setdefault(k, {}).update(v)
    cfg = parse_config(data)
    agent = Agent(cfg, drivers, clock, Buffer(cfg.buffer_path, "van-001"), FakeLink(), timer=Timer(),
                  boot_id="boot-A")
    end = clock.monotonic() + seconds
    while clock.monotonic() < end:
        agent.tick()
        clock.sleep(1.0)
    agent.commit()
    agent.maybe_seal(force=final_seal)
    out = []
    for b in agent.buffer.pending(1000):
        out += decode_batch(b.payload).samples
    return agent, out


def test_stale_boot_clock_is_corrected_once_ntp_syncs(tmp_path):
    clock = SimClock(TRUE_T0, trusted_after=60, boot_error_s=-THREE_YEARS)
    agent, samples = run_agent(tmp_path, clock, [Counter()], 120)
    assert len(samples) == 120
    # nothing carries the stale clock's year
    for s in samples:
        assert abs(s.t_utc_ms / 1000 - (TRUE_T0 + (s.t_mono_ms / 1000 - 1000.0))) < 0.01
    srcs = [s.time_src for s in samples]
    assert srcs[:60] == [TimeSource.CORRECTED] * 60
    assert set(srcs[60:]) == {TimeSource.NTP}
    assert agent.stats.time_corrected == 60


def test_gps_time_without_any_ntp(tmp_path):
    clock = SimClock(TRUE_T0, trusted_after=1e9, boot_error_s=-THREE_YEARS)
    gps = FakeGps(clock, fix_after=45, default_date=315_964_800.0)  # 1980 before the fix
    agent, samples = run_agent(tmp_path, clock, [Counter(), gps], 100)
    pm = [s for s in samples if s.sensor == "pm"]
    for s in pm:
        assert abs(s.t_utc_ms / 1000 - (TRUE_T0 + (s.t_mono_ms / 1000 - 1000.0))) < 0.01
    assert {s.time_src for s in pm[:45]} == {TimeSource.CORRECTED}
    assert {s.time_src for s in pm[46:]} == {TimeSource.GPS}


def test_samples_wait_for_trusted_time_then_go_out_flagged(tmp_path):
    """Never trusted: after hold_unsync_s they are sealed as 'unsync'; an impossible year is unknown."""
    clock = SimClock(TRUE_T0, trusted_after=1e9, boot_error_s=-(TRUE_T0 - 100_000))  # 1970
    data = {"time": {"hold_unsync_s": 50.0}}
    agent, _ = run_agent(tmp_path, clock, [Counter()], 40, final_seal=False, **data)
    assert agent.buffer.stats().batches == 0  # held back: no trusted time yet
    agent2, samples = run_agent(tmp_path / "b", SimClock(TRUE_T0, trusted_after=1e9,
                                boot_error_s=-(TRUE_T0 - 100_000)), [Counter()], 80, final_seal=False, **data)
    assert samples and all(s.time_src == TimeSource.UNSYNC for s in samples)
    assert all(s.t_utc_ms is None for s in samples)  # 1970 is not a time these sensors lived in


def test_ntp_step_neither_reorders_nor_duplicates(tmp_path):
    clock = SimClock(TRUE_T0)
    data = {"device": {"id": "van-001", "data_dir": str(tmp_path)}, "batch": {"max_samples": 10_000}}
    cfg = parse_config(data)
    gps = FakeGps(clock, fix_after=0)
    agent = Agent(cfg, [Counter(), gps], clock, Buffer(cfg.buffer_path, "van-001"), FakeLink(),
                  timer=Timer(), boot_id="b")
    for i in range(60):
        if i == 30:
            clock.step(-20.0)  # the system clock jumps back 20 s
        agent.tick()
        clock.sleep(1.0)
    agent.commit()
    agent.maybe_seal(force=True)
    samples = [s for b in agent.buffer.pending(100) for s in decode_batch(b.payload).samples]
    pm = [s for s in samples if s.sensor == "pm"]
    seqs = [s.seq for s in samples]
    assert seqs == sorted(set(seqs))
    times = [s.t_utc_ms for s in pm]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert all(b - a == 1000 for a, b in zip(times, times[1:]))


def test_restart_in_the_same_boot_still_corrects(tmp_path):
    clock = SimClock(TRUE_T0, trusted_after=1e9, boot_error_s=-THREE_YEARS)
    cfg = parse_config({"device": {"id": "van-001", "data_dir": str(tmp_path)}})
    a1 = Agent(cfg, [Counter()], clock, Buffer(cfg.buffer_path, "van-001"), FakeLink(), timer=Timer(),
               boot_id="same-boot")
    for _ in range(10):
        a1.tick()
        clock.sleep(1)
    a1.commit()
    a1.buffer.close()
    # the service restarts (same kernel boot); then GPS brings time
    gps = FakeGps(clock, fix_after=0)
    a2 = Agent(cfg, [Counter(), gps], clock, Buffer(cfg.buffer_path, "van-001"), FakeLink(),
               timer=Timer(), boot_id="same-boot")
    a2.tick()
    a2.commit()
    a2.maybe_seal(force=True)
    samples = [s for b in a2.buffer.pending(10) for s in decode_batch(b.payload).samples]
    assert [s.time_src for s in samples[:10]] == [TimeSource.CORRECTED] * 10
    assert abs(samples[0].t_utc_ms / 1000 - TRUE_T0) < 0.01


def test_default_dates_are_not_time():
    clock = SimClock(TRUE_T0, trusted_after=1e9)
    tk = TimeKeeper(clock, [FakeGps(clock, fix_after=1e9, default_date=315_964_800.0)])
    tk.update()
    assert tk.correction_offset_ms() is None
    assert tk.stamp().source == TimeSource.UNSYNC
    assert not plausible_utc_ms(315_964_800_000) and not plausible_utc_ms(3_502_915_200_000)
