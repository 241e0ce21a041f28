"""GeoPackage export (``export --format gpkg``): the layers QGIS users open with a double click.

Why a library (pyogrio, GDAL's vector I/O in a wheel) and not our own SQLite writer: a
GeoPackage is SQLite plus a spec's worth of metadata tables, triggers, an R-tree per
layer and a binary geometry header; GDAL is what QGIS reads it with, so writing it
with GDAL is the surest way to a file QGIS opens as it expects. Imported only here,
when a GeoPackage is asked for.

One layer per geometry: ``measurements`` (points), ``aggregates_<scheme>`` (lines for
road segments, polygons for H3 cells), each in EPSG:4326 (RFC 7946's CRS as well). Rows
are written in chunks (append), so a month of a fleet does not have to fit in memory.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from receiver.export import MEASUREMENT_FIELDS, AGG_FIELDS, aggregate_feature, measurements, published_aggregates

CHUNK = 20_000
_INT_FIELDS = {"n_passes", "n_days", "n_samples", "n_excluded", "t_utc_ms", "fix_quality", "excluded",
               "humidity_corrected", "seq"}
_WKB_TYPES = {"Point": 1, "LineString": 2, "Polygon": 3, "MultiPoint": 4, "MultiLineString": 5,
              "MultiPolygon": 6}


def wkb(geom: dict[str, Any]) -> bytes:
    """A GeoJSON geometry as little-endian 2D WKB (what GDAL takes)."""
    kind = geom["type"]
    code = _WKB_TYPES.get(kind)
    if code is None:
        raise ValueError(f"no GeoPackage geometry for {kind!r}")
    head = struct.pack("<BI", 1, code)
    c = geom["coordinates"]
    if kind == "Point":
        return head + struct.pack("<2d", float(c[0]), float(c[1]))
    if kind in ("LineString", "MultiPoint"):
        if kind == "MultiPoint":
            return head + struct.pack("<I", len(c)) + b"".join(wkb({"type": "Point", "coordinates": p}) for p in c)
        return head + _points(c)
    if kind == "Polygon":
        return head + struct.pack("<I", len(c)) + b"".join(_points(ring) for ring in c)
    part = "LineString" if kind == "MultiLineString" else "Polygon"
    return head + struct.pack("<I", len(c)) + b"".join(wkb({"type": part, "coordinates": p}) for p in c)


def _points(coords: list[list[float]]) -> bytes:
    return struct.pack("<I", len(coords)) + b"".join(struct.pack("<2d", float(x), float(y)) for x, y, *_ in coords)


class _Layer:
    """Rows of one layer, flushed to the file every CHUNK rows."""

    def __init__(self, path: Path, name: str, fields: tuple[str, ...]) -> None:
        self.path, self.name, self.fields = path, name, fields
        self.geoms: list[bytes] = []
        self.rows: list[dict[str, Any]] = []
        self.types: dict[str, str] | None = None
        self.kind = ""
        self.written = 0

    def add(self, geometry: dict[str, Any], props: dict[str, Any]) -> None:
        kind = geometry["type"]
        self.kind = self.kind if self.kind in (kind, "Unknown") else (kind if not self.kind else "Unknown")
        self.geoms.append(wkb(geometry))
        self.rows.append(props)
        if len(self.rows) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        from pyogrio.raw import write

        if self.types is None:  # fixed by the first chunk: every chunk must have the same columns
            self.types = {f: _kind(f, (r.get(f) for r in self.rows)) for f in self.fields}
        data, masks = [], []
        for f in self.fields:
            vals = [r.get(f) for r in self.rows]
            mask = np.array([v is None for v in vals])
            t = self.types[f]
            if t == "str":
                arr = np.array([None if v is None else str(v) for v in vals], dtype=object)
            else:
                arr = np.array([0 if v is None else v for v in vals], dtype=np.int64 if t == "int" else np.float64)
            data.append(arr)
            masks.append(mask)
        write(str(self.path), np.array(self.geoms, dtype=object), data, list(self.fields), field_mask=masks,
              layer=self.name, driver="GPKG", geometry_type=self.kind, crs="EPSG:4326",
              append=self.written > 0)
        self.written += len(self.rows)
        self.geoms, self.rows = [], []


def _kind(field: str, values: Iterable[Any]) -> str:
    if field in _INT_FIELDS:
        return "int"
    seen = [v for v in values if v is not None]
    if seen and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seen):
        return "float"
    return "str"


def write_layers(path: Path, features: Iterator[tuple[str, dict[str, Any]]], fields: tuple[str, ...]) -> int:
    """(layer name, GeoJSON Feature) pairs into a new GeoPackage; how many features."""
    if path.exists():
        path.unlink()  # a new file: appending to an old export would mix two exports
    layers: dict[str, _Layer] = {}
    n = 0
    for name, feat in features:
        layer = layers.get(name) or layers.setdefault(name, _Layer(path, name, fields))
        layer.add(feat["geometry"], feat["properties"])
        n += 1
    for layer in layers.values():
        layer.flush()
    return n


def export_geopackage(conn: Any, path: str | Path, kind: str, **kw: Any) -> int:
    """``kind``: "aggregates" (published only; ``scheme``, ``period``, ``quantity``) or "measurements"."""
    path = Path(path)
    if kind == "aggregates":
        feats: Iterator[tuple[str, dict[str, Any]]] = (
            ("aggregates_" + r["scheme"].replace(":", "_"), aggregate_feature(r))
            for r in published_aggregates(conn, **kw) if r.get("geometry"))
        return write_layers(path, feats, tuple(f for f in AGG_FIELDS))
    fields = tuple(f for f in MEASUREMENT_FIELDS if f not in ("lat", "lon"))
    pts = (("measurements", {"geometry": {"type": "Point", "coordinates": [r["lon"], r["lat"]]}, "properties": r})
           for r in measurements(conn, **kw) if r["lat"] is not None and r["lon"] is not None)
    return write_layers(path, pts, fields)
