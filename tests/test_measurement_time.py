"""Every value carries the time it was measured (issue 15, 1).

A simulated GPS receiver on a real pseudo-terminal sends each epoch at a known
phase of the monotonic clock; the driver is read once per "tick" at another
phase, as the agent does. The stamps must land within 50 ms of when the fix was
measured, whatever the tick phase (they used to be late by the phase: up to 1 s).
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from typing import Iterator

import pytest
import serial

from drivers.base import Reading
from drivers.gps import NmeaGpsDriver
from core.sample import TimeSource
from core.timekeeping import MEASURED_MONO, MEASURED_UTC, TimeKeeper
from simulator.gps_device import FakeGpsReceiver

UTC = dt.timezone.utc
ORIGIN = dt.datetime(2026, 5, 6, 7, 30, tzinfo=UTC)
TOLERANCE_S = 0.050  # the requirement; the machine is loaded, the truth is exact


def path(t: float) -> tuple[float, float, float, float]:
    return (51.4545 + t * 7.6e-5, -2.5879 + t * 1.2e-4, 12.0, 45.0)


class NtpClock:
    """The real monotonic clock with a kernel clock that NTP keeps exactly on UTC.

    UTC = monotonic + ``offset``: the same mapping the simulated receiver uses, so
    the truth of every epoch is known in both scales.
    """

    def __init__(self, offset: float, source: TimeSource = TimeSource.NTP) -> None:
        self.offset = offset
        self._source = source

    def utc(self) -> float:
        return time.monotonic() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def source(self) -> TimeSource:
        return self._source


class CountingPort:
    """A pyserial port that counts the reads the timing thread makes."""

    def __init__(self, port: serial.Serial) -> None:
        self._port = port
        self.thread_reads = 0

    def __getattr__(self, name: str):
        return getattr(self._port, name)

    @property
    def timeout(self):
        return self._port.timeout

    @timeout.setter
    def timeout(self, value) -> None:
        self._port.timeout = value

    @property
    def in_waiting(self) -> int:
        return self._port.in_waiting

    def read(self, n: int = 1) -> bytes:
        if threading.current_thread().name.endswith("-reader"):
            self.thread_reads += 1
        return self._port.read(n)


@pytest.fixture
def receiver() -> Iterator:
    made: list[tuple[FakeGpsReceiver, NmeaGpsDriver]] = []

    def make(phase: float, output_delay_s: float = 0.0) -> tuple[FakeGpsReceiver, NmeaGpsDriver]:
        # The receiver's second k starts at monotonic k - phase.
        sim = FakeGpsReceiver(path, clock=lambda: time.monotonic() + phase, utc_origin=ORIGIN,
                              output_delay_s=output_delay_s, poll_interval=0.002)
        sim.start(background=True)
        port = serial.serial_for_url(sim.port_name, baudrate=9600, timeout=0)
        drv = NmeaGpsDriver(CountingPort(port), reader_thread=True, collect_s=0.05)
        made.append((sim, drv))
        return sim, drv

    yield make
    for sim, drv in made:
        drv.close()
        sim.stop()


def tick_readings(drv: NmeaGpsDriver, tick_phase: float, n: int) -> list[tuple[float, Reading]]:
    """Read the driver once a second at ``tick_phase`` of the monotonic second, like the agent."""
    out: list[tuple[float, Reading]] = []
    deadline = time.monotonic() + n + 4.0
    while len(out) < n and time.monotonic() < deadline:
        now = time.monotonic()
        nxt = math.floor(now) + tick_phase
        if nxt <= now:
            nxt += 1.0
        time.sleep(nxt - now)
        reading = drv.read()
        # The first fix's date is not yet corroborated (no GPS time): it cannot be checked here.
        if reading is not None and reading.values["gps_time"] is not None:
            out.append((time.monotonic(), reading))
    assert len(out) >= n, f"only {len(out)} fixes"
    return out


def truth_mono(reading: Reading, phase: float) -> float:
    """When the fix was measured, in monotonic seconds: its receiver second k, at k - phase."""
    k = reading.values["gps_time"] - ORIGIN.timestamp()
    assert k == round(k)
    return k - phase


@pytest.mark.parametrize("tick_phase", [0.1, 0.5, 0.9])
def test_fix_is_timed_by_the_arrival_of_its_epoch_not_by_the_tick(receiver, tick_phase: float) -> None:
    phase = 0.3  # the receiver's seconds start at monotonic x.7
    _, drv = receiver(phase)
    started = time.monotonic()
    readings = tick_readings(drv, tick_phase, 3)
    elapsed = time.monotonic() - started
    for read_at, r in readings:
        truth = truth_mono(r, phase)
        assert abs(r.meta[MEASURED_MONO] - truth) < TOLERANCE_S, (r.meta, truth)
        # The read came later by the tick's phase after the epoch: the old stamp was that wrong.
        late_by = (read_at - truth) % 1.0
        assert abs(late_by - ((tick_phase + phase) % 1.0)) < 0.2
    # The time fix the TimeKeeper follows is timed the same way.
    utc, mono = drv.time_fix()
    assert abs(mono - (utc - ORIGIN.timestamp() - phase)) < TOLERANCE_S
    # CPU (issue 18): the thread times an epoch every probe_every_s, it does not read them all;
    # the epochs between are dated from the timed one (and met the 50 ms above).
    assert drv.stats.probes <= 1 + elapsed / 4.0 < drv.stats.sentences / 7  # 7 sentences an epoch
    assert drv._port.thread_reads <= 8 * drv.stats.probes  # a few reads a probe: it blocks, never polls


@pytest.mark.parametrize(("spine", "tick_phase"), [("ntp", 0.2), ("gps", 0.6)])
def test_stamps_are_within_50_ms_of_the_measurement(receiver, tick_phase: float, spine: str) -> None:
    """End to end through the TimeKeeper, on NTP time or on the receiver's own time."""
    phase = 0.55
    # The receiver sends 80 ms after its second (a real receiver computes first): arrival
    # alone would be 80 ms late; the fix's own UTC, mapped through the spine, is not.
    _, drv = receiver(phase, output_delay_s=0.08)
    offset = ORIGIN.timestamp() + phase  # UTC - monotonic, the same for receiver and kernel
    clock = NtpClock(offset, TimeSource.NTP if spine == "ntp" else TimeSource.UNSYNC)
    tk = TimeKeeper(clock, [drv] if spine == "gps" else [])
    errors_hint, errors_arrival = [], []
    for _, r in tick_readings(drv, tick_phase, 3):
        tk.update()
        true_utc = r.values["gps_time"]
        st = tk.stamp(r.meta.get(MEASURED_MONO), r.meta.get(MEASURED_UTC))
        assert st.source is (TimeSource.NTP if spine == "ntp" else TimeSource.GPS)
        errors_hint.append(st.t_utc_ms / 1000 - true_utc)
        arrival = tk.stamp(r.meta.get(MEASURED_MONO))
        errors_arrival.append(arrival.t_utc_ms / 1000 - true_utc)
    assert max(abs(e) for e in errors_hint) < TOLERANCE_S, errors_hint
    if spine == "ntp":
        # Timed by arrival only, a fix is late by the receiver's output delay (and no more).
        assert all(0.05 < e < 0.08 + TOLERANCE_S for e in errors_arrival), errors_arrival


