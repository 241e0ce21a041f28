"""MicrophoneDriver with simulated and scripted sources, and AlsaSource's sample conversion."""

from __future__ import annotations

import importlib.util
import sys
import time
import types

import numpy as np
import pytest

from drivers.base import SensorDriver
from drivers.noise.capture import AlsaSource, MicrophoneDriver, wait_for_seconds
from drivers.noise.levels import LevelMeter
from core.errors import FatalError, ReadError
from simulator.microphone import SimulatedMicrophone, sine

FS = 48_000


class ScriptedSource:
    """Hands out the given blocks (or raises the given exceptions), then None."""

    def __init__(self, items: list) -> None:
        self.items = list(items)
        self.closed = False

    def read_block(self) -> np.ndarray | None:
        if not self.items:
            return None
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.closed = True


def run_to(driver: MicrophoneDriver, seconds: int) -> None:
    assert wait_for_seconds(driver, seconds, timeout_s=30), driver.seconds_processed


def drain(driver: MicrophoneDriver) -> list:
    """Every queued second, oldest first, as the agent reads them in one tick."""
    out = []
    while (r := driver.read()) is not None:
        out.append(r)
    return out


def test_per_second_levels_near_the_requested_level() -> None:
    mic = SimulatedMicrophone(lambda t: 62.0, seed=11, duration_s=10.0, passby_rate_per_min=0)
    driver = MicrophoneDriver(mic, LevelMeter())
    try:
        assert isinstance(driver, SensorDriver) and driver.name == "noise"
        seen = []
        while driver.seconds_processed < 10 and driver.running:
            reading = driver.read()
            if reading is not None:
                seen.append(reading)
            time.sleep(0.002)  # poll like the agent would, without hogging the GIL
        run_to(driver, 10)
        final = driver.read()  # None if the loop above already took second 9
        if final is not None:
            seen.append(final)
    finally:
        driver.close()
    last = seen[-1]
    assert last.meta["second"] == 9
    for reading in seen:
        if "warming_up" in reading.flags:
            continue
        assert reading.values["laeq"] == pytest.approx(62.0, abs=0.6)
        assert reading.values["lamin"] <= reading.values["laeq"] <= reading.values["lamax"]
    assert "la10" not in last.values  # no minute yet


def test_minute_statistics_appear_after_60_s_of_audio() -> None:
    mic = SimulatedMicrophone(lambda t: 66.0, seed=1, duration_s=61.0, passby_rate_per_min=3.0)
    driver = MicrophoneDriver(mic, LevelMeter())
    try:
        run_to(driver, 61)
        readings = drain(driver)
        again = driver.read()
    finally:
        driver.close()
    assert [r.meta["second"] for r in readings] == list(range(31, 61))  # the queue's 30 newest
    with_minute = [r for r in readings if "la10" in r.values]
    assert len(with_minute) == 1 and with_minute[0].meta["second"] == 59  # the second that completes it
    reading = with_minute[0]
    v = reading.values
    assert {"la10", "la50", "la90", "laeq_1min"} <= set(v)
    assert v["la10"] >= v["la50"] >= v["la90"]
    assert v["la10"] - v["la90"] > 0.5  # pass-bys make the level move
    assert v["laeq_1min"] == pytest.approx(66.0, abs=1.5)
    assert reading.meta["minute"] == 0
    assert again is None  # nothing new since the last read


def test_minute_values_are_delivered_once_with_the_second_that_completes_the_minute() -> None:
    blocks = [sine(1000.0, 70.0, 1.0) for _ in range(62)]
    driver = MicrophoneDriver(ScriptedSource(blocks), LevelMeter())
    try:
        run_to(driver, 62)  # seconds 59 (with the minute) and 60, 61 completed unread
        readings = drain(driver)
    finally:
        driver.close()
    assert readings[-1].meta["second"] == 61
    with_minute = [r for r in readings if "laeq_1min" in r.values]
    assert [r.meta["second"] for r in with_minute] == [59]
    assert with_minute[0].values["laeq_1min"] == pytest.approx(70.0, abs=0.05)


