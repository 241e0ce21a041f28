"""LevelMeter: levels, time weightings, statistics, flags, calibration, and no audio escapes."""

from __future__ import annotations

import builtins
import math
import os
from pathlib import Path

import numpy as np
import pytest

from drivers.noise.capture import MicrophoneDriver, wait_for_seconds
from drivers.noise.levels import (
    FAST_TAU_S,
    SLOW_TAU_S,
    ExponentialAverager,
    LevelMeter,
    MeterConfig,
    MinuteLevels,
    SecondLevels,
    measure_calibrator,
)
from drivers.noise.weighting import a_weighting_db
from core.errors import ConfigError
from simulator.microphone import SimulatedMicrophone, level_to_rms, pink_noise, sine
from tests.test_noise_weighting import CLASS1_LIMITS, exact_frequency

FS = 48_000


def seconds(records: list) -> list[SecondLevels]:
    return [r for r in records if isinstance(r, SecondLevels)]


def minutes(records: list) -> list[MinuteLevels]:
    return [r for r in records if isinstance(r, MinuteLevels)]


def energy_mean_db(levels: list[float]) -> float:
    return 10.0 * math.log10(float(np.mean([10.0 ** (v / 10.0) for v in levels])))


@pytest.mark.parametrize("nominal", sorted(CLASS1_LIMITS))
def test_tone_reads_level_plus_a_weighting(nominal: float) -> None:
    f = exact_frequency(nominal)
    level = 80.0
    secs = seconds(LevelMeter().process(sine(f, level, 2.0)))
    assert len(secs) == 2 and secs[0].settling and not secs[1].settling
    deviation = secs[1].laeq - (level + a_weighting_db(f))
    upper, lower = CLASS1_LIMITS[nominal]
    assert lower <= deviation <= upper
    assert abs(deviation) < 0.15


def test_94db_1khz_calibrator_reads_94_after_calibration() -> None:
    # The real microphone is 1.3 dB more sensitive than its datasheet's -26 dBFS.
    true_sens = -24.7
    calibrator = sine(1000.0, 94.0, 3.0, sensitivity_dbfs=true_sens)
    nominal = MeterConfig(sensitivity_dbfs=-26.0)
    before = seconds(LevelMeter(nominal).process(calibrator))[-1].laeq
    assert before == pytest.approx(95.3, abs=0.1)
    offset = measure_calibrator(calibrator, nominal)
    calibrated = MeterConfig(sensitivity_dbfs=-26.0, calibration_offset_db=offset)
    after = seconds(LevelMeter(calibrated).process(sine(1000.0, 94.0, 3.0, sensitivity_dbfs=true_sens, phase=1.0)))
    for sec in after[1:]:
        assert sec.laeq == pytest.approx(94.0, abs=0.1)
    # Linear over level: a 64 dB tone then reads 64.0.
    quiet = seconds(LevelMeter(calibrated).process(sine(1000.0, 64.0, 2.0, sensitivity_dbfs=true_sens)))
    assert quiet[-1].laeq == pytest.approx(64.0, abs=0.1)


def test_nominal_sensitivity_puts_a_full_scale_sine_at_120db() -> None:
    # -26 dBFS at 94 dB SPL: full scale (0 dBFS sine, peak 1.0) is 94 + 26 = 120 dB.
    x = np.sin(2 * np.pi * 1000.0 * np.arange(2 * FS) / FS) * 0.999
    sec = seconds(LevelMeter(MeterConfig(overload_threshold=1.0)).process(x))[-1]
    assert sec.laeq == pytest.approx(120.0 + 20 * math.log10(0.999), abs=0.05)