def test_stamp_of_an_earlier_measurement_keeps_its_age() -> None:
    """A value measured before another one read in the same tick is not clamped to it."""
    clock = NtpClock(1.8e9)
    tk = TimeKeeper(clock)
    now = clock.monotonic()
    later = tk.stamp()  # a PM reading read first in the tick
    earlier = tk.stamp(now - 0.6)  # the GPS epoch that arrived 0.6 s before
    assert later.t_utc_ms - earlier.t_utc_ms == pytest.approx(600, abs=20)
    assert earlier.t_mono_ms == round((now - 0.6) * 1000)
    # Timed at the read (a simulated van), 0.9 s after the epoch: the fix's own UTC places it.
    hinted = tk.stamp(now, at_utc=now - 0.9 + 1.8e9)
    assert hinted.t_utc_ms == pytest.approx((now - 0.9 + 1.8e9) * 1000, abs=2)
    # A UTC that disagrees with the spine (a wrong receiver time) does not move the stamp.
    wrong = tk.stamp(now - 0.6, at_utc=now - 0.6 + 1.8e9 + 30.0)
    assert abs(wrong.t_utc_ms - earlier.t_utc_ms) < 20


# -- sound levels ------------------------------------------------------------------------------


@pytest.mark.parametrize("tick_phase", [0.25, 0.75])
def test_sound_level_is_stamped_at_the_end_of_its_second_of_audio(tick_phase: float) -> None:
    """A real-time microphone; levels picked up at any phase carry the end of their own second."""
    from drivers.noise.capture import MicrophoneDriver
    from drivers.noise.levels import LevelMeter
    from simulator.microphone import SimulatedMicrophone

    mic = SimulatedMicrophone(lambda t: 60.0, seed=3, realtime=True, passby_rate_per_min=0.0)
    drv = MicrophoneDriver(mic, LevelMeter())
    try:
        got: list[tuple[float, Reading]] = []
        deadline = time.monotonic() + 8.0
        while len(got) < 3 and time.monotonic() < deadline:
            start = mic.started_at
            now = time.monotonic()
            # Ticks at tick_phase of the audio's seconds (once the stream has started).
            nxt = now + 0.05 if start is None else start + math.floor(now - start) + tick_phase
            if nxt <= now:
                nxt += 1.0
            time.sleep(nxt - now)
            r = drv.read()
            if r is not None:
                got.append((time.monotonic(), r))
        assert len(got) >= 3
        start = mic.started_at
        assert start is not None
        for read_at, r in got:
            end_of_second = start + r.meta["second"] + 1
            assert abs(r.meta[MEASURED_MONO] - end_of_second) < TOLERANCE_S, (r.meta, end_of_second)
            assert read_at - end_of_second > tick_phase - 0.15  # picked up that much later
    finally:
        drv.close()


