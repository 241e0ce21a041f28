"""A simulated I2S MEMS microphone: traffic-like noise at a level that follows a schedule.

:class:`SimulatedMicrophone` implements the ``drivers.noise.capture.BlockSource`` protocol.
Its A-weighted level follows ``level_db_fn(t)`` (t = seconds of audio since start; the van's
route and time of day will drive it), with occasional vehicle pass-bys on top.  It is
calibrated analytically, so a correctly calibrated meter reads about the requested level:

* the spectrum is white noise shaped towards low-mid frequencies (two 40 Hz high-pass and
  600 Hz / 4 kHz low-pass poles), roughly the shape of road-traffic noise;
* the A-weighted gain of that shaping is computed once by integrating |S(f)|² 10^(A(f)/10);
* pass-bys are intensity bumps I_peak / (1 + ((t - t0)/w)²) (a point source passing at
  constant speed); the background is lowered by their expected energy share, so the
  *long-term* LAeq equals the requested level while single seconds go up and down;
* microphone self-noise (white, at ``self_noise_db`` dB(A)) is added, and samples clip at
  full scale like a real microphone.

:func:`sine` and :func:`pink_noise` are pure generators for tests and calibration;
:class:`CalibratorTone` is a 94 dB / 1 kHz acoustic calibrator seated on a microphone whose
real sensitivity is off its data sheet by ``sensitivity_error_db`` (what calibration fixes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from drivers.noise.levels import rms_at_94db
from drivers.noise.weighting import SosFilter, a_weighting_db, sos_response

# Pass-by bumps are cut at +/- this many half-widths (the Lorentzian tail beyond is tiny).
_BUMP_SPAN = 10.0


def level_to_rms(level_db: float, sensitivity_dbfs: float = -26.0) -> float:
    """Full-scale rms of a signal at ``level_db`` SPL for a mic of this sensitivity."""
    return rms_at_94db(sensitivity_dbfs) * 10.0 ** ((level_db - 94.0) / 20.0)


def sine(
    freq_hz: float,
    level_db: float,
    duration_s: float,
    *,
    sample_rate: int = 48_000,
    sensitivity_dbfs: float = -26.0,
    phase: float = 0.0,
) -> NDArray[np.float64]:
    """A pure tone whose (unweighted) sound pressure level is ``level_db``."""
    t = np.arange(int(round(duration_s * sample_rate))) / sample_rate
    amp = math.sqrt(2.0) * level_to_rms(level_db, sensitivity_dbfs)
    return amp * np.sin(2.0 * math.pi * freq_hz * t + phase)


def pink_noise(
    level_db: float,
    duration_s: float,
    *,
    sample_rate: int = 48_000,
    seed: int = 0,
    sensitivity_dbfs: float = -26.0,
    f_lo: float = 20.0,
    f_hi: float = 20_000.0,
) -> NDArray[np.float64]:
    """Pink noise (equal energy per octave) in ``f_lo..f_hi`` at unweighted level ``level_db``.

    Built in the frequency domain with an exact 1/f power spectrum and random phases, so
    its band energies are deterministic (only the waveform is random).
    """
    n = int(round(duration_s * sample_rate))
    rng = np.random.default_rng(seed)
    f = np.fft.rfftfreq(n, 1.0 / sample_rate)
    mag = np.zeros_like(f)
    band = (f >= f_lo) & (f <= f_hi)
    mag[band] = 1.0 / np.sqrt(f[band])
    spec = mag * np.exp(2j * math.pi * rng.random(len(f)))
    x = np.fft.irfft(spec, n)
    return x * (level_to_rms(level_db, sensitivity_dbfs) / np.sqrt(np.mean(x * x)))


def _one_pole_lowpass(fc: float, fs: float) -> list[float]:
    p = math.exp(-2.0 * math.pi * fc / fs)
    return [1.0 - p, 0.0, 0.0, 1.0, -p, 0.0]


def _one_pole_highpass(fc: float, fs: float) -> list[float]:
    p = math.exp(-2.0 * math.pi * fc / fs)
    g = (1.0 + p) / 2.0  # unity gain at Nyquist
    return [g, -g, 0.0, 1.0, -p, 0.0]


def _a_weighted_gain(sos: NDArray[np.float64] | None, fs: float) -> float:
    """A-weighted mean square of unit-variance white noise passed through ``sos``."""
    f = np.linspace(0.0, fs / 2.0, 200_001)[1:]
    w = 10.0 ** (a_weighting_db(f) / 10.0)
    if sos is not None:
        w = w * np.abs(sos_response(sos, f, fs)) ** 2
    # Two-sided PSD of unit white noise is 1/fs per Hz: mean square = (2/fs) ∫_0^{fs/2} ...
    return float(np.sum(w) * (f[1] - f[0]) * 2.0 / fs)


class SimulatedMicrophone:
    """Block source of traffic-like noise whose A-weighted level follows ``level_db_fn(t)``.

    ``t`` is seconds of audio since start.  ``duration_s`` ends the stream (``read_block``
    then returns None); ``realtime`` paces blocks at the wall clock like real hardware: each
    is returned when its last sample would have been captured, ``wall_start`` (the real
    monotonic time of the first call) plus its end in the stream.
    """

    def __init__(
        self,
        level_db_fn: Callable[[float], float],
        sample_rate: int = 48_000,
        seed: int = 0,
        *,
        block_s: float = 0.1,
        sensitivity_dbfs: float = -26.0,
        self_noise_db: float | None = 29.0,
        passby_rate_per_min: float = 1.5,
        passby_excess_db: tuple[float, float] = (2.0, 6.0),
        passby_halfwidth_s: tuple[float, float] = (0.6, 1.5),
        duration_s: float | None = None,
        realtime: bool = False,
    ) -> None:
        self.level_db_fn = level_db_fn
        self.sample_rate = sample_rate
        self.block = max(1, int(round(block_s * sample_rate)))
        self.sensitivity_dbfs = sensitivity_dbfs
        self.self_noise_db = self_noise_db
        self.duration_samples = None if duration_s is None else int(duration_s * sample_rate)
        self.realtime = realtime
        self._rng = np.random.default_rng(seed)
        fs = float(sample_rate)
        sos = np.array(
            [
                _one_pole_highpass(40.0, fs),
                _one_pole_highpass(40.0, fs),
                _one_pole_lowpass(600.0, fs),
                _one_pole_lowpass(4000.0, fs),
            ]
        )
        self._shaper = SosFilter(sos, max_block=self.block)
        self._shaped_gain = _a_weighted_gain(sos, fs)
        self._white_gain = _a_weighted_gain(None, fs)
        # Pass-bys: Poisson arrivals; intensity bump relative to the level at arrival.
        self._rate_per_s = passby_rate_per_min / 60.0
        self._excess_db = passby_excess_db
        self._halfwidth_s = passby_halfwidth_s
        lo, hi = passby_excess_db
        mean_factor = (
            10.0 ** (lo / 10.0)
            if hi == lo
            else (10.0 ** (hi / 10.0) - 10.0 ** (lo / 10.0)) / ((hi - lo) * math.log(10.0) / 10.0)
        )
        mean_width = sum(passby_halfwidth_s) / 2.0
        share = self._rate_per_s * mean_factor * mean_width * 2.0 * math.atan(_BUMP_SPAN)
        if share >= 0.9:
            raise ValueError("pass-bys would carry more than 90 % of the energy; lower the rate")
        self._background_share = 1.0 - share
        self._bumps: list[tuple[float, float, float]] = []  # (centre s, half-width s, I_peak)
        self._next_centre = self._draw_gap() if self._rate_per_s > 0 else math.inf
        self._emitted = 0
        self._wall_start: float | None = None

    def read_all(self) -> NDArray[np.float32]:
        """The rest of a finite stream as one array (tests; needs ``duration_s``)."""
        if self.duration_samples is None:
            raise ValueError("read_all needs a finite stream (duration_s)")
        blocks = []
        while (block := self.read_block()) is not None:
            blocks.append(block)
        return np.concatenate(blocks) if blocks else np.empty(0, dtype=np.float32)

    def _draw_gap(self) -> float:
        return float(self._rng.exponential(1.0 / self._rate_per_s))

    def _intensity(self, t: float) -> float:
        return 10.0 ** (float(self.level_db_fn(t)) / 10.0)

    def read_block(self) -> NDArray[np.float32] | None:
        n = self.block
        if self.duration_samples is not None:
            n = min(n, self.duration_samples - self._emitted)
            if n <= 0:
                return None
        if self.realtime:
            self._pace(n)
        fs = self.sample_rate
        t0 = self._emitted / fs
        t = t0 + np.arange(n) / fs
        t_end = t0 + n / fs
        # Requested intensity, linear across the block (level_db_fn is called twice a block).
        i0, i1 = self._intensity(t0), self._intensity(t_end)
        target = i0 + (i1 - i0) * (t - t0) / (t_end - t0)
        total = self._background_share * target
        # Schedule pass-bys whose bump starts before this block ends.
        lo_w, hi_w = self._halfwidth_s
        while self._next_centre - _BUMP_SPAN * hi_w < t_end:
            c = self._next_centre
            w = float(self._rng.uniform(lo_w, hi_w))
            excess = float(self._rng.uniform(*self._excess_db))
            self._bumps.append((c, w, self._intensity(max(c, 0.0)) * 10.0 ** (excess / 10.0)))
            self._next_centre += self._draw_gap()
        for c, w, peak in self._bumps:
            span = (t > c - _BUMP_SPAN * w) & (t < c + _BUMP_SPAN * w)
            if span.any():
                u = (t[span] - c) / w
                total[span] += peak / (1.0 + u * u)
        self._bumps = [b for b in self._bumps if b[0] + _BUMP_SPAN * b[1] > t_end]
        # total is in intensity re the 94 dB reference once divided by 10^9.4.
        rms94 = rms_at_94db(self.sensitivity_dbfs)
        amp = rms94 * np.sqrt(total / 10.0**9.4 / self._shaped_gain)
        x = self._shaper.process(self._rng.standard_normal(n)) * amp
        if self.self_noise_db is not None:
            floor_rms = level_to_rms(self.self_noise_db, self.sensitivity_dbfs)
            x += self._rng.standard_normal(n) * (floor_rms / math.sqrt(self._white_gain))
        self._emitted += n
        return np.clip(x, -1.0, 1.0).astype(np.float32)

    def _pace(self, n: int) -> None:
        # Like a capture device, a block is handed out once its last sample is in: sample i of
        # the stream was heard at wall_start + i / sample_rate.
        now = time.monotonic()
        if self._wall_start is None:
            self._wall_start = now
        due = self._wall_start + (self._emitted + n) / self.sample_rate
        if due > now:
            time.sleep(due - now)

    @property
    def started_at(self) -> float | None:
        """With ``realtime``: the monotonic time sample 0 was heard (the first ``read_block``)."""
        return self._wall_start

    def close(self) -> None:
        """Nothing to release; present for symmetry with real sources."""


class CalibratorTone:
    """A block source: an acoustic calibrator's tone on a microphone that reads off.

    The microphone's real sensitivity is ``sensitivity_dbfs + sensitivity_error_db`` while
    the meter is configured with the data sheet's ``sensitivity_dbfs``, so an uncalibrated
    meter reads ``level_db + sensitivity_error_db`` (94 dB reads 92.7 dB at -1.3 dB). A little
    self-noise (30 dB) keeps it from being a mathematically pure tone.
    """

    def __init__(self, freq_hz: float = 1000.0, level_db: float = 94.0, sensitivity_dbfs: float = -26.0, *,
                 sensitivity_error_db: float = 0.0, sample_rate: int = 48_000, block_s: float = 0.1,
                 seed: int = 3, speed: float | None = None) -> None:
        self.freq_hz, self.level_db = freq_hz, level_db
        # speed: audio paced at this many times real time (None: as fast as it is read), so a
        # capture thread reading it does not spin a core.
        self.speed = speed
        self._wall_start: float | None = None
        self.sensitivity_dbfs = sensitivity_dbfs + sensitivity_error_db  # what the capsule really does
        self.sample_rate = sample_rate
        self.block = int(block_s * sample_rate)
        self._n = 0
        self._rng = np.random.default_rng(seed)

    def read_block(self) -> NDArray[np.float32]:
        if self.speed:
            now = time.monotonic()
            if self._wall_start is None:
                self._wall_start = now
            due = self._wall_start + self._n / self.sample_rate / self.speed
            if due > now:
                time.sleep(due - now)
        phase = 2.0 * math.pi * self.freq_hz * self._n / self.sample_rate
        x = sine(self.freq_hz, self.level_db, self.block / self.sample_rate, sample_rate=self.sample_rate,
                 sensitivity_dbfs=self.sensitivity_dbfs, phase=phase)
        x = x + self._rng.normal(0.0, level_to_rms(30.0, self.sensitivity_dbfs), len(x))
        self._n += self.block
        return x.astype(np.float32)

    def close(self) -> None:
        """Nothing to release."""
