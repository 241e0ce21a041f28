"""Flags describe the value that is served (issue 15, v5 finding 7).

The van computed no2_ppb with a bad record (5000 ppb: out_of_range); the receiver
recomputes it with the corrected record to ~23 ppb. Its flags must then be judged on
23 ppb, whether the record came with the samples or arrived later (recompute of stored
samples), on SQLite and PostgreSQL. Real ingest (tests/test_receiver_store.put).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.calibration import CALIBRATION_SENSOR, CalibrationRecord, no2_ppb_from_record
from core.sample import Sample, TimeSource
from receiver import dbapi
from receiver.store import SQLiteStore
from receiver.store_pg import PostgresStore
from tests.pg import pg_cluster, pg_dsn  # noqa: F401  (fixtures, used by name)
from tests.test_receiver_store import T, put
from core.wire import Batch

SHEET = {"we_e_mv": 295, "ae_e_mv": 300, "we_o_mv": 1, "ae_o_mv": 2, "sensitivity_na_per_ppb": -0.3,
         "gain_mv_per_na": -0.73}
BAD = 10  # the sample the van got wrong


def record(version: int, sheet: dict[str, Any]) -> Sample:
    rec = CalibrationRecord(id=f"no2:A1:v{version}", kind="no2", serial="A1", version=version, technician="t",
                            method="sheet", values=dict(sheet), valid_from=T / 1000 - 3600, status="active",
                            device="van-d1")
    return Sample(CALIBRATION_SENSOR, T + version, 0, TimeSource.GPS,
                  {"id": rec.id, "kind": rec.kind, "serial": rec.serial, "version": rec.version,
                   "status": rec.status, "record": rec.to_json()}, (), 0)


def no2(k: int, seq: int) -> Sample:
    we, ae, t = 296.0 + 0.2 * (k % 4), 296.0, 12.0
    onboard = 5000.0 if k == BAD else round(no2_ppb_from_record(SHEET, we, ae, t), 3)
    return Sample("no2", T + k * 1000, k * 1000, TimeSource.GPS,
                  {"no2_ppb": onboard, "no2_we_mv": we, "no2_ae_mv": ae, "no2_temp_c": t, "cal": "no2:A1:v1"},
                  (), seq)


def batch(samples: list[Sample], first: int) -> Batch:
    for i, s in enumerate(samples):
        s.seq = first + i
    return Batch("van-d1", "e1", first, first + len(samples) - 1, samples)


def flags_and_values(url: str) -> dict[int, tuple[float, str]]:
    conn = dbapi.connect(url)
    rows = dbapi.fetchall(conn, "SELECT t_utc_ms, value, quality FROM observations WHERE quantity = 'no2_ppb'")
    conn.close()
    # the value's own flags (no GPS here: the position state no_fix is not one of them)
    return {(t - T) // 1000: (float(v), ",".join(f for f in (q or "").split(",") if f not in ("", "no_fix")))
            for t, v, q in rows}


def run(store: Any, url: str, later: bool) -> dict[int, tuple[float, str]]:
    samples = [no2(k, 0) for k in range(1, 31)]
    if later:  # the samples first, flagged on the van's values; the corrected record afterwards
        put(store, batch(samples, 1))
        assert "out_of_range" in flags_and_values(url)[BAD][1]
        put(store, batch([record(2, SHEET)], 100))
    else:
        put(store, batch([record(2, SHEET), *samples], 1))
    store.close()
    return flags_and_values(url)


@pytest.mark.parametrize("later", [False, True])
def test_flags_follow_the_recomputed_value_sqlite(tmp_path: Path, later: bool) -> None:
    url = str(tmp_path / "d.sqlite")
    got = run(SQLiteStore(url), url, later)
    assert got[BAD][0] == pytest.approx(23.2, abs=0.5)  # served: the receiver's value
    assert got[BAD][1] == ""  # and nothing says it is out of range or an outlier
    assert all(q == "" for _, q in got.values())


@pytest.mark.parametrize("later", [False, True])
def test_flags_follow_the_recomputed_value_postgresql(pg_dsn: str, later: bool) -> None:  # noqa: F811
    got = run(PostgresStore(pg_dsn), pg_dsn, later)
    assert got[BAD][0] == pytest.approx(23.2, abs=0.5) and got[BAD][1] == ""


def test_a_recomputed_value_out_of_range_is_flagged(tmp_path: Path) -> None:
    """The other way round: the van's values were sound, the record the receiver applies is not."""
    url = str(tmp_path / "w.sqlite")
    store = SQLiteStore(url)
    wrong = {**SHEET, "sensitivity_na_per_ppb": -0.0003}  # a thousand times too sensitive a value
    put(store, batch([record(2, wrong), *[no2(k, 0) for k in range(1, 31) if k != BAD]], 1))
    store.close()
    got = flags_and_values(url)
    assert all(v > 2000 and "out_of_range" in q for v, q in got.values())
