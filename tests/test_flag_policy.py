"""The flag policy (receiver/flag_policy.py) on real stores: which flagged values the street maps
leave out, the count per unit, the one sentinel rule, the config setting, and the exports.

The expectations are written out by hand from docs/datalab.md "Flag policy" (EXPECTED_OUT),
not taken from the policy under test. The maps of a store whose flagged values carry a
poison value are compared with the maps of the same store where exactly the values the
policy must leave out are null and the kept ones carry the poison without a flag: equal
only if every flag is handled as documented.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from core.errors import ConfigError
from receiver import dbapi, quality
from receiver.aggregate import QUANTITY_KEYS, Period, build, split_values
from receiver.datalab_commands import datalab_commands
from receiver.config import load_receiver_config
from receiver.export import export_aggregates, export_measurements
from receiver.flag_policy import KNOWN_FLAGS, FlagPolicy
from receiver.mapunits import make_snapper
from simulator.route import Route
from tests.datalab_synth import copy_to_postgres, flag_values, make_store
from tests.pg import pg_cluster, pg_dsn  # noqa: F401  (fixtures, used by name)

ALL = {"pm25", "pm10", "no2_ppb", "laeq"}
PM = {"pm25", "pm10"}
# By hand, from the docs: which map quantities each flag keeps out by default.
EXPECTED_OUT: dict[str, set[str]] = {
    "out_of_range": ALL, "stuck": ALL, "outlier": ALL, "clock_untrusted": ALL, "warming_up": ALL,
    "clock_step": ALL, "time_implausible": ALL, "device_error": ALL, "overload": ALL,
    "humid": PM, "negative": PM,
    "noise_floor": set(), "temp_outside_correction_table": set(), "no_temperature": set(),
    "cal_input_missing": set(), "non_finite": set(), "salvaged": set(), "no_gps_time": set(), "time_untimed": set(),
    "audio_gap": set(), "audio_overrun": set(), "cal_unavailable": set(), "single_sentence": set(), "rh_missing": PM,
}
# no_fix / no_time are position states, not sample or value flags: maps take trusted positions only.
POISONED = sorted(EXPECTED_OUT)
SENSORS = (("pm", 1, ("pm25", "pm10")), ("no2", 2, ("no2_ppb",)), ("noise", 3, ("laeq",)))
DAYS, VANS, MINUTES = 3, 2, 12


def poison(flag: str) -> dict[str, float]:
    """A value far from the synthetic street levels (9-20 µg/m³, 56-72 dB), fitting the flag."""
    if flag == "negative":
        return {"pm25": -5.0, "pm10": -5.0, "no2_ppb": -5.0, "laeq": 125.0}
    if flag == "out_of_range":
        return {"pm25": 5000.0, "pm10": 5000.0, "no2_ppb": 5000.0, "laeq": 150.0}
    return {"pm25": 900.0, "pm10": 900.0, "no2_ppb": 900.0, "laeq": 130.0}


def changes(flagged: bool) -> tuple[list[Any], Counter]:
    """Every 37th second of each van-day gets the next flag of POISONED on all its sensors' values.

    ``flagged``: with the flags (the store under test); otherwise the values the policy must
    leave out are null and the others carry the poison unflagged (the expected store).
    Also: (unit of the segment scheme, quantity) -> values that must be left out.
    """
    route, snapper = Route.load(), make_snapper("segment")
    out, left_out, i = [], Counter(), 0
    for v in range(VANS):
        for d in range(DAYS):
            for sec in range(5, MINUTES * 60, 37):
                flag = POISONED[i % len(POISONED)]
                i += 1
                pos = route.position_at(300.0 * v + 10.0 * sec)
                unit = snapper.snap(pos.lat, pos.lon)
                for sensor, k, keys in SENSORS:
                    seq = 3 * sec + k
                    if not flagged:
                        vals = {q: None if q in EXPECTED_OUT[flag] else poison(flag)[q] for q in keys}
                        out.append((f"van-{v + 1:03d}", f"e{d}", seq, vals, "", {}))
                        for q in keys:
                            if q in EXPECTED_OUT[flag] and unit is not None:
                                left_out[(unit, q)] += 1
                        continue
                    by_receiver = KNOWN_FLAGS[flag][0] == "receiver"
                    out.append((f"van-{v + 1:03d}", f"e{d}", seq, {q: poison(flag)[q] for q in keys},
                                "" if by_receiver else flag, {q: flag for q in keys} if by_receiver else {}))
    return out, left_out


ROWS = ("SELECT cell, quantity, n_passes, n_days, n_samples, value, published, n_excluded FROM aggregates"
        " WHERE scheme = 'segment' AND period = 'all'")


def maps(conn: Any, policy: FlagPolicy = FlagPolicy()) -> dict[tuple[str, str], tuple]:
    build(conn, make_snapper("segment"), [Period("all")], policy=policy)
    return {(r[0], r[1]): tuple(r[2:]) for r in dbapi.fetchall(conn, ROWS)}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Counter]:
    base = make_store(tmp_path_factory.mktemp("flags") / "base.sqlite", days=DAYS, vans=VANS, minutes=MINUTES)
    flagged, expected = base.with_name("flagged.sqlite"), base.with_name("expected.sqlite")
    shutil.copy(base, flagged)
    shutil.copy(base, expected)
    flag_values(flagged, changes(True)[0])
    want_changes, left_out = changes(False)
    flag_values(expected, want_changes)
    return flagged, expected, left_out


def _check(got: dict, want: dict, left_out: Counter) -> None:
    assert got.keys() == want.keys() and len(got) > 50
    for key, (np_, nd, ns, value, pub, _) in want.items():
        assert got[key][:3] == (np_, nd, ns) and got[key][4] == pub, key
        assert got[key][3] == pytest.approx(value, abs=1e-9), key
        assert got[key][5] == left_out.get(key, 0), key  # the count per unit
    assert sum(left_out.values()) > 100 and {q for _, q in left_out} == ALL


def test_maps_leave_out_exactly_what_the_policy_says_sqlite(stores: tuple[Path, Path, Counter]) -> None:
    flagged, expected, left_out = stores
    got, want = maps(dbapi.connect(flagged)), maps(dbapi.connect(expected))
    _check(got, want, left_out)
    # The comparison can see flags: with no policy at all the poison reaches the maps.
    ignoring = maps(dbapi.connect(flagged), FlagPolicy(frozenset(), frozenset()))
    assert max(v[3] for (_, q), v in ignoring.items() if q == "pm25") > 100
    assert all(v[5] == 0 for v in ignoring.values())


def test_maps_leave_out_exactly_what_the_policy_says_postgresql(stores: tuple[Path, Path, Counter],
                                                                pg_dsn: str) -> None:  # noqa: F811
    flagged, expected, left_out = stores
    copy_to_postgres(flagged, pg_dsn, schemes=())
    pg = dbapi.connect(pg_dsn)
    _check(maps(pg), maps(dbapi.connect(expected)), left_out)
    pg.close()


def test_a_configured_policy_reaches_the_maps(stores: tuple[Path, Path, Counter], tmp_path: Path) -> None:
    flagged, _, _ = stores
    cfg = tmp_path / "receiver.toml"
    # Humid PM kept; salvaged samples left out (every quantity).
    cfg.write_text('[receiver]\nexclude_flags = ["salvaged"]\nexclude_flags_pm = []\n')
    res = CliRunner().invoke(datalab_commands, ["aggregate", "--store", str(flagged), "--scheme", "segment",
                                                "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    conn = dbapi.connect(flagged)
    params = json.loads(dbapi.fetchall(conn, "SELECT params FROM aggregate_builds WHERE scheme = 'segment'")[0][0])
    assert params["flag_policy"] == {"exclude": ["salvaged"], "exclude_pm": []}
    rows = maps(conn, load_receiver_config(cfg).flag_policy())
    assert sum(v[5] for v in rows.values()) > 0
    assert max(v[3] for (_, q), v in rows.items() if q == "pm25") > 100  # out_of_range etc. now reach the map


def test_config_rejects_unknown_flags_with_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "receiver.toml"
    cfg.write_text('[receiver]\nexclude_flags_pm = ["humidd"]\n')
    with pytest.raises(ConfigError, match="exclude_flags_pm.*humidd"):
        load_receiver_config(cfg)
    cfg.write_text('[receiver]\nexclude_flags = "stuck"\n')
    with pytest.raises(ConfigError, match="exclude_flags"):
        load_receiver_config(cfg)
    res = CliRunner().invoke(datalab_commands, ["aggregate", "--store", str(tmp_path / "x.sqlite"),
                                                "--config", str(cfg)])
    assert res.exit_code != 0 and "exclude_flags" in res.output


def test_every_flag_the_code_sets_is_decided() -> None:
    # The flags quality.py can set are all in the policy's list, and the test above poisons each.
    assert set(quality.FLAG_NAMES) <= set(KNOWN_FLAGS)
    assert set(KNOWN_FLAGS) - set(POISONED) == {"no_fix", "no_time"}


# -- sentinels -----------------------------------------------------------------------------

SENTINEL_VALUES = (-999.0, -9999.0, 65535.0, -900.0, -950.5, -1e6)
MEASUREMENTS = (0.0, 12.5, 899.0)


@pytest.mark.parametrize("q", sorted(ALL))
def test_sentinels_are_treated_identically_by_quality_and_aggregate(q: str) -> None:
    v = np.array([*SENTINEL_VALUES, *MEASUREMENTS])
    masks = quality.value_masks(q, v)
    # quality: a sentinel is out of range and nothing else
    assert [int(m) for m in masks[:len(SENTINEL_VALUES)]] == [quality.BIT["out_of_range"]] * len(SENTINEL_VALUES)
    # aggregate: left out even with no quality row and a policy that excludes no flag at all
    none = FlagPolicy(frozenset(), frozenset())
    sensor = {"pm25": "pm", "pm10": "pm", "no2_ppb": "no2", "laeq": "noise"}[q]
    for x in SENTINEL_VALUES:
        assert split_values(sensor, {q: x}, "", {}, none) == ({}, (q,)), x
    for x in MEASUREMENTS:
        assert split_values(sensor, {q: x}, "", {}, none) == ({q: x}, ()), x


def test_sentinels_on_both_paths_and_backends(tmp_path: Path, pg_dsn: str) -> None:  # noqa: F811
    """The columnar maps (SQL + numpy) leave the same sentinels out, counted per unit, on both stores."""
    path = make_store(tmp_path / "s.sqlite", days=1, vans=1, minutes=4)
    values = [*SENTINEL_VALUES, *MEASUREMENTS]
    flag_values(path, [("van-001", "e0", 3 * sec + 1, {"pm25": values[sec % len(values)]}, "", {})
                       for sec in range(240)])
    route, snapper = Route.load(), make_snapper("segment")
    want: Counter = Counter()
    for sec in range(240):
        pos = route.position_at(10.0 * sec)
        if sec % len(values) < len(SENTINEL_VALUES) and (unit := snapper.snap(pos.lat, pos.lon)):
            want[unit] += 1
    copy_to_postgres(path, pg_dsn, schemes=())
    for conn in (dbapi.connect(path), dbapi.connect(pg_dsn)):
        rows = {u: v for (u, q), v in maps(conn, FlagPolicy(frozenset(), frozenset())).items() if q == "pm25"}
        assert len(rows) > 20 and {u: v[5] for u, v in rows.items()} == {u: want.get(u, 0) for u in rows}
        assert max(v[3] for v in rows.values()) < 1000  # 65535 reaches no map
        conn.close()


# -- exports ---------------------------------------------------------------------------------


def test_measurement_export_carries_unit_flags_excluded_and_calibration(stores: tuple[Path, Path, Counter],
                                                                        tmp_path: Path) -> None:
    flagged, _, _ = stores
    path = tmp_path / "m.sqlite"
    shutil.copy(flagged, path)
    conn = dbapi.connect(path)
    # A value the receiver recomputed with a calibration record (receiver/calibration.py).
    dbapi.execute(conn, "INSERT INTO derived VALUES ('van-001', 'e0', 2, 'no2_ppb', 31.25, 'no2:SN1:v2')")
    conn.commit()
    out = io.StringIO()
    n = export_measurements(conn, out, "csv", device="van-001")
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert n == len(rows) > 1000
    by_key = {(r["t_utc_ms"], r["quantity"]): r for r in rows}
    units = {r["quantity"]: r["unit"] for r in rows}
    assert units == {"pm25": "µg/m³", "pm10": "µg/m³", "no2_ppb": "ppb", "laeq": "dB(A)"}
    first = min(int(r["t_utc_ms"]) for r in rows)  # second 0 of day 0: seq 1-3
    cal = by_key[(str(first), "no2_ppb")]
    assert (cal["calibration"], float(cal["value"])) == ("no2:SN1:v2", 31.25)
    assert all(r["calibration"] == "" for r in rows if r is not cal)
    # Second 5 + 37*i carries POISONED[i]: a van flag shows in "flags", a receiver flag in
    # "quality"; "excluded" is what the hand-written EXPECTED_OUT says for each quantity.
    for i, flag in enumerate(POISONED[:3]):
        sec = 5 + 37 * i
        col = "flags" if KNOWN_FLAGS[flag][0] == "van" else "quality"
        for q in ALL:
            r = by_key[(str(first + sec * 1000), q)]
            assert (r[col], r["excluded"]) == (flag, "1" if q in EXPECTED_OUT[flag] else "0"), (sec, q)
    # humid: out for PM only
    sec = 5 + 37 * POISONED.index("humid")
    assert {q: by_key[(str(first + sec * 1000), q)]["excluded"] for q in ALL} == {
        "pm25": "1", "pm10": "1", "no2_ppb": "0", "laeq": "0"}
    # GeoJSON: the same per value, and an RFC 7946 FeatureCollection (no "properties" member).
    out = io.StringIO()
    export_measurements(conn, out, "geojson", device="van-001")
    fc = json.loads(out.getvalue())
    assert "properties" not in fc and fc["metadata"]["flag_policy"]["exclude_pm"] == ["humid", "negative", "rh_missing"]
    props = [f["properties"] for f in fc["features"]]
    assert {"unit", "flags", "quality", "excluded", "calibration"} <= set(props[0])
    assert sum(p["calibration"] == "no2:SN1:v2" for p in props) == 1
    conn.close()


def test_aggregate_export_carries_the_count_left_out(stores: tuple[Path, Path, Counter]) -> None:
    flagged, _, left_out = stores
    conn = dbapi.connect(flagged)
    maps(conn)
    out = io.StringIO()
    export_aggregates(conn, out, "geojson", scheme="segment")
    fc = json.loads(out.getvalue())
    assert fc["type"] == "FeatureCollection" and "properties" not in fc and fc["metadata"]["published_only"]
    feats = fc["features"]
    assert feats and all(set(f) == {"type", "id", "geometry", "properties"} for f in feats)
    counts = {(f["properties"]["cell"], f["properties"]["quantity"]): f["properties"]["n_excluded"] for f in feats}
    assert counts == {k: left_out.get(k, 0) for k in counts} and sum(counts.values()) > 0
    out = io.StringIO()
    export_aggregates(conn, out, "csv", scheme="segment")
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert {(r["cell"], r["quantity"]): int(r["n_excluded"]) for r in rows} == counts
    assert {r["unit"] for r in rows} == {"µg/m³", "ppb", "dB(A)"}
    conn.close()


def test_a_map_table_made_before_the_policy_gets_the_column(tmp_path: Path) -> None:
    path = make_store(tmp_path / "old.sqlite", days=1, vans=1, minutes=2)
    conn = dbapi.connect(path)
    dbapi.execute(conn, "CREATE TABLE aggregates (scheme TEXT NOT NULL, cell TEXT NOT NULL, period TEXT NOT NULL,"
                        " quantity TEXT NOT NULL, unit TEXT, n_passes INTEGER NOT NULL, n_days INTEGER NOT NULL,"
                        " n_samples INTEGER NOT NULL, value DOUBLE PRECISION, published INTEGER NOT NULL,"
                        " period_start_utc_ms BIGINT, period_end_utc_ms BIGINT, properties TEXT, geometry TEXT,"
                        " built_utc_ms BIGINT, PRIMARY KEY (scheme, cell, period, quantity))")
    conn.commit()
    assert maps(conn) and all(v[5] == 0 for v in maps(conn).values())
    conn.close()


def test_quantity_columns_match_the_map_quantities() -> None:
    # The synthetic stores carry the A-weighted level; C and Z levels are map quantities too.
    assert set(QUANTITY_KEYS) == ALL | {"lceq", "lzeq"}


def test_measurement_export_is_the_same_on_postgresql(stores: tuple[Path, Path, Counter],
                                                      pg_dsn: str) -> None:  # noqa: F811
    flagged, _, _ = stores
    copy_to_postgres(flagged, pg_dsn, schemes=())
    out = {}
    for name, conn in (("sqlite", dbapi.connect(flagged)), ("pg", dbapi.connect(pg_dsn))):
        with dbapi.transaction(conn):
            dbapi.execute(conn, "DELETE FROM derived")
            dbapi.execute(conn, "INSERT INTO derived VALUES ('van-002', 'e1', 5, 'no2_ppb', 7.5, 'no2:SN9:v1')")
        buf = io.StringIO()
        export_measurements(conn, buf, "csv", device="van-002", period=Period("all"))
        out[name] = list(csv.DictReader(io.StringIO(buf.getvalue())))
        conn.close()
    assert len(out["pg"]) == len(out["sqlite"]) > 1000
    cols = ("t_utc_ms", "quantity", "unit", "flags", "quality", "excluded", "calibration")
    assert [tuple(r[c] for c in cols) for r in out["pg"]] == [tuple(r[c] for c in cols) for r in out["sqlite"]]
    assert [float(r["value"]) for r in out["pg"]] == [float(r["value"]) for r in out["sqlite"]]
    assert sum(r["excluded"] == "1" for r in out["pg"]) > 50
    (cal,) = [r for r in out["pg"] if r["calibration"]]
    assert (cal["calibration"], float(cal["value"])) == ("no2:SN9:v1", 7.5)
