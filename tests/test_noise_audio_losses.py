"""Issue 15 point 5: audio lost on the way to a level is counted, flagged and reported.

A late read (the agent stalled) leaves completed seconds nobody read; an ALSA overrun
loses audio before the meter sees it. Neither may vanish silently: the next sample is
flagged (``audio_gap`` / ``audio_overrun``), and the heartbeat carries the counts.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from drivers.noise.capture import MicrophoneDriver, wait_for_seconds
from drivers.noise.levels import LevelMeter, MeterConfig
from simulator.microphone import CalibratorTone
from tests.test_agent import make

BLOCKS_PER_S = 10  # CalibratorTone's default 0.1 s blocks


class GatedSource:
    """The calibrator tone, released block by block by the test (a real-time stream, on demand).

    ``overrun_next`` makes the next read behave as AlsaSource does on -EPIPE: the period is
    lost, ``overruns`` grows and nothing is returned.
    """

    def __init__(self) -> None:
        self.tone = CalibratorTone(1000.0, 94.0)
        self.overruns = 0
        self.overrun_next = 0
        self._allowed = threading.Semaphore(0)

    def allow(self, blocks: int) -> None:
        for _ in range(blocks):
            self._allowed.release()

    def read_block(self) -> Any:
        if not self._allowed.acquire(timeout=0.05):
            return None
        if self.overrun_next:
            self.overrun_next -= 1
            self.overruns += 1
            self.tone.read_block()  # that audio happened, and is lost
            return None
        return self.tone.read_block()


def driver_over(src: GatedSource) -> MicrophoneDriver:
    return MicrophoneDriver(src, LevelMeter(MeterConfig()), name="mic", idle_sleep_s=0.005)


def test_a_late_read_gets_every_queued_second_and_skips_none() -> None:
    """Since v15 a late read loses nothing: the seconds wait in the queue (a stall longer than
    the queue is tests/test_noise_late_ticks.py)."""
    src = GatedSource()
    drv = driver_over(src)
    try:
        src.allow(2 * BLOCKS_PER_S)
        assert wait_for_seconds(drv, 2, timeout_s=10)
        first = drv.read()  # second 0 (settling) waited for this late read
        assert first is not None and first.meta["second"] == 0 and "audio_gap" not in first.flags
        assert drv.backlog == 1 and drv.read().meta["second"] == 1
        src.allow(4 * BLOCKS_PER_S)  # the agent stalls four seconds
        assert wait_for_seconds(drv, 6, timeout_s=10)
        late = []
        while (r := drv.read()) is not None:
            late.append(r)
        assert [r.meta["second"] for r in late] == [2, 3, 4, 5]
        assert not any("audio_gap" in r.flags or "audio_overrun" in r.flags for r in late)
        assert drv.audio_health() == {"seconds_skipped": 0, "overruns": 0, "source_errors": 0, "minutes_dropped": 0}
    finally:
        drv.close()


def test_an_overrun_flags_the_next_reading_and_the_heartbeat_reports_both(tmp_path) -> None:
    src = GatedSource()
    drv = driver_over(src)
    agent, *_ = make(tmp_path, drivers=[drv])
    try:
        src.allow(2 * BLOCKS_PER_S)
        assert wait_for_seconds(drv, 2, timeout_s=10)
        agent.sample()
        src.overrun_next = 2
        src.allow(BLOCKS_PER_S + 2)  # two periods lost, then a full second of audio
        assert wait_for_seconds(drv, 3, timeout_s=10)
        agent.sample()
        src.allow(BLOCKS_PER_S)
        assert wait_for_seconds(drv, 4, timeout_s=10)
        agent.sample()
        flags = [s.flags for s in agent._pending]
        assert len(flags) == 4  # seconds 0 and 1 both read by the first (late) tick
        assert "warming_up" in flags[0] and not any("audio_gap" in f for f in flags)
        assert "audio_overrun" in flags[2] and "audio_overrun" not in flags[3]
        assert agent.status()["audio"] == {"mic": {"seconds_skipped": 0, "overruns": 2, "source_errors": 0,
                                                   "minutes_dropped": 0}}
        # The flagged samples are stored, not dropped.
        agent.commit()
        assert agent.stats.committed == 4
    finally:
        drv.close()
        agent.buffer.close()


def test_no_flags_when_every_second_is_read_in_time() -> None:
    src = GatedSource()
    drv = driver_over(src)
    try:
        flags = []
        for n in range(1, 5):
            src.allow(BLOCKS_PER_S)
            assert wait_for_seconds(drv, n, timeout_s=10)
            r = drv.read()
            assert r is not None
            flags.append(r.flags)
        assert all("audio_gap" not in f and "audio_overrun" not in f for f in flags)
        assert np.isclose(r.values["laeq"], 94.0, atol=0.1)
    finally:
        drv.close()