def test_gps_minus_ntp_shows_the_receivers_output_latency() -> None:
    """With both references there, the heartbeat's gps_minus_ntp_ms measures the latency GPS time carries."""
    clock = NtpClock(1.8e9)

    epoch_mono = clock.monotonic() - 0.5  # an epoch half a second ago

    class LateReceiver:
        """A receiver whose epoch's first byte arrived 80 ms after the second it names."""

        def time_fix(self) -> tuple[float, float]:
            return epoch_mono + clock.offset, epoch_mono + 0.08

    tk = TimeKeeper(clock, [LateReceiver()])
    tk.update()
    tk.stamp()
    assert tk.stats.gps_minus_system_ms == pytest.approx(-80, abs=2)


def test_an_untimed_fix_is_placed_by_its_own_utc_within_the_delivery_lag() -> None:
    """Before the timing thread has timed an epoch a fix has no arrival, only its UTC (B3).

    It may have waited in the driver's hand-out queue (3 fixes, one per 1 Hz read) plus the
    read that found it: 1.1-3.5 s late were seen. Its UTC used to be refused beyond 1.5 s, so
    it was stamped at its read; now it places the fix up to the age clamp (5 s). A value whose
    arrival was measured keeps the tight window, and a UTC older than any possible lag is
    not believed.
    """
    clock = NtpClock(1.8e9)
    tk = TimeKeeper(clock, [])
    for lag in (0.3, 2.1, 3.5, 4.5):
        now_utc = clock.utc()
        st = tk.stamp(None, now_utc - lag)
        assert st.t_utc_ms / 1000 == pytest.approx(now_utc - lag, abs=0.01), lag
    now_utc, now_mono = clock.utc(), clock.monotonic()
    st = tk.stamp(None, now_utc - 7.0)  # older than any lag the driver allows: not this fix's time
    assert st.t_utc_ms / 1000 == pytest.approx(now_utc, abs=0.05)
    st = tk.stamp(now_mono - 0.1, now_utc - 3.0)  # timed 0.1 s ago: 3 s is no latency, the arrival wins
    assert st.t_utc_ms / 1000 == pytest.approx(now_utc - 0.1, abs=0.05)


