"""Is the van measuring? Healthy means samples of real sensors reach the card (issue #19.4).

A loop that ticks while every sensor is dead, unplugged or not configured at all used to
look healthy to systemd and to the dashboard. ``Measuring`` watches, tick by tick, which
configured sensors produced a reading and whether a commit carried one to the buffer:

* ``ready`` - at least one sensor has produced a reading, or the start grace period
  (``grace_s``) is over (then READY goes out anyway, with a status line that says the van
  is not measuring: a start that never ends would only have systemd kill it at
  TimeoutStartSec without a word in the heartbeat);
* ``check()`` - after the grace period, healthy only while a sample of a real sensor was
  committed within ``window_s``. Sensors the power manager put to sleep (parked duty
  cycle) are excused: a van whose every sensor sleeps is resting, not broken; so is a
  van whose remote change is on probation (``excused``: the probation rolls it back);
* ``status()`` - the heartbeat's ``measuring`` fields: which sensors read, which are
  silent, since when.

Pseudo-sensors (the calibration announcer: records, not measurements) are never counted.
Readings are counted per driver (``reads``, kept by ``edge.power.ObservedDriver``: the
Supervisor wraps any driver that does not count).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from core.calibration import CALIBRATION_SENSOR

# Drivers that carry records rather than measurements.
PSEUDO_SENSORS = frozenset({CALIBRATION_SENSOR})

# How long a van may start without any reading before it says READY anyway (seconds).
# Under TimeoutStartSec (120 s) with room for opening ports; a PMS5003 gives its first
# frame within ~3 s of power, a GPS its first sentence within 1 s even without a fix.
DEFAULT_GRACE_S = 60.0


def sensors_of(drivers: Iterable[Any]) -> list[Any]:
    """The drivers that measure (not the calibration pseudo-sensor)."""
    return [d for d in drivers if getattr(d, "name", "") not in PSEUDO_SENSORS]


class Measuring:
    def __init__(self, *, grace_s: float = DEFAULT_GRACE_S, window_s: float = 60.0,
                 now: Callable[[], float]) -> None:  # fmt: skip
        self.grace_s = grace_s
        self.window_s = window_s
        self._now = now
        self._started = now()
        self._reads: dict[str, tuple[int, int]] = {}  # per sensor: (driver id, its newest count)
        self._last_read: dict[str, float] = {}  # when each sensor last produced a reading
        self._read_since_commit = False
        self._last_measured_commit: float | None = None
        self._committed = 0
        self._sensors: list[str] = []
        self._asleep: list[str] = []
        # Something else decides for now (a remote change on probation rolls itself back when
        # its sensors stay silent; a watchdog restart would restart its probation instead).
        self.excused: Callable[[], bool] = lambda: False

    # -- fed by the loop ---------------------------------------------------------------

    def observe(self, drivers: Iterable[Any], committed: int) -> None:
        """After a tick: who read, and did a commit carry a reading to the card?"""
        now = self._now()
        sensors = sensors_of(drivers)
        self._sensors = [d.name for d in sensors]
        self._asleep = [d.name for d in sensors if getattr(d, "asleep", False) is True]
        for d in sensors:
            n = getattr(d, "reads", None)
            if not isinstance(n, int):
                continue
            # A driver rebuilt by a reload counts from 0 again: compare with its own count only.
            seen_id, seen = self._reads.get(d.name, (id(d), 0))
            if n > (seen if seen_id == id(d) else 0):
                self._last_read[d.name] = now
                self._read_since_commit = True
            self._reads[d.name] = (id(d), n)
        if committed > self._committed:
            if self._read_since_commit:
                self._last_measured_commit = now
                self._read_since_commit = False
            self._committed = committed

    # -- asked by systemd's side ---------------------------------------------------------

    @property
    def has_read(self) -> bool:
        return bool(self._last_read)

    @property
    def in_grace(self) -> bool:
        return self._now() - self._started < self.grace_s

    @property
    def ready(self) -> bool:
        return self.has_read or not self.in_grace

    def check(self) -> tuple[bool, str]:
        if self.in_grace or self.excused():
            return True, "ok"
        if not self._sensors:
            return False, "not measuring: no sensor configured"
        if set(self._sensors) <= set(self._asleep):
            return True, "ok"  # parked: the power manager put every sensor to sleep
        if self._last_measured_commit is None:
            return False, "not measuring: no sensor has produced a reading"
        age = self._now() - self._last_measured_commit
        if age > self.window_s:
            return False, f"not measuring: no reading committed for {age:.0f} s"
        return True, "ok"

    def reading(self) -> list[str]:
        """The sensors that read within the window."""
        now = self._now()
        return [n for n in self._sensors if now - self._last_read.get(n, -1e18) <= self.window_s]

    def status(self) -> dict[str, Any]:
        reading = self.reading()
        return {
            "measuring": bool(reading) or (bool(self._sensors) and set(self._sensors) <= set(self._asleep)),
            "sensors": len(self._sensors),
            "sensors_reading": reading,
            "sensors_silent": [n for n in self._sensors if n not in reading and n not in self._asleep],
            "sensors_asleep": list(self._asleep),
        }