def test_pink_noise_gives_its_a_weighted_level() -> None:
    level = 70.0
    # Independent expectation: integrate the A-weighting formula over a 1/f spectrum.
    f = np.geomspace(20.0, 20_000.0, 20_001)
    lnf = np.log(f)
    weighted = np.trapezoid(10.0 ** (a_weighting_db(f) / 10.0), lnf) / (lnf[-1] - lnf[0])
    expected = level + 10.0 * math.log10(weighted)
    assert expected == pytest.approx(67.1, abs=0.3)  # sanity: about -3 dB for pink noise
    secs = seconds(LevelMeter().process(pink_noise(level, 6.0, seed=3)))
    measured = energy_mean_db([s.laeq for s in secs[1:]])
    assert measured == pytest.approx(expected, abs=0.15)


def test_exponential_averager_decay_rates_fast_and_slow() -> None:
    for tau, rate in ((FAST_TAU_S, 34.74), (SLOW_TAU_S, 4.343)):
        avg = ExponentialAverager(tau, FS)
        avg.process(np.ones(FS * 8))  # settled at 1.0
        y = avg.process(np.zeros(FS))  # the signal stops
        level = 10 * np.log10(y)
        slope = (level[int(0.9 * FS)] - level[int(0.1 * FS)]) / 0.8
        assert slope == pytest.approx(-rate, rel=0.002)


def test_exponential_averager_rise_follows_one_minus_exp() -> None:
    avg = ExponentialAverager(FAST_TAU_S, FS)
    avg.process(np.zeros(100))
    y = avg.process(np.ones(FS))
    for t in (0.05, 0.125, 0.3):
        assert y[int(t * FS) - 1] == pytest.approx(1 - math.exp(-t / FAST_TAU_S), rel=1e-3)


def test_meter_follows_a_level_step_with_fast_and_slow() -> None:
    hi, lo = 90.0, 40.0
    # 6 s high so that SLOW (which starts from rest) has settled to within 0.01 dB.
    x = np.concatenate([sine(1000.0, hi, 6.0), sine(1000.0, lo, 2.0)])
    secs = seconds(LevelMeter().process(x))
    after = secs[6]  # the first second after the step down

    def decayed(t: float, tau: float) -> float:
        w = math.exp(-t / tau)
        return 10 * math.log10(10 ** (hi / 10) * w + 10 ** (lo / 10) * (1 - w))

    assert after.lafmax == pytest.approx(hi, abs=0.05)
    assert after.lafmin == pytest.approx(decayed(1.0, FAST_TAU_S), abs=0.2)  # ~55.4
    assert after.las == pytest.approx(decayed(1.0, SLOW_TAU_S), abs=0.05)  # ~85.7
    assert secs[7].lafmin == pytest.approx(lo, abs=0.2)
    assert secs[5].lasmax == pytest.approx(hi, abs=0.05)
    assert secs[0].settling and secs[0].las < hi - 1.0  # SLOW still rising in second 0


def _record_tuple(records: list) -> list[tuple]:
    return [tuple(getattr(r, f) for f in r.__slots__) for r in records]


def test_one_block_or_many_small_blocks_give_the_same_records() -> None:
    mic = SimulatedMicrophone(lambda t: 60.0 + 5 * math.sin(t), seed=5, duration_s=3.0)
    x = mic.read_all()
    whole = LevelMeter().process(x)
    rng = np.random.default_rng(1)
    meter, parts, i = LevelMeter(), [], 0
    while i < len(x):
        n = int(rng.integers(1, 3000))
        parts += meter.process(x[i : i + n])
        i += n
    tiny_meter, tiny = LevelMeter(), []
    for i in range(0, 2 * FS, 37):
        tiny += tiny_meter.process(x[i : min(i + 37, 2 * FS)])
    assert len(whole) == 3 and len(parts) == 3
    np.testing.assert_allclose(
        np.array(_record_tuple(parts), dtype=float), np.array(_record_tuple(whole), dtype=float),
        rtol=0, atol=1e-9,
    )
    np.testing.assert_allclose(
        np.array(_record_tuple(tiny), dtype=float), np.array(_record_tuple(whole[:2]), dtype=float),
        rtol=0, atol=1e-9,
    )


