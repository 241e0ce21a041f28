"""Tests for the simulated route and the van drive model."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from simulator.route import Drive, DriveParams, Route, RoutePosition, VanState, haversine_m

# Rough bounding box of the town of Alphen aan den Rijn.
LAT_MIN, LAT_MAX, LON_MIN, LON_MAX = 52.10, 52.16, 4.60, 4.72


@pytest.fixture(scope="module")
def route() -> Route:
    return Route.load()


@pytest.fixture(scope="module")
def drive(route: Route) -> Drive:
    return Drive(route, seed=42, start_offset_m=1234.0)


def test_geojson_is_a_featurecollection_with_required_properties() -> None:
    doc = json.loads(resources.files("simulator").joinpath("data/alphen-route.geojson").read_text("utf-8"))
    assert doc["type"] == "FeatureCollection"
    assert "source" in doc["properties"]
    assert doc["features"]
    for feat in doc["features"]:
        assert feat["geometry"]["type"] == "LineString"
        props = feat["properties"]
        assert props["name"]
        assert props["road_class"] in {"primary", "secondary", "tertiary", "residential", "service"}
        assert 10 <= props["speed_kmh"] <= 100


def test_route_loads_as_closed_loop_of_plausible_length(route: Route) -> None:
    assert route.closed
    assert 15_000 <= route.length_m <= 30_000
    assert route.vertices()[0] == pytest.approx(route.vertices()[-1])


def test_route_inside_alphen_bounding_box(route: Route) -> None:
    for lat, lon in route.vertices():
        assert LAT_MIN <= lat <= LAT_MAX and LON_MIN <= lon <= LON_MAX, (lat, lon)


def test_consecutive_vertices_not_absurdly_far_apart(route: Route) -> None:
    verts = route.vertices()
    gaps = [haversine_m(*a, *b) for a, b in zip(verts, verts[1:])]
    assert max(gaps) < 800.0
    assert min(gaps) > 0.0


def test_route_has_mix_of_road_classes_and_named_streets(route: Route) -> None:
    classes = {s.road_class for s in route.segments}
    assert {"primary", "secondary", "residential"} <= classes
    names = {s.street_name for s in route.segments}
    assert any("Hooftstraat" in n for n in names)
    assert any("N11" in n for n in names)


def test_gps_blocked_stretches_exist(route: Route) -> None:
    stretches = route.blocked_stretches()
    assert len(stretches) >= 1
    for start, end in stretches:
        assert 50.0 <= end - start <= 1500.0
        assert route.position_at((start + end) / 2).gps_blocked
    assert not route.position_at(stretches[0][0] - 100.0).gps_blocked


def test_position_at_interpolates_and_wraps(route: Route) -> None:
    p0 = route.position_at(0.0)
    assert isinstance(p0, RoutePosition)
    lat, lon, course, road_class, blocked, street = p0  # six-tuple as documented
    assert 0.0 <= course < 360.0 and isinstance(road_class, str) and isinstance(street, str)
    wrapped, direct = route.position_at(route.length_m + 10.0), route.position_at(10.0)
    assert (wrapped.lat, wrapped.lon) == pytest.approx((direct.lat, direct.lon), abs=1e-9)
    # The straight-line distance between two points 50 m apart along the route is at most 50 m
    # (plus centimetres, because interpolation is linear in lat/lon).
    a, b = route.position_at(500.0), route.position_at(550.0)
    assert 30.0 < haversine_m(a.lat, a.lon, b.lat, b.lon) <= 50.05


def test_drive_is_deterministic_for_seed(route: Route) -> None:
    a = Drive(route, seed=7, start_offset_m=500.0)
    b = Drive(route, seed=7, start_offset_m=500.0)
    c = Drive(route, seed=8, start_offset_m=500.0)
    times = [0, 1, 59.5, 600, 3600, 7201.25, 28_799]
    assert [a.state_at(t) for t in times] == [b.state_at(t) for t in times]
    # Asking in a different order gives the same answers: there is no hidden state.
    assert [a.state_at(t) for t in reversed(times)] == [b.state_at(t) for t in times][::-1]
    assert [a.state_at(t) for t in times] != [c.state_at(t) for t in times]


def test_drive_starts_at_offset(route: Route) -> None:
    d = Drive(route, seed=1, start_offset_m=2000.0)
    s = d.state_at(0.0)
    p = route.position_at(2000.0)
    assert isinstance(s, VanState)
    assert (s.lat, s.lon) == pytest.approx((p.lat, p.lon))
    assert s.speed_mps == 0.0


def test_odometer_monotone_and_speeds_plausible(drive: Drive) -> None:
    prev = -1.0
    max_speed = 0.0
    for t in range(0, 8 * 3600, 1):
        odo = drive.odometer_at(t)
        assert odo >= prev - 1e-9
        prev = odo
        s = drive.state_at(t)
        max_speed = max(max_speed, s.speed_mps)
        if s.road_class == "residential":
            assert s.speed_mps <= 30 / 3.6 + 1e-6
    assert max_speed <= 80 / 3.6 + 1e-6  # never faster than the fastest limit
    assert max_speed >= 55 / 3.6  # but it does use the N11
    km = drive.odometer_at(8 * 3600) / 1000
    # A delivery shift in town covers a few laps: average speed including stops 8-30 km/h.
    assert 60 <= km <= 240


def test_drive_covers_whole_route(route: Route, drive: Drive) -> None:
    assert drive.odometer_at(drive.shift_s) > route.length_m


def test_positions_change_smoothly(drive: Drive) -> None:
    prev = drive.state_at(0)
    for t in range(1, 4 * 3600):
        cur = drive.state_at(t)
        step = haversine_m(prev.lat, prev.lon, cur.lat, cur.lon)
        assert step <= 80 / 3.6 + 1.0, (t, step)
        prev = cur


def test_delivery_and_signal_stops_happen(drive: Drive) -> None:
    stops = drive.stops()
    deliveries = [s for s in stops if s[2] == "delivery"]
    signals = [s for s in stops if s[2] == "signal"]
    assert len(deliveries) >= 30
    assert len(signals) >= 5
    for _, dur, _ in deliveries:
        assert 30.0 <= dur <= 120.0
    t0, dur, _ = deliveries[3]
    s = drive.state_at(t0 + dur / 2)
    assert s.stopped_for_delivery and not s.moving and s.speed_mps == 0.0
    assert s.road_class in {"residential", "tertiary"}


def test_gps_blocked_seen_during_drive(drive: Drive) -> None:
    assert any(drive.state_at(t).gps_blocked for t in range(0, 8 * 3600, 2))


def test_after_shift_van_is_parked(drive: Drive) -> None:
    s1 = drive.state_at(drive.end_time_s + 10)
    s2 = drive.state_at(drive.end_time_s + 1000)
    assert s1 == s2 and not s1.moving and s1.speed_mps == 0.0


def test_short_shift_and_no_stops_terminates(route: Route) -> None:
    params = DriveParams(shift_s=600.0, signal_probability=0.0, delivery_gap_m=(1e9, 1e9))
    d = Drive(route, seed=3, params=params)
    assert 600.0 <= d.end_time_s < 1200.0
    assert d.stops() == []


def test_state_at_is_fast(route: Route) -> None:
    import time

    d = Drive(route, seed=5)
    t0 = time.perf_counter()
    for t in range(0, 8 * 3600, 1):
        d.state_at(t)
    assert time.perf_counter() - t0 < 2.0
