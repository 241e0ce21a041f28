"""A value the van calibrated exports the id of its record (issue 15 point 7; v5 finding 9: a laeq
calibrated on the van with noise:MIC1:v2 names that record in the measurement export)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from drivers.base import Reading
from core.calibration import CalibrationRecord
from edge.calibration import SensorCalibration, apply_record
from core.sample import Sample, TimeSource
from receiver import dbapi
from receiver.export import export_measurements
from receiver.store import SQLiteStore
from tests.test_receiver_store import T, put
from core.wire import Batch


def test_noise_values_calibrated_on_the_van_name_their_record(tmp_path: Path) -> None:
    rec = CalibrationRecord(id="noise:MIC1:v2", kind="noise", serial="MIC1", version=2, technician="t",
                            method="acoustic", values={"offset_db": 1.3}, valid_from=T / 1000 - 3600,
                            status="active", device="van-c1")
    samples = []
    for k in range(10):
        raw = Reading(sensor="noise", values={"laeq": 60.0 + 0.1 * k, "lamax": 66.0, "lamin": 54.0})
        cal = apply_record(raw, rec, SensorCalibration(kind="noise", serial="MIC1", base_offset_db=0.0))
        t = T + k * 1000
        samples.append(Sample("noise", t, k * 1000, TimeSource.GPS, dict(cal.values), tuple(cal.flags), 2 * k + 1))
        samples.append(Sample("gps", t, k * 1000, TimeSource.GPS, {"lat": 52.1, "lon": 4.6, "fix_quality": 1},
                              (), 2 * k + 2))
    store = SQLiteStore(tmp_path / "c.sqlite")
    put(store, Batch("van-c1", "e1", 1, 20, samples))
    store.close()
    conn = dbapi.connect(str(tmp_path / "c.sqlite"))
    buf = io.StringIO()
    export_measurements(conn, buf, "csv")
    conn.close()
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert {r["quantity"] for r in rows} == {"laeq"} and len(rows) == 10
    assert {r["calibration"] for r in rows} == {"noise:MIC1:v2"}
    assert rows[0]["value"] == "61.3" and rows[0]["unit"] == "dB(A)"  # 60.0 + the record's 1.3 dB
