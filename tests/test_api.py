"""The read-only HTTP API: public aggregates, token-protected fleet and tracks, SensorThings shapes, exports."""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from receiver import dbapi
from receiver.api import make_server
from receiver.datalab_commands import datalab_commands
from tests.datalab_synth import make_store, with_aggregates

TOKEN = "s3cret-token-for-tests-only"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_aggregates(make_store(tmp_path_factory.mktemp("api") / "datalab.sqlite"))


def _serve(store: Path, token: str | None) -> Iterator[str]:
    server = make_server(str(store), "127.0.0.1", 0, token=token)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def base(store: Path) -> Iterator[str]:
    yield from _serve(store, TOKEN)


def get(url: str, token: str | None = None) -> tuple[int, Message, bytes]:
    """Status, headers (case-insensitive, as HTTP has them) and body."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def get_json(url: str, token: str | None = None, status: int = 200) -> Any:
    code, _, body = get(url, token)
    assert code == status, body[:300]
    return json.loads(body)


def db_count(store: Path, where: str) -> int:
    conn = dbapi.connect(store)
    return dbapi.fetchall(conn, f"SELECT count(*) FROM aggregates WHERE {where}")[0][0]


# -- public aggregates ------------------------------------------------------------------


def test_aggregates_geojson_are_published_only_with_filters(base: str, store: Path) -> None:
    fc = get_json(f"{base}/api/v1/aggregates?scheme=segment&period=all&quantity=pm25")
    assert fc["type"] == "FeatureCollection" and "properties" not in fc  # RFC 7946 7.1
    expected = db_count(store, "scheme='segment' AND period='all' AND quantity='pm25' AND published=1")
    unpublished = db_count(store, "scheme='segment' AND period='all' AND quantity='pm25' AND published=0")
    assert expected > 50 and unpublished > 0  # the data hold both kinds
    assert len(fc["features"]) == expected
    for f in fc["features"]:
        p = f["properties"]
        assert p["quantity"] == "pm25" and p["scheme"] == "segment" and p["period"] == "all"
        assert p["n_passes"] >= 4 and p["n_days"] >= 2 and p["n_excluded"] == 0 and p["unit"] == "µg/m³"
        assert f["geometry"]["type"] == "LineString"
        assert not any("van" in str(v) for v in p.values())  # nothing per van
    cells = get_json(f"{base}/api/v1/aggregates?scheme=h3:10&quantity=laeq")
    assert cells["features"] and all(f["geometry"]["type"] == "Polygon" for f in cells["features"])
    assert get_json(f"{base}/api/v1/aggregates?period=2025-01")["features"] == []


def test_aggregates_json_csv_and_bad_parameters(base: str) -> None:
    rows = get_json(f"{base}/api/v1/aggregates?format=json&scheme=segment&quantity=no2_ppb")
    assert rows and "geometry" not in rows[0] and rows[0]["unit"] == "ppb"
    code, headers, body = get(f"{base}/api/v1/aggregates?format=csv&scheme=segment&quantity=laeq")
    assert code == 200 and headers["Content-Type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(table) > 50 and table[0]["unit"] == "dB(A)"
    assert get_json(f"{base}/api/v1/aggregates?quantity=pm1", status=400)["error"].startswith("unknown quantity")
    get_json(f"{base}/api/v1/aggregates?period=last-tuesday", status=400)
    get_json(f"{base}/api/v1/aggregates?format=xml", status=400)
    get_json(f"{base}/api/v1/nothing-here", status=404)


def test_catalog_lists_what_is_published(base: str) -> None:
    cat = get_json(f"{base}/api/v1/catalog")
    # C- and Z-weighted levels (a sound module set so) are quantities of their own, with their unit.
    assert set(cat["quantities"]) == {"pm25", "pm10", "no2_ppb", "laeq", "lceq", "lzeq"}
    assert cat["quantities"]["lceq"]["unit"] == "dB(C)"
    combos = {(r["scheme"], r["period"], r["quantity"]) for r in cat["published"]}
    assert ("segment", "all", "pm25") in combos and ("h3:10", "all", "laeq") in combos


# -- token protection --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/fleet", "/api/v1/tracks", "/api/v1/tracks/van-001"])
def test_protected_routes_need_the_right_token(base: str, path: str) -> None:
    code, headers, _ = get(base + path)
    assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert get(base + path, token="wrong")[0] == 401
    assert get(base + path, token=TOKEN[:-1])[0] == 401
    assert get(base + path + f"?token={TOKEN}")[0] == 401  # never from the query string
    assert get(base + path, token=TOKEN)[0] == 200


def test_fleet_status_from_heartbeats(base: str) -> None:
    fleet = get_json(f"{base}/api/v1/fleet", token=TOKEN)
    vans = {v["device"]: v for v in fleet["vans"]}
    assert set(vans) == {"van-001", "van-002"}
    assert vans["van-001"]["online"] is True and vans["van-002"]["online"] is False
    assert vans["van-002"]["backlog_samples"] == 120 and vans["van-002"]["oldest_unsent_age_s"] == 42.0
    assert vans["van-002"]["sensor_health"] == "errors" and vans["van-002"]["sensor_errors"] == {"pm": 3}
    assert vans["van-001"]["sensor_health"] == "ok" and vans["van-001"]["samples_stored"] > 0
    assert 0 < vans["van-001"]["last_contact_age_s"] < 600


def test_tracks_are_geojson_per_van(base: str) -> None:
    listing = get_json(f"{base}/api/v1/tracks", token=TOKEN)
    assert [d["device"] for d in listing["devices"]] == ["van-001", "van-002"]
    fc = get_json(f"{base}/api/v1/tracks/van-001?limit=100", token=TOKEN)
    assert fc["metadata"] == {"device": "van-001", "points": 100, "truncated": True}
    assert "properties" not in fc  # RFC 7946 7.1: a FeatureCollection has none
    assert fc["features"][0]["geometry"]["type"] == "LineString"
    # Three days: the track breaks at the gaps between shifts.
    full = get_json(f"{base}/api/v1/tracks/van-001", token=TOKEN)
    assert len(full["features"]) == 3
    day2 = get_json(f"{base}/api/v1/tracks/van-001?from=2026-11-03T00:00:00Z&to=2026-11-04T00:00:00Z", token=TOKEN)
    assert len(day2["features"]) == 1 and day2["features"][0]["properties"]["start_utc"].startswith("2026-11-03")
    get_json(f"{base}/api/v1/tracks/van-999", token=TOKEN, status=404)


def test_without_a_configured_token_protected_routes_are_closed(store: Path) -> None:
    for url in _serve(store, None):
        assert get(url + "/api/v1/fleet")[0] == 403
        assert get(url + "/api/v1/fleet", token="")[0] == 403
        assert get(url + "/api/v1/aggregates")[0] == 200


def test_the_token_never_reaches_the_log(base: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        get(f"{base}/api/v1/fleet", token=TOKEN)
        get(f"{base}/api/v1/fleet", token="wrong-guess")
    assert "/api/v1/fleet" in caplog.text  # requests are logged ...
    assert TOKEN not in caplog.text and "wrong-guess" not in caplog.text  # ... tokens are not


# -- SensorThings ------------------------------------------------------------------------


def test_sta_root_and_entity_shapes(base: str, store: Path) -> None:
    root = get_json(f"{base}/sta/v1.1")
    assert {v["name"] for v in root["value"]} >= {"Things", "Datastreams", "Observations", "Locations"}
    things = get_json(f"{base}/sta/v1.1/Things?$top=3&$count=true")
    n_units = dbapi.fetchall(dbapi.connect(store), "SELECT count(DISTINCT cell) FROM aggregates WHERE published=1")[0][0]
    assert things["@iot.count"] == n_units and len(things["value"]) == 3
    assert "$skip=3" in things["@iot.nextLink"].replace("%24", "$")
    t = things["value"][0]
    for key in ("@iot.id", "@iot.selfLink", "name", "description", "properties",
                "Locations@iot.navigationLink", "Datastreams@iot.navigationLink"):
        assert key in t
    # The self link resolves to the same entity.
    assert get_json(t["@iot.selfLink"])["@iot.id"] == t["@iot.id"]
    ds = get_json(t["Datastreams@iot.navigationLink"])["value"]
    assert ds and all(d["@iot.id"].startswith(t["@iot.id"] + ":") for d in ds)
    d = ds[0]
    assert d["unitOfMeasurement"]["symbol"] in ("µg/m³", "ppb", "dB(A)")
    assert d["observationType"].endswith("OM_Measurement")
    obs = get_json(d["Observations@iot.navigationLink"])["value"]
    o = obs[0]
    assert isinstance(o["result"], float) and "/" in o["phenomenonTime"]
    assert o["parameters"]["n_passes"] >= 4 and o["parameters"]["n_days"] >= 2
    assert get_json(o["Datastream@iot.navigationLink"])["@iot.id"] == d["@iot.id"]
    loc = get_json(t["Locations@iot.navigationLink"])["value"][0]
    assert loc["encodingType"] == "application/geo+json" and loc["location"]["type"] in ("LineString", "Polygon")


def test_sta_paging_expand_and_errors(base: str) -> None:
    first = get_json(f"{base}/sta/v1.1/Observations?$top=5")["value"]
    second = get_json(f"{base}/sta/v1.1/Observations?$top=5&$skip=5")["value"]
    assert len(first) == len(second) == 5
    assert not {o["@iot.id"] for o in first} & {o["@iot.id"] for o in second}
    assert get_json(f"{base}/sta/v1.1/Observations?$top=5&$skip=2")["value"][0]["@iot.id"] == first[2]["@iot.id"]
    expanded = get_json(f"{base}/sta/v1.1/Things?$top=1&$expand=Locations,Datastreams")["value"][0]
    assert expanded["Locations"] and expanded["Datastreams"]
    sel = get_json(f"{base}/sta/v1.1/Datastreams?$top=1&$select=name,unitOfMeasurement")["value"][0]
    assert set(sel) == {"name", "unitOfMeasurement"}
    props = get_json(f"{base}/sta/v1.1/ObservedProperties")["value"]
    assert {p["@iot.id"] for p in props} == {"pm25", "pm10", "no2_ppb", "laeq"}
    assert get_json(f"{base}/sta/v1.1/Sensors")["value"][0]["@iot.id"] == "datalab-mobile-median"
    assert get_json(f"{base}/sta/v1.1/Things?$filter=name%20eq%20'x'", status=400)["code"] == 400
    get_json(f"{base}/sta/v1.1/Things('no-such-unit')", status=404)
    get_json(f"{base}/sta/v1.1/Things?$top=-1", status=400)
    get_json(f"{base}/sta/v1.1/Vans", status=404)


def test_sta_shows_no_unpublished_unit_and_no_van(base: str, store: Path) -> None:
    hidden = dbapi.fetchall(dbapi.connect(store), "SELECT cell FROM aggregates WHERE published = 0 AND cell NOT IN"
                                                  " (SELECT cell FROM aggregates WHERE published = 1) LIMIT 1")
    assert hidden
    get_json(f"{base}/sta/v1.1/Things('{hidden[0][0]}')", status=404)
    body = get(f"{base}/sta/v1.1/Observations?$top=10000")[2].decode()
    assert "van-00" not in body


# -- static files and exports ------------------------------------------------------------


def test_dashboard_files_are_served_and_contained(base: str) -> None:
    code, headers, body = get(f"{base}/web/")
    assert code == 200 and b"DataLab" in body and "default-src 'self'" in headers["Content-Security-Policy"]
    assert get(f"{base}/web/app.js")[0] == 200
    assert get(f"{base}/web/../api.py")[0] == 404
    assert get(f"{base}/web/%2e%2e/api.py")[0] == 404


def test_export_commands(store: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "map.geojson"
    res = runner.invoke(datalab_commands, ["export", "aggregates", "--store", str(store), "--format", "geojson",
                                           "--scheme", "segment", "--quantity", "laeq", "--out", str(out)])
    assert res.exit_code == 0, res.output
    fc = json.loads(out.read_text())
    assert len(fc["features"]) == db_count(store, "scheme='segment' AND quantity='laeq' AND published=1")
    assert all(f["properties"]["n_passes"] >= 4 for f in fc["features"])
    res = runner.invoke(datalab_commands, ["export", "aggregates", "--store", str(store), "--scheme", "h3:10"])
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == db_count(store, "scheme='h3:10' AND published=1")
    csv_out = tmp_path / "m.csv"
    res = runner.invoke(datalab_commands, ["export", "measurements", "--store", str(store), "--device", "van-002",
                                           "--period", "2026-11-03", "--quantity", "pm25", "--out", str(csv_out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(csv_out.open()))
    assert len(rows) == 30 * 60  # one pm25 value per second of a 30-minute shift
    assert {r["device"] for r in rows} == {"van-002"} and all(r["time_utc"].startswith("2026-11-03") for r in rows)
    gj = tmp_path / "m.geojson"
    runner.invoke(datalab_commands, ["export", "measurements", "--store", str(store), "--format", "geojson",
                                     "--period", "2026-11-02", "--out", str(gj)])
    feats = json.loads(gj.read_text())["features"]
    assert len(feats) == 2 * 30 * 60 * 4 and feats[0]["geometry"]["type"] == "Point"


# -- hostile input: the cases found on main (issue 13, point 8) ------------------------------


@pytest.mark.parametrize("path", ["/web/%00", "/web/%00index.html", "/web/..%00", "/api/v1/tracks/van%00",
                                  "/sta/v1.1/Things('%00')", "/web/%ff%fe", "/web/" + "a" * 5000])
def test_bad_paths_get_4xx_not_500(base: str, path: str) -> None:
    code, _, body = get(base + path, token=TOKEN)
    assert 400 <= code < 500, (code, body[:200])
    assert "error" in json.loads(body)


@pytest.mark.parametrize("query", ["$skip=" + "9" * 400, f"$skip={2**63}", "$skip=-1", "$top=-1", "$top=1_0",
                                   "$top=%D9%A1", "$top=%207", "$count=maybe", "$skip=1e3"])
def test_sta_numbers_outside_the_pattern_get_400(base: str, query: str) -> None:
    assert get_json(f"{base}/sta/v1.1/Observations?{query}", status=400)["code"] == 400


def test_sta_expand_cannot_multiply_the_top_cap(base: str) -> None:
    page = get_json(f"{base}/sta/v1.1/Things?$top=10000&$expand=Datastreams,Locations,Datastreams")
    assert len(page["value"]) == 100 and "@iot.nextLink" in page  # $top capped at 100 with $expand
    assert len(get_json(f"{base}/sta/v1.1/Things?$top=10000&$select=name")["value"]) > 100


@pytest.mark.parametrize("limit", ["-1", "0", "-50000", "abc", "1.5", "", "1e9", "%D9%A1", "99999999999999999999"])
def test_track_limits_that_are_not_a_plain_positive_number_get_400(base: str, limit: str) -> None:
    body = get_json(f"{base}/api/v1/tracks/van-001?limit={limit}", token=TOKEN, status=400)
    assert "limit" in body["error"]


def test_a_huge_track_limit_gets_the_cap(base: str, store: Path) -> None:
    fc = get_json(f"{base}/api/v1/tracks/van-001?limit=999999999999", token=TOKEN)
    n = dbapi.fetchall(dbapi.connect(store), "SELECT count(*) FROM fixes WHERE device='van-001'")[0][0]
    assert fc["metadata"]["points"] == min(n, 50_000)  # (the cap itself: tests/test_api_server.py)
