"""A postal-van route through Alphen aan den Rijn and a deterministic drive along it.

Two layers:

* :class:`Route`: the static geometry, loaded from ``simulator/data/alphen-route.geojson``.
  It answers "where am I after ``d`` metres along the loop?" in O(log n).
* :class:`Drive`: one van driving the loop over and over for a shift. Speeds depend on
  road class, and the van stops for deliveries and at traffic lights. The whole shift is
  planned up front as a timeline of constant-acceleration pieces, so
  :meth:`Drive.state_at` is a bisect plus a few multiplications. It is called at 1 Hz for
  8-hour shifts for many vans.

Everything is deterministic for a given seed. The same ``Drive(route, seed)`` always gives
the same states, whatever order the states are asked for in.
"""

from __future__ import annotations

import json
import math
import random
from bisect import bisect_right
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple

EARTH_RADIUS_M = 6_371_008.8

#: Road classes where the van stops for deliveries (letterboxes and parcels).
DELIVERY_CLASSES = frozenset({"residential", "tertiary", "living_street"})
#: Road classes with signalised junctions. A feature boundary that touches one of them
#: may have a red light.
SIGNAL_CLASSES = frozenset({"primary", "secondary", "trunk"})
#: Fallback speeds if a feature has no ``speed_kmh``.
DEFAULT_SPEED_KMH = {
    "motorway": 100.0, "trunk": 80.0, "primary": 70.0, "secondary": 50.0,
    "tertiary": 30.0, "residential": 30.0, "living_street": 15.0, "service": 20.0,
}


# ---------------------------------------------------------------------------------------
# Geometry helpers (pure functions)
# ---------------------------------------------------------------------------------------

def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two WGS84 points."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def initial_bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Course over ground from point 1 to point 2, in degrees clockwise from true north, [0, 360)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dl = math.radians(lon2 - lon1)
    x = math.sin(dl) * math.cos(p2)
    y = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(x, y)) % 360.0


# ---------------------------------------------------------------------------------------
# Route
# ---------------------------------------------------------------------------------------

class RoutePosition(NamedTuple):
    """A point on the route. It is a NamedTuple, so it unpacks as the six-tuple the API promises."""

    lat: float
    lon: float
    course_deg: float
    road_class: str
    gps_blocked: bool
    street_name: str


@dataclass(frozen=True)
class Segment:
    """The straight piece between route vertex ``i`` and ``i + 1``, with its feature's attributes."""

    start_m: float
    length_m: float
    lat0: float
    lon0: float
    lat1: float
    lon1: float
    course_deg: float
    road_class: str
    speed_kmh: float
    gps_blocked: bool
    street_name: str
    feature_index: int


