"""Sound level meter: A-weighted LAeq, FAST/SLOW time weighting and percentile levels.

:class:`LevelMeter` is fed float sample blocks (full scale ±1.0) of any length and emits
small typed records, never audio:

* :class:`SecondLevels` every second of audio: LAeq,1s, LAFmax, LAFmin, LASmax, LAS at the
  end of the second, and flags (overload, noise floor, settling);
* :class:`MinuteLevels` every 60 s: LAeq,1min (energy average), LA10/LA50/LA90 from the FAST
  level sampled every 0.1 s (600 values; 595 in the first minute, whose first 0.5 s the
  FAST level spends rising from rest), LAFmax/LAFmin of the minute.

Levels: L = 94 dB + 20 log10(rms / rms_at_94) + calibration offset, where rms_at_94 follows
from the microphone sensitivity in dBFS at 94 dB SPL.  dBFS here is relative to a full-scale
*sine* (peak 1.0, rms 1/√2), the convention of I2S MEMS microphone datasheets; with the
ICS-43434's -26 dBFS a full-scale sine is 120 dB SPL, its rated acoustic overload point.

Time keeping is by sample count, not by wall clock: a "second" is ``sample_rate`` samples
however the audio arrived, so results do not depend on block sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from core.errors import ConfigError

from .weighting import SosFilter, design_a_weighting

FAST_TAU_S = 0.125
SLOW_TAU_S = 1.0
REFERENCE_SPL_DB = 94.0
# A reading equal to the self-noise floor + 3 dB means the true level is at or below the floor.
_FLOOR_MARGIN_DB = 10.0 * math.log10(2.0)
# Mean-square floor before taking logs, so silence gives a very low number instead of -inf.
_MS_FLOOR = 1e-20


def rms_at_94db(sensitivity_dbfs: float) -> float:
    """Full-scale-relative rms of a 94 dB SPL tone for a mic of this sensitivity (dBFS)."""
    return 10.0 ** (sensitivity_dbfs / 20.0) / math.sqrt(2.0)


def calibration_offset(
    measured_db: float, reference_db: float = REFERENCE_SPL_DB, current_offset_db: float = 0.0
) -> float:
    """New calibration offset after reading ``measured_db`` on a ``reference_db`` calibrator."""
    return current_offset_db + (reference_db - measured_db)


@dataclass(frozen=True, slots=True)
class MeterConfig:
    """What the meter needs from configuration (``[noise]`` section)."""

    sample_rate: int = 48_000
    #: dBFS at 94 dB SPL (datasheet: ICS-43434 -26, INMP441 -26, SPH0645 -26).
    sensitivity_dbfs: float = -26.0
    #: dB added to every level; set from an acoustic calibrator (94.0 dB, 1 kHz).
    calibration_offset_db: float = 0.0
    #: microphone self-noise in dB(A) (ICS-43434: 94 - SNR 65 = 29 dB(A)).
    noise_floor_db: float = 29.0
    #: |sample| at or above this fraction of full scale counts as overload (clipping).
    overload_threshold: float = 0.99

    def __post_init__(self) -> None:
        if int(self.sample_rate) != self.sample_rate or self.sample_rate % 10:
            raise ConfigError("noise.sample_rate", "must be an integer multiple of 10 Hz")
        if self.sample_rate < 44_000:
            raise ConfigError("noise.sample_rate", "A-weighting needs >= 44 kHz")
        if not -80.0 <= self.sensitivity_dbfs <= 0.0:
            raise ConfigError("noise.sensitivity_dbfs", "expected -80..0 dBFS")
        if not -20.0 <= self.calibration_offset_db <= 20.0:
            raise ConfigError("noise.calibration_offset_db", "expected -20..+20 dB")
        if not 0.0 < self.overload_threshold <= 1.0:
            raise ConfigError("noise.overload_threshold", "expected 0 < x <= 1")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> MeterConfig:
        """Build from a config mapping; unknown keys are ignored, bad types raise ConfigError."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in cfg:
                try:
                    kwargs[f.name] = (int if f.name == "sample_rate" else float)(cfg[f.name])
                except (TypeError, ValueError):
                    raise ConfigError(f"noise.{f.name}", f"not a number: {cfg[f.name]!r}") from None
        return cls(**kwargs)

    @property
    def db_offset(self) -> float:
        """L = 10 log10(mean square) + db_offset."""
        return (
            REFERENCE_SPL_DB
            - 20.0 * math.log10(rms_at_94db(self.sensitivity_dbfs))
            + self.calibration_offset_db
        )