class OffsetReceiver:
    """A receiver whose UTC is off by ``error_s``; its epochs arrive ``latency_s`` after their second."""

    def __init__(self, clock: NtpClock, error_s: float, latency_s: float = 0.08) -> None:
        self.clock, self.error_s, self.latency_s = clock, error_s, latency_s

    def time_fix(self) -> tuple[float, float]:
        arrival = math.floor(self.clock.monotonic() - self.latency_s) + self.latency_s
        return arrival - self.latency_s + self.clock.offset + self.error_s, arrival


class FastClock(NtpClock):
    """NtpClock whose monotonic time runs ``scale`` times faster (a minute of watching in a second)."""

    def __init__(self, offset: float, scale: float) -> None:
        super().__init__(offset)
        self._t0, self.scale = time.monotonic(), scale

    def monotonic(self) -> float:
        return self._t0 + (time.monotonic() - self._t0) * self.scale

    def utc(self) -> float:
        return self.monotonic() + self.offset


@pytest.mark.parametrize(("error_s", "disagrees"), [(0.0, False), (0.2, False), (-0.5, True), (1.0, True)])
def test_gps_time_that_disagrees_with_ntp_for_a_minute_is_reported(error_s: float, disagrees: bool) -> None:
    """A receiver whose UTC is off shifts fix stamps silently (B4): now the heartbeat says so.

    gps - ntp is expected at minus the receiver's latency (time.gps_latency_s); beyond it by
    more than 250 ms for a minute, gps_time_disagrees is set (GPS stays the reference).
    """
    clock = FastClock(1.8e9, scale=120.0)
    tk = TimeKeeper(clock, [OffsetReceiver(clock, error_s)], gps_latency_s=0.08)
    start = clock.monotonic()
    while clock.monotonic() - start < 90.0:
        tk.update()
        tk.stamp()
        if clock.monotonic() - start < 50.0:
            assert not tk.gps_time_disagrees  # not before a sustained minute
        time.sleep(0.02)
    assert tk.stats.gps_minus_system_ms == pytest.approx((error_s - 0.08) * 1000, abs=20)
    assert tk.gps_time_disagrees is disagrees
    assert tk.stats.gps_disagreements == int(disagrees)


def test_heartbeat_carries_the_gps_ntp_disagreement(tmp_path) -> None:
    from tests.test_agent import make

    agent, *_ = make(tmp_path, drivers=[])
    assert agent.status()["gps_time_disagrees"] is False
    agent.timekeeper.gps_time_disagrees = True
    assert agent.status()["gps_time_disagrees"] is True


def test_agent_stamps_a_reading_at_its_measured_time(tmp_path) -> None:
    """The agent hands the driver's measured time to the time keeper; a plain reading is stamped at its read."""
    from tests.test_agent import make

    class Measured:
        name = "late"

        def __init__(self) -> None:
            self.clock = None

        def read(self) -> Reading:
            return Reading(sensor="late", values={"x": 1.0}, meta={MEASURED_MONO: self.clock.monotonic() - 0.4})

        def close(self) -> None:
            pass

    drv = Measured()
    agent, clock, _, _ = make(tmp_path, drivers=[drv])
    drv.clock = clock
    clock.advance(5.0)  # past the make() clock's untrusted start
    agent.sample()
    now_ms = round(clock.monotonic() * 1000)
    (sample,) = agent._pending
    assert sample.t_mono_ms == now_ms - 400
    assert sample.t_utc_ms == round(clock.utc() * 1000) - 400
