"""Build the configured sensor drivers.

Each ``[sensors.NAME]`` table names a ``driver`` and its options. Simulated
drivers (``sim-*``) need the van's simulated world; real ones take their port
or bus from the options.
"""

from __future__ import annotations

from typing import Any, Callable

from drivers.base import SensorDriver
from edge.config import SensorConfig
from edge.errors import ConfigError

DriverFactory = Callable[[SensorConfig, dict[str, Any]], SensorDriver]


def _sim_factory(kind: str) -> DriverFactory:
    def make(sc: SensorConfig, ctx: dict[str, Any]) -> SensorDriver:
        from simulator.sensors import SIM_DRIVERS

        world = ctx.get("world")
        if world is None:
            raise ConfigError(
                f"sensors.{sc.name}.driver", f"{kind!r} needs [simulation] enabled = true"
            )
        unknown = set(sc.options) - {"seed"}
        if unknown:
            raise ConfigError(f"sensors.{sc.name}.{sorted(unknown)[0]}", "unknown option")
        return SIM_DRIVERS[kind](world, name=sc.name, seed=int(sc.options.get("seed", 0)))

    return make


FACTORIES: dict[str, DriverFactory] = {
    k: _sim_factory(k) for k in ("sim-pm", "sim-no2", "sim-noise", "sim-gps")
}


def build_drivers(sensors: list[SensorConfig], ctx: dict[str, Any]) -> list[SensorDriver]:
    out: list[SensorDriver] = []
    for sc in sensors:
        factory = FACTORIES.get(sc.driver)
        if factory is None:
            raise ConfigError(
                f"sensors.{sc.name}.driver",
                f"unknown driver {sc.driver!r} (known: {', '.join(sorted(FACTORIES))})",
            )
        out.append(factory(sc, ctx))
    return out
