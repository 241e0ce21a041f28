"""v17 attack on #17.2: RFC 7946 everywhere, exports with flags/unit/calibration, GeoPackage, gzip.

Oracles: a hand-written RFC 7946 checker (members forbidden by §7.1, closed rings and the
right-hand rule of §3.1.6, LineStrings of >= 2 positions §3.1.4, no crs, strict JSON without
NaN/Infinity per RFC 8259), the raw GeoPackage read with sqlite3 (OGC 12-128 tables), and the
real `datalab-receiver serve` over HTTP with urllib and gzip.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.datalab_synth import make_store, with_aggregates

PROG = str(Path(sys.executable).with_name("datalab-receiver"))
TOKEN = "v17-token-abcdefgh"


def _strict(b: bytes) -> Any:
    def bad(c: str) -> Any:
        raise ValueError(f"non-JSON constant {c}")
    return json.loads(b, parse_constant=bad)


def _area2(ring: list[list[float]]) -> float:
    return sum(x1 * y2 - x2 * y1 for (x1, y1, *_), (x2, y2, *_) in zip(ring, ring[1:]))


def rfc7946_problems(obj: dict[str, Any]) -> list[str]:
    p = []
    if obj.get("type") != "FeatureCollection":
        p.append(f"top type {obj.get('type')}")
    for m in ("properties", "geometry", "coordinates", "crs"):
        if m in obj:
            p.append(f"FeatureCollection has {m!r} (RFC 7946 §7.1/§4)")
    for i, f in enumerate(obj.get("features", [])):
        if f.get("type") != "Feature":
            p.append(f"feature {i} type")
        for m in ("features", "coordinates", "geometries", "crs"):
            if m in f:
                p.append(f"feature {i} has {m!r}")
        if "id" in f and not isinstance(f["id"], (str, int, float)):
            p.append(f"feature {i} id type")
        if "properties" not in f or "geometry" not in f:
            p.append(f"feature {i} lacks properties/geometry member")
        g = f.get("geometry")
        if g is None:
            continue
        for m in ("properties", "geometry", "features"):
            if m in g:
                p.append(f"geometry {i} has {m!r}")
        t, c = g.get("type"), g.get("coordinates")
        def pos_ok(q: Any) -> bool:
            return (isinstance(q, list) and 2 <= len(q) <= 3 and all(isinstance(v, (int, float)) for v in q)
                    and -180 <= q[0] <= 180 and -90 <= q[1] <= 90)
        if t == "Point":
            if not pos_ok(c):
                p.append(f"feature {i} bad point {c}")
        elif t == "LineString":
            if len(c) < 2 or not all(pos_ok(q) for q in c):
                p.append(f"feature {i} LineString with {len(c)} positions")
        elif t == "Polygon":
            for k, ring in enumerate(c):
                if len(ring) < 4 or ring[0] != ring[-1] or not all(pos_ok(q) for q in ring):
                    p.append(f"feature {i} ring {k} not closed / < 4")
                elif (_area2(ring) > 0) != (k == 0):
                    p.append(f"feature {i} ring {k} winding (§3.1.6 right-hand rule)")
        elif t in ("MultiLineString", "MultiPolygon", "MultiPoint", "GeometryCollection"):
            pass
        else:
            p.append(f"feature {i} geometry type {t}")
    return p


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_aggregates(make_store(tmp_path_factory.mktemp("v17files") / "datalab.sqlite", days=3, vans=2,
                                      minutes=10))


def _cli(*a: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PROG, *a], capture_output=True, timeout=300)


@pytest.mark.parametrize("what", ["aggregates", "measurements"])
def test_export_geojson_rfc7946_strict(store: Path, what: str, tmp_path: Path) -> None:
    out = tmp_path / f"{what}.geojson"
    r = _cli("export", what, "--store", str(store), "--format", "geojson", "--out", str(out))
    assert r.returncode == 0, r.stderr
    obj = _strict(out.read_bytes())
    probs = rfc7946_problems(obj)
    assert obj["features"], "empty export"
    assert not probs, probs[:10]
    props = obj["features"][0]["properties"]
    print(what, sorted(props))
    if what == "measurements":
        for k in ("unit", "flags", "calibration"):
            assert any(k in key for key in props), (k, sorted(props))


def test_export_csv_measurements_has_flags_unit_calibration(store: Path, tmp_path: Path) -> None:
    r = _cli("export", "measurements", "--store", str(store), "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout.decode())))
    assert rows
    cols = list(rows[0])
    print(cols)
    for k in ("unit", "flags", "calibration"):
        assert any(k in c for c in cols), (k, cols)
    units = {(r_["quantity"], r_["unit"]) for r_ in rows} if "quantity" in cols else set()
    print(units)
    assert all(u for _, u in units)


def test_gpkg_read_raw(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gpkg"
    r = _cli("export", "aggregates", "--store", str(store), "--format", "gpkg", "--out", str(out))
    assert r.returncode == 0, r.stderr
    gj = tmp_path / "m.geojson"
    assert _cli("export", "aggregates", "--store", str(store), "--format", "geojson", "--out", str(gj)).returncode == 0
    n_geojson = len(_strict(gj.read_bytes())["features"])
    c = sqlite3.connect(out)
    assert out.read_bytes()[68:72] == b"GPKG", "application_id is not GPKG"
    contents = c.execute("select table_name, data_type, srs_id from gpkg_contents").fetchall()
    geomcols = c.execute("select table_name, column_name, geometry_type_name, srs_id from gpkg_geometry_columns"
                         ).fetchall()
    srs = {r_[0]: r_[1:] for r_ in c.execute("select srs_id, organization, organization_coordsys_id "
                                             "from gpkg_spatial_ref_sys")}
    print(contents, geomcols)
    total = 0
    for t, dtype, sid in contents:
        assert dtype == "features" and srs[sid] in (("EPSG", 4326), ("epsg", 4326)), (t, sid, srs.get(sid))
        total += c.execute(f'select count(*) from "{t}"').fetchone()[0]
        # every geometry blob starts with the GeoPackage magic 'GP' and srs 4326
        for (blob,) in c.execute(f'select "{[g for g in geomcols if g[0] == t][0][1]}" from "{t}" limit 50'):
            assert blob[:2] == b"GP" and int.from_bytes(blob[4:8], "little" if blob[3] & 1 else "big") == 4326
    assert total == n_geojson, (total, n_geojson)
    # re-export over an existing file
    r2 = _cli("export", "aggregates", "--store", str(store), "--format", "gpkg", "--out", str(out))
    print("re-export over existing gpkg:", r2.returncode, r2.stderr[-300:])
    c2 = sqlite3.connect(out)
    t2 = sum(c2.execute(f'select count(*) from "{t}"').fetchone()[0] for t, *_ in contents)
    assert t2 == n_geojson, f"re-export over an existing file: {t2} features, expected {n_geojson}"


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tok = tmp_path_factory.mktemp("tok") / "token"
    tok.write_text(TOKEN + "\n")
    proc = subprocess.Popen([PROG, "serve", "--store", str(store), "--port", str(port), "--token-file", str(tok)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(base + "/api/v1/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    yield base
    proc.terminate()
    proc.wait(20)


def _get(url: str, **h: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _body(h: dict[str, str], b: bytes) -> bytes:
    return gzip.decompress(b) if h.get("content-encoding") == "gzip" else b


@pytest.mark.parametrize("path", ["/api/v1/aggregates?scheme=h3:10&period=all",
                                  "/api/v1/aggregates?scheme=segment&period=all", "/api/v1/tracks/van-001"])
def test_api_geojson_strict(server: str, path: str) -> None:
    st, h, b = _get(server + path, Authorization=f"Bearer {TOKEN}", **{"Accept-Encoding": "gzip"})
    assert st == 200, b[:300]
    obj = _strict(_body(h, b))
    print(path, h.get("content-type"), h.get("content-encoding"), len(b), len(obj.get("features", [])))
    assert not rfc7946_problems(obj), rfc7946_problems(obj)[:10]
    assert "geo+json" in h.get("content-type", "") or "json" in h.get("content-type", "")


def test_tracks_of_a_van_with_one_fix(server: str, store: Path) -> None:
    """A van that reported a single fix: its track must not be a 1-position LineString."""
    c = sqlite3.connect(store)
    t = c.execute("select min(t_utc_ms) from positions where device='van-001' and lat is not null").fetchone()[0]
    st, h, b = _get(server + f"/api/v1/tracks/van-001?from={t}&to={t}", Authorization=f"Bearer {TOKEN}")
    print(st, b[:400])
    if st == 200:
        assert not rfc7946_problems(_strict(_body(h, b))), b[:400]


@pytest.mark.parametrize("ae, gz", [("gzip", True), ("GZIP", True), ("gzip;q=0", False), ("identity", False),
                                    ("br", False), ("*", True), ("deflate, gzip;q=0.5", True),
                                    ("gzip;q=0, identity", False), ("x-gzip", True)])
def test_gzip_negotiation(server: str, ae: str, gz: bool) -> None:
    st, h, b = _get(server + "/api/v1/aggregates?scheme=h3:10&period=all", **{"Accept-Encoding": ae})
    assert st == 200
    got = h.get("content-encoding") in ("gzip", "x-gzip")
    print(ae, h.get("content-encoding"), h.get("vary"), len(b))
    assert "accept-encoding" in (h.get("vary") or "").lower()
    _strict(_body(h, b))
    assert got == gz, f"Accept-Encoding {ae!r}: content-encoding {h.get('content-encoding')!r}"


@pytest.mark.parametrize("auth", [None, "Bearer ", "Bearer wrong", f"bearer {TOKEN}x", f"Basic {TOKEN}",
                                  f"Bearer {TOKEN[:-1]}"])
@pytest.mark.parametrize("path", ["/api/v1/tracks", "/api/v1/tracks/van-001", "/api/v1/fleet",
                                  "/api/v1/tracks/van-001/", "/api/v1/tracks/../tracks/van-001",
                                  "/api/v1//tracks/van-001", "/API/v1/tracks/van-001"])
def test_per_van_routes_closed_to_the_public(server: str, auth: str | None, path: str) -> None:
    h = {} if auth is None else {"Authorization": auth}
    st, _, b = _get(server + path + f"?token={TOKEN}x", **h)
    assert st in (401, 403, 404), (path, auth, st, b[:200])
    assert b"van-001" not in b or st == 404 and b"van-001" not in b.replace(b"/api/v1/tracks/van-001", b"")


@pytest.mark.parametrize("path", ["/api/v1/aggregates?scheme=h3:10&period=all", "/api/v1/catalog", "/web/",
                                  "/api/v1/basemap", "/api/v1", "/api/v1/health", "/sta/v1.1",
                                  "/sta/v1.1/Things", "/sta/v1.1/Datastreams", "/sta/v1.1/Observations",
                                  "/sta/v1.1/Locations", "/sta/v1.1/FeaturesOfInterest", "/sta/v1.1/Sensors",
                                  "/sta/v1.1/HistoricalLocations",
                                  "/sta/v1.1/Observations?$filter=startswith(name,'van')"])
def test_public_routes_name_no_van(server: str, path: str) -> None:
    st, h, b = _get(server + path, **{"Accept-Encoding": "identity"})
    print(path, st, len(b))
    assert b"van-00" not in _body(h, b), path
