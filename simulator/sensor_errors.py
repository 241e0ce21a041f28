"""Sensor, position and clock error models of realistic size, for the simulated vans.

The world (:mod:`simulator.environment`) is the truth; these models turn it into what a
van's devices report. Every parameter's size and its source are listed in
docs/fidelity.md ("Error models"). In short:

* PM: hygroscopic growth by kappa-Koehler theory (Crilley et al. 2018, AMT 11, 709;
  kappa of urban PM2.5 0.15-0.29 and of the coarse fraction 0.05-0.13, Huang et al.
  2024, AMT 17, 6073), unit-to-unit gain, per-reading scatter, spikes, 65535
  sentinels and stuck runs;
* NO2 (Alphasense B43F): field gain against the sheet, zero offset, the zero's
  temperature dependence left after the sheet's n_T correction (AAN 803), zero drift
  (B4-series datasheets: up to 20 ppb/year), ozone cross-sensitivity through the O3
  filter, spikes;
* noise: MEMS microphone sensitivity offset (ICS-43434: +-1 dB);
* RH and temperature of the BME280 beside them (+-3 %RH, +-1 degC);
* GPS: 5 m (2D RMS) first-order Gauss-Markov position noise, no fix in street canyons
  (the route's ``gps_blocked`` stretches) and before the first fix of a shift;
* clock: with time alignment (shipped) the agent's real ``TimeKeeper`` stamps every
  reading from the meta the drivers give (:func:`agent_stamps`); without it, GPS fixes
  stamped early by the agent's tick phase and sound levels 0.5-1.5 s late (issue 15's
  measurements of the old agent, :func:`stamp_errors`);
* NO2's raw electrode millivolts for what the cell reads (:func:`no2_electrodes`), and
  the co-location fit as a calibration record's values (:meth:`CalibrationFit.no2_record_values`).

Everything is numpy over one van-day at once and deterministic for its seed. The
calibration a technician would make (a co-location, a 94 dB calibrator) is simulated
too (:class:`CalibrationFit`): the fitted parameters carry the fit's own error, so
switching the correction on does not give the truth back for free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from core.no2_sheet import N_T, TABLE_TEMPS_C, No2Calibration
from core.calibration import no2_values_from_sheet
from core.clock import SimClock
from core.sample import TimeSource
from core.timekeeping import Stamp, TimeKeeper

#: PM sensor housing warms the air it draws by about this much, lowering its RH.
HOUSING_WARMING_C = 1.5
#: kappa-Koehler mass growth uses the dry particle density (g/cm3) of urban aerosol.
DRY_DENSITY = 1.65
#: The kappa the receiver's humidity correction assumes (middle of Huang et al.'s PM2.5 range).
FLEET_KAPPA = 0.22
GPS_TAU_S = 30.0  # correlation time of GPS position error (multipath, atmosphere)
GPS_TTFF_S = 35.0  # a cold receiver's time to first fix
WARM_UP_S = 30.0
EARTH_M_PER_DEG = 111_195.0


@dataclass(frozen=True)
class ErrorSwitches:
    """Which error models are on. :meth:`off` gives a perfect fleet (the oracle's zero)."""

    pm_growth: bool = True
    pm_gain: bool = True
    no2_gain: bool = True
    no2_zero: bool = True  # offset and drift
    no2_temperature: bool = True
    no2_ozone: bool = True
    mic_offset: bool = True
    rh_temp_error: bool = True  # the BME280's own error
    read_noise: bool = True  # per-reading scatter and quantisation to the agent's 0.1
    faults: bool = True  # warm-up, spikes, sentinels, stuck runs
    gps_noise_m: float = 5.0  # 2D RMS
    gps_outages: bool = True
    stamp_errors: bool = True
    # Known biases added to every reading (the bench's self-check: it must report them).
    pm25_bias: float = 0.0
    no2_bias: float = 0.0
    laeq_bias: float = 0.0

    @classmethod
    def off(cls, **overrides: object) -> ErrorSwitches:
        base = {f.name: (0.0 if f.type in ("float", float) else False) for f in fields(cls)}
        return replace(cls(**base), **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DeviceErrors:
    """One van's devices as they really are (drawn once per van)."""

    pm_gain: float
    rh_offset: float  # %RH
    temp_offset: float  # degC
    no2_gain: float
    no2_zero: float  # ppb at 20 degC
    no2_temp_coef: float  # ppb per degC away from 20 degC, left after the sheet's n_T
    no2_drift: float  # ppb per day
    no2_o3: float  # fraction of O3 read as NO2
    mic_offset: float  # dB

    @classmethod
    def draw(cls, seed: int, device: str) -> DeviceErrors:
        r = np.random.default_rng([seed, _h(device), 1])
        return cls(
            pm_gain=float(r.normal(1.0, 0.05)),
            rh_offset=float(r.normal(0.0, 2.0)),
            temp_offset=float(r.normal(0.0, 0.5)),
            no2_gain=float(r.normal(1.0, 0.08)),
            no2_zero=float(r.normal(0.0, 5.0)),
            no2_temp_coef=float(r.normal(0.0, 0.3)),
            no2_drift=float(r.uniform(-20.0, 20.0) / 365.0),
            no2_o3=float(max(0.0, r.normal(0.03, 0.02))),
            mic_offset=float(r.normal(0.0, 1.0)),
        )


@dataclass(frozen=True)
class CalibrationFit:
    """What a calibration finds for one van: the true parameters plus the fit's own error.

    NO2: a co-location against a reference station over a range of temperatures (its
    mean ozone folds into the zero); noise: a class 1 calibrator (IEC 60942, +-0.4 dB;
    0.2 dB typical); PM: a co-location for the gain.
    """

    pm_gain: float
    no2_gain: float
    no2_zero: float
    no2_temp_coef: float
    mic_offset: float

    @classmethod
    def fit(
        cls, dev: DeviceErrors, seed: int, device: str, sw: ErrorSwitches, mean_o3_ppb: float = 25.0
    ) -> CalibrationFit:
        r = np.random.default_rng([seed, _h(device), 2])
        noisy = sw.read_noise  # with a perfect fleet the fit is perfect too
        e = (lambda s: float(r.normal(0.0, s))) if noisy else (lambda s: 0.0)
        return cls(
            pm_gain=(dev.pm_gain if sw.pm_gain else 1.0) * (1 + e(0.02)),
            no2_gain=(dev.no2_gain if sw.no2_gain else 1.0) * (1 + e(0.03)),
            no2_zero=(dev.no2_zero if sw.no2_zero else 0.0)
            + e(1.0)
            + (dev.no2_o3 * mean_o3_ppb if sw.no2_ozone else 0.0),
            no2_temp_coef=(dev.no2_temp_coef if sw.no2_temperature else 0.0) + e(0.05),
            mic_offset=(dev.mic_offset if sw.mic_offset else 0.0) + e(0.2),
        )


    def no2_record_values(self, sheet: No2Calibration) -> dict[str, float | int]:
        """The fit as an NO2 calibration record's values (edge/calibration.py ``no2_finish``).

        The record's finish is ``intercept + slope * sheet_ppb + temp_coef * temp_c``; the fit
        says ``true = (sheet_ppb - zero - coef * (temp_c - 20)) / gain``, so slope = 1/gain,
        intercept = (20 coef - zero)/gain, temp_coef = -coef/gain.
        """
        g = self.no2_gain
        return {
            **no2_values_from_sheet(sheet),
            "slope": 1.0 / g,
            "intercept_ppb": (20.0 * self.no2_temp_coef - self.no2_zero) / g,
            "temp_coef_ppb_per_c": -self.no2_temp_coef / g,
        }


def _h(text: str) -> int:
    """A stable integer of a string (Python's hash() changes per process)."""
    return int.from_bytes(text.encode()[:16].ljust(16, b"\0"), "little") % (2**63)


def day_kappa(seed: int, day: int) -> tuple[float, float]:
    """(fine, coarse) hygroscopicity of the day's aerosol (Huang et al. 2024's ranges)."""
    r = np.random.default_rng([seed, day, 3])
    return float(r.uniform(0.15, 0.29)), float(r.uniform(0.05, 0.13))


def growth_factor(kappa: float | np.ndarray, rh_pct: np.ndarray) -> np.ndarray:
    """kappa-Koehler wet/dry mass ratio: 1 + (kappa / rho_dry) * a_w / (1 - a_w), a_w = RH/100."""
    aw = np.clip(np.asarray(rh_pct, dtype=float), 0.0, 98.0) / 100.0
    return 1.0 + (kappa / DRY_DENSITY) * aw / (1.0 - aw)


def inlet_rh(rh_pct: np.ndarray) -> np.ndarray:
    """RH inside the warmed housing (Magnus: RH falls ~6.5 % of itself per degC of warming)."""
    return rh_pct * math.exp(-0.065 * HOUSING_WARMING_C)


# -- readings --------------------------------------------------------------------------


def measure_rh_temp(
    rh: np.ndarray, temp: np.ndarray, dev: DeviceErrors, sw: ErrorSwitches, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The BME280 in the PM housing: inlet RH and air temperature as reported."""
    rh_in = inlet_rh(rh) if sw.pm_growth else rh
    if sw.rh_temp_error:
        rh_in = np.clip(rh_in + dev.rh_offset + rng.normal(0, 0.5, len(rh)), 0.0, 100.0)
        temp = temp + dev.temp_offset + rng.normal(0, 0.1, len(temp))
    return rh_in, temp


def measure_ambient_rh(rh: np.ndarray, dev: DeviceErrors, sw: ErrorSwitches, rng: np.random.Generator) -> np.ndarray:
    """Ambient RH as a shipped van reports it: the DGS-NO2's ``no2_rh_pct`` (its own sensor, outside
    the warmed PM housing), with the same offset and scatter as the BME280 model. No shipped PM
    driver sends RH, so this, not the housing's, is what the receiver's growth correction gets."""
    if not sw.rh_temp_error:
        return np.asarray(rh, dtype=float)
    return np.clip(rh + dev.rh_offset + rng.normal(0, 0.5, len(rh)), 0.0, 100.0)


def measure_pm(
    pm25: np.ndarray,
    pm10: np.ndarray,
    rh: np.ndarray,
    kappa: tuple[float, float],
    dev: DeviceErrors,
    sw: ErrorSwitches,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(pm25, pm10) an optical sensor reports for the true dry mass at ambient ``rh``."""
    n = len(pm25)
    if sw.pm_growth:
        rh_in = inlet_rh(rh)
        coarse = pm10 - pm25
        pm25 = pm25 * growth_factor(kappa[0], rh_in)
        pm10 = pm25 + coarse * growth_factor(kappa[1], rh_in)
    if sw.pm_gain:
        pm25, pm10 = pm25 * dev.pm_gain, pm10 * dev.pm_gain
    pm25, pm10 = pm25 + sw.pm25_bias, pm10 + sw.pm25_bias
    if sw.read_noise:
        pm25 = pm25 * (1 + rng.normal(0, 0.05, n)) + rng.normal(0, 0.8, n)
        pm10 = pm10 * (1 + rng.normal(0, 0.07, n)) + rng.normal(0, 1.2, n)
        pm25 = np.round(np.maximum(pm25, 0.0), 1)
        pm10 = np.round(np.maximum(pm10, pm25), 1)
    return pm25, pm10


def measure_no2(
    no2: np.ndarray,
    o3: np.ndarray,
    temp: np.ndarray,
    days: np.ndarray,
    dev: DeviceErrors,
    sw: ErrorSwitches,
    rng: np.random.Generator,
) -> np.ndarray:
    """ppb as the van computes it from the sheet (algorithm 1), before any field calibration.

    ``days``: days since the sensor was calibrated (zero drift).
    """
    out = no2 * (dev.no2_gain if sw.no2_gain else 1.0)
    if sw.no2_zero:
        out = out + dev.no2_zero + dev.no2_drift * days
    if sw.no2_temperature:
        out = out + dev.no2_temp_coef * (temp - 20.0)
    if sw.no2_ozone:
        out = out + dev.no2_o3 * o3
    out = out + sw.no2_bias
    if sw.read_noise:
        out = np.round(out + rng.normal(0, 3.0, len(out)), 1)  # B43F on an ISB: a few ppb at 1 Hz
    return out


def no2_electrodes(
    sheet_ppb: np.ndarray,
    temp_c: np.ndarray,
    cal: No2Calibration,
    rng: np.random.Generator,
    round_uv: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(WE, AE) mV an ISB reports when the sheet's AAN 803 algorithm 1 gives ``sheet_ppb`` at
    ``temp_c``: the inverse simulator/hardware.py's ADS1115 uses, in columns.

    WEu = WEe + n_T (AEu - AEe) + ppb * sensitivity; the AE electrode sits near its zero.
    Rounded to 1 uV, below the ADS1115's 62.5 uV step at +-2.048 V.
    """
    ae = cal.ae_e_mv + cal.ae_o_mv + rng.normal(0.0, 0.3, len(sheet_ppb))
    n_t = np.interp(temp_c, TABLE_TEMPS_C, N_T)  # interpolate_factor, clamped at the ends alike
    we = cal.we_e_mv + n_t * (ae - cal.ae_e_mv) + sheet_ppb * cal.sensitivity_mv_per_ppb
    return (np.round(we, 3), np.round(ae, 3)) if round_uv else (we, ae)


def measure_laeq(
    laeq: np.ndarray, dev: DeviceErrors, sw: ErrorSwitches, rng: np.random.Generator
) -> np.ndarray:
    out = laeq + (dev.mic_offset if sw.mic_offset else 0.0) + sw.laeq_bias
    if sw.read_noise:
        out = np.round(out + rng.normal(0, 0.5, len(out)), 1)
    return out


def add_faults(
    pm25: np.ndarray,
    pm10: np.ndarray,
    no2: np.ndarray,
    sw: ErrorSwitches,
    rng: np.random.Generator,
    shift_s: np.ndarray,
) -> np.ndarray:
    """Spikes, sentinels, a stuck run and warm-up, in place; the warming-up mask.

    PM: 0.2 % spikes x3-8 (an insect, a dust puff), 0.05 % 65535 sentinels (a corrupt
    frame that passed), half the van-days a 2-minute frozen run; NO2: 0.1 % transients
    of 50-150 ppb from the van's 12 V system. Warm-up: the first 30 s of the shift the
    fan and the cell settle (PM x0.5, NO2 +20 ppb); the agent flags them ``warming_up``.
    """
    n = len(pm25)
    warming = shift_s < WARM_UP_S
    if not sw.faults:
        return np.zeros(n, dtype=bool)
    spike = rng.random(n) < 0.002
    pm25[spike] *= rng.uniform(3, 8, spike.sum())
    pm10[spike] *= rng.uniform(3, 8, spike.sum())
    sent = rng.random(n) < 0.0005
    pm25[sent] = 65535.0
    pm10[sent] = 65535.0
    if rng.random() < 0.5 and n > 600:
        a = int(rng.integers(300, n - 200))
        pm25[a : a + 120] = pm25[a]
        pm10[a : a + 120] = pm10[a]
    ns = rng.random(n) < 0.001
    no2[ns] += rng.uniform(50, 150, ns.sum())
    pm25[warming] *= 0.5
    pm10[warming] *= 0.5
    no2[warming] += 20.0
    return warming


# -- position and time ----------------------------------------------------------------


def gps_noise(
    n: int, sw: ErrorSwitches, rng: np.random.Generator, lat0: float
) -> tuple[np.ndarray, np.ndarray]:
    """(dlat, dlon) degrees of first-order Gauss-Markov error at 1 Hz, 2D RMS ``gps_noise_m``."""
    if sw.gps_noise_m <= 0:
        return np.zeros(n), np.zeros(n)
    sigma = sw.gps_noise_m / math.sqrt(2.0)
    a = math.exp(-1.0 / GPS_TAU_S)
    out = []
    for _ in range(2):
        w = rng.normal(0, sigma * math.sqrt(1 - a * a), n)
        x = np.empty(n)
        x[0] = rng.normal(0, sigma)
        for i in range(1, n):  # a plain recursion: 30k steps a van-day, a few ms
            x[i] = a * x[i - 1] + w[i]
        out.append(x)
    return out[0] / EARTH_M_PER_DEG, out[1] / (EARTH_M_PER_DEG * math.cos(math.radians(lat0)))


def gps_has_fix(blocked: np.ndarray, shift_s: np.ndarray, sw: ErrorSwitches) -> np.ndarray:
    if not sw.gps_outages:
        return np.ones(len(blocked), dtype=bool)
    return ~blocked & (shift_s >= GPS_TTFF_S)


@dataclass(frozen=True)
class StampErrors:
    """Seconds to add to each stream's true times to get what the van stamps."""

    gps: np.ndarray
    reads: np.ndarray  # PM, NO2 (stamped at their read, in both cases)
    sound: np.ndarray


def stamp_errors(
    n: int, has_fix: np.ndarray, sw: ErrorSwitches, rng: np.random.Generator
) -> StampErrors:
    """Stamp errors of the agent before issue 15 part 1, for one van-day of 1 Hz ticks.

    That code is gone, so it cannot be run: this is issue 15's measurement of it. GPS
    stamped when the agent read the port, early by the tick phase (0.10-0.99 s, one per
    run); sound 0.5-1.5 s late; reads +-2 ms. Samples before the first fix were stamped by
    an unset clock and corrected by that first GPS time: they carry its error. The shipped
    agent's stamps come from :func:`agent_stamps`.
    """
    z = np.zeros(n)
    if not sw.stamp_errors:
        return StampErrors(z, z.copy(), z.copy())
    jitter = lambda s: rng.normal(0, s, n)  # noqa: E731
    gps = -rng.uniform(0.10, 0.99) + jitter(0.005)
    sound = rng.uniform(0.5, 1.5, n)
    reads = jitter(0.002)
    first = int(np.argmax(has_fix)) if has_fix.any() else n
    if first < n:
        before = np.arange(n) < first
        reads = np.where(before, reads + gps[first], reads)
        sound = np.where(before, sound + gps[first], sound)
    return StampErrors(gps, reads, sound)


#: The receiver's NMEA output latency after its epoch (u-blox at 9600 baud: tens of ms).
GPS_LATENCY_S = (0.02, 0.08)
#: The Pi's clock at boot: its last saved time (fake-hwclock), hours behind; no NTP on the road.
BOOT_CLOCK_ERROR_S = -14 * 3600.0


@dataclass(frozen=True)
class Geometry:
    """When each stream of one van-day is really measured, as UTC seconds per tick.

    Reads (PM, NO2) happen at the agent's ticks, ``t0 + k`` (the truth's seconds); the GPS
    epoch the tick reads came ``phase`` before it (a per-run tick phase, U(0.10, 0.99) s as
    issue 15 measured), the second of audio delivered at the tick ended ``capture`` before
    it (the capture thread's seconds run on their own phase).
    """

    reads: np.ndarray
    gps: np.ndarray
    sound: np.ndarray
    gps_latency: np.ndarray  # s from each epoch to its first byte at the agent

    @classmethod
    def draw(cls, t0_utc: float, n: int, rng: np.random.Generator, exact: bool = False) -> Geometry:
        """``exact``: every stream measured at the tick (the perfect fleet's zero)."""
        k = t0_utc + np.arange(n, dtype=float)
        phase, capture = (0.0, 0.0) if exact else (rng.uniform(0.10, 0.99), rng.uniform(0.0, 0.9))
        return cls(k, k - phase, k - capture, rng.uniform(*GPS_LATENCY_S, n))


@dataclass(frozen=True)
class AgentStamps:
    """What one van-day's samples carry, per tick: UTC ms stamps, monotonic ms and time source."""

    gps: list[int | None]
    reads: list[int | None]
    sound: list[int | None]
    mono: list[int]
    source: list[TimeSource]


class _GpsTime:
    """The GPS driver's ``time_fix`` (drivers/gps.py): the latest fix's UTC and its arrival."""

    def __init__(self) -> None:
        self.fix: tuple[float, float] | None = None

    def time_fix(self) -> tuple[float, float] | None:
        return self.fix


def agent_stamps(geo: Geometry, has_fix: np.ndarray, rng: np.random.Generator) -> AgentStamps:
    """Stamp one van-day as the shipped agent does (edge/agent.py, issue 15 part 1).

    The real :class:`core.timekeeping.TimeKeeper` on a simulated clock (monotonic spine,
    the Pi's stale boot time, no NTP): each tick ``update()``, then ``stamp`` per reading
    with the meta the drivers give: GPS its epoch's arrival (``measured_mono``) and the fix's
    UTC (``measured_utc``), sound the end of its second of audio (``measured_mono``, with
    the capture anchor's ~5 ms error), PM and NO2 nothing (stamped at their read). Samples
    stamped ``unsync`` before the first fix are re-stamped from monotonic time with the first
    trusted offset, as ``Agent._hold_for_time`` / ``buffer.correct_unsync`` do.
    """
    t0 = float(geo.reads[0])
    clock = SimClock(t0, trusted_after=math.inf, boot_error_s=BOOT_CLOCK_ERROR_S)
    src = _GpsTime()
    tk = TimeKeeper(clock, [src])
    m0 = clock.monotonic()
    mono_of = lambda utc: m0 + (utc - t0)  # noqa: E731 - true UTC -> this boot's monotonic
    anchor = rng.normal(0.0, 0.005, len(geo.reads))
    stamps: tuple[list[Stamp], list[Stamp], list[Stamp]] = ([], [], [])
    offset: int | None = None
    fix = has_fix.tolist()
    for k, (e, lat, snd, a) in enumerate(
        zip(geo.gps.tolist(), geo.gps_latency.tolist(), geo.sound.tolist(), anchor.tolist())
    ):
        if k:
            clock.advance(1.0)
        arrival = mono_of(e) + lat
        if fix[k]:
            src.fix = (e, arrival)
        tk.update()
        stamps[0].append(tk.stamp(arrival, e if fix[k] else None))
        stamps[1].append(tk.stamp())
        stamps[2].append(tk.stamp(min(mono_of(snd) + a, clock.monotonic())))
        if offset is None:
            offset = tk.correction_offset_ms()
    utc = [
        [s.t_mono_ms + offset if s.source == TimeSource.UNSYNC and offset is not None else s.t_utc_ms
         for s in col]
        for col in stamps
    ]
    source = [
        TimeSource.CORRECTED if s.source == TimeSource.UNSYNC and offset is not None else s.source
        for s in stamps[1]
    ]
    return AgentStamps(utc[0], utc[1], utc[2], [s.t_mono_ms for s in stamps[1]], source)


class DeviceErrorModel:
    """One van's error models, one reading at a time: the hook of the byte-level devices.

    :class:`simulator.hardware.SimulatedHardware` calls it when it is given one, so the
    errors are in the bytes the real drivers decode (PMS frames, ADS1115 volts, sound
    levels, NMEA). The devices keep adding their own scatter; this adds the systematic
    part: growth, gains, zero, temperature, ozone, drift, microphone offset, GPS noise.
    """

    def __init__(
        self,
        dev: DeviceErrors,
        sw: ErrorSwitches = ErrorSwitches(),
        *,
        seed: int = 0,
        calibrated_utc: float | None = None,
    ) -> None:
        self.dev = dev
        self.sw = replace(sw, read_noise=False, faults=False)
        self.seed = seed
        self.calibrated_utc = calibrated_utc
        self._rng = np.random.default_rng([seed, 4])
        self._gps: tuple[float, float] | None = None  # Gauss-Markov state, metres north/east

    def _one(self, x: float) -> np.ndarray:
        return np.array([x], dtype=float)

    def pm(self, pm25: float, pm10: float, rh_pct: float, utc: float) -> tuple[float, float]:
        day = int(utc // 86400)
        a, b = measure_pm(
            self._one(pm25),
            self._one(pm10),
            self._one(rh_pct),
            day_kappa(self.seed, day),
            self.dev,
            self.sw,
            self._rng,
        )
        return float(a[0]), float(b[0])

    def no2(self, no2_ppb: float, o3_ppb: float, temp_c: float, utc: float) -> float:
        days = (
            0.0 if self.calibrated_utc is None else max(0.0, (utc - self.calibrated_utc) / 86400.0)
        )
        return float(
            measure_no2(
                self._one(no2_ppb),
                self._one(o3_ppb),
                self._one(temp_c),
                self._one(days),
                self.dev,
                self.sw,
                self._rng,
            )[0]
        )

    def laeq(self, level_db: float) -> float:
        return float(measure_laeq(self._one(level_db), self.dev, self.sw, self._rng)[0])

    def gps(self, lat: float, lon: float) -> tuple[float, float]:
        """The position a receiver reports for one epoch (called once a second)."""
        sigma = self.sw.gps_noise_m / math.sqrt(2.0)
        if sigma <= 0:
            return lat, lon
        a = math.exp(-1.0 / GPS_TAU_S)
        if self._gps is None:
            self._gps = (float(self._rng.normal(0, sigma)), float(self._rng.normal(0, sigma)))
        else:
            s = sigma * math.sqrt(1 - a * a)
            self._gps = (
                a * self._gps[0] + float(self._rng.normal(0, s)),
                a * self._gps[1] + float(self._rng.normal(0, s)),
            )
        n, e = self._gps
        return lat + n / EARTH_M_PER_DEG, lon + e / (EARTH_M_PER_DEG * math.cos(math.radians(lat)))
