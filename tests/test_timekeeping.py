"""Time a van can trust: stale boot clocks, GPS time, NTP steps, receiver default dates."""

from __future__ import annotations

import pytest

from buffer.store import Buffer
from drivers.base import Reading
from edge.agent import Agent
from core.clock import SimClock
from edge.config import parse_config
from core.sample import TimeSource
from core.timekeeping import GPS_FILTER_S, GPS_ROLLOVER_S, TimeKeeper, plausible_utc_ms, unroll_gps_week
from tests.test_agent import Counter, FakeLink, Timer
from core.wire import decode_batch

TRUE_T0 = 1_790_000_000.0  # 2026-09-21
THREE_YEARS = 3 * 365 * 86400.0


class FakeGps:
    """A GPS driver's time interface: true time once it has a fix (after ``fix_after`` s)."""

    name = "gps"

    def __init__(self, clock: SimClock, fix_after: float, default_date: float | None = None):
        self.clock, self.fix_after, self.default_date = clock, fix_after, default_date
        self.error_s = 0.0  # what the receiver's time is off by (a glitch, a rollover)
        self.lost_after: float | None = None

    def time_fix(self):
        if self.lost_after is not None and self.clock.monotonic() - 1000.0 >= self.lost_after:
            return None  # a tunnel: the last fix stays the newest
        if self.clock.monotonic() - 1000.0 < self.fix_after:
            if self.default_date is not None:
                return (self.default_date, self.clock.monotonic())  # 1980-style garbage
            return None
        return (self.clock.true_utc() + self.error_s, self.clock.monotonic())

    def read(self):
        return Reading("gps", {"fix": self.time_fix() is not None})

    def close(self):
        pass


def run_agent(tmp_path, clock, drivers, seconds, final_seal=True, on_tick=None, **cfg_over):
    """Tick once a virtual second for ``seconds`` (``on_tick(i)`` first: faults); every sample, sealed."""
    data = {"device": {"id": "van-001", "data_dir": str(tmp_path)},
            "batch": {"max_samples": 10_000, "max_age_s": 30.0}}
    for k, v in cfg_over.items():
        data.setdefault(k, {}).update(v)
    cfg = parse_config(data)
    agent = Agent(cfg, drivers, clock, Buffer(cfg.buffer_path, "van-001"), FakeLink(), timer=Timer(),
                  boot_id="boot-A")
    end = clock.monotonic() + seconds
    i = 0
    while clock.monotonic() < end:
        if on_tick is not None:
            on_tick(i)
        agent.tick()
        clock.sleep(1.0)
        i += 1
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


# -- steps of the system clock and of GPS time (issue 14, point 4) ---------------------------


def run_with_step(tmp_path, clock, drivers, step, before=120, after=240):
    """Tick ``before`` s, apply ``step()``, tick ``after`` s; the PM samples, sealed."""
    agent, samples = run_agent(tmp_path, clock, drivers, before + after,
                               on_tick=lambda i: step() if i == before else None)
    return agent, [s for s in samples if s.sensor == "pm"]


def truth_ms(s) -> int:
    return int(round((TRUE_T0 + s.t_mono_ms / 1000 - 1000.0) * 1000))


def silent_disorder(samples) -> list[int]:
    """Seqs of unflagged samples stamped earlier than a sample committed before them."""
    out, newest = [], None
    for s in sorted(samples, key=lambda x: x.seq):
        if newest is not None and s.t_utc_ms < newest and "clock_step" not in s.flags:
            out.append(s.seq)
        newest = s.t_utc_ms if newest is None else max(newest, s.t_utc_ms)
    return out


def flagged(samples):
    return [s for s in samples if "clock_step" in s.flags]


def test_system_step_under_a_gps_fix_is_ignored(tmp_path):
    clock = SimClock(TRUE_T0)
    gps = FakeGps(clock, fix_after=0)
    agent, pm = run_with_step(tmp_path, clock, [Counter(), gps], lambda: clock.step(86400.0))
    assert agent.timekeeper.stats.system_steps == 1
    assert agent.status()["time_steps"] == 1  # the heartbeat tells the dashboard
    assert all(abs(s.t_utc_ms - truth_ms(s)) <= 1 for s in pm)
    assert not flagged(pm) and not silent_disorder(pm)


