"""The columnar aggregation (build) gives the same rows as the per-sample reference.

:func:`receiver.aggregate.split_passes` and :func:`combine` define the street map one
sample at a time; :func:`build` computes it on numpy columns per van with the values
pulled out of the JSON by the database. These tests run both on the same stores, with
the awkward cases in them (flags, sentinels, booleans and strings, gaps, off-road
positions, untrusted positions, passes crossing local midnight, even pass counts for
noise), on SQLite and PostgreSQL, and compare every row.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from receiver import dbapi
from receiver.aggregate import (
    QUANTITY_KEYS,
    Period,
    Rule,
    build,
    combine,
    parse_period,
    read_samples,
    read_tracks,
    split_passes,
    track_passes,
)
from receiver.mapunits import H3Snapper, SegmentSnapper, make_snapper
from receiver.store_pg import PostgresStore
from simulator.route import Route
from tests.datalab_synth import make_store
from tests.pg import pg_cluster, pg_dsn  # noqa: F401  (fixtures, used by name)

AWKWARD_T0 = int(dt.datetime(2026, 11, 4, 22, 50, tzinfo=dt.timezone.utc).timestamp() * 1000)
ROWS = ("SELECT cell, quantity, n_passes, n_days, n_samples, value, published, n_excluded FROM aggregates"
        " WHERE scheme = ? AND period = ?")


def _add_awkward_van(path: Path) -> None:
    """van-009: one day of driving with every case the reader must drop or split on.

    It starts at 22:50 UTC (23:50 in Amsterdam), so its passes fall on two local days.
    """
    route = Route.load()
    t0 = AWKWARD_T0
    samples, positions = [], []
    seq = 0
    for s in range(1500):
        if 600 <= s < 660:
            continue  # a minute without data: a gap longer than max_gap_s
        t = t0 + s * 1000
        pos = route.position_at(3000.0 + (s % 700) * 6.0)  # round and round a stretch: many passes
        lat, lon, state = pos.lat, pos.lon, "interpolated"
        if 200 <= s < 230:
            lat += 0.05  # 5.5 km north, off every road: in no segment (still in some H3 cell)
        if s % 97 == 0:
            state = "no_fix"
        if s % 89 == 0:
            lat = lon = None  # a trusted state without a position: left out
        flags = "warming_up" if s < 40 else ("stuck,time_implausible" if s % 53 == 0 else
                                             ("humid" if s % 7 == 0 else ""))
        pm25: Any = 10.0 + (s % 11)
        if s % 31 == 0:
            pm25 = -999
        elif s % 37 == 0:
            pm25 = True  # not a measurement
        elif s % 41 == 0:
            pm25 = "12.5"  # neither
        elif s % 43 == 0:
            pm25 = None
        laeq = 50.0 + (s * 7919 % 23)
        for sensor, vals in (("pm", {"pm25": pm25, "pm10": 20 + s % 5, "rh": 80}),
                             ("no2", {"no2_ppb": 15.5 + (s % 3), "no2_we_mv": 300}),
                             ("noise", {"laeq": laeq, "lamax": laeq + 5}),
                             ("gps", {"lat": pos.lat, "lon": pos.lon})):
            seq += 1
            samples.append(("van-009", "e0", seq, sensor, t, s * 1000, "gps", "b", json.dumps(vals), flags,
                            "van-009:e0", t + 500))
            positions.append(("van-009", "e0", seq, t, state, lat, lon, 6.0, 1))
    db = dbapi.connect(path)
    with dbapi.transaction(db):
        dbapi.executemany(db, "INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", samples)
        dbapi.executemany(db, "INSERT INTO positions VALUES (?,?,?,?,?,?,?,?,?)", positions)
    db.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_store(tmp_path_factory.mktemp("fast") / "d.sqlite", days=4, vans=3, minutes=25)
    _add_awkward_van(path)
    return path


def _reference(conn: Any, snapper: Any, period: Period, rule: Rule, max_gap_s: float = 30.0) -> dict:
    """The per-sample definition: read_samples -> split_passes -> combine, as build would store it."""
    passes = list(split_passes(read_samples(conn, period), snapper, max_gap_s))
    return {(v.unit, v.quantity): (v.n_passes, v.n_days, v.n_samples, round(v.value, 3), int(v.published),
                                   v.n_excluded) for v in combine(passes, rule)}, len(passes)


def _built(conn: Any, snapper: Any, period: Period, rule: Rule, max_gap_s: float = 30.0) -> tuple[dict, int]:
    (rep,) = build(conn, snapper, [period], rule=rule, max_gap_s=max_gap_s)
    rows = dbapi.fetchall(conn, ROWS, (snapper.scheme, period.label))
    return {(r[0], r[1]): (r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows}, rep.passes


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, (np_, nd, ns, value, pub, excluded) in want.items():
        g = got[key]
        assert g[:3] == (np_, nd, ns) and g[4:] == (pub, excluded), key
        assert g[3] == pytest.approx(value, abs=1e-9), key


class GridSnapper:
    """A snapper with only ``snap`` (no columnar interface): ~100 m squares, none north of 52.13."""

    scheme = "grid"

    def snap(self, lat: float, lon: float) -> str | None:
        return None if lat > 52.13 else f"{math.floor(lat / 0.001)}:{math.floor(lon / 0.0015)}"

    def geometry(self, unit: str) -> dict:
        return {"type": "Point", "coordinates": [0.0, 0.0]}

    def properties(self, unit: str) -> dict:
        return {}


@pytest.mark.parametrize("scheme", ["segment", "h3:10", "h3:11", "grid"])
@pytest.mark.parametrize("period", ["all", "2026-11-05", "2026-11-04..2026-11-05"])
def test_build_equals_the_per_sample_reference(store: Path, scheme: str, period: str) -> None:
    conn = dbapi.connect(store)
    snapper = GridSnapper() if scheme == "grid" else make_snapper(scheme)
    p, rule = parse_period(period), Rule(3, 2)
    want, want_passes = _reference(conn, snapper, p, rule)
    got, got_passes = _built(conn, snapper, p, rule)
    assert len(want) > 20  # the case is not empty
    assert got_passes == want_passes
    _assert_same(got, want)


def test_awkward_van_alone_matches_with_a_short_gap(store: Path) -> None:
    # max_gap_s below the 1 s sample spacing: every sample is a pass of its own.
    conn = dbapi.connect(store)
    snapper = make_snapper("segment")
    p = parse_period("2026-11-04..2026-11-05")
    want, want_passes = _reference(conn, snapper, p, Rule(1, 1), max_gap_s=0.5)
    got, got_passes = _built(conn, snapper, p, Rule(1, 1), max_gap_s=0.5)
    assert got_passes == want_passes
    _assert_same(got, want)


def test_the_awkward_cases_are_dropped_or_split(store: Path) -> None:
    # Worked out from _add_awkward_van, not from the code under test.
    conn = dbapi.connect(store)
    (track,) = [t for t in read_tracks(conn, parse_period("2026-11-04..2026-11-05")) if t.device == "van-009"]
    kept = [s for s in range(1500) if not 600 <= s < 660 and s % 97 and s % 89]  # no_fix and no position out
    assert len(track.t_ms) == 3 * len(kept)  # gps samples are not map samples
    assert (np.diff(track.t_ms) >= 0).all()
    col = QUANTITY_KEYS.index("pm25")
    pm25 = track.values[:, col][~np.isnan(track.values[:, col])]
    # Flag policy: warming_up (s < 40), time_implausible (s % 53) and, for PM, humid (s % 7) leave
    # a value out; so does the sentinel -999 (s % 31). True, "12.5" and null are no values at all.
    number = [s for s in kept if s % 31 == 0 or (s % 37 and s % 41 and s % 43)]
    usable = [s for s in number if s >= 40 and s % 53 and s % 31 and s % 7]
    assert len(pm25) == len(usable)
    assert int(track.excluded[:, col].sum()) == len(number) - len(usable)
    # NO2 has no humid rule: only warming_up and time_implausible leave it out.
    no2 = track.values[:, QUANTITY_KEYS.index("no2_ppb")]
    assert int((~np.isnan(no2)).sum()) == len([s for s in kept if s >= 40 and s % 53])
    # Off the road for 30 s: no segment, and the pass before it ends there.
    codes = make_snapper("segment").snap_array(track.lat, track.lon)
    off = (track.t_ms - AWKWARD_T0 >= 200_000) & (track.t_ms - AWKWARD_T0 < 230_000)
    assert (codes[off] == -1).all() and (codes[~off] >= 0).mean() > 0.9
    # Back on the road after the stretch, and back after the minute without data: new passes.
    starts = set((track_passes(track, codes).start_ms - AWKWARD_T0).tolist())
    assert {230_000, 660_000} <= starts


def test_segment_snap_array_equals_snap(store: Path) -> None:
    conn = dbapi.connect(store)
    track = next(read_tracks(conn, Period("all")))
    lat = np.concatenate([track.lat, track.lat + 0.0002, track.lat - 0.0003])  # ~22 and ~33 m aside too
    lon = np.concatenate([track.lon, track.lon, track.lon])
    for snapper in (make_snapper("segment"), H3Snapper(10)):
        codes = snapper.snap_array(lat, lon)
        fresh: Any = SegmentSnapper.from_file() if snapper.scheme == "segment" else H3Snapper(10)
        want = [fresh.snap(a, b) for a, b in zip(lat.tolist(), lon.tolist())]
        assert [None if c < 0 else snapper.unit_of(c) for c in codes.tolist()] == want
        assert any(w is None for w in want) or snapper.scheme != "segment"


def _copy_to_postgres(src: Path, dsn: str) -> None:
    PostgresStore(dsn).close()  # the schema
    a, b = dbapi.connect(src), dbapi.connect(dsn)
    with dbapi.transaction(b):
        dbapi.executemany(b, "INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,CAST(? AS jsonb),?,?,?)",
                          dbapi.fetchall(a, "SELECT * FROM samples"))
        dbapi.executemany(b, "INSERT INTO positions (device, epoch, seq, t_utc_ms, state, lat, lon, speed_mps,"
                             " fix_quality) VALUES (?,?,?,?,?,?,?,?,?)", dbapi.fetchall(a, "SELECT * FROM positions"))
    a.close()
    b.close()


def test_postgresql_builds_the_same_rows_as_sqlite(store: Path, pg_dsn: str) -> None:  # noqa: F811
    _copy_to_postgres(store, pg_dsn)
    lite, pg = dbapi.connect(store), dbapi.connect(pg_dsn)
    for scheme in ("segment", "h3:10"):
        snapper = make_snapper(scheme)
        for period in (Period("all"), parse_period("2026-11-04..2026-11-05")):
            want, want_passes = _reference(lite, snapper, period, Rule())
            got, got_passes = _built(pg, snapper, period, Rule())
            assert got_passes == want_passes
            _assert_same(got, want)
    (rep,) = build(pg, make_snapper("segment"), [Period("all")])
    assert rep.samples == dbapi.fetchall(lite, "SELECT count(*) FROM samples s JOIN positions p USING (device, epoch,"
                                               " seq) WHERE s.sensor <> 'gps' AND p.state IN ('exact',"
                                               " 'interpolated') AND p.lat IS NOT NULL")[0][0]
    pg.close()
