"""What the dashboard draws under the data: map tiles from a configured URL, else the streets.

A city's server often has no way out to a tile service (or may not send its visitors' map
views to one), so the dashboard must show streets without one: the street lines the ``segment``
map units are cut from (receiver/mapunits.py ``load_road_features``: the roads file, by default
the shipped pilot route) are served within the data's bounding box and drawn as a grey
network. With ``serve --tile-url`` (or ``DATALAB_TILE_URL``) set, e.g.
``https://tile.openstreetmap.org/{z}/{x}/{y}.png``, the page draws those raster tiles instead,
and the page's Content-Security-Policy admits that one origin for images.

Road lines are public map data (no van, no time), so the route is public.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from receiver.mapunits import load_road_features

TILE_FIELDS = ("{z}", "{x}", "{y}")
MAX_STREETS = 20_000  # lines in one answer: a city's network within a view, not a country's


def check_tile_url(url: str) -> str:
    """``url`` if it is an http(s) template with {z}, {x} and {y}; ``ValueError`` says what is missing."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"a tile URL is http(s)://host/...{{z}}/{{x}}/{{y}}..., not {url!r}")
    missing = [f for f in TILE_FIELDS if f not in url]
    if missing:
        raise ValueError(f"the tile URL lacks {', '.join(missing)}")
    return url


def tile_origin(url: str) -> str:
    """The origin the browser must be allowed to load images from (CSP ``img-src``)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass
class Basemap:
    tile_url: str | None = None
    attribution: str = ""
    roads: str | Path | None = None  # None: the shipped pilot route
    _lines: list[dict[str, Any]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tile_url:
            check_tile_url(self.tile_url)

    def lines(self) -> list[dict[str, Any]]:
        if self._lines is None:  # read once, on first use: serve starts without touching it
            self._lines = load_road_features(self.roads)
        return self._lines

    def csp_img_src(self) -> str:
        return "'self' data:" + (f" {tile_origin(self.tile_url)}" if self.tile_url else "")

    def answer(self, bbox: tuple[float, float, float, float] | None) -> dict[str, Any]:
        """``/api/v1/basemap``: the tile URL, or the streets that touch ``bbox`` (west, south, east, north)."""
        if self.tile_url:
            return {"tile_url": self.tile_url, "attribution": self.attribution}
        feats = []
        for f in self.lines():
            coords = f["coordinates"]
            if bbox is not None and not _touches(coords, bbox):
                continue
            props = f["properties"]
            feats.append({"type": "Feature", "geometry": {"type": "LineString", "coordinates": coords},
                          "properties": {"name": props.get("name"), "road_class": props.get("road_class")}})
            if len(feats) >= MAX_STREETS:
                break
        return {"tile_url": None, "streets": {"type": "FeatureCollection", "features": feats}}


def _touches(coords: list[list[float]], bbox: tuple[float, float, float, float]) -> bool:
    w, s, e, n = bbox
    lons = [c[0] for c in coords]
    lats = [c[1] for c in coords]
    return min(lons) <= e and max(lons) >= w and min(lats) <= n and max(lats) >= s


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    """``west,south,east,north`` in degrees; ``ValueError`` for anything else."""
    if not text:
        return None
    try:
        w, s, e, n = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError("bbox is west,south,east,north in degrees") from None
    if not (-180 <= w <= e <= 180 and -90 <= s <= n <= 90):
        raise ValueError("bbox is west,south,east,north in degrees, west <= east, south <= north")
    return (w, s, e, n)
