"""The street-aggregate bench at CI size: its generated fleet is what its docstring says.

bench/bench_aggregate.py times a month of 50 vans; here two vans, three days and a few
minutes a day, so the generator and the measurement path run in seconds.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from bench.bench_aggregate import PERIOD, WARMUP_S, generate, measure
from receiver import dbapi
from receiver.aggregate import parse_period

SECONDS = 90  # 0.025 h


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "month.sqlite"
    assert generate(path, SECONDS / 3600, vans=2, days=3) == 2 * 3 * SECONDS * 3
    assert not list(path.parent.glob("*positions*"))  # the side store is gone
    return path


def test_every_sample_has_its_position_and_its_values(fleet: Path) -> None:
    c = dbapi.connect(fleet)
    assert dbapi.fetchall(c, "SELECT count(*) FROM samples s JOIN positions p USING (device, epoch, seq)"
                             " WHERE p.state = 'interpolated' AND p.lat BETWEEN 52.0 AND 52.3"
                             " AND p.lon BETWEEN 4.5 AND 4.8") == [(2 * 3 * SECONDS * 3,)]
    rows = dbapi.fetchall(c, "SELECT sensor, vals, flags, t_mono_ms FROM samples WHERE device = 'van-002'"
                             " ORDER BY seq LIMIT 3 OFFSET ?", (3 * WARMUP_S - 3,))
    assert [r[0] for r in rows] == ["pm", "no2", "noise"]
    assert set(json.loads(rows[0][1])) == {"pm25", "pm10"} and set(json.loads(rows[2][1])) == {"laeq"}
    assert rows[0][2] == "warming_up" and rows[1][2] == ""  # the PM sensor's first 30 s only
    assert dbapi.fetchall(c, "SELECT count(*) FROM samples WHERE flags = 'warming_up'") == [(2 * 3 * WARMUP_S,)]
    assert dbapi.fetchall(c, "PRAGMA journal_mode") == [("wal",)]  # as the receiver keeps it


def test_vans_move_at_van_speeds_on_weekdays_of_one_month(fleet: Path) -> None:
    c = dbapi.connect(fleet)
    speeds = [r[0] for r in dbapi.fetchall(c, "SELECT speed_mps FROM positions")]
    assert max(speeds) < 80 / 3.6 and min(speeds) == 0.0  # standing at the start of a shift
    days = {dt.datetime.fromtimestamp(t / 1000, dt.timezone.utc).date()
            for (t,) in dbapi.fetchall(c, "SELECT DISTINCT t_utc_ms / 86400000 * 86400000 FROM samples")}
    assert len(days) == 3 and all(d.weekday() < 5 for d in days)
    p = parse_period(PERIOD)
    assert dbapi.fetchall(c, "SELECT min(t_utc_ms) >= ? AND max(t_utc_ms) < ? FROM samples",
                          (p.start_ms, p.end_ms)) == [(1,)]
    # Ingest order: the vans' 60-second batches interleave in the table.
    first = [r[0] for r in dbapi.fetchall(c, "SELECT device FROM samples ORDER BY rowid LIMIT 400")]
    assert first[:180] == ["van-001"] * 180 and first[180:360] == ["van-002"] * 180


def test_measure_names_a_scaled_figure_as_scaled() -> None:
    rows = measure(SECONDS / 3600, vans=2, days=2)
    assert [r["name"] for r in rows] == ["street aggregates, 2 vans x 2 days (segment), SCALED x320",
                                         "street aggregates, 2 vans x 2 days (h3:10), SCALED x320"]
    assert all("1,080 samples" in r["note"] and r["value"] > 0 for r in rows)
