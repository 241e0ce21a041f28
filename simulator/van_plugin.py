"""The simulator as the van's simulation backend (edge/simulation.py).

Registered in pyproject.toml under the entry point group ``datalab_edge.simulation``, so
the van finds its simulated hardware from above without importing the simulator.
"""

from __future__ import annotations

from typing import Any

from core.clock import Clock
from drivers.base import SensorDriver
from simulator.hardware import SIM_NO2_CAL, SIM_TEMP_MV_AT_0C, SIM_TEMP_MV_PER_C, SimulatedHardware
from simulator.microphone import CalibratorTone
from simulator.value_sensors import SIM_DRIVERS
from simulator.world import VanWorld


class SimulatorBackend:
    no2_sheet = SIM_NO2_CAL
    temp_mv_at_0c = SIM_TEMP_MV_AT_0C
    temp_mv_per_c = SIM_TEMP_MV_PER_C

    def world(self, clock: Clock, *, shift_start_utc: float, seed: int, start_offset_m: float = 0.0) -> VanWorld:
        return VanWorld(clock, shift_start_utc=shift_start_utc, seed=seed, start_offset_m=start_offset_m)

    def hardware(self, world: Any, clock: Clock, *, seed: int, noise: str, **faults: float) -> SimulatedHardware:
        return SimulatedHardware(world, clock, seed=seed, noise=noise, **faults)  # type: ignore[arg-type]

    def value_driver(self, kind: str, world: Any, *, name: str, seed: int) -> SensorDriver:
        return SIM_DRIVERS[kind](world, name=name, seed=seed)

    def calibrator_tone(self, freq_hz: float, level_db: float, sensitivity_dbfs: float, *,
                        sensitivity_error_db: float, sample_rate: int) -> CalibratorTone:
        return CalibratorTone(freq_hz, level_db, sensitivity_dbfs,
                              sensitivity_error_db=sensitivity_error_db, sample_rate=sample_rate)


BACKEND = SimulatorBackend()
