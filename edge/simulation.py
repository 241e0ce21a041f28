"""The seam through which simulated hardware plugs into the van from above.

No production module imports the simulator (tests/test_layering.py): a van built with
``[simulation] enabled = true``, a sensor on ``"sim"`` or a ``sim-*`` driver asks this
module for the simulation backend instead. The simulator package offers one through the
entry point group ``datalab_edge.simulation`` (pyproject.toml, ``simulator/van_plugin.py``);
a test may ``register`` its own. A van without the simulator installed gets a
``ConfigError`` naming the key that asked for simulation, not an ImportError.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from core.clock import Clock
from core.errors import ConfigError
from core.no2_sheet import No2Calibration
from drivers.base import SensorDriver

ENTRY_POINT_GROUP = "datalab_edge.simulation"


@runtime_checkable
class SimulationBackend(Protocol):
    """What the van needs from a simulator: a world, hardware in it, and its constants."""

    no2_sheet: No2Calibration  # the simulated NO2 sensor's calibration sheet
    temp_mv_at_0c: float  # the simulated NO2 board's temperature output: mV at 0 °C ...
    temp_mv_per_c: float  # ... and mV per °C

    def world(self, clock: Clock, *, shift_start_utc: float, seed: int, start_offset_m: float = 0.0) -> Any:
        """The simulated street and air the van drives through (``ctx["world"]``)."""

    def hardware(self, world: Any, clock: Clock, *, seed: int, noise: str, **faults: float) -> Any:
        """Byte-level devices (pseudo-terminals, a fake I2C bus, a microphone) for the real
        drivers (``ctx["hardware"]``: ``.ports``, ``.bus``, ``.microphone``, ``.adc``)."""

    def value_driver(self, kind: str, world: Any, *, name: str, seed: int) -> SensorDriver:
        """A value-level ``sim-*`` sensor reading straight from ``world``."""

    def calibrator_tone(self, freq_hz: float, level_db: float, sensitivity_dbfs: float, *,
                        sensitivity_error_db: float, sample_rate: int) -> Any:
        """An acoustic calibrator's tone as a microphone source (``edge noise calibrate``)."""


_registered: SimulationBackend | None = None


def register(backend: SimulationBackend | None) -> None:
    """Use ``backend`` from now on (None: back to the installed entry point)."""
    global _registered
    _registered = backend


def backend(key: str = "simulation.enabled") -> SimulationBackend:
    """The simulation backend; ``key`` names the setting that asked for it in the error."""
    global _registered
    if _registered is None:
        found = list(entry_points(group=ENTRY_POINT_GROUP))
        if not found:
            raise ConfigError(key, "simulation needs the simulator, which is not installed here "
                                   "(install datalab-edge with the simulator; in a checkout: pip install -e .)")
        try:
            _registered = found[0].load()
        except ImportError as exc:  # the entry point left behind by an uninstalled simulator
            raise ConfigError(key, "simulation needs the simulator, which is not installed here (only its entry "
                                   "point is left: reinstall datalab-edge with the simulator; in a checkout: "
                                   "pip install -e .)") from exc
    return _registered
