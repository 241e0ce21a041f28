"""Identity everywhere: what a van uploads lands under the device its topic names, on both stores.

The failure this guards against (issue 13): calibration records were keyed by their id
``no2:<serial>:vN`` alone, so van A's record for a sensor serial that van B also had
overwrote B's, and B's recomputed NO2 went from ~114 ppb to ~118,853 ppb. Here every upload
goes through the receiver's real ``Ingestor`` (topic -> decode -> store), as the service does.
"""

from __future__ import annotations

import json
import math
from typing import Any

from core.calibration import CalibrationRecord, no2_ppb_from_record
from edge.calibration import CalibrationStore
from receiver.ingest import Ingestor
from tests.test_calibration import SERIAL, T0, FakeClock, _cal_sample, _no2_sample, sheet_values
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_store_contract import MakeStore, make, q  # noqa: F401  (make: fixture, used by name)
from core.wire import Batch, Gap, encode_batch

RECEIVED = int(T0 * 1000) + 3_600_000
WE_MV = {i: 320.0 + i for i in range(2, 12)}  # raw working-electrode mV per sample seq


def _record(tmp_path: Any, device: str, **values: float) -> CalibrationRecord:
    """A van's own calibration store (a file per van, as on the Pi) with one confirmed NO2 record."""
    with CalibrationStore.for_data_dir(tmp_path / device, clock=FakeClock()) as cs:
        return cs.confirm(cs.add("no2", SERIAL, "sheet", sheet_values(**values), technician="t", device=device).id)


def _upload(ing: Ingestor, device: str, batch: Batch) -> str:
    out = ing.handle(f"datalab/v1/{device}/batch", encode_batch(batch), RECEIVED)
    assert out.ack is not None
    return out.ack.status


def _derived(s: Any, device: str) -> dict[int, tuple[float, str]]:
    return {seq: (v, cal) for seq, v, cal in q(s, "SELECT seq, value, calibration FROM derived WHERE device=?", device)}


def _van_batch(device: str, rec: CalibrationRecord, epoch: str = "e1") -> Batch:
    samples = [_cal_sample(1, T0, rec)] + [_no2_sample(i, T0 + i, WE_MV[i], cal=rec.id) for i in range(2, 12)]
    return Batch(device, epoch, 1, 11, samples)


def test_same_sensor_serial_in_two_vans_is_two_records(make: MakeStore, tmp_path: Any) -> None:
    s = make()
    ing = Ingestor(s)
    rec_b = _record(tmp_path, "van-b")
    # Van A has a sensor of the same serial (it moved, or a copied sheet) with wildly other values.
    rec_a = _record(tmp_path, "van-a", slope=1000.0, intercept_ppb=50.0)
    assert rec_a.id == rec_b.id == f"no2:{SERIAL}:v1"

    assert _upload(ing, "van-b", _van_batch("van-b", rec_b)) == "stored"
    before = _derived(s, "van-b")
    assert len(before) == 10
    expect_b = no2_ppb_from_record(rec_b.values, WE_MV[5], 306.0, 12.0)
    assert math.isclose(before[5][0], expect_b)

    # Van A's upload, from its own topic, with the same record id.
    assert _upload(ing, "van-a", _van_batch("van-a", rec_a)) == "stored"
    rows = q(s, "SELECT device, id, record FROM calibrations ORDER BY device")
    assert [(d, i) for d, i, _ in rows] == [("van-a", rec_a.id), ("van-b", rec_b.id)]
    assert CalibrationRecord.from_json(rows[1][2]) == rec_b, "van B's record untouched"
    assert _derived(s, "van-b") == before, "van B's derived NO2 untouched"
    got_a = _derived(s, "van-a")
    assert math.isclose(got_a[5][0], no2_ppb_from_record(rec_a.values, WE_MV[5], 306.0, 12.0))
    assert abs(got_a[5][0] - expect_b) > 1000  # the two really differ: the test would see a mix-up

    # A retroactive correction by van A recomputes van A's values only.
    with CalibrationStore.for_data_dir(tmp_path / "van-a", clock=FakeClock(T0 + 86400)) as cs:
        p = cs.add("no2", SERIAL, "colocation", sheet_values(slope=2.0), technician="t", device="van-a",
                   valid_from=T0)
        a2 = cs.confirm(p.id)
        a1_closed = cs.get(rec_a.id)
    fix = Batch("van-a", "e1", 12, 13, [_cal_sample(12, T0 + 86400, a1_closed), _cal_sample(13, T0 + 86400, a2)])
    assert _upload(ing, "van-a", fix) == "stored"
    assert {cal for _, cal in _derived(s, "van-a").values()} == {a2.id}
    assert _derived(s, "van-b") == before
    print(f"two vans, one serial: van-b no2[5] {before[5][0]:.2f} ppb kept; "
          f"van-a {got_a[5][0]:.1f} -> {_derived(s, 'van-a')[5][0]:.2f} ppb by {a2.id}")


