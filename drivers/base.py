"""The seams every driver plugs into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Reading:
    """What a driver hands the agent: one sensor's values at one moment.

    ``sensor`` names the channel group (``pm``, ``no2``, ``noise``, ``gps``);
    ``values`` the quantities by name, in SI-ish units given by the name
    (``pm25`` µg/m³, ``no2_ppb``, ``laeq`` dB(A), ``lat``/``lon`` degrees);
    ``flags`` quality remarks such as ``warming_up``.
    """

    sensor: str
    values: dict[str, Any]
    flags: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class SensorDriver(Protocol):
    """A sensor the agent polls once per sampling tick.

    ``read`` returns ``None`` when the sensor has nothing new (a passive
    sensor between frames), raises ``core.errors.ReadError`` (recoverable)
    for a failed read, and never blocks for longer than its timeout.
    """

    name: str

    def read(self) -> Reading | None: ...

    def close(self) -> None: ...
