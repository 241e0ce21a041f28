"""The devices of one simulated van, at the byte and register level.

Under the real drivers, in lock-step with the van's ``SimClock``:

* GPS: a ``FakeGpsReceiver`` on a pseudo-terminal emits NMEA once per virtual
  second (``SimClock.on_advance``), with fix loss where the route is blocked and
  before the receiver's time to first fix; the clock moves on only once the
  epoch is readable on the port (``FakeGpsReceiver.emit_readable``);
* NO2: a ``FakeADS1115`` on a ``FakeI2CBus`` presents the Alphasense ISB's WE,
  AE and temperature voltages for the true NO2 level (inverse of AAN 803
  algorithm 1 for the simulated sensor's calibration sheet);
* noise: either a ``FakeSoundModule`` on the same bus (PCB Artists module) or
  a ``SimulatedMicrophone`` audio stream, gated to virtual time, for the
  full 48 kHz sound level meter;
* PM: a Plantower PMS5003 on a pseudo-terminal, answering the driver's
  passive-mode reads from its own thread, warming up for 30 virtual seconds.

``ports`` and ``bus`` are what a van's configuration names as ``sim:...``.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import threading
import time

import numpy as np
from typing import Any

from drivers.i2c import FakeI2CBus
from core.no2_sheet import N_T, No2Calibration, interpolate_factor
from core.clock import SimClock
from simulator.environment import local_time, ozone_ppb
from simulator.gps_device import FakeGpsReceiver
from simulator.gps_sky import SkyModel
from simulator.i2c_devices import FakeADS1115, FakeSoundModule
from simulator.microphone import SimulatedMicrophone
from simulator.pm_devices import PMSSimulator
from simulator.sensor_errors import DeviceErrorModel
from simulator.world import VanWorld

GPS_TTFF_S = 35.0  # cold start: no fix (and a 1980 receiver date) before this

# The simulated NO2-B43F's calibration sheet (plausible values for an ISB board).
SIM_NO2_CAL = No2Calibration(
    serial="202-SIM-0001",
    we_e_mv=295.0,
    ae_e_mv=300.0,
    we_o_mv=12.0,
    ae_o_mv=6.0,
    sensitivity_na_per_ppb=-0.3547,
    gain_mv_per_na=-0.73,
)
# The board's temperature output in the simulation: 500 mV at 0 °C, 10 mV/°C.
SIM_TEMP_MV_AT_0C = 500.0
SIM_TEMP_MV_PER_C = 10.0


class LoopedMicrophone:
    """Traffic noise at the world's level for hours of virtual time, cheaply.

    ``SimulatedMicrophone`` shapes fresh random noise for every block, which
    costs more CPU than the sound level meter it feeds. For whole shifts we
    shape 20 s of it once (at 60 dB) and loop it with a gain that follows the
    level the van hears: the meter downstream does exactly the same work.
    """

    REF_DB = 60.0

    def __init__(self, level_db_fn: Any, *, seed: int, loop_s: float = 20.0, block_s: float = 0.1) -> None:
        src = SimulatedMicrophone(lambda t: self.REF_DB, seed=seed, block_s=block_s,
                                  passby_rate_per_min=0.0, self_noise_db=None, duration_s=loop_s)
        self._loop = src.read_all()
        self.block = src.block
        self.sample_rate = src.sample_rate
        self.level_db_fn = level_db_fn
        self._pos = 0
        self._t = 0.0

    def read_block(self) -> Any:
        n = self.block
        if self._pos + n > len(self._loop):
            self._pos = 0
        x = self._loop[self._pos : self._pos + n]
        self._pos += n
        gain = 10.0 ** ((float(self.level_db_fn(self._t)) - self.REF_DB) / 20.0)
        self._t += n / self.sample_rate
        return np.clip(x * gain, -1.0, 1.0).astype(np.float32)


class ClockedMicrophone:
    """A simulated microphone in lock-step with the van's virtual clock.

    Real hardware paces itself. A simulation running at 1000x must neither let
    the audio run ahead of the clock nor let the clock run ahead of the audio
    (the agent would find no new second to read): ``advanced`` (called as the
    clock moves) waits until the capture thread has taken every block up to
    the new time.
    """

    def __init__(self, mic: Any, clock: SimClock, block_s: float = 0.1) -> None:
        self.mic = mic
        self.clock = clock
        self.block_s = block_s
        self.produced_s = 0.0
        self._cv = threading.Condition()
        self._idle = False
        self._consumer_seen = False
        self._closed = False

    def _behind(self, elapsed: float) -> bool:
        return self.produced_s + self.block_s <= elapsed + 1e-9

    def advanced(self, elapsed: float) -> None:
        with self._cv:
            self._cv.notify_all()
            if not self._consumer_seen:
                return
            deadline = time.monotonic() + 2.0  # a stuck consumer must not hang the van
            while not self._closed and (self._behind(elapsed) or not self._idle):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)

    def read_block(self) -> Any:
        with self._cv:
            self._consumer_seen = True
            if not self._behind(self.clock.elapsed):
                self._idle = True
                self._cv.notify_all()
                # Wait here for the clock rather than return at once: the capture loop
                # would otherwise sleep its idle interval on every virtual second.
                self._cv.wait_for(lambda: self._closed or self._behind(self.clock.elapsed), 0.5)
                if not self._behind(self.clock.elapsed):
                    return None
            self._idle = False
            self.produced_s += self.block_s
        return self.mic.read_block()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class SimulatedHardware:
    def __init__(
        self,
        world: VanWorld,
        clock: SimClock,
        *,
        seed: int = 1,
        noise: str = "module",  # "module" (I2C sound level module) or "microphone"
        gps_corrupt_prob: float = 0.0,
        pm_corrupt_prob: float = 0.0,
        errors: DeviceErrorModel | None = None,  # realistic sensor and GPS errors (simulator/sensor_errors.py)
    ) -> None:
        self.world = world
        self.errors = errors
        self.clock = clock
        self._rng = random.Random(f"hw:{seed}")
        self.ports: dict[str, str] = {}
        self.bus = FakeI2CBus()
        shift_start = dt.datetime.fromtimestamp(world.shift_start_utc, dt.timezone.utc)
        self.gps = FakeGpsReceiver(
            self._gps_position,
            clock=lambda: clock.elapsed,
            utc_origin=shift_start,
            corrupt_prob=gps_corrupt_prob,
            seed=seed,
            sky=SkyModel(seed).at,  # satellites, HDOP and altitude move, as on a real van
        )
        self.gps.start(background=False)
        self.ports["gps"] = self.gps.port_name
        self._last_gps_second = -1
        self.pm = PMSSimulator(
            self._pm_values,
            warmup_s=30.0,
            corrupt_probability=pm_corrupt_prob,
            seed=seed,
            clock=lambda: clock.elapsed,
        )
        self.pm.start()
        self.ports["pm"] = self.pm.device_path
        self.adc = FakeADS1115(source=self._adc_volts)
        self.bus.attach(0x49, self.adc)
        self.sound = FakeSoundModule(source=self._sound_level, fluctuation_db=3.0, seed=seed)
        self.bus.attach(0x48, self.sound)
        self.microphone: ClockedMicrophone | None = None
        if noise == "microphone":
            # Half-second blocks: the lock-step handshake per block costs more than the audio.
            self.microphone = ClockedMicrophone(
                LoopedMicrophone(self._mic_level, seed=seed, block_s=0.5), clock, block_s=0.5
            )
        clock.on_advance(self._on_advance)
        self._on_advance(clock.elapsed)

    # -- lock-step emission -----------------------------------------------------------

    def _on_advance(self, elapsed: float) -> None:
        second = int(math.floor(elapsed + 1e-9))
        if second != self._last_gps_second:
            self._last_gps_second = second
            # Readable before the clock moves on: a pty delivers asynchronously, and the few ms
            # a loaded kernel takes would be seconds of virtual time (simulator/pty_delivery.py).
            self.gps.emit_readable(float(second))
        if self.microphone is not None:
            self.microphone.advanced(elapsed)

    # -- what each device senses ----------------------------------------------------------

    def _gps_position(self, t: float) -> tuple[float, float, float, float] | None:
        van = self.world.truth_at(self.world.shift_start_utc + t).van
        if t < GPS_TTFF_S or van.gps_blocked:
            return None
        g = self._rng.gauss
        if self.errors is not None:
            lat, lon = self.errors.gps(van.lat, van.lon)
            return (lat, lon, max(0.0, van.speed_mps + g(0, 0.2)), van.course_deg)
        # a consumer receiver: a couple of metres of scatter
        return (van.lat + g(0, 2e-5), van.lon + g(0, 3e-5), max(0.0, van.speed_mps + g(0, 0.2)),
                van.course_deg)

    def _pm_values(self) -> tuple[float, float, float]:
        a = self.world.truth().air
        g = self._rng.gauss
        # An optical sensor: a few percent of scatter, reads high in humid air.
        humid = 1.0 + max(0.0, a.rh_pct - 75.0) * 0.01
        true25, true10 = a.pm25 * humid, a.pm10 * humid
        if self.errors is not None:  # kappa-Koehler growth and gain instead of the rough factor
            true25, true10 = self.errors.pm(a.pm25, a.pm10, a.rh_pct, self.world.now_utc())
            humid = true25 / a.pm25 if a.pm25 > 0 else 1.0
        pm25 = max(0.0, true25 * (1 + g(0, 0.05)) + g(0, 0.8))
        return (max(0.0, min(pm25, a.pm1 * humid + g(0, 0.5))), pm25,
                max(pm25, true10 * (1 + g(0, 0.07)) + g(0, 1.2)))

    def _adc_volts(self, channel: int) -> float:
        air = self.world.truth().air
        cal = SIM_NO2_CAL
        if channel == 2:
            return (SIM_TEMP_MV_AT_0C + SIM_TEMP_MV_PER_C * air.temp_c) / 1000.0
        ae_mv = cal.ae_e_mv + cal.ae_o_mv + self._rng.gauss(0, 0.3)
        if channel == 1:
            return ae_mv / 1000.0
        if channel == 0:
            # Inverse of AAN 803 algorithm 1: WEu = WEe + n_T (AEu - AEe) + ppb * sensitivity.
            n_t = interpolate_factor(air.temp_c, N_T)
            ppb = air.no2_ppb
            if self.errors is not None:  # gain, zero, drift, temperature and ozone of the real cell
                utc = self.world.now_utc()
                ppb = self.errors.no2(ppb, ozone_ppb(ppb, local_time(utc).hour), air.temp_c, utc)
            ppb += self._rng.gauss(0, 2.0)  # electrochemical noise
            we = cal.we_e_mv + n_t * (ae_mv - cal.ae_e_mv) + ppb * cal.sensitivity_mv_per_ppb
            return we / 1000.0
        return 0.0

    def _sound_level(self) -> float:
        return self._heard(self.world.truth().air.noise_laeq_db) + self._rng.gauss(0, 1.5)

    def _mic_level(self, t: float) -> float:
        return self._heard(self.world.truth_at(self.world.shift_start_utc + t).air.noise_laeq_db)

    def _heard(self, level_db: float) -> float:
        """The level the microphone's sensitivity makes of the true one."""
        return level_db if self.errors is None else self.errors.laeq(level_db)

    def close(self) -> None:
        if self.microphone is not None:
            self.microphone.close()
        self.gps.stop()
        self.pm.stop()
