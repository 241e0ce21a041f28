"""A simulated van: where it is and what the air and the street sound like there, at clock time.

The world is the truth. Simulated sensors read it and add their own noise,
warm-up and faults, as real ones would.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from core.clock import Clock
from simulator.environment import Conditions, Environment
from simulator.route import Drive, Route, VanState


@lru_cache(maxsize=1)
def shipped_route() -> Route:
    return Route.load()


@dataclass(frozen=True, slots=True)
class Truth:
    van: VanState
    air: Conditions


class VanWorld:
    """The van of one agent: its drive along the route and the environment it meets."""

    def __init__(
        self,
        clock: Clock,
        *,
        shift_start_utc: float,
        seed: int = 1,
        start_offset_m: float = 0.0,
        route: Route | None = None,
        environment: Environment | None = None,
    ) -> None:
        self.clock = clock
        self.shift_start_utc = shift_start_utc
        self.seed = seed
        self.drive = Drive(route or shipped_route(), seed, start_offset_m=start_offset_m)
        self.env = environment or Environment(seed=seed)
        self._cache_t: float | None = None
        self._cache: Truth | None = None

    def now_utc(self) -> float:
        """True time: a simulated Pi's own clock may be wrong, the world is not."""
        true_utc = getattr(self.clock, "true_utc", None)
        return true_utc() if true_utc is not None else self.clock.utc()

    def truth(self) -> Truth:
        """The truth now; cached per clock instant (all sensors of one tick share it)."""
        t = self.now_utc()
        if self._cache is None or t != self._cache_t:
            self._cache_t, self._cache = t, self.truth_at(t)
        return self._cache

    def truth_at(self, utc: float) -> Truth:
        van = self.drive.state_at(utc - self.shift_start_utc)
        air = self.env.at(van.lat, van.lon, van.road_class, utc)
        return Truth(van, air)
