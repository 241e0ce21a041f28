"""Map units a positioned sample is assigned to: ~30 m road segments, or H3 cells.

Road segments follow Apte et al. (2017): streets cut into pieces of about 30 m, each
sample snapped to the nearest piece within a distance (25 m by default; farther
samples are *unsnapped* and left out, e.g. a van in a yard). The pieces are cut from
a GeoJSON file of street LineStrings; by default the route shipped with the
simulator (``simulator/data/alphen-route.geojson``), the pilot area's streets.

A road file may list the same street twice (a van drives out and back along
Ondernemingsweg: two features over the same vertices). A street map wants one unit
per piece of street whatever the direction, so edges already seen, in either
direction, are dropped before cutting. Otherwise GPS noise would flip samples
between two coinciding pieces and split passes for nothing.

H3 cells (``h3.latlng_to_cell``) need no road file: resolution 10 has ~66 m edges,
11 ~25 m. Cell ids are global and name their resolution.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np

EARTH_RADIUS_M = 6_371_008.8
DEFAULT_PIECE_M = 30.0
DEFAULT_SNAP_M = 25.0
DEFAULT_H3_RES = 10


class Snapper(Protocol):
    scheme: str

    def snap(self, lat: float, lon: float) -> str | None:
        """The unit id for a position, or None when the position belongs to no unit."""

    def geometry(self, unit: str) -> dict[str, Any]:
        """The unit's GeoJSON geometry (WGS84, lon/lat order)."""

    def properties(self, unit: str) -> dict[str, Any]:
        """Descriptive properties (street name, road class ...)."""


class ArraySnapper(Snapper, Protocol):
    """A snapper that also snaps whole columns of positions (what the aggregation uses).

    Units come back as integer *codes* (-1: no unit) so that a month of samples never
    becomes a list of strings; :meth:`unit_of` names a code.
    """

    def snap_array(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """Unit codes (int64, -1 for none) of many positions; the same units as :meth:`snap`."""

    def unit_of(self, code: int) -> str:
        """The unit id of a code from :meth:`snap_array`."""


def run_starts(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Indices where the position differs from the one before: the three sensors of one
    second share a position, so each run needs snapping once."""
    n = len(lat)
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = (lat[1:] != lat[:-1]) | (lon[1:] != lon[:-1])
    return np.flatnonzero(first)


# -- H3 --------------------------------------------------------------------------------


class H3Snapper:
    """Samples to H3 cells at one resolution. Scheme name ``h3:<res>``."""

    def __init__(self, resolution: int = DEFAULT_H3_RES) -> None:
        import h3  # imported here: only the H3 scheme needs it
        from h3.api import basic_int

        if not 0 <= resolution <= 15:
            raise ValueError("H3 resolution must be 0..15")
        self._h3 = h3
        self._to_int = basic_int.latlng_to_cell  # the same cell as an int: no string per sample
        self.resolution = resolution
        self.scheme = f"h3:{resolution}"

    def snap(self, lat: float, lon: float) -> str | None:
        return self._h3.latlng_to_cell(lat, lon, self.resolution)

    def snap_array(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        # H3 cell ids are 64-bit with the top bit clear, so they fit int64 codes as they are.
        # h3 has no vectorised call; one call per run of equal positions (~0.5 us each).
        starts = run_starts(lat, lon)
        f, res = self._to_int, self.resolution
        cells = np.fromiter((f(a, b, res) for a, b in zip(lat[starts].tolist(), lon[starts].tolist())),
                            dtype=np.int64, count=len(starts))
        return np.repeat(cells, np.diff(np.append(starts, len(lat))))

    def unit_of(self, code: int) -> str:
        return self._h3.int_to_str(int(code))

    def geometry(self, unit: str) -> dict[str, Any]:
        ring = [[round(lng, 7), round(lat, 7)] for lat, lng in self._h3.cell_to_boundary(unit)]
        ring.append(ring[0])
        return {"type": "Polygon", "coordinates": [ring]}

    def properties(self, unit: str) -> dict[str, Any]:
        return {"h3_resolution": self.resolution}


# -- road segments ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Piece:
    """One ~30 m piece of a street: a short polyline (lon/lat) with its street's attributes."""

    id: str
    name: str
    road_class: str
    coords: tuple[tuple[float, float], ...]  # (lon, lat)
    length_m: float


class _Projection:
    """Local equirectangular projection in metres: accurate to well under 1 % over a city."""

    def __init__(self, lat0: float, lon0: float) -> None:
        self.lat0, self.lon0 = lat0, lon0
        self.kx = math.radians(1) * EARTH_RADIUS_M * math.cos(math.radians(lat0))
        self.ky = math.radians(1) * EARTH_RADIUS_M

    def xy(self, lon: float, lat: float) -> tuple[float, float]:
        return (lon - self.lon0) * self.kx, (lat - self.lat0) * self.ky

    def lonlat(self, x: float, y: float) -> tuple[float, float]:
        return self.lon0 + x / self.kx, self.lat0 + y / self.ky


def _point_segment_m(px: float, py: float, ax: float, ay: float, bx: float, by: float) -> float:
    dx, dy = bx - ax, by - ay
    L2 = dx * dx + dy * dy
    t = 0.0 if L2 == 0 else max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / L2))
    return math.hypot(px - (ax + t * dx), py - (ay + t * dy))