class Route:
    """A polyline route built from the features of a GeoJSON FeatureCollection, in order.

    If the last vertex equals the first, the route is a closed loop and distances wrap
    around. Otherwise :meth:`position_at` clamps to the two ends.
    """

    def __init__(self, segments: list[Segment], *, closed: bool, properties: dict[str, Any] | None = None):
        if not segments:
            raise ValueError("route has no segments")
        self.segments: tuple[Segment, ...] = tuple(segments)
        self.closed = closed
        self.properties: dict[str, Any] = dict(properties or {})
        # Segment start offsets, kept separately so bisect needs no key function.
        self._starts: list[float] = [s.start_m for s in self.segments]
        last = self.segments[-1]
        self.length_m: float = last.start_m + last.length_m

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_geojson(cls, doc: dict[str, Any]) -> Route:
        """Build a route from a parsed GeoJSON FeatureCollection of LineStrings, in feature order."""
        if doc.get("type") != "FeatureCollection":
            raise ValueError("expected a GeoJSON FeatureCollection")
        segments: list[Segment] = []
        cum = 0.0
        first_pt: tuple[float, float] | None = None
        last_pt: tuple[float, float] | None = None
        for fi, feat in enumerate(doc["features"]):
            geom = feat.get("geometry") or {}
            if geom.get("type") != "LineString":
                raise ValueError(f"feature {fi}: only LineString geometry is supported")
            props = feat.get("properties") or {}
            road_class = str(props.get("road_class", "residential"))
            speed = float(props.get("speed_kmh") or DEFAULT_SPEED_KMH.get(road_class, 30.0))
            blocked = bool(props.get("gps_blocked", False))
            name = str(props.get("name", ""))
            pts = [(float(lat), float(lon)) for lon, lat, *_ in geom["coordinates"]]
            if first_pt is None:
                first_pt = pts[0]
            # Join features end to end. The shared vertex just gives a zero-length
            # segment, and those are skipped below.
            if last_pt is not None and pts[0] != last_pt:
                pts.insert(0, last_pt)
            for (la0, lo0), (la1, lo1) in zip(pts, pts[1:]):
                length = haversine_m(la0, lo0, la1, lo1)
                if length < 0.01:
                    continue
                segments.append(Segment(
                    start_m=cum, length_m=length, lat0=la0, lon0=lo0, lat1=la1, lon1=lo1,
                    course_deg=initial_bearing_deg(la0, lo0, la1, lo1), road_class=road_class,
                    speed_kmh=speed, gps_blocked=blocked, street_name=name, feature_index=fi,
                ))
                cum += length
            last_pt = pts[-1]
        closed = first_pt is not None and last_pt is not None and haversine_m(*first_pt, *last_pt) < 1.0
        return cls(segments, closed=closed, properties=doc.get("properties"))

    @classmethod
    def load(cls, resource: str = "data/alphen-route.geojson", package: str = "simulator") -> Route:
        """Load the packaged route. It works from a source tree and from an installed wheel."""
        text = resources.files(package).joinpath(resource).read_text(encoding="utf-8")
        return cls.from_geojson(json.loads(text))

    # -- queries ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.segments)

    def normalise(self, distance_m: float) -> float:
        """Map an odometer distance onto the route: wrap it on a loop, clamp it on an open line."""
        if self.closed:
            return distance_m % self.length_m
        return min(max(distance_m, 0.0), self.length_m)

    def segment_index_at(self, distance_m: float) -> int:
        """Index of the segment under ``distance_m``, found by bisection."""
        i = bisect_right(self._starts, self.normalise(distance_m)) - 1
        return min(max(i, 0), len(self.segments) - 1)

    def segment_at(self, distance_m: float) -> Segment:
        """The segment under ``distance_m``."""
        return self.segments[self.segment_index_at(distance_m)]

    def position_at(self, distance_m: float) -> RoutePosition:
        """Position, course and road attributes at ``distance_m`` along the route.

        Inside a segment the position is interpolated linearly in lat/lon. Segments are
        under a kilometre long, so the error against a great-circle path is well under a
        metre.
        """
        d = self.normalise(distance_m)
        seg = self.segment_at(d)
        f = min(max((d - seg.start_m) / seg.length_m, 0.0), 1.0)
        return RoutePosition(
            lat=seg.lat0 + f * (seg.lat1 - seg.lat0),
            lon=seg.lon0 + f * (seg.lon1 - seg.lon0),
            course_deg=seg.course_deg,
            road_class=seg.road_class,
            gps_blocked=seg.gps_blocked,
            street_name=seg.street_name,
        )

    def vertices(self) -> list[tuple[float, float]]:
        """All vertices as (lat, lon), in driving order."""
        out = [(self.segments[0].lat0, self.segments[0].lon0)]
        out.extend((s.lat1, s.lon1) for s in self.segments)
        return out

    def blocked_stretches(self) -> list[tuple[float, float]]:
        """(start_m, end_m) of each stretch where the GNSS fix is lost. Adjacent segments are merged."""
        out: list[tuple[float, float]] = []
        for s in self.segments:
            if not s.gps_blocked:
                continue
            if out and abs(out[-1][1] - s.start_m) < 1e-6:
                out[-1] = (out[-1][0], s.start_m + s.length_m)
            else:
                out.append((s.start_m, s.start_m + s.length_m))
        return out


# ---------------------------------------------------------------------------------------
# Drive
# ---------------------------------------------------------------------------------------

class VanState(NamedTuple):
    """What the van is doing at one instant. This is the truth; the simulated GPS adds its own noise."""

    lat: float
    lon: float
    speed_mps: float
    course_deg: float
    moving: bool
    stopped_for_delivery: bool
    road_class: str
    gps_blocked: bool
    street: str


# The kinds of timeline piece.
MOVE, DELIVERY, SIGNAL, PARKED = 0, 1, 2, 3