def test_gps_step_under_ntp_is_ignored(tmp_path):
    clock = SimClock(TRUE_T0)
    gps = FakeGps(clock, fix_after=0)

    def glitch():
        gps.error_s = 3600.0

    agent, pm = run_with_step(tmp_path, clock, [Counter(), gps], glitch)
    assert agent.timekeeper.stats.gps_steps == 1 and agent.timekeeper.stats.rebases == 0
    assert all(abs(s.t_utc_ms - truth_ms(s)) <= 1 for s in pm)
    assert not flagged(pm)


@pytest.mark.parametrize("step_s", [86400.0, -7200.0])
def test_system_step_with_nobody_to_ask_is_flagged_then_followed(tmp_path, step_s):
    """No GPS: the step is contested for confirm_s (flagged), then the clock is believed."""
    clock = SimClock(TRUE_T0)
    agent, pm = run_with_step(tmp_path, clock, [Counter()], lambda: clock.step(step_s))
    st = agent.timekeeper.stats
    assert st.system_steps == 1 and st.rebases == 1 and st.contested_stamps == 60
    assert not silent_disorder(pm)
    before, contested, after = pm[:120], pm[120:180], pm[180:]
    assert all(s.t_utc_ms == truth_ms(s) for s in before) and not flagged(before)
    # held back, then re-stamped from monotonic time with the offset that won
    assert all("clock_step" in s.flags and s.time_src == TimeSource.CORRECTED for s in contested)
    assert all(s.t_utc_ms == truth_ms(s) + step_s * 1000 for s in contested + after)
    overlap = flagged(after)
    if step_s < 0:  # stamps that fall before the newest earlier one stay flagged
        assert len(overlap) == 240 - 60 and st.overlap_stamps == len(overlap)
    else:
        assert not overlap


def test_gps_glitch_that_returns_is_corrected_back(tmp_path):
    clock = SimClock(TRUE_T0, trusted_after=1e9, boot_error_s=-THREE_YEARS)  # no NTP: GPS alone
    gps = FakeGps(clock, fix_after=0)

    def glitch(i):
        gps.error_s = 86400.0 if 100 <= i < 130 else 0.0  # a day off for 30 s, then right again

    agent, samples = run_agent(tmp_path, clock, [Counter(), gps], 200, on_tick=glitch)
    pm = [s for s in samples if s.sensor == "pm"]
    assert agent.timekeeper.stats.gps_steps == 1 and agent.timekeeper.stats.rebases == 0
    assert all(s.t_utc_ms == truth_ms(s) for s in pm)
    # flagged while it was off, and as long again as the filter still remembers the day-late fixes
    assert len(flagged(pm)) == 30 + GPS_FILTER_S


def test_gps_alone_stepping_is_contested_then_followed(tmp_path):
    clock = SimClock(TRUE_T0, trusted_after=1e9, boot_error_s=-THREE_YEARS)
    gps = FakeGps(clock, fix_after=0)

    def glitch():
        gps.error_s = -3600.0

    agent, pm = run_with_step(tmp_path, clock, [Counter(), gps], glitch)
    st = agent.timekeeper.stats
    assert st.gps_steps == 1 and st.rebases == 1
    assert not silent_disorder(pm) and len(flagged(pm)) > 60


def test_gps_week_rollover_is_corrected(tmp_path):
    clock = SimClock(TRUE_T0, trusted_after=1e9, boot_error_s=-THREE_YEARS)
    gps = FakeGps(clock, fix_after=0)
    gps.error_s = -GPS_ROLLOVER_S  # the receiver says 2007
    agent, pm = run_with_step(tmp_path, clock, [Counter(), gps], lambda: None, before=10, after=50)
    assert agent.timekeeper.stats.gps_rollovers == 60
    assert all(s.t_utc_ms == truth_ms(s) for s in pm) and not flagged(pm)


def test_unroll_gps_week_moves_one_period_only():
    assert unroll_gps_week(TRUE_T0 - GPS_ROLLOVER_S) == (TRUE_T0, True)
    assert unroll_gps_week(TRUE_T0) == (TRUE_T0, False)
    assert unroll_gps_week(315_964_800.0) == (315_964_800.0, False)  # 1980-01-06: a default date