def test_a_van_cannot_write_another_vans_rows(make: MakeStore, tmp_path: Any) -> None:
    s = make()
    ing = Ingestor(s)
    rec_b = _record(tmp_path, "van-b")
    assert _upload(ing, "van-b", _van_batch("van-b", rec_b)) == "stored"
    before = _derived(s, "van-b")

    # Van A sends, from its own topic: a record naming van B as its device, a record whose
    # id is not its key, gaps and samples. None of it may reach van B's rows.
    forged_b = CalibrationRecord.from_dict({**json.loads(rec_b.to_json()), "values": sheet_values(slope=-9.0)})
    rec_a = _record(tmp_path, "van-a")
    wrong_id = CalibrationRecord.from_dict({**json.loads(rec_a.to_json()), "id": f"no2:{SERIAL}:v7"})
    samples = [_cal_sample(1, T0, forged_b), _cal_sample(2, T0, wrong_id)] + [
        _no2_sample(i, T0 + i, 999.0) for i in range(3, 12) if i != 5]
    # A consistent batch (receiver/batch_consistency.py): the gap is the number no sample holds.
    b = Batch("van-a", "e1", 1, 11, samples, gaps=[Gap(5, 5, "cap")])
    assert _upload(ing, "van-a", b) == "stored"
    # ... and a payload that claims to be van B's batch, sent on van A's topic, is rejected.
    out = ing.handle("datalab/v1/van-a/batch", encode_batch(_van_batch("van-b", rec_b, epoch="e2")), RECEIVED)
    assert out.ack is not None and out.ack.status == "rejected" and "claims device" in out.ack.reason

    assert q(s, "SELECT device, id FROM calibrations") == [("van-b", rec_b.id)]
    assert _derived(s, "van-b") == before
    assert q(s, "SELECT DISTINCT device FROM gaps") == [("van-a",)]
    assert q(s, "SELECT count(*) FROM samples WHERE device='van-b'") == [(11,)]
    assert {d for (d,) in q(s, "SELECT DISTINCT device FROM samples")} == {"van-a", "van-b"}

    # Status: stored under the topic's device whatever the payload says.
    ing.handle_status("van-a", json.dumps({"v": 1, "device": "van-b", "online": True}).encode(), RECEIVED)
    status = {r["device"]: r for r in s.fleet_status()}
    assert set(status) == {"van-a"}


def test_separate_derivation_uses_each_devices_own_record(make: MakeStore, tmp_path: Any) -> None:
    s = make()
    ing = Ingestor(s, derive=False)  # --derive separate: the deriver works from the queue later
    rec_b = _record(tmp_path, "van-b")
    rec_a = _record(tmp_path, "van-a", slope=1000.0)
    assert _upload(ing, "van-b", _van_batch("van-b", rec_b)) == "stored"
    assert _upload(ing, "van-a", _van_batch("van-a", rec_a)) == "stored"
    s.derive_pending()
    b5 = _derived(s, "van-b")[5][0]
    a5 = _derived(s, "van-a")[5][0]
    assert math.isclose(b5, no2_ppb_from_record(rec_b.values, WE_MV[5], 306.0, 12.0))
    assert math.isclose(a5, no2_ppb_from_record(rec_a.values, WE_MV[5], 306.0, 12.0))


def _run(store: Any, sql: str, *params: Any) -> None:
    """A statement without rows, on either backend (``?`` placeholders)."""
    from receiver.store import SQLiteStore

    store.conn.execute(sql if isinstance(store, SQLiteStore) else sql.replace("?", "%s"), params)


_OLD_TABLE = """CREATE TABLE calibrations (
    id TEXT PRIMARY KEY, device TEXT NOT NULL, kind TEXT NOT NULL, serial TEXT NOT NULL,
    version INTEGER NOT NULL, status TEXT NOT NULL, valid_from_ms BIGINT, valid_to_ms BIGINT,
    record TEXT NOT NULL, received_utc_ms BIGINT NOT NULL)"""


