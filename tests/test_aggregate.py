"""Street-map aggregation: passes, pass means, medians, the N-passes-on-M-days rule, snapping.

Expectations are worked out by hand in the comments, not recomputed with the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h3
import pytest
from click.testing import CliRunner

from receiver import dbapi
from receiver.aggregate import (
    QUANTITIES,
    Pass,
    Period,
    Rule,
    Sample,
    build,
    combine,
    energy_mean,
    median_of,
    parse_period,
    split_passes,
    usable_values,
)
from receiver.datalab_commands import datalab_commands
from receiver.mapunits import H3Snapper, SegmentSnapper, cut_pieces, make_snapper
from receiver.store import SQLiteStore
from tests.datalab_synth import make_store

DAY = 86_400_000
T0 = 1_793_606_400_000  # 2026-11-02T08:00:00Z (09:00 in Amsterdam)


class LonSnapper:
    """Units by longitude band: unit "A" for lon < 1, "B" for 1 <= lon < 2, none beyond."""

    scheme = "test"

    def snap(self, lat: float, lon: float) -> str | None:
        return "A" if lon < 1 else "B" if lon < 2 else None

    def geometry(self, unit: str) -> dict:
        return {"type": "Point", "coordinates": [0.5 if unit == "A" else 1.5, 0.0]}

    def properties(self, unit: str) -> dict:
        return {}


def s(t_s: float, lon: float, device: str = "v1", day: int = 0, **values: float) -> Sample:
    return Sample(device, T0 + day * DAY + int(t_s * 1000), 0.0, lon, values)


# -- statistics -------------------------------------------------------------------------


def test_energy_mean_is_not_the_arithmetic_mean() -> None:
    # 60 and 70 dB: energies 1e6 and 1e7, mean 5.5e6, 10*log10(5.5e6) = 67.404 dB (not 65).
    assert energy_mean([60.0, 70.0]) == pytest.approx(67.4036, abs=1e-3)
    # Equal levels stay equal; ten times the same level is that level.
    assert energy_mean([55.0] * 10) == pytest.approx(55.0)
    # 3 dB more for twice the energy: mean of 80 and -inf-ish 0 dB is 80 - 3.01.
    assert energy_mean([80.0, 0.0]) == pytest.approx(76.99, abs=0.01)
    # Very loud values must not overflow.
    assert energy_mean([400.0, 400.0]) == pytest.approx(400.0)


def test_median_odd_even_and_energy_for_noise() -> None:
    pm, noise = QUANTITIES["pm25"], QUANTITIES["laeq"]
    assert median_of(pm, [10.0, 1.0, 3.0]) == 3.0
    assert median_of(pm, [1.0, 3.0, 100.0, 5.0]) == 4.0  # (3 + 5) / 2
    assert median_of(noise, [50.0, 60.0, 70.0, 99.0]) == pytest.approx(67.4036, abs=1e-3)  # energy mean of 60, 70


# -- passes -------------------------------------------------------------------------------


def test_split_passes_on_leaving_the_unit_on_gaps_and_off_road() -> None:
    track = [
        s(0, 0.1, pm25=10), s(1, 0.2, pm25=20),  # pass 1 in A: mean 15
        s(2, 1.1, pm25=7),  # pass 2 in B
        s(3, 0.3, pm25=1), s(4, 0.4, pm25=3),  # pass 3: back in A is a new pass, mean 2
        s(60, 0.5, pm25=100),  # 56 s later (> 30 s gap): pass 4 although still in A
        s(61, 5.0, pm25=999),  # off any unit: dropped, and it ends pass 4
        s(62, 0.6, pm25=50),  # pass 5 in A
    ]
    passes = list(split_passes(track, LonSnapper(), max_gap_s=30))
    assert [(p.unit, p.means()["pm25"][0]) for p in passes] == [
        ("A", 15.0), ("B", 7.0), ("A", 2.0), ("A", 100.0), ("A", 50.0)]
    assert passes[0].start_ms == T0 and passes[0].end_ms == T0 + 1000


def test_passes_are_per_van_even_when_vans_interleave() -> None:
    track = [s(0, 0.1, "v1", pm25=1), s(0, 0.1, "v2", pm25=100), s(1, 0.2, "v1", pm25=3), s(1, 0.2, "v2", pm25=300)]
    passes = sorted(split_passes(track, LonSnapper()), key=lambda p: p.device)
    assert [(p.device, p.means()["pm25"]) for p in passes] == [("v1", (2.0, 2)), ("v2", (200.0, 2))]


def test_noise_pass_mean_is_an_energy_mean() -> None:
    (p,) = split_passes([s(0, 0.1, laeq=60), s(1, 0.1, laeq=70)], LonSnapper())
    assert p.means()["laeq"][0] == pytest.approx(67.4036, abs=1e-3)


def test_median_of_pass_means_not_of_samples() -> None:
    # Pass 1: a van parked with 9 samples of 100; passes 2 and 3 drive through with 10 and 12.
    # Sample median would be 100; the median of pass means (100, 10, 12) is 12.
    p1 = Pass("v1", "A", T0, T0)
    p1.values["pm25"].extend([100.0] * 9)
    p2 = Pass("v1", "A", T0 + DAY, T0 + DAY)
    p2.values["pm25"].append(10.0)
    p3 = Pass("v2", "A", T0 + 2 * DAY, T0 + 2 * DAY)
    p3.values["pm25"].append(12.0)
    (v,) = combine([p1, p2, p3], Rule(3, 3))
    assert (v.value, v.n_passes, v.n_days, v.n_samples, v.published) == (12.0, 3, 3, 11, True)


def _passes(days: list[int]) -> list[Pass]:
    out = []
    for i, d in enumerate(days):
        p = Pass("v1", "A", T0 + d * DAY + i * 60_000, T0 + d * DAY + i * 60_000)
        p.values["pm25"].append(float(i))
        out.append(p)
    return out


@pytest.mark.parametrize(
    ("days", "published"),
    [
        ([0, 0, 0, 0], False),  # 4 passes on 1 day: too few days
        ([0, 0, 1, 1], True),  # 4 passes on 2 days: just enough
        ([0, 1, 2], False),  # 3 passes on 3 days: too few passes
        ([0, 1, 2, 3, 4], True),
    ],
)
def test_publication_rule_n_passes_on_m_days(days: list[int], published: bool) -> None:
    (v,) = combine(_passes(days), Rule(min_passes=4, min_days=2))
    assert v.published is published
    assert v.n_days == len(set(days))


def test_days_are_local_days() -> None:
    # 23:30 UTC on Nov 2 is 00:30 on Nov 3 in Amsterdam: a different day from 08:00 UTC Nov 2.
    a = Pass("v1", "A", T0, T0)
    b = Pass("v1", "A", T0 + int(15.5 * 3600_000), T0 + int(15.5 * 3600_000))
    for p in (a, b):
        p.values["pm25"].append(1.0)
    assert combine([a, b], tz="Europe/Amsterdam")[0].n_days == 2
    assert combine([a, b], tz="UTC")[0].n_days == 1


def test_usable_values_drop_flags_sentinels_and_other_keys() -> None:
    assert usable_values("pm", {"pm25": 5, "pm10": 8, "pm1": 2, "rh": 90}, "") == {"pm25": 5.0, "pm10": 8.0}
    assert usable_values("pm", {"pm25": 5}, "warming_up") == {}
    assert usable_values("pm", {"pm25": -999, "pm10": float("nan")}, None) == {}
    assert usable_values("no2", {"no2_ppb": 12.5, "no2_we_mv": 300}, "no_temperature") == {"no2_ppb": 12.5}
    assert usable_values("noise", {"laeq": 61, "lamax": 70}, "") == {"laeq": 61.0}


def test_parse_period_uses_local_midnights() -> None:
    p = parse_period("2026-11")
    assert p.start_ms == 1_793_487_600_000  # 2026-10-31T23:00:00Z = Nov 1 00:00 CET
    assert p.end_ms == 1_796_079_600_000  # 2026-11-30T23:00:00Z
    r = parse_period("2026-11-02..2026-11-03")
    assert (r.end_ms - r.start_ms) == 2 * DAY
    assert parse_period("all") == Period("all")
    with pytest.raises(ValueError):
        parse_period("November")


# -- snapping -----------------------------------------------------------------------------

# A straight street along the equator: 0.0008 deg of longitude = 89.06 m.
STREET = {"properties": {"name": "Teststraat", "road_class": "residential"},
          "coordinates": [[0.0, 0.0], [0.0008, 0.0]]}
M_PER_DEG = math.radians(1) * 6_371_008.8  # 111195 m


def test_streets_are_cut_into_about_30_m_pieces() -> None:
    pieces = cut_pieces([STREET], 30.0)
    # 89.06 m / 30 m rounds to 3 pieces of 29.69 m.
    assert [p.id for p in pieces] == ["s000-0-000", "s000-0-001", "s000-0-002"]
    assert all(p.length_m == pytest.approx(29.7, abs=0.05) for p in pieces)
    assert pieces[1].coords[0][0] == pytest.approx(0.0008 / 3, abs=1e-7)
    assert pieces[0].name == "Teststraat"


def test_a_street_listed_twice_in_both_directions_is_cut_once() -> None:
    back = {"properties": STREET["properties"], "coordinates": [[0.0008, 0.0], [0.0, 0.0]]}
    assert len(cut_pieces([STREET, back], 30.0)) == 3


def test_segment_snapping_nearest_piece_within_the_distance() -> None:
    snap = SegmentSnapper(cut_pieces([STREET], 30.0), max_m=25.0)
    lon_45m = 45 / M_PER_DEG
    # 45 m along, 10 m beside the street: the middle piece (29.7..59.4 m), 10 m away.
    pid, d = snap.nearest(10 / M_PER_DEG, lon_45m)
    assert pid == "s000-0-001" and d == pytest.approx(10.0, abs=0.05)
    assert snap.snap(-10 / M_PER_DEG, 5 / M_PER_DEG) == "s000-0-000"
    assert snap.snap(0.0, 80 / M_PER_DEG) == "s000-0-002"
    # 30 m beside the street, and 30 m beyond its end: unsnapped.
    assert snap.snap(30 / M_PER_DEG, lon_45m) is None
    assert snap.snap(0.0, 120 / M_PER_DEG) is None
    assert snap.geometry("s000-0-001")["type"] == "LineString"
    assert snap.properties("s000-0-001")["street"] == "Teststraat"


def test_shipped_route_gives_about_30_m_pieces() -> None:
    snap = make_snapper("segment")
    lengths = [p.length_m for p in snap.pieces.values()]
    assert 500 < len(lengths) < 700  # 17.7 km of distinct street
    assert min(lengths) > 20 and max(lengths) < 45


def test_h3_snapping_and_cell_geometry() -> None:
    snap = H3Snapper(10)
    lat, lon = 52.1244, 4.6578  # Alphen aan den Rijn station
    cell = snap.snap(lat, lon)
    assert cell == h3.latlng_to_cell(lat, lon, 10) and h3.get_resolution(cell) == 10
    ring = snap.geometry(cell)["coordinates"][0]
    assert len(ring) == 7 and ring[0] == ring[-1]  # a closed hexagon, lon/lat order
    assert all(abs(x - lon) < 0.002 and abs(y - lat) < 0.002 for x, y in ring)
    # ~66 m edges at resolution 10, ~25 m at 11: a point 100 m away is in another res-10 cell.
    assert snap.snap(lat + 100 / M_PER_DEG, lon) != cell
    assert make_snapper("h3:11").snap(lat, lon) == h3.latlng_to_cell(lat, lon, 11)


# -- the table, end to end ----------------------------------------------------------------


def _tiny_store(path: Path) -> Path:
    """Two vans on a 3-piece street: van 1 on Nov 2 and 3, van 2 on Nov 3; one sample in December."""
    st = SQLiteStore(path)
    lon = lambda m: m / M_PER_DEG  # noqa: E731
    rows = []
    # (device, epoch, seq, t, sensor, vals, flags, position state, lat, lon)
    seq = 0
    for k, (device, day, pm) in enumerate( (("van-001", 0, 10.0), ("van-001", 1, 20.0), ("van-002", 1, 40.0), ("van-002", 1, 30.0))):
        for i, m in enumerate((5.0, 15.0)):  # two samples in the first piece per pass
            seq += 1
            t = T0 + day * DAY + k * 60_000 + i * 1000
            rows.append((device, "e", seq, t, "pm", {"pm25": pm + i, "pm10": 1.0}, "", "exact", 0.0, lon(m)))
    seq += 1
    rows.append(("van-001", "e", seq, T0 + 3 * DAY, "pm", {"pm25": 5.0}, "warming_up", "exact", 0.0, lon(5)))
    seq += 1
    rows.append(("van-001", "e", seq, T0 + 3 * DAY + 1, "pm", {"pm25": 999.0}, "", "no_fix", None, None))
    seq += 1
    rows.append(("van-001", "e", seq, T0 + 35 * DAY, "pm", {"pm25": 77.0}, "", "exact", 0.0, lon(5)))
    c = st.conn
    for d, e, sq, t, sensor, vals, flags, state, la, lo in rows:
        c.execute("INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                  (d, e, sq, sensor, t, 0, "gps", "b", json.dumps(vals), flags, "b", t))
        c.execute("INSERT INTO positions VALUES (?,?,?,?,?,?,?,?,?)", (d, e, sq, t, state, la, lo, 5.0, 1))
    st.close()
    return path


def test_build_writes_medians_counts_flags_and_periods(tmp_path: Path) -> None:
    conn = dbapi.connect(_tiny_store(tmp_path / "s.sqlite"))
    snap = SegmentSnapper(cut_pieces([STREET], 30.0))
    rep = build(conn, snap, [Period("all"), parse_period("2026-11")], rule=Rule(3, 2))
    assert [r.rows for r in rep] == [2, 2]  # pm25 and pm10 of piece 0
    got = {(r[0], r[1]): r[2:] for r in dbapi.fetchall(
        conn, "SELECT period, quantity, n_passes, n_days, n_samples, value, published FROM aggregates")}
    # Pass means 10.5, 20.5, 40.5 and 30.5 (four passes: van 2's two runs are 1 min apart > 30 s),
    # plus December's 77 in "all". Median of (10.5, 20.5, 30.5, 40.5, 77) = 30.5; November: (20.5+30.5)/2.
    assert got[("all", "pm25")] == (5, 3, 9, 30.5, 1)
    assert got[("2026-11", "pm25")] == (4, 2, 8, 25.5, 1)
    assert got[("2026-11", "pm10")][:2] == (4, 2)
    row = dbapi.fetchall(conn, "SELECT geometry, properties, unit FROM aggregates WHERE period='all' LIMIT 1")[0]
    assert json.loads(row[0])["type"] == "LineString" and json.loads(row[1])["street"] == "Teststraat"
    # Rebuilding replaces, never duplicates; a stricter rule unpublishes.
    build(conn, snap, [parse_period("2026-11")], rule=Rule(5, 2))
    assert dbapi.fetchall(conn, "SELECT count(*), sum(published) FROM aggregates WHERE period='2026-11'") == [(2, 0)]
    assert dbapi.fetchall(conn, "SELECT min_passes, n_rows FROM aggregate_builds WHERE period='2026-11'") == [(5, 2)]


def test_aggregate_command_on_a_synthetic_fleet(tmp_path: Path) -> None:
    store = make_store(tmp_path / "d.sqlite")
    res = CliRunner().invoke(datalab_commands, ["aggregate", "--store", str(store), "--scheme", "segment",
                                                "--scheme", "h3:10", "--monthly"])
    assert res.exit_code == 0, res.output
    conn = dbapi.connect(store)
    rows = dbapi.fetchall(conn, "SELECT scheme, period, count(DISTINCT cell), sum(published), min(n_days),"
                                " max(n_days) FROM aggregates GROUP BY 1, 2 ORDER BY 1, 2")
    assert [r[:2] for r in rows] == [("h3:10", "2026-11"), ("h3:10", "all"), ("segment", "2026-11"),
                                     ("segment", "all")]
    for scheme, period, cells, published, dmin, dmax in rows:
        assert cells > 50 and 0 < published and dmax == 3
    # Every published row meets the default rule (4 passes on 2 days); some rows do not.
    assert dbapi.fetchall(conn, "SELECT count(*) FROM aggregates WHERE published = 1 AND"
                                " (n_passes < 4 OR n_days < 2)") == [(0,)]
    assert dbapi.fetchall(conn, "SELECT count(*) > 0 FROM aggregates WHERE published = 0") == [(1,)]
    # Primary roads are dirtier and louder than residential ones in the synthetic data.
    by_class = dict(dbapi.fetchall(conn, "SELECT json_extract(properties, '$.road_class'), avg(value) FROM aggregates"
                                         " WHERE scheme='segment' AND period='all' AND quantity='pm25' GROUP BY 1"))
    assert by_class["primary"] == pytest.approx(20.0, abs=0.6)
    assert by_class["secondary"] == pytest.approx(14.0, abs=0.6) and by_class["service"] == pytest.approx(9.0, abs=0.6)