def test_first_second_is_flagged_and_read_returns_none_when_idle() -> None:
    source = ScriptedSource([sine(1000.0, 70.0, 1.0)])
    driver = MicrophoneDriver(source, LevelMeter())
    try:
        run_to(driver, 1)
        reading = driver.read()
        assert reading is not None and "warming_up" in reading.flags
        assert driver.read() is None
    finally:
        driver.close()
    assert source.closed and not driver.running


def test_overload_flag_reaches_the_reading() -> None:
    loud = np.clip(sine(1000.0, 70.0, 2.0) * 1e3, -1.0, 1.0)
    driver = MicrophoneDriver(ScriptedSource([loud]), LevelMeter())
    try:
        run_to(driver, 2)
        reading = driver.read()
    finally:
        driver.close()
    assert reading is not None and "overload" in reading.flags


def test_recoverable_source_errors_are_counted_and_capture_continues() -> None:
    items = [sine(1000.0, 70.0, 1.0), ReadError("overrun"), sine(1000.0, 70.0, 1.0)]
    driver = MicrophoneDriver(ScriptedSource(items), LevelMeter())
    try:
        run_to(driver, 2)
        assert driver.source_errors == 1
        assert driver.read() is not None
    finally:
        driver.close()


def test_a_failing_source_surfaces_as_read_error_and_capture_goes_on() -> None:
    # Any source error but a fatal one is counted and retried (ALSA errors other than an overrun,
    # e.g. -EIO, used to stop capture for good); while there is no audio, read() says why.
    driver = MicrophoneDriver(ScriptedSource([RuntimeError("device unplugged")]), LevelMeter())
    try:
        deadline = time.monotonic() + 10
        while driver.source_errors < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(ReadError, match="capture failing"):
            driver.read()
        assert driver.running
    finally:
        driver.close()


def test_a_fatal_source_error_stops_capture_and_surfaces_as_read_error() -> None:
    driver = MicrophoneDriver(ScriptedSource([FatalError("no such device")]), LevelMeter())
    try:
        driver._thread.join(timeout=5)
        with pytest.raises(ReadError, match="capture stopped"):
            driver.read()
    finally:
        driver.close()


def test_alsa_source_without_pyalsaaudio_is_a_clear_fatal_error() -> None:
    if importlib.util.find_spec("alsaaudio") is not None:
        pytest.skip("pyalsaaudio is installed here")
    with pytest.raises(FatalError, match="pyalsaaudio"):
        AlsaSource()


def test_alsa_source_converts_s32_frames_to_float(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for the alsaaudio module: left channel = mic, right channel = junk.
    left = np.array([2**31 - 256, -(2**31), 2**30, 0, -(2**29)], dtype="<i4")
    frames = np.stack([left, np.full_like(left, 12345 << 8)], axis=1)
    reads = [(-32, b""), (len(left), frames.tobytes())]
    opened: dict = {}

    class FakePCM:
        def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
            opened.update(kwargs)

        def read(self):  # type: ignore[no-untyped-def]
            return reads.pop(0)

        def close(self) -> None:
            opened["closed"] = True

    fake = types.SimpleNamespace(
        PCM=FakePCM, PCM_CAPTURE=1, PCM_NORMAL=0, PCM_FORMAT_S32_LE=10,
        ALSAAudioError=OSError,
    )
    monkeypatch.setitem(sys.modules, "alsaaudio", fake)
    src = AlsaSource(device="hw:1", channels=2, channel=0)
    assert opened["rate"] == 48_000 and opened["format"] == 10 and opened["device"] == "hw:1"
    assert src.read_block() is None and src.overruns == 1
    block = src.read_block()
    assert block is not None and block.dtype == np.float32
    np.testing.assert_allclose(block, left / 2**31, atol=1e-7)
    assert block.max() < 1.0 and block.min() == -1.0
    src.close()
    assert opened["closed"]
