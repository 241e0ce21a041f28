"""Standard files (issue #17.2): RFC 7946 GeoJSON everywhere, checked by independent readers (the
``geojson`` package's validation and GDAL); a GeoPackage read back with GDAL; gzip on the API."""

from __future__ import annotations

import gzip
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import geojson
import pyogrio
import pytest
from click.testing import CliRunner

from receiver.api import App
from receiver.cli import main
from tests.datalab_synth import make_store, with_aggregates

TOKEN = "t0ken-for-tests-only"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_aggregates(make_store(tmp_path_factory.mktemp("files") / "datalab.sqlite"))


def call(app: App, path: str, query: str = "", **headers: str) -> tuple[str, dict[str, str], bytes]:
    got: dict[str, Any] = {}

    def start_response(status: str, hdrs: list[tuple[str, str]]) -> None:
        got["status"], got["headers"] = status, dict(hdrs)

    env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "HTTP_HOST": "test",
           "HTTP_AUTHORIZATION": f"Bearer {TOKEN}", **{f"HTTP_{k.upper()}": v for k, v in headers.items()}}
    body = b"".join(app(env, start_response))
    return got["status"], got["headers"], body


def _coords(c: Any) -> Iterator[list[float]]:
    if c and isinstance(c[0], (int, float)):
        yield c
    else:
        for x in c:
            yield from _coords(x)


def assert_rfc7946(text: str | bytes, tmp_path: Path, name: str) -> dict[str, Any]:
    """Valid for the ``geojson`` package and readable by GDAL's GeoJSON driver, plus what RFC 7946
    asks beyond the geometry: no ``properties``/``crs`` on the collection, WGS 84 longitude first."""
    obj = geojson.loads(text if isinstance(text, str) else text.decode())
    assert isinstance(obj, geojson.FeatureCollection)
    assert obj.is_valid, obj.errors()
    for f in obj["features"]:
        assert isinstance(f, geojson.Feature) and f.is_valid, f.errors()
        for lon, lat, *_ in _coords(f["geometry"]["coordinates"]):
            assert -180 <= lon <= 180 and -90 <= lat <= 90
            assert 3 < lon < 6 and 51 < lat < 53  # the synthetic route: lon, lat in that order
    raw = json.loads(text)
    assert "properties" not in raw and "crs" not in raw  # RFC 7946 7.1 and 4
    p = tmp_path / f"{name}.geojson"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    info = pyogrio.read_info(p)  # GDAL's GeoJSON driver
    assert info["features"] == len(raw["features"]) > 0
    return raw


def test_exports_are_rfc7946(store: Path, tmp_path: Path) -> None:
    for kind, n_min in (("aggregates", 10), ("measurements", 1000)):
        out = tmp_path / f"{kind}.geojson"
        r = CliRunner().invoke(main, ["export", kind, "--store", str(store), "--format", "geojson", "--out", str(out)])
        assert r.exit_code == 0, r.output
        fc = assert_rfc7946(out.read_text(encoding="utf-8"), tmp_path, kind)
        assert len(fc["features"]) >= n_min
    props = fc["features"][0]["properties"]  # measurements carry flags, unit and calibration id
    assert {"flags", "quality", "unit", "calibration", "excluded"} <= set(props)


def test_api_geojson_is_rfc7946_and_gzip_compressed(store: Path, tmp_path: Path) -> None:
    app = App(str(store), token=TOKEN)
    try:
        status, plain_h, plain = call(app, "/api/v1/aggregates")
        assert status.startswith("200") and "Content-Encoding" not in plain_h
        assert plain_h["Vary"] == "Accept-Encoding"  # v17 #11: a cache must not serve it to a gzip client
        assert_rfc7946(plain, tmp_path, "api")
        status, h, packed = call(app, "/api/v1/aggregates", accept_encoding="br, gzip;q=0.8")
        assert status.startswith("200") and h["Content-Encoding"] == "gzip" and h["Vary"] == "Accept-Encoding"
        assert "Content-Length" not in h  # streamed: compressed as it goes
        assert gzip.decompress(packed) == plain
        print(f"aggregates GeoJSON: {len(plain):,} bytes, gzip {len(packed):,} ({len(packed) / len(plain):.1%})")
        assert len(packed) < len(plain) / 4
        # refused or not offered: plain
        for accept in ("gzip;q=0", "identity", ""):
            _, h, body = call(app, "/api/v1/aggregates", accept_encoding=accept)
            assert "Content-Encoding" not in h and body == plain and h["Vary"] == "Accept-Encoding"
        # small answers stay plain (gzip's header would outweigh the gain)
        _, h, _ = call(app, "/api/v1/health", accept_encoding="gzip")
        assert "Content-Encoding" not in h
        # the tracks route (admin token only): RFC 7946 too, compressed too
        dev = json.loads(call(app, "/api/v1/tracks")[2])["devices"][0]["device"]
        _, h, body = call(app, f"/api/v1/tracks/{dev}", accept_encoding="gzip")
        assert h["Content-Encoding"] == "gzip"
        assert_rfc7946(gzip.decompress(body), tmp_path, "track")
    finally:
        app.close()


def test_geopackage_export_reads_back_with_gdal(store: Path, tmp_path: Path) -> None:
    agg, meas = tmp_path / "maps.gpkg", tmp_path / "measurements.gpkg"
    for kind, out in (("aggregates", agg), ("measurements", meas)):
        r = CliRunner().invoke(main, ["export", kind, "--store", str(store), "--format", "gpkg", "--out", str(out)])
        assert r.exit_code == 0, r.output
    layers = {name: kind for name, kind in pyogrio.list_layers(agg)}
    assert layers == {"aggregates_segment": "LineString", "aggregates_h3_10": "Polygon"}
    conn = sqlite3.connect(store)
    published = dict(conn.execute("SELECT scheme, count(*) FROM aggregates WHERE published = 1 GROUP BY scheme"))
    conn.close()
    for layer, scheme in (("aggregates_segment", "segment"), ("aggregates_h3_10", "h3:10")):
        info = pyogrio.read_info(agg, layer=layer)
        assert info["features"] == published[scheme] and "4326" in info["crs"]
    meta, _, geom, data = pyogrio.raw.read(meas)
    names = list(meta["fields"])
    assert {"unit", "flags", "quality", "calibration", "excluded", "value"} <= set(names)
    assert len(geom) > 1000
    values = data[names.index("value")]
    assert values.dtype.kind == "f" and 0 < float(values[~(values != values)].mean()) < 200
    # the same count as the CSV export's positioned rows
    csv_out = tmp_path / "m.csv"
    CliRunner().invoke(main, ["export", "measurements", "--store", str(store), "--out", str(csv_out)])
    assert len(csv_out.read_text().splitlines()) - 1 == len(geom)
    r = CliRunner().invoke(main, ["export", "aggregates", "--store", str(store), "--format", "gpkg"])
    assert r.exit_code != 0 and "--out" in r.output