def test_stores_keyed_by_record_id_are_migrated(make: MakeStore, tmp_path: Any) -> None:
    """A store from before: one row per record id, one of them overwritten by another van."""
    s = make()
    rec_b = _record(tmp_path, "van-b")
    rec_a = _record(tmp_path, "van-a", slope=1000.0)
    rec_c = _record(tmp_path / "c", "van-c")
    # The old schema, as main made it, with what the bug left: van B's row holding van A's
    # record, and van B's derived values computed from it.
    _run(s, "DROP TABLE calibrations")
    _run(s, _OLD_TABLE)
    ins = ("INSERT INTO calibrations VALUES (?,?,?,?,?,?,?,?,?,?)")
    _run(s, ins, rec_a.id, "van-b", "no2", SERIAL, 1, "active", int(T0 * 1000), None, rec_a.to_json(), 1)
    _run(s, ins, f"no2:{SERIAL}-c:v1", "van-c", "no2", f"{SERIAL}-c", 1,
      "active", int(T0 * 1000), None, rec_c.to_json(), 1)
    _run(s, "INSERT INTO derived VALUES (?,?,?,?,?,?)", "van-b", "e1", 5, "no2_ppb", 118852.7, rec_a.id)
    _run(s, "INSERT INTO derived VALUES (?,?,?,?,?,?)", "van-c", "e1", 5, "no2_ppb", 12.5, f"no2:{SERIAL}-c:v1")
    s.close()

    s = make()  # opening migrates
    rows = q(s, "SELECT device, id, kind, serial, version FROM calibrations ORDER BY device")
    assert rows == [("van-a", rec_a.id, "no2", SERIAL, 1), ("van-c", f"no2:{SERIAL}-c:v1", "no2", f"{SERIAL}-c", 1)]
    # The poisoned values are gone; the clean van's stay.
    assert q(s, "SELECT device, value FROM derived ORDER BY device") == [("van-c", 12.5)]
    # The new key holds: van B's own record (its next announcement) lands beside van A's.
    assert _upload(Ingestor(s), "van-b", _van_batch("van-b", rec_b)) == "stored"
    assert q(s, "SELECT device FROM calibrations WHERE id=? ORDER BY device", rec_b.id) == [("van-a",), ("van-b",)]
    assert math.isclose(_derived(s, "van-b")[5][0], no2_ppb_from_record(rec_b.values, WE_MV[5], 306.0, 12.0))
    s.close()
    s = make()  # and opening again changes nothing
    assert len(q(s, "SELECT device FROM calibrations")) == 3


def test_migration_drops_records_naming_no_device(make: MakeStore, tmp_path: Any) -> None:
    """The old code took a record with an empty or absent ``device`` (issue 13, tester's probe
    p6_migrate.py): van A's record with ``device: ""`` overwrote van B's row and B's values were
    derived from it. Such a row cannot be placed under its author: dropped, with what it derived."""
    s = make()
    rec_b = _record(tmp_path, "van-b")
    rec_a = _record(tmp_path, "van-a", slope=1000.0)
    rec_c = _record(tmp_path / "c", "van-c")
    no_device = json.dumps({**json.loads(rec_a.to_json()), "device": ""})
    absent = json.loads(rec_c.to_json())
    del absent["device"]
    _run(s, "DROP TABLE calibrations")
    _run(s, _OLD_TABLE)
    ins = "INSERT INTO calibrations VALUES (?,?,?,?,?,?,?,?,?,?)"
    _run(s, ins, rec_a.id, "van-b", "no2", SERIAL, 1, "active", int(T0 * 1000), None, no_device, 1)
    _run(s, ins, f"no2:{SERIAL}-c:v1", "van-c", "no2", f"{SERIAL}-c", 1,
         "active", int(T0 * 1000), None, json.dumps(absent), 1)  # fmt: skip
    _run(s, "INSERT INTO derived VALUES (?,?,?,?,?,?)", "van-b", "e1", 5, "no2_ppb", 118852.7, rec_a.id)
    _run(s, "INSERT INTO derived VALUES (?,?,?,?,?,?)", "van-c", "e1", 5, "no2_ppb", 12.5, f"no2:{SERIAL}-c:v1")
    s.close()

    s = make()  # opening migrates
    print("after migration:", q(s, "SELECT device, id FROM calibrations"), q(s, "SELECT device, value FROM derived"))
    assert q(s, "SELECT device, id FROM calibrations") == []
    assert q(s, "SELECT device, value FROM derived") == []
    # Van B's own record (its next announcement) brings its values back, computed from its parameters.
    assert _upload(Ingestor(s), "van-b", _van_batch("van-b", rec_b)) == "stored"
    assert q(s, "SELECT device FROM calibrations WHERE id=?", rec_b.id) == [("van-b",)]
    assert math.isclose(_derived(s, "van-b")[5][0], no2_ppb_from_record(rec_b.values, WE_MV[5], 306.0, 12.0))