def load_road_features(path: str | Path | None = None) -> list[dict[str, Any]]:
    """LineString (and MultiLineString) features of a road file; default: the shipped route."""
    if path is None:
        text = resources.files("simulator").joinpath("data/alphen-route.geojson").read_text()
    else:
        text = Path(path).read_text()
    doc = json.loads(text)
    out = []
    for f in doc.get("features", []):
        g = f.get("geometry") or {}
        lines = [g["coordinates"]] if g.get("type") == "LineString" else (
            g["coordinates"] if g.get("type") == "MultiLineString" else [])
        for line in lines:
            out.append({"properties": f.get("properties") or {}, "coordinates": line})
    if not out:
        raise ValueError("the road file has no LineString features")
    return out


def cut_pieces(features: list[dict[str, Any]], piece_m: float = DEFAULT_PIECE_M) -> list[Piece]:
    """Cut each street into pieces of about ``piece_m`` (equal lengths per chain of new edges)."""
    lons = [c[0] for f in features for c in f["coordinates"]]
    lats = [c[1] for f in features for c in f["coordinates"]]
    proj = _Projection((min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2)
    seen: set[tuple[tuple[float, float], tuple[float, float]]] = set()
    pieces: list[Piece] = []
    for fi, f in enumerate(features):
        props = f["properties"]
        pts = [(round(c[0], 7), round(c[1], 7)) for c in f["coordinates"]]
        # Chains of consecutive edges not seen before (in either direction).
        chains: list[list[tuple[float, float]]] = []
        current: list[tuple[float, float]] = []
        for a, b in zip(pts, pts[1:]):
            if a == b:
                continue
            key = (a, b) if a < b else (b, a)
            if key in seen:
                if len(current) > 1:
                    chains.append(current)
                current = []
                continue
            seen.add(key)
            if not current:
                current = [a]
            current.append(b)
        if len(current) > 1:
            chains.append(current)
        for ci, chain in enumerate(chains):
            for pi, (coords, length) in enumerate(_cut(chain, proj, piece_m)):
                pieces.append(Piece(
                    id=f"s{fi:03d}-{ci}-{pi:03d}",
                    name=str(props.get("name", "")),
                    road_class=str(props.get("road_class", "")),
                    coords=tuple(coords),
                    length_m=round(length, 1),
                ))
    return pieces


def _cut(chain: list[tuple[float, float]], proj: _Projection, piece_m: float):  # type: ignore[no-untyped-def]
    """Yield (coords, length) of equal pieces along a polyline, each close to ``piece_m``."""
    xy = [proj.xy(*p) for p in chain]
    steps = [math.hypot(bx - ax, by - ay) for (ax, ay), (bx, by) in zip(xy, xy[1:])]
    total = sum(steps)
    n = max(1, round(total / piece_m))
    size = total / n
    cuts = [size * k for k in range(n + 1)]
    cuts[-1] = total
    # Walk the polyline once, emitting each piece's vertices and its cut points.
    acc = 0.0
    piece: list[tuple[float, float]] = [chain[0]]
    k = 1
    for (ax, ay), (bx, by), step in zip(xy, xy[1:], steps):
        while k <= n and cuts[k] <= acc + step + 1e-9:
            t = (cuts[k] - acc) / step if step else 1.0
            p = proj.lonlat(ax + t * (bx - ax), ay + t * (by - ay))
            p = (round(p[0], 7), round(p[1], 7))
            if piece[-1] != p:
                piece.append(p)
            yield piece, size
            piece = [p]
            k += 1
        acc += step
        end = proj.lonlat(bx, by)
        end = (round(end[0], 7), round(end[1], 7))
        if k <= n and piece[-1] != end:
            piece.append(end)


# Snapping keys: positions rounded to 1e-5 degree (~1 m), packed into one int64.
_KEY_SCALE = 1e5
_KEY_LON_SPAN = 40_000_000  # > 2 x 180 x 1e5: room for every rounded longitude


class SegmentSnapper:
    """Samples to the nearest ~30 m road piece within ``max_m``. Scheme name ``segment``.

    A uniform grid (cell = ``max_m``) indexes the pieces: a position looks only at
    the pieces registered in its own grid cell, so snapping stays O(1) per sample
    however large the city's road file is.
    """

    scheme = "segment"

    def __init__(self, pieces: list[Piece], max_m: float = DEFAULT_SNAP_M) -> None:
        if not pieces:
            raise ValueError("no road pieces")
        self.pieces = {p.id: p for p in pieces}
        self._ids = [p.id for p in pieces]  # unit code -> piece id
        self._code = {pid: i for i, pid in enumerate(self._ids)}
        self.max_m = max_m
        lats = [c[1] for p in pieces for c in p.coords]
        lons = [c[0] for p in pieces for c in p.coords]
        self.proj = _Projection((min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2)
        self.cell = max_m
        self._xy: dict[str, list[tuple[float, float]]] = {}
        self._grid: dict[tuple[int, int], list[str]] = {}
        self._memo: dict[int, int] = {}  # snapping key -> unit code (-1: none)
        for p in pieces:
            xy = [self.proj.xy(*c) for c in p.coords]
            self._xy[p.id] = xy
            xs, ys = [x for x, _ in xy], [y for _, y in xy]
            # Register the piece in every grid cell within max_m of its bounding box.
            for gx in range(self._g(min(xs) - max_m), self._g(max(xs) + max_m) + 1):
                for gy in range(self._g(min(ys) - max_m), self._g(max(ys) + max_m) + 1):
                    self._grid.setdefault((gx, gy), []).append(p.id)

    @classmethod
    def from_file(cls, path: str | Path | None = None, *, piece_m: float = DEFAULT_PIECE_M,
                  max_m: float = DEFAULT_SNAP_M) -> SegmentSnapper:
        return cls(cut_pieces(load_road_features(path), piece_m), max_m)

    def _g(self, v: float) -> int:
        return math.floor(v / self.cell)

    def nearest(self, lat: float, lon: float) -> tuple[str | None, float]:
        """(piece id, distance in m) of the nearest piece within ``max_m``, else (None, inf)."""
        x, y = self.proj.xy(lon, lat)
        best, best_d = None, math.inf
        for pid in self._grid.get((self._g(x), self._g(y)), ()):
            xy = self._xy[pid]
            d = min(_point_segment_m(x, y, ax, ay, bx, by) for (ax, ay), (bx, by) in zip(xy, xy[1:]))
            if d < best_d:
                best, best_d = pid, d
        if best_d > self.max_m:
            return None, math.inf
        return best, best_d

    # Samples of the three sensors in one second, a van standing still, and vans driving
    # the same streets day after day share positions to within a metre: snapping works on
    # positions rounded to ~1 m, each distinct one computed once (memo) and reused.
    _MEMO_MAX = 500_000

    def _code_of_key(self, ki: int, kj: int) -> int:
        key = ki * _KEY_LON_SPAN + kj
        code = self._memo.get(key)
        if code is None:
            if len(self._memo) > self._MEMO_MAX:
                self._memo.clear()
            pid = self.nearest(ki / _KEY_SCALE, kj / _KEY_SCALE)[0]
            code = self._memo[key] = -1 if pid is None else self._code[pid]
        return code

    def snap(self, lat: float, lon: float) -> str | None:
        # round() halves to even on the product, as np.rint does in snap_array: same keys.
        code = self._code_of_key(round(lat * _KEY_SCALE), round(lon * _KEY_SCALE))
        return None if code < 0 else self._ids[code]

    def snap_array(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        ki = np.rint(np.asarray(lat, dtype=np.float64) * _KEY_SCALE).astype(np.int64)
        kj = np.rint(np.asarray(lon, dtype=np.float64) * _KEY_SCALE).astype(np.int64)
        keys, first, inverse = np.unique(ki * _KEY_LON_SPAN + kj, return_index=True, return_inverse=True)
        ki_u, kj_u = ki[first].tolist(), kj[first].tolist()
        codes = np.fromiter((self._code_of_key(a, b) for a, b in zip(ki_u, kj_u)), dtype=np.int64,
                            count=len(keys))
        return codes[inverse.reshape(-1)]

    def unit_of(self, code: int) -> str:
        return self._ids[int(code)]

    def geometry(self, unit: str) -> dict[str, Any]:
        return {"type": "LineString", "coordinates": [list(c) for c in self.pieces[unit].coords]}

    def properties(self, unit: str) -> dict[str, Any]:
        p = self.pieces[unit]
        return {"street": p.name, "road_class": p.road_class, "length_m": p.length_m}


def make_snapper(scheme: str, *, roads: str | Path | None = None, piece_m: float = DEFAULT_PIECE_M,
                 snap_m: float = DEFAULT_SNAP_M) -> Snapper:
    """``segment`` or ``h3:<res>`` (``h3`` alone means resolution 10)."""
    if scheme == "segment":
        return SegmentSnapper.from_file(roads, piece_m=piece_m, max_m=snap_m)
    if scheme == "h3" or scheme.startswith("h3:"):
        res = int(scheme.split(":", 1)[1]) if ":" in scheme else DEFAULT_H3_RES
        return H3Snapper(res)
    raise ValueError(f"unknown map scheme {scheme!r}: use 'segment' or 'h3:<resolution>'")