@dataclass(frozen=True, slots=True)
class SecondLevels:
    """Levels of one second of audio, dB re 20 µPa."""

    index: int  # 0-based second since the meter started
    laeq: float
    lafmax: float
    lafmin: float
    lasmax: float
    las: float  # SLOW level at the end of the second
    overload: bool
    noise_floor: bool
    settling: bool  # first second: filters started from rest (LAS still rising)


@dataclass(frozen=True, slots=True)
class MinuteLevels:
    """Statistics of one minute (60 SecondLevels), dB re 20 µPa."""

    index: int
    laeq: float  # LAeq,1min, energy average
    la10: float
    la50: float
    la90: float
    lafmax: float
    lafmin: float
    overload: bool
    noise_floor: bool


MeterRecord = SecondLevels | MinuteLevels


class ExponentialAverager:
    """Exponential time weighting of a mean-square signal: y' = (x - y) / tau, per sample.

    Discretised as y[n] = a y[n-1] + (1-a) x[n] with a = exp(-1/(fs tau)), starting at 0.  A block is done
    without a Python loop: y[n] = a^n (a y[-1] + (1-a) Σ_{k<=n} a^-k x[k]).  Blocks are cut
    so a^-k stays small (<= e^(chunk/(fs tau))) and the cumulative sum keeps its precision.
    """

    def __init__(self, tau_s: float, sample_rate: int, max_chunk: int = 4800) -> None:
        self.alpha = math.exp(-1.0 / (sample_rate * tau_s))
        self.max_chunk = max_chunk
        k = np.arange(max_chunk, dtype=np.float64)
        self._pow = self.alpha**k
        self._inv = (1.0 - self.alpha) * self.alpha ** (-k)
        self.value = 0.0  # starts from rest, like an analogue meter switched on

    def process(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """Weighted values for each sample of ``x`` (mean-square units)."""
        if len(x) == 0:
            return np.empty(0)
        out = np.empty(len(x))
        for i in range(0, len(x), self.max_chunk):
            seg = x[i : i + self.max_chunk]
            n = len(seg)
            y = self._pow[:n] * (self.alpha * self.value + np.cumsum(self._inv[:n] * seg))
            out[i : i + n] = y
            self.value = float(y[-1])
        return out


class LevelMeter:
    """A-weighted sound level meter over a stream of float sample blocks.

    ``process(block)`` returns the records completed by that block (often none).  State
    (filter, time weightings, partial second and minute) carries across calls, so one big
    block and many small ones give the same records.
    """

    def __init__(self, config: MeterConfig | None = None) -> None:
        self.config = config or MeterConfig()
        fs = self.config.sample_rate
        self._slot = fs // 10  # 0.1 s: the sampling interval of the FAST level for Ln
        self._filter = SosFilter(design_a_weighting(fs), max_block=self._slot)
        self._fast = ExponentialAverager(FAST_TAU_S, fs, max_chunk=self._slot)
        self._slow = ExponentialAverager(SLOW_TAU_S, fs, max_chunk=self._slot)
        self._offset = self.config.db_offset
        self._settle = fs // 2  # samples: 4 FAST time constants
        self._floor = self.config.noise_floor_db + _FLOOR_MARGIN_DB
        self.samples_processed = 0
        self._second_index = 0
        self._minute_index = 0
        self._reset_second()
        self._minute: list[SecondLevels] = []
        self._minute_energy = 0.0
        self._fast_samples: list[float] = []

    # -- public -------------------------------------------------------------------------

    @property
    def seconds_completed(self) -> int:
        return self._second_index

    def level(self, mean_square: float) -> float:
        """dB re 20 µPa of an (A-weighted) mean square in full-scale units."""
        return 10.0 * math.log10(max(mean_square, _MS_FLOOR)) + self._offset

    def process(self, block: ArrayLike) -> list[MeterRecord]:
        """Feed the next samples (full scale ±1.0); return the records they complete."""
        x = np.asarray(block, dtype=np.float64).ravel()
        records: list[MeterRecord] = []
        i = 0
        while i < len(x):
            # Cut at 0.1 s boundaries of the stream so the Ln sampling grid and the
            # second boundaries do not depend on how the audio was blocked.
            take = min(len(x) - i, self._slot - self._pos_in_slot)
            self._piece(x[i : i + take], records)
            i += take
        return records

    # -- internals ----------------------------------------------------------------------

    def _reset_second(self) -> None:
        self._pos_in_slot = 0
        self._slots_done = 0
        self._energy = 0.0
        self._fmax = 0.0
        self._fmin = math.inf
        self._smax = 0.0
        self._overload = False

    def _piece(self, x: NDArray[np.float64], records: list[MeterRecord]) -> None:
        if np.max(np.abs(x)) >= self.config.overload_threshold:
            self._overload = True
        y = self._filter.process(x)
        e = y * y
        self._energy += float(np.sum(e))
        fast = self._fast.process(e)
        slow = self._slow.process(e)
        self._fmax = max(self._fmax, float(fast.max()))
        self._smax = max(self._smax, float(slow.max()))
        start = self.samples_processed
        self.samples_processed += len(x)
        # The FAST level rises from rest: leave its first 0.5 s (-0.08 dB by then) out of
        # LAFmin and of the Ln samples.  Counted in samples so blocking does not matter.
        settled_from = self._settle - start
        if settled_from < len(x):
            self._fmin = min(self._fmin, float(fast[max(settled_from, 0) :].min()))
        self._pos_in_slot += len(x)
        if self._pos_in_slot < self._slot:
            return
        self._pos_in_slot = 0
        if self.samples_processed > self._settle:
            self._fast_samples.append(float(fast[-1]))
        self._slots_done += 1
        if self._slots_done == 10:
            records.extend(self._finish_second())

    def _finish_second(self) -> list[MeterRecord]:
        fs = self.config.sample_rate
        laeq = self.level(self._energy / fs)
        sec = SecondLevels(
            index=self._second_index,
            laeq=laeq,
            lafmax=self.level(self._fmax),
            lafmin=self.level(self._fmin if math.isfinite(self._fmin) else self._fmax),
            lasmax=self.level(self._smax),
            las=self.level(self._slow.value),
            overload=self._overload,
            noise_floor=laeq < self._floor,
            settling=self._second_index == 0,
        )
        self._minute_energy += self._energy / fs
        self._minute.append(sec)
        self._second_index += 1
        self._reset_second()
        out: list[MeterRecord] = [sec]
        if len(self._minute) == 60:
            out.append(self._finish_minute())
        return out

    def _finish_minute(self) -> MinuteLevels:
        secs = self._minute
        fast_db = np.array([self.level(v) for v in self._fast_samples])
        # Ln is the level exceeded n % of the time: the (100 - n)th percentile.
        la10, la50, la90 = (float(v) for v in np.percentile(fast_db, [90.0, 50.0, 10.0]))
        laeq = self.level(self._minute_energy / len(secs))
        rec = MinuteLevels(
            index=self._minute_index,
            laeq=laeq,
            la10=la10,
            la50=la50,
            la90=la90,
            lafmax=max(s.lafmax for s in secs),
            lafmin=min(s.lafmin for s in secs),
            overload=any(s.overload for s in secs),
            noise_floor=laeq < self._floor,
        )
        self._minute_index += 1
        self._minute = []
        self._minute_energy = 0.0
        self._fast_samples = []
        return rec


def measure_calibrator(
    samples: ArrayLike, config: MeterConfig | None = None, reference_db: float = REFERENCE_SPL_DB
) -> float:
    """Calibration offset (dB) that makes ``samples`` of a calibrator tone read ``reference_db``.

    Uses the LAeq over whole seconds after the first (settling) one, so give >= 2 s.
    At 1 kHz A-weighting is 0 dB, so the A-weighted reading is the calibrator level.
    """
    cfg = config or MeterConfig()
    meter = LevelMeter(cfg)
    secs = [r for r in meter.process(samples) if isinstance(r, SecondLevels) and not r.settling]
    if not secs:
        raise ValueError("calibration needs at least 2 s of audio")
    measured = 10.0 * math.log10(float(np.mean([10.0 ** (s.laeq / 10.0) for s in secs])))
    return calibration_offset(measured, reference_db, cfg.calibration_offset_db)
