"""Audio losses land on the second that lost audio, and no ALSA error stops capture (issue 15,
tester v4).

* An overrun is attributed in the capture thread to the second being captured when the frames
  were lost: the flag ``audio_overrun`` goes on that second, never on an intact one that happened
  to be delivered next.
* pyalsaaudio raises ``ALSAAudioError`` for errors other than an overrun (-EIO when the I2S clock
  hiccups, -ENODEV): each is counted, the device is reopened after a growing backoff, the holed
  second is flagged, and capture goes on.
* Minute statistics dropped (with their second) during a stall longer than the queue are counted
  (``minutes_dropped``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from drivers.noise.capture import AlsaSource, MicrophoneDriver, wait_for_seconds
from drivers.noise.levels import LevelMeter, MeterConfig
from simulator.microphone import CalibratorTone
from tests.test_noise_audio_losses import BLOCKS_PER_S, GatedSource, driver_over


def _wait(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class CountingGate(GatedSource):
    """GatedSource that counts the blocks it has handed out (or lost), so a test knows where it is."""

    def __init__(self) -> None:
        super().__init__()
        self.consumed = 0

    def read_block(self) -> Any:
        if not self._allowed.acquire(timeout=0.05):
            return None
        self.consumed += 1
        block = self.tone.read_block()  # that audio happened, arrived or not
        if self.overrun_next:
            self.overrun_next -= 1
            self.overruns += 1
            return None
        return block


def _consumed(src: CountingGate, n: int) -> None:
    _wait(lambda: src.consumed >= n)
    time.sleep(0.05)  # let the meter publish


def test_an_overrun_after_a_second_completed_flags_the_holed_second_not_the_intact_one() -> None:
    src = CountingGate()
    drv = driver_over(src)
    try:
        src.allow(BLOCKS_PER_S)
        assert wait_for_seconds(drv, 1) and drv.read() is not None  # second 0 on time
        src.allow(BLOCKS_PER_S + 3)  # second 1 whole, then 0.3 s of second 2
        assert wait_for_seconds(drv, 2)
        _consumed(src, 23)
        src.overrun_next = 2
        src.allow(2)  # 0.2 s of second 2 lost, before the agent reads second 1
        _consumed(src, 25)
        r1 = drv.read()
        src.allow(BLOCKS_PER_S)
        assert wait_for_seconds(drv, 3)
        r2 = drv.read()
        assert r1.meta["second"] == 1 and "audio_overrun" not in r1.flags, r1.flags
        assert r2.meta["second"] == 2 and "audio_overrun" in r2.flags, r2.flags
        src.allow(BLOCKS_PER_S)
        assert wait_for_seconds(drv, 4)
        assert "audio_overrun" not in drv.read().flags  # once, not on every later second
        assert drv.audio_health()["overruns"] == 2
    finally:
        drv.close()


def test_an_overrun_read_before_its_second_completes_flags_that_second() -> None:
    src = CountingGate()
    drv = driver_over(src)
    try:
        src.allow(2 * BLOCKS_PER_S)
        assert wait_for_seconds(drv, 2)
        assert drv.read().meta["second"] == 0 and drv.read().meta["second"] == 1
        src.allow(5)
        _consumed(src, 25)
        src.overrun_next = 2
        src.allow(2)
        _consumed(src, 27)
        assert drv.read() is None  # second 2 is not complete yet
        src.allow(5)
        assert wait_for_seconds(drv, 3)
        r2 = drv.read()
        assert r2.meta["second"] == 2 and "audio_overrun" in r2.flags
    finally:
        drv.close()


# -- ALSA errors other than an overrun ----------------------------------------------------------


class ALSAAudioError(Exception):
    """What pyalsaaudio raises (a plain Exception subclass), e.g. 'Input/output error [-5]'."""


class ScriptedPcm:
    """The libasound side of AlsaSource: S32_LE stereo periods of a 1 kHz, 94 dB tone, and the
    failures the test scripts (``"eio"`` raises, ``"epipe"`` is an overrun). Reads pace on a gate."""

    def __init__(self, plan: list[str], gate: threading.Semaphore) -> None:
        self.plan, self.gate = plan, gate
        self.tone = CalibratorTone(1000.0, 94.0)
        self.closed = False

    def read(self) -> tuple[int, bytes]:
        if not self.gate.acquire(timeout=0.05):
            return 0, b""
        step = self.plan.pop(0) if self.plan else "ok"
        block = self.tone.read_block()  # the audio happens whether or not it arrives
        if step == "eio":
            raise ALSAAudioError("Input/output error [-5]")
        if step == "epipe":
            return -32, b""
        words = np.clip(np.round(np.asarray(block, dtype=np.float64) * 2**31), -(2**31), 2**31 - 1).astype("<i4")
        return len(words), np.repeat(words, 2).tobytes()  # both I2S channels

    def close(self) -> None:
        self.closed = True


class Device:
    """The sound card: opens PCMs (or refuses while ``absent``), all sharing one script and gate."""

    def __init__(self, plan: list[str]) -> None:
        self.plan, self.gate = plan, threading.Semaphore(0)
        self.opened: list[ScriptedPcm] = []
        self.absent = 0  # refuse this many opens

    def open(self) -> ScriptedPcm:
        if self.absent:
            self.absent -= 1
            raise ALSAAudioError("No such device [-19]")
        pcm = ScriptedPcm(self.plan, self.gate)
        self.opened.append(pcm)
        return pcm

    def allow(self, n: int) -> None:
        for _ in range(n):
            self.gate.release()


def _alsa(device: Device) -> AlsaSource:
    return AlsaSource("hw:mic", pcm_factory=device.open, error_types=(ALSAAudioError,))


def test_a_transient_alsa_error_is_counted_the_device_reopened_and_the_second_flagged() -> None:
    card = Device(["ok"] * 15 + ["eio"])
    src = _alsa(card)
    drv = MicrophoneDriver(src, LevelMeter(MeterConfig()), name="mic", idle_sleep_s=0.005, backoff_min_s=0.01)
    try:
        card.allow(BLOCKS_PER_S)
        assert wait_for_seconds(drv, 1)
        assert drv.read().meta["second"] == 0
        card.allow(5 + 1)  # 0.5 s of second 1, then -EIO (0.1 s lost)
        _wait(lambda: drv.source_errors == 1)
        card.allow(5)  # the rest of second 1 (10 periods of audio that arrived), from the reopened device
        assert wait_for_seconds(drv, 2)
        r1 = drv.read()
        assert r1.meta["second"] == 1 and "audio_overrun" in r1.flags and "audio_gap" not in r1.flags
        card.allow(BLOCKS_PER_S)
        assert wait_for_seconds(drv, 3)
        r2 = drv.read()
        assert r2.meta["second"] == 2 and "audio_overrun" not in r2.flags
        assert np.isclose(r2.values["laeq"], 94.0, atol=0.2)  # the reopened stream is the real audio
        assert drv.running and src.reopens == 1 and card.opened[0].closed
        assert drv.audio_health()["source_errors"] == 1
    finally:
        drv.close()


def test_the_holed_second_is_flagged_and_a_missing_device_is_retried_with_backoff() -> None:
    card = Device(["ok"] * 13 + ["eio"])
    src = _alsa(card)
    card.absent = 3  # after the error, three reopen attempts fail (device gone for a while)
    drv = MicrophoneDriver(src, LevelMeter(MeterConfig()), name="mic", idle_sleep_s=0.005,
                           backoff_min_s=0.02, backoff_max_s=0.08)
    try:
        card.allow(BLOCKS_PER_S)
        assert wait_for_seconds(drv, 1) and drv.read() is not None
        card.allow(4)  # 0.3 s of second 1, then -EIO
        _wait(lambda: drv.source_errors >= 1)
        _wait(lambda: drv.source_errors == 4)  # the error + 3 failed reopens, spaced by the backoff
        card.allow(8)
        assert wait_for_seconds(drv, 2)
        r1 = drv.read()
        assert r1.meta["second"] == 1 and "audio_overrun" in r1.flags
        card.allow(BLOCKS_PER_S)
        assert wait_for_seconds(drv, 3)
        assert "audio_overrun" not in drv.read().flags
        assert src.reopens == 1 and drv.running
    finally:
        drv.close()


def test_minute_statistics_dropped_in_a_stall_are_counted() -> None:
    """The agent does not read for three minutes of audio: two minute records are overwritten."""
    src = GatedSource()
    drv = driver_over(src)
    try:
        src.allow(181 * BLOCKS_PER_S)
        assert wait_for_seconds(drv, 181, timeout_s=60)
        late = []
        while (r := drv.read()) is not None:
            late.append(r)
        # The queue kept the newest 30 seconds (151-180); minutes 0 and 1 went with their seconds.
        assert late[0].meta["second"] == 151 and "audio_gap" in late[0].flags
        minute = [r for r in late if "laeq_1min" in r.values]
        assert len(minute) == 1 and minute[0].meta["minute"] == 2
        assert {"la10", "la50", "la90", "laeq_1min"} <= set(minute[0].values)
        assert drv.minutes_dropped == 2 and drv.audio_health()["minutes_dropped"] == 2
        assert drv.seconds_skipped == 151
    finally:
        drv.close()