def test_gps_lost_without_ntp_holds_over_on_the_monotonic_clock(tmp_path):
    clock = SimClock(TRUE_T0, trusted_after=1e9, boot_error_s=-THREE_YEARS)
    gps = FakeGps(clock, fix_after=0)
    gps.lost_after = 60.0
    agent, samples = run_agent(tmp_path, clock, [Counter(), gps], 200, time={"gps_valid_s": 30.0})
    pm = [s for s in samples if s.sensor == "pm"]
    srcs = [str(s.time_src) for s in pm]
    assert srcs == ["gps"] * 90 + ["corrected"] * 110  # the last fix (59 s) is fresh up to 89 s
    assert all(s.t_utc_ms == truth_ms(s) for s in pm) and not flagged(pm)


def test_step_confirmation_time_comes_from_the_config(tmp_path):
    clock = SimClock(TRUE_T0)

    def step(i):
        if i == 30:
            clock.step(-600.0)

    agent, samples = run_agent(tmp_path, clock, [Counter()], 90, on_tick=step,
                               time={"step_confirm_s": 10.0, "step_tolerance_s": 5.0})
    assert agent.timekeeper.tolerance_s == 5.0
    assert agent.timekeeper.stats.contested_stamps == 10 and agent.timekeeper.stats.rebases == 1
    assert not silent_disorder(samples)


def test_a_late_gps_read_is_not_a_step(tmp_path):
    """A stalled loop reads an epoch seconds late: the fix looks early, and the filter ignores it."""
    clock = SimClock(TRUE_T0, trusted_after=1e9, boot_error_s=-THREE_YEARS)
    gps = FakeGps(clock, fix_after=0)

    def stall(i):
        gps.error_s = -5.0 if i in (50, 51) else 0.0  # two fixes timed 5 s after they were sent

    agent, samples = run_agent(tmp_path, clock, [Counter(), gps], 100, on_tick=stall)
    pm = [s for s in samples if s.sensor == "pm"]
    assert agent.timekeeper.stats.gps_steps == 0 and not flagged(pm)
    assert all(s.t_utc_ms == truth_ms(s) for s in pm)


def test_both_references_stepping_apart_keep_the_spine_until_one_is_unopposed(tmp_path):
    """System +1 h and GPS -1 h at the same moment (issue 14, finding A): nobody can tell which is
    right, so neither wins by waiting; the samples are flagged on the spine's time. Only once GPS
    goes quiet does the system clock, unopposed for confirm_s, win."""
    clock = SimClock(TRUE_T0)
    gps = FakeGps(clock, fix_after=0)

    def fault(i):
        if i == 120:
            clock.step(3600.0)
            gps.error_s = -3600.0
        if i == 300:
            gps.lost_after = 300.0  # GPS goes quiet; its last fix counts for gps_valid_s = 30 s

    agent, samples = run_agent(tmp_path, clock, [Counter(), gps], 420, on_tick=fault, time={"gps_valid_s": 30.0})
    st = agent.timekeeper.stats
    pm = sorted((s for s in samples if s.sensor == "pm"), key=lambda s: s.seq)
    # Contested from when GPS's filter lets its new time through (10 s after the step) until the
    # system clock has been alone for confirm_s: GPS's last fix counts until 330 s, + 60 s.
    # (Before this fix the system clock won at 180 s, with GPS still contradicting it.)
    contested = [i for i, s in enumerate(pm) if "clock_step" in s.flags]
    assert contested == list(range(contested[0], contested[-1] + 1))
    assert abs(contested[0] - (120 + GPS_FILTER_S)) <= 2 and abs(contested[-1] - 390) <= 2, contested[::50]
    assert st.contested_stamps == 2 * len(contested)  # a PM sample and a GPS reading each tick
    assert all(s.t_utc_ms == truth_ms(s) and not s.flags for s in pm[: contested[0]])
    assert not silent_disorder(pm)
    assert st.system_steps == 1 and st.gps_steps == 1 and st.rebases == 1
