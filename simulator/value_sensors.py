"""Value-level simulated sensors: they hand the agent readings straight from the world.

They implement the same ``SensorDriver`` seam as the real drivers. The
byte-level simulators (PM, GPS, NO2 over pseudo-terminals and fake I2C buses)
stand in for the devices themselves under the real drivers; these ones are for
large fleets and tests of the parts above the drivers.
"""

from __future__ import annotations

import random

from drivers.base import Reading
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
    name = "pm"

    def read(self) -> Reading:
        a = self.world.truth().air
        g = self._rng.gauss
        # Optical PM sensors: a few percent of scatter plus ~1 µg/m³ of noise.
        pm25 = max(0.0, a.pm25 * (1 + g(0, 0.05)) + g(0, 0.8))
        pm10 = max(pm25, a.pm10 * (1 + g(0, 0.07)) + g(0, 1.2))
        pm1 = max(0.0, min(pm25, a.pm1 * (1 + g(0, 0.05)) + g(0, 0.5)))
        return Reading(
            self.name,  # the section name, as the real drivers label theirs
            {"pm1": round(pm1, 1), "pm25": round(pm25, 1), "pm10": round(pm10, 1), "rh": round(a.rh_pct, 1)},
            self._warming(),
        )


class SimNO2(_SimSensor):
    name = "no2"

    def read(self) -> Reading:
        a = self.world.truth().air
        no2 = a.no2_ppb + self._rng.gauss(0, 3.0)  # electrochemical noise: a few ppb
        return Reading(self.name, {"no2_ppb": round(no2, 1), "temp_c": round(a.temp_c, 1)}, self._warming())


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
