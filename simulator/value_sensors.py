"""Value-level simulated sensors: they hand the agent readings straight from the world.

They implement the same ``SensorDriver`` seam as the real drivers. The
byte-level simulators (PM, GPS, NO2 over pseudo-terminals and fake I2C buses)
stand in for the devices themselves under the real drivers; these ones are for
large fleets and tests of the parts above the drivers.
"""

from __future__ import annotations

import random

import numpy as np

from drivers.base import Reading
from simulator.sensor_errors import day_kappa, growth_factor, inlet_rh
from simulator.world import VanWorld

WARM_UP_S = 30.0
GPS_TTFF_S = 35.0  # a cold receiver's time to first fix


class _SimSensor:
    name = "sim"

    def __init__(self, world: VanWorld, name: str | None = None, seed: int = 0) -> None:
        self.world = world
        if name:
            self.name = name
        self._rng = random.Random(f"{self.name}:{world.seed}:{seed}")
        self._t_on = world.clock.monotonic()

    def _warming(self) -> tuple[str, ...]:
        return ("warming_up",) if self.world.clock.monotonic() - self._t_on < WARM_UP_S else ()

    def close(self) -> None:
        pass


class SimPM(_SimSensor):
    """Optical PM as a shipped van's sensor reports it: the particles grew with the humidity in
    the warmed housing (the bench's error model, simulator/sensor_errors.py: kappa-Koehler at
    the inlet RH, the day's kappa), and like every shipped PM driver it sends no RH. The RH the
    receiver corrects growth with is the van's ambient one (SimNO2's ``no2_rh_pct``, as the
    DGS-NO2 sends it). Before issue 15 (tester v15) it reported dry truth and sent ambient
    ``rh``: the receiver dried growth it never had (-22 % at 67 % RH)."""

    name = "pm"

    def read(self) -> Reading:
        a = self.world.truth().air
        g = self._rng.gauss
        day = int(self.world.now_utc() // 86_400)
        fine_k, coarse_k = day_kappa(self.world.seed, day)
        rh_in = float(inlet_rh(np.array([a.rh_pct]))[0])
        grow_fine = float(growth_factor(fine_k, np.array([rh_in]))[0])
        grow_coarse = float(growth_factor(coarse_k, np.array([rh_in]))[0])
        wet1, wet25 = a.pm1 * grow_fine, a.pm25 * grow_fine
        wet10 = wet25 + max(a.pm10 - a.pm25, 0.0) * grow_coarse
        # Optical PM sensors: a few percent of scatter plus ~1 µg/m³ of noise.
        pm25 = max(0.0, wet25 * (1 + g(0, 0.05)) + g(0, 0.8))
        pm10 = max(pm25, wet10 * (1 + g(0, 0.07)) + g(0, 1.2))
        pm1 = max(0.0, min(pm25, wet1 * (1 + g(0, 0.05)) + g(0, 0.5)))
        return Reading(
            self.name,  # the section name, as the real drivers label theirs
            {"pm1": round(pm1, 1), "pm25": round(pm25, 1), "pm10": round(pm10, 1)},
            self._warming(),
        )


class SimNO2(_SimSensor):
    """The DGS-NO2: NO2, its temperature, and the ambient RH it measures beside it (``no2_rh_pct``,
    drivers/dgs_no2.py), the van's one RH, which the receiver's PM correction uses."""

    name = "no2"

    def read(self) -> Reading:
        a = self.world.truth().air
        no2 = a.no2_ppb + self._rng.gauss(0, 3.0)  # electrochemical noise: a few ppb
        rh = min(100.0, max(0.0, a.rh_pct + self._rng.gauss(0, 1.0)))  # a few %RH of sensor error
        return Reading(self.name, {"no2_ppb": round(no2, 1), "temp_c": round(a.temp_c, 1),
                                   "no2_rh_pct": round(rh, 1)}, self._warming())


class SimNoise(_SimSensor):
    name = "noise"

    def read(self) -> Reading:
        a = self.world.truth().air
        g = self._rng.gauss
        laeq = a.noise_laeq_db + g(0, 1.5)
        return Reading(
            self.name,
            {
                "laeq": round(laeq, 1),
                "lamax": round(laeq + abs(g(4, 2)), 1),
                "lamin": round(laeq - abs(g(3, 1.5)), 1),
            },
        )


class SimGPS(_SimSensor):
    name = "gps"

    def _has_fix(self) -> bool:
        cold = self.world.clock.monotonic() - self._t_on < GPS_TTFF_S
        return not cold and not self.world.truth().van.gps_blocked

    def time_fix(self) -> tuple[float, float] | None:
        """True time while the van has a fix: the agent's trusted time source."""
        if not self._has_fix():
            return None
        clock = self.world.clock
        true_utc = getattr(clock, "true_utc", clock.utc)
        return (true_utc(), clock.monotonic())

    def read(self) -> Reading:
        van = self.world.truth().van
        if not self._has_fix():
            return Reading("gps", {"fix_quality": 0, "sats_used": 0}, ("no_fix",))
        # A consumer receiver: metres of scatter (1e-5 degree ≈ 1.1 m).
        return Reading(
            "gps",
            {
                "lat": round(van.lat + self._rng.gauss(0, 2e-5), 7),
                "lon": round(van.lon + self._rng.gauss(0, 3e-5), 7),
                "speed": round(max(0.0, van.speed_mps + self._rng.gauss(0, 0.2)), 2),
                "course": round(van.course_deg, 1),
                "fix_quality": 1,
                "sats_used": self._rng.randint(6, 12),
                "hdop": round(self._rng.uniform(0.7, 1.6), 2),
            },
        )


SIM_DRIVERS = {"sim-pm": SimPM, "sim-no2": SimNO2, "sim-noise": SimNoise, "sim-gps": SimGPS}


def oracle_check(t_mono_ms: int) -> int:
    """The value an oracle sensor reports at a monotonic time: any corruption or mix-up shows."""
    return (t_mono_ms * 2654435761 + 97) % 4294967291


class OracleSensor(_SimSensor):
    """A sensor whose every value can be checked afterwards (the delivery tests' generator).

    It reads the same clock the agent stamps with, in the same instant, so the
    stored sample's ``t_mono_ms`` determines what its value must be.
    """

    name = "oracle"

    def read(self) -> Reading:
        t_mono_ms = int(round(self.world.clock.monotonic() * 1000))
        return Reading(self.name, {"check": oracle_check(t_mono_ms)})


SIM_DRIVERS["sim-oracle"] = OracleSensor