def test_minute_statistics_for_a_three_level_signal() -> None:
    # 12 s at 80 dB, 30 s at 70 dB, 18 s at 60 dB: 20 % / 50 % / 30 % of the minute.
    x = np.concatenate([sine(1000.0, 80.0, 12), sine(1000.0, 70.0, 30), sine(1000.0, 60.0, 18)])
    records = LevelMeter().process(x)
    (minute,) = minutes(records)
    assert len(seconds(records)) == 60
    assert minute.la10 >= minute.la50 >= minute.la90
    assert minute.la10 == pytest.approx(80.0, abs=0.1)
    assert minute.la50 == pytest.approx(70.0, abs=0.1)
    assert minute.la90 == pytest.approx(60.0, abs=0.1)
    # Energy average, not arithmetic (which would be 69 dB).
    expected = 10 * math.log10(0.2 * 1e8 + 0.5 * 1e7 + 0.3 * 1e6)
    assert minute.laeq == pytest.approx(expected, abs=0.05)
    assert minute.lafmax == pytest.approx(80.0, abs=0.05)
    assert minute.lafmin == pytest.approx(60.0, abs=0.1)


def test_overload_flag_marks_only_the_clipping_second() -> None:
    x = sine(1000.0, 80.0, 3.0)
    x[FS + 100 : FS + 200] = 1.0  # a clipped burst in second 1
    secs = seconds(LevelMeter().process(x))
    assert [s.overload for s in secs] == [False, True, False]
    loud = seconds(LevelMeter().process(np.clip(3.0 * np.sin(np.arange(FS) * 0.1), -1, 1)))
    assert loud[0].overload


def test_noise_floor_flag() -> None:
    cfg = MeterConfig(noise_floor_db=29.0)
    quiet = seconds(LevelMeter(cfg).process(sine(1000.0, 25.0, 2.0)))[-1]
    normal = seconds(LevelMeter(cfg).process(sine(1000.0, 60.0, 2.0)))[-1]
    assert quiet.noise_floor and not normal.noise_floor
    silent = seconds(LevelMeter(cfg).process(np.zeros(FS)))[0]
    assert silent.noise_floor and math.isfinite(silent.laeq)


def test_config_from_mapping_validates() -> None:
    cfg = MeterConfig.from_mapping({"sensitivity_dbfs": "-26", "calibration_offset_db": 0.4})
    assert cfg.sensitivity_dbfs == -26.0 and cfg.calibration_offset_db == 0.4
    with pytest.raises(ConfigError):
        MeterConfig.from_mapping({"sensitivity_dbfs": "loud"})
    with pytest.raises(ConfigError):
        MeterConfig(sample_rate=16_000)
    assert level_to_rms(94.0) == pytest.approx(10 ** (-26 / 20) / math.sqrt(2))


def test_driver_writes_no_files_and_readings_hold_only_levels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    writes: list[tuple] = []
    real_open = builtins.open

    def spy_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(c in mode for c in "wax+"):
            writes.append((file, mode))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    mic = SimulatedMicrophone(lambda t: 65.0, seed=2, duration_s=62.0)
    driver = MicrophoneDriver(mic, LevelMeter())
    try:
        assert wait_for_seconds(driver, 61, timeout_s=30)
        reading = driver.read()
    finally:
        driver.close()
    assert writes == []
    assert os.listdir(tmp_path) == []
    assert reading is not None and reading.sensor == "noise"
    assert type(reading.meta.pop("measured_mono")) is float  # when its second ended: a scalar, no audio
    allowed = {"laeq", "lamax", "lamin", "la10", "la50", "la90", "laeq_1min"}
    assert set(reading.values) <= allowed and {"laeq", "lamax", "lamin"} <= set(reading.values)
    for value in reading.values.values():
        assert type(value) is float and 0.0 < value < 140.0  # a level, not samples
    # audio_gap: read once after 61 s, the 60 seconds before were never read (and say so)
    assert set(reading.flags) <= {"overload", "noise_floor", "warming_up", "audio_gap"}
    assert all(isinstance(v, int) for v in reading.meta.values())