@dataclass(frozen=True)
class DriveParams:
    """Tunable behaviour of the van. The defaults are plausible for a PostNL-style delivery van."""

    shift_s: float = 8 * 3600.0
    accel_mps2: float = 1.0  # a loaded van pulls away gently
    decel_mps2: float = 1.5
    speed_factor: tuple[float, float] = (0.85, 1.0)  # the driver's share of the limit, drawn per drive
    delivery_gap_m: tuple[float, float] = (100.0, 400.0)  # distance between stops on delivery streets
    delivery_dwell_s: tuple[float, float] = (30.0, 120.0)
    signal_probability: float = 0.45  # chance of a red light at a signalised junction
    signal_wait_s: tuple[float, float] = (10.0, 60.0)


@dataclass(frozen=True)
class _Chunk:
    """A stretch of the drive with one speed limit. The distances are odometer metres."""

    start: float
    length: float
    vmax: float


class Drive:
    """One van driving the route repeatedly for a shift. It is deterministic for ``seed``.

    The timeline is a sorted list of pieces. Each piece has a start time, start odometer,
    start speed, constant acceleration and a kind (moving, delivery stop, red light,
    parked). It is built once in ``__init__``. After that, :meth:`state_at` does one
    bisect and a route lookup, both O(log n).

    When the shift ends the van stays parked where it stopped. Asking for a time past
    the end therefore gives a stationary van, not an error.
    """

    def __init__(self, route: Route, seed: int, start_offset_m: float = 0.0,
                 params: DriveParams | None = None):
        self.route = route
        self.seed = seed
        self.start_offset_m = float(start_offset_m)
        self.params = params or DriveParams()
        # A string seed goes through SHA-512, so the stream does not depend on PYTHONHASHSEED.
        self._rng = random.Random(f"drive:{seed}:{self.start_offset_m:.3f}")
        self._speed_factor = self._rng.uniform(*self.params.speed_factor)
        self._t0: list[float] = []
        self._d0: list[float] = []
        self._v0: list[float] = []
        self._a: list[float] = []
        self._kind: list[int] = []
        self._build()

    # -- public API -----------------------------------------------------------------------

    @property
    def shift_s(self) -> float:
        return self.params.shift_s

    @property
    def end_time_s(self) -> float:
        """When the planned timeline ends. This is at least ``shift_s``."""
        return self._t0[-1]

    def odometer_at(self, t: float) -> float:
        """Metres driven since shift start. It never decreases as ``t`` grows."""
        i, dt = self._piece(t)
        return self._d0[i] + self._v0[i] * dt + 0.5 * self._a[i] * dt * dt

    def state_at(self, t: float) -> VanState:
        """The van's state ``t`` seconds after the shift started."""
        i, dt = self._piece(t)
        kind = self._kind[i]
        d = self._d0[i] + self._v0[i] * dt + 0.5 * self._a[i] * dt * dt
        v = max(0.0, self._v0[i] + self._a[i] * dt) if kind == MOVE else 0.0
        pos = self.route.position_at(self.start_offset_m + d)
        return VanState(
            lat=pos.lat, lon=pos.lon, speed_mps=v, course_deg=pos.course_deg,
            moving=kind == MOVE and v > 0.1, stopped_for_delivery=kind == DELIVERY,
            road_class=pos.road_class, gps_blocked=pos.gps_blocked, street=pos.street_name,
        )

    def stops(self) -> list[tuple[float, float, str]]:
        """(start_t, duration_s, kind) for every stop in the shift. Useful for tests and plots."""
        names = {DELIVERY: "delivery", SIGNAL: "signal"}
        out = []
        for i, k in enumerate(self._kind[:-1]):
            if k in names:
                out.append((self._t0[i], self._t0[i + 1] - self._t0[i], names[k]))
        return out

    # -- timeline -----------------------------------------------------------------------

    def _piece(self, t: float) -> tuple[int, float]:
        t = max(0.0, float(t))
        i = bisect_right(self._t0, t) - 1
        return i, t - self._t0[i]

    def _emit(self, t: float, d: float, v: float, a: float, kind: int) -> None:
        self._t0.append(t)
        self._d0.append(d)
        self._v0.append(v)
        self._a.append(a)
        self._kind.append(kind)

    def _chunks_from(self, odo: float):
        """Endless stream of (chunk, is_signal_junction, is_delivery_street), starting at odometer ``odo``."""
        route = self.route
        segs = route.segments
        base = odo - route.normalise(self.start_offset_m + odo)  # odometer of route distance 0
        i = route.segment_index_at(self.start_offset_m + odo)
        first = True
        while True:
            s = segs[i]
            start = base + s.start_m
            seg_end = start + s.length_m
            lo = odo if first else start
            prev = segs[i - 1]
            junction = (not first and prev.feature_index != s.feature_index
                        and (prev.road_class in SIGNAL_CLASSES or s.road_class in SIGNAL_CLASSES))
            vmax = max(1.0, s.speed_kmh / 3.6 * self._speed_factor)
            if seg_end - lo > 1e-6:
                yield _Chunk(lo, seg_end - lo, vmax), junction, s.road_class in DELIVERY_CLASSES
            first = False
            i += 1
            if i == len(segs):
                if not route.closed:
                    return  # an open route: the van parks at the far end
                i = 0
                base += route.length_m

    def _build(self) -> None:
        p, rng = self.params, self._rng
        t, odo = 0.0, 0.0
        run: list[_Chunk] = []
        next_delivery = rng.uniform(*p.delivery_gap_m)  # delivery-street metres until the next stop

        def flush_run(kind_after: int, dwell: float) -> None:
            nonlocal t, odo, run
            if run:
                t, odo = self._plan_run(run, t)
                run = []
            if dwell > 0:
                self._emit(t, odo, 0.0, 0.0, kind_after)
                t += dwell

        for chunk, junction, delivery_street in self._chunks_from(0.0):
            # Time only advances when a run is planned, so add an estimate for the open
            # run. Without it, a route with no stops at all would never end.
            if t + sum(c.length / c.vmax for c in run) >= p.shift_s:
                break
            if junction and rng.random() < p.signal_probability:
                flush_run(SIGNAL, rng.uniform(*p.signal_wait_s))
            pos, remaining = chunk.start, chunk.length
            while delivery_street and next_delivery <= remaining:
                run.append(_Chunk(pos, next_delivery, chunk.vmax))
                pos += next_delivery
                remaining -= next_delivery
                flush_run(DELIVERY, rng.uniform(*p.delivery_dwell_s))
                next_delivery = rng.uniform(*p.delivery_gap_m)
            if remaining > 1e-6:
                run.append(_Chunk(pos, remaining, chunk.vmax))
                if delivery_street:
                    next_delivery -= remaining
        flush_run(MOVE, 0.0)
        self._emit(t, odo, 0.0, 0.0, PARKED)  # the van rests here for good

    def _plan_run(self, run: list[_Chunk], t: float) -> tuple[float, float]:
        """Emit kinematic pieces for one stop-to-stop run, starting and ending at rest.

        This is the usual forward/backward pass over the speed at each chunk boundary,
        then a trapezoid inside each chunk. The result keeps within every chunk's limit
        and keeps within the acceleration bounds.
        """
        acc, dec = self.params.accel_mps2, self.params.decel_mps2
        n = len(run)
        u = [0.0] * (n + 1)  # speed at each boundary
        for k in range(1, n):
            u[k] = min(run[k - 1].vmax, run[k].vmax)
        for k in range(n):  # forward: can we get up to this speed in time?
            u[k + 1] = min(u[k + 1], math.sqrt(u[k] ** 2 + 2 * acc * run[k].length))
        for k in range(n - 1, -1, -1):  # backward: can we still brake in time?
            u[k] = min(u[k], math.sqrt(u[k + 1] ** 2 + 2 * dec * run[k].length))
        odo = run[0].start
        for k, c in enumerate(run):
            ui, uo, length = u[k], u[k + 1], c.length
            # The peak speed where the accel and decel ramps meet, capped at the limit.
            vp2 = (2 * acc * dec * length + dec * ui ** 2 + acc * uo ** 2) / (acc + dec)
            vp = max(min(c.vmax, math.sqrt(max(vp2, 0.0))), ui, uo)
            da = (vp ** 2 - ui ** 2) / (2 * acc)
            dd = (vp ** 2 - uo ** 2) / (2 * dec)
            cruise = max(0.0, length - da - dd)
            if vp - ui > 1e-9:
                self._emit(t, odo, ui, acc, MOVE)
                t += (vp - ui) / acc
                odo += da
            if cruise > 1e-9 and vp > 1e-9:
                self._emit(t, odo, vp, 0.0, MOVE)
                t += cruise / vp
                odo += cruise
            if vp - uo > 1e-9:
                self._emit(t, odo, vp, -dec, MOVE)
                t += (vp - uo) / dec
                odo += dd
            # Snap to the exact chunk end so rounding does not build up over a shift.
            odo = c.start + c.length
        return t, odo
