"""The truth along a van's day, and the true map: what a perfect fleet would publish.

:class:`VanDay` is one van's shift at 1 Hz as it really was: where the van was
(the route drive of :mod:`simulator.route`) and the field there
(:mod:`simulator.environment`), the same two calls as :meth:`VanWorld.truth_at`.

:func:`unit_map` turns tracks (true or measured) into map values with the receiver's
own pass and median code (:mod:`receiver.aggregate`), so "the true mean of the field
over a unit's place and passes" is computed exactly as the published value is: the
median over the van's true passes through the unit of the true field's pass mean.
A perfect fleet's map equals it to float error (tests/test_bench_fidelity.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from receiver.aggregate import QUANTITY_KEYS, Accumulator, Rule, Track, UnitValue, track_passes
from receiver.mapunits import ArraySnapper
from simulator.environment import Environment, local_time, ozone_ppb
from simulator.route import Drive, DriveParams, Route

#: Rows per second of a truth track: one per map sensor (pm, no2, noise), like the samples.
SENSOR_ROWS = (("pm", ("pm25", "pm10")), ("no2", ("no2_ppb",)), ("noise", ("laeq",)))
#: The map quantities the fidelity bench compares.
MAP_KEYS = ("pm25", "pm10", "no2_ppb", "laeq")


def make_track(
    device: str, t_ms: np.ndarray, lat: np.ndarray, lon: np.ndarray, values: np.ndarray
) -> Track:
    """An aggregate :class:`Track`; nothing in it counts as left out by a flag policy.

    With issue 15's flag policy the receiver's Track also carries an ``excluded`` mask
    (values the policy left out, counted per unit): filled with False when it has one.
    """
    if "excluded" in getattr(Track, "__dataclass_fields__", {}):
        return Track(device, t_ms, lat, lon, values, np.zeros(values.shape, dtype=bool))  # type: ignore[call-arg]
    return Track(device, t_ms, lat, lon, values)


@dataclass
class VanDay:
    """One van's shift, per second: true position and field."""

    device: str
    t0_utc: float  # the first tick, epoch seconds
    lat: np.ndarray
    lon: np.ndarray
    blocked: np.ndarray  # no GPS here (a street canyon, an aquaduct)
    speed: np.ndarray
    course: np.ndarray
    pm25: np.ndarray
    pm10: np.ndarray
    no2: np.ndarray
    o3: np.ndarray
    laeq: np.ndarray
    temp: np.ndarray
    rh: np.ndarray

    @property
    def n(self) -> int:
        return len(self.lat)

    def t_ms(self) -> np.ndarray:
        return np.round((self.t0_utc + np.arange(self.n)) * 1000).astype(np.int64)

    @classmethod
    def drive(
        cls,
        route: Route,
        env: Environment,
        device: str,
        *,
        t0_utc: float,
        seconds: int,
        seed: int,
        offset_m: float,
    ) -> VanDay:
        d = Drive(route, seed, start_offset_m=offset_m, params=DriveParams(shift_s=float(seconds)))
        cols: dict[str, list[float]] = {
            k: []
            for k in (
                "lat",
                "lon",
                "blocked",
                "speed",
                "course",
                "pm25",
                "pm10",
                "no2",
                "o3",
                "laeq",
                "temp",
                "rh",
            )
        }
        hour0 = local_time(t0_utc).hour
        for s in range(seconds):
            v = d.state_at(float(s))
            a = env.at(v.lat, v.lon, v.road_class, t0_utc + s)
            for k, x in (
                ("lat", v.lat),
                ("lon", v.lon),
                ("blocked", v.gps_blocked),
                ("speed", v.speed_mps),
                ("course", v.course_deg),
                ("pm25", a.pm25),
                ("pm10", a.pm10),
                ("no2", a.no2_ppb),
                ("o3", ozone_ppb(a.no2_ppb, hour0 + s / 3600.0)),
                ("laeq", a.noise_laeq_db),
                ("temp", a.temp_c),
                ("rh", a.rh_pct),
            ):
                cols[k].append(x)
        arr = {k: np.asarray(v, dtype=bool if k == "blocked" else float) for k, v in cols.items()}
        return cls(device, t0_utc, **arr)


def sensor_track(
    device: str, t_ms: np.ndarray, lat: np.ndarray, lon: np.ndarray, values: dict[str, np.ndarray]
) -> Track:
    """A :class:`Track` with one row per second and sensor, as the store holds them.

    ``values``: quantity -> one value per second (NaN: none usable). Rows of one second
    come in SENSOR_ROWS order; the track is sorted by time (stable), like track_sql's.
    """
    n = len(t_ms)
    k = len(SENSOR_ROWS)
    vals = np.full((n * k, len(QUANTITY_KEYS)), np.nan)
    for i, (_, qs) in enumerate(SENSOR_ROWS):
        for q in qs:
            vals[i::k, QUANTITY_KEYS.index(q)] = values[q]
    t = np.repeat(t_ms, k)
    order = np.argsort(t, kind="stable")
    return make_track(
        device, t[order], np.repeat(lat, k)[order], np.repeat(lon, k)[order], vals[order]
    )


def truth_track(days: list[VanDay]) -> Track:
    """The true track of one van over several days: true times, places and field."""
    t = np.concatenate([d.t_ms() for d in days])
    cat = lambda name: np.concatenate([getattr(d, name) for d in days])
    return sensor_track(
        days[0].device,
        t,
        cat("lat"),
        cat("lon"),
        {"pm25": cat("pm25"), "pm10": cat("pm10"), "no2_ppb": cat("no2"), "laeq": cat("laeq")},
    )


def unit_map(
    tracks: list[Track], snapper: ArraySnapper, rule: Rule, max_gap_s: float = 30.0
) -> dict[tuple[str, str], UnitValue]:
    """(unit, quantity) -> value, with the receiver's passes, pass means and medians."""
    acc = Accumulator()
    for tr in tracks:
        if len(tr.t_ms):
            acc.add(tr, track_passes(tr, snapper.snap_array(tr.lat, tr.lon), max_gap_s))
    return {(v.unit, v.quantity): v for v in acc.unit_values(snapper.unit_of, rule)}
