"""After a remote change: is the van healthy again, or must it go back by itself?

A change can be valid by every rule and still leave a van that measures nothing (a sensor
moved to a port where nothing answers) or cannot reach the broker, and then it can no
longer be told to change back. So an applied change is on probation for a grace period.
It is confirmed as soon as

* a sensor has produced a reading since the change, every sensor the change built anew
  among them (one asleep by the power manager's duty cycle is excused), and
* if the change touched the uplink, the new connection has come up;

otherwise, at the end of the grace period, the runtime rolls back to the configuration
before it (edge/runtime.py ``Runtime._watch_hook``) and reports why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_GRACE_S = 120.0


@dataclass(slots=True)
class Probation:
    request_id: str
    deadline: float  # on the watch's monotonic clock
    reads_before: dict[str, int]  # sensor name -> read count at the change
    rebuilt: set[str]  # sensors the change built anew: each must read
    uplink_changed: bool
    undo: Any = None  # what the runtime needs to go back (opaque here)
    seen: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Verdict:
    request_id: str
    healthy: bool
    reason: str
    undo: Any = None


def _reads(drivers: Iterable[Any]) -> dict[str, int]:
    """Read counts of the observed sensors (edge.power.ObservedDriver); others are not sensors."""
    return {d.name: d.reads for d in drivers if isinstance(getattr(d, "reads", None), int)}


class HealthWatch:
    """One change on probation at a time; ``poll`` decides it (sampling thread only)."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_S, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self.monotonic = monotonic
        self.pending: Probation | None = None

    def start(self, request_id: str, drivers: Iterable[Any], rebuilt: Iterable[str], *, uplink_changed: bool,
              undo: Any) -> None:
        prev = self.pending  # a change on top of one still on probation inherits what it waits for
        waiting = (prev.rebuilt - prev.seen) if prev else set()
        self.pending = Probation(request_id, self.monotonic() + self.grace_s, _reads(drivers), set(rebuilt) | waiting,
                                 uplink_changed or bool(prev and prev.uplink_changed), undo)  # fmt: skip

    def poll(self, drivers: Iterable[Any], connected: bool) -> Verdict | None:
        p = self.pending
        if p is None:
            return None
        drivers = list(drivers)
        now = _reads(drivers)
        asleep = {d.name for d in drivers if getattr(d, "asleep", False) is True}
        p.seen |= {n for n, c in now.items() if c > p.reads_before.get(n, 0)}
        missing = sorted((p.rebuilt & set(now)) - p.seen - asleep)
        sensors_ok = bool(p.seen) and not missing
        link_ok = connected or not p.uplink_changed
        if sensors_ok and link_ok:
            self.pending = None
            return Verdict(p.request_id, True, f"healthy: readings from {', '.join(sorted(p.seen))}")
        if self.monotonic() < p.deadline:
            return None
        self.pending = None
        why = []
        if not p.seen:
            why.append("no sensor reading")
        elif missing:
            why.append(f"no reading from {', '.join(missing)}")
        if not link_ok:
            why.append("the uplink did not connect")
        return Verdict(p.request_id, False, f"{' and '.join(why)} within {self.grace_s:g} s of the change", p.undo)
