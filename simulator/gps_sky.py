"""What a GPS receiver's sky looks like second by second: satellites, dilution, altitude.

A real receiver's fix fields are never constants: satellites rise, set and are shaded
by buildings (the used count moves by one or two every few tens of seconds), HDOP
follows the geometry, and the altitude wanders by metres (vertical error is about
1.5 times the horizontal). Constant values here made the wire format look better
than it is on a real van (issue #18: 20-23 % of the values counted were constants).

Deterministic for a seed; ``at(t)`` must be called with non-decreasing ``t`` (it is a
random walk advanced one step per whole second).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sky:
    altitude: float  # m above mean sea level, as GGA prints it (0.1 m)
    sats_used: int
    sats_in_view: int
    hdop: float
    pdop: float
    vdop: float


class SkyModel:
    """Random walks of the satellites in view and used, and the errors they give."""

    def __init__(self, seed: int = 0, *, ground_m: float = 2.0, in_view: int = 14) -> None:
        self._rng = random.Random(f"sky:{seed}")
        self.ground_m = ground_m  # the Dutch polders: a few metres above sea level
        self._in_view = in_view
        self._used = in_view - 4
        self._alt_err = 0.0
        self._second: int | None = None
        self._sky = self._make()

    def _step(self) -> None:
        r = self._rng
        # Rising and setting (a satellite every few minutes), shading by buildings (seconds).
        if r.random() < 0.02:
            self._in_view = max(8, min(24, self._in_view + r.choice((-1, 1))))
        if r.random() < 0.08:
            self._used = self._used + r.choice((-1, 1))
        self._used = max(4, min(self._in_view, self._used))
        # Vertical error: a slow, mean-reverting walk of a few metres.
        self._alt_err = 0.97 * self._alt_err + r.gauss(0, 0.6)

    def _make(self) -> Sky:
        r = self._rng
        # Dilution grows as fewer satellites are used; a little jitter from the geometry.
        hdop = max(0.5, 5.5 / math.sqrt(self._used) - 0.9 + r.gauss(0, 0.04))
        vdop = hdop * (1.35 + r.gauss(0, 0.03))
        return Sky(
            altitude=round(self.ground_m + self._alt_err, 1),
            sats_used=self._used,
            sats_in_view=self._in_view,
            hdop=round(hdop, 2),
            pdop=round(math.hypot(hdop, vdop), 2),
            vdop=round(vdop, 2),
        )

    def at(self, t: float) -> Sky:
        second = math.floor(t)
        if self._second is None:
            self._second = second
        while self._second < second:
            self._second += 1
            self._step()
            self._sky = self._make()
        return self._sky
