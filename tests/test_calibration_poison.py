"""A calibration record derivation cannot use never stops a van's batches (issue 13 point 2).

The tester's repro: a record with ``"values": {..., "algorithm": null}`` or ``"slope": [1]``
was accepted and stored, and every later NO2 batch of that van raised TypeError while
deriving, so all of them were parked. Now the door refuses such a record (the upload is
rejected with a reason), and a poisoned record already in a store (written before the
check) is skipped: the van's values stay uncalibrated, its batches are stored. Both stores.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

import receiver.calibration as rcal
from core.calibration import CalibrationRecord
from edge.calibration import CalibrationStore
from receiver.ingest import Ingestor
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_calibration import SERIAL, T0, FakeClock, _cal_sample, _no2_sample, sheet_values
from tests.test_calibration_identity import RECEIVED, _record, _upload, _van_batch
from tests.test_store_contract import MakeStore, make, q  # noqa: F401  (make: fixture, used by name)
from core.wire import Batch, encode_batch


def _poisoned(rec: CalibrationRecord, **change: Any) -> CalibrationRecord:
    """``rec`` with fields of its JSON replaced (``values`` entries merged), bypassing from_dict."""
    d = json.loads(rec.to_json())
    d["values"].update(change.pop("values", {}))
    d.update(change)
    return _Raw(rec, json.dumps(d))  # type: ignore[return-value]


class _Raw:
    """Quacks like a CalibrationRecord for ``_cal_sample``: its JSON is whatever we say."""

    def __init__(self, rec: CalibrationRecord, text: str) -> None:
        self.id, self._text = rec.id, text

    def to_json(self) -> str:
        return self._text


POISONS = {
    "algorithm null": {"values": {"algorithm": None}},
    "slope list": {"values": {"slope": [1]}},
    "sheet value text": {"values": {"gain_mv_per_na": "0.8"}},
    "zero sensitivity": {"values": {"sensitivity_na_per_ppb": 0}},
    "version 2^70": {"version": 2**70},
    "valid_from 1e300": {"valid_from": 1e300},
    "values a list": {"values_raw": [1, 2]},
    # Issue 13 re-test: accepted before, and NO2 then stayed uncalibrated without a count.
    "sensitivity subnormal 1e-320": {"values": {"sensitivity_na_per_ppb": 1e-320}},
    "sensitivity 1e-300 (ppb overflows)": {"values": {"sensitivity_na_per_ppb": 1e-300}},
    "gain subnormal 5e-324": {"values": {"gain_mv_per_na": 5e-324}},
    "sensitivity -1e-320": {"values": {"sensitivity_na_per_ppb": -1e-320}},
    "valid_to before valid_from": {"valid_from": 1_795_000_000, "valid_to": 1_794_999_999},
    "slope 1e14 (ppb beyond what the store holds)": {"values": {"slope": 1e14}},
    # Issue 13 re-test (v1): only two ADC corners were tried; this gives -1.21e15 ppb at
    # WE = AE = -6144 mV and 50 C, a corner the trials skipped.
    "algorithm 3, gain 1.88, slope -2.5e10 (out of bound at WE = AE = -6144 mV)":
        {"values": {"algorithm": 3, "gain_mv_per_na": 1.88, "slope": -2.5e10}},
    # Outside test: in bound up to 50 C, beyond 1e15 ppb from 53 C (the temperature term grows
    # past the tables' last breakpoint); 85 C is the board's top.
    "temperature coefficient 1.9e13 ppb/C (out of bound at 85 C)": {"values": {"temp_coef_ppb_per_c": 1.9e13}},
}


def _poison(rec: CalibrationRecord, change: dict[str, Any]) -> Any:
    if "values_raw" in change:
        d = json.loads(rec.to_json())
        d["values"] = change["values_raw"]
        return _Raw(rec, json.dumps(d))
    return _poisoned(rec, **dict(change))


def test_poisoned_records_are_refused_at_the_door(make: MakeStore, tmp_path: Any) -> None:
    s = make()
    ing = Ingestor(s)
    good = _record(tmp_path, "van-a")
    for i, (name, change) in enumerate(POISONS.items()):
        b = Batch("van-a", f"p{i}", 1, 1, [_cal_sample(1, T0, _poison(good, change))])
        out = ing.handle("datalab/v1/van-a/batch", encode_batch(b), RECEIVED)
        print(f"{name}: {out.ack.status} - {out.ack.reason}")
        assert out.ack.status == "rejected", name
        assert "calibration record" in out.ack.reason, name
    assert q(s, "SELECT COUNT(*) FROM calibrations")[0][0] == 0
    assert q(s, "SELECT COUNT(*) FROM dead_letters")[0][0] == len(POISONS)
    # The van's good record and NO2 data still go through, and derive.
    assert _upload(ing, "van-a", _van_batch("van-a", good)) == "stored"
    assert len(q(s, "SELECT seq FROM derived WHERE device=?", "van-a")) == 10


@pytest.mark.parametrize("name", ["algorithm null", "slope list"])
def test_a_poisoned_stored_record_is_skipped_not_fatal(make: MakeStore, tmp_path: Any, name: str) -> None:
    """A store holding a poisoned record from before the check: batches store, values stay raw."""
    s = make()
    ing = Ingestor(s)
    good_b = _record(tmp_path, "van-b")
    rec_a = _record(tmp_path, "van-a")
    bad_text = _poison(rec_a, POISONS[name]).to_json()
    # What the old receiver stored: the record row as it came.
    ph = "?" if type(s).__name__ == "SQLiteStore" else "%s"
    s.conn.execute(f"INSERT INTO calibrations (id, device, kind, serial, version, status, valid_from_ms,"
                   f" valid_to_ms, record, received_utc_ms) VALUES ({','.join([ph] * 10)})",
                   (rec_a.id, "van-a", "no2", rec_a.serial, 1, "active", int(T0 * 1000), None, bad_text, RECEIVED))
    s.conn.commit()
    before = rcal.skipped_records
    no2 = Batch("van-a", "e9", 1, 5, [_no2_sample(i, T0 + i, 320.0 + i, cal=rec_a.id) for i in range(1, 6)])
    assert _upload(ing, "van-a", no2) == "stored"
    assert rcal.skipped_records > before, "the unusable record was met and counted"
    assert q(s, "SELECT COUNT(*) FROM samples WHERE device=? AND sensor=?", "van-a", "no2")[0][0] == 5
    assert q(s, "SELECT COUNT(*) FROM derived WHERE device=?", "van-a")[0][0] == 0, "not calibrated"
    # The other van is untouched; and van A's corrected record (a new version) heals van A.
    assert _upload(ing, "van-b", _van_batch("van-b", good_b)) == "stored"
    assert len(q(s, "SELECT seq FROM derived WHERE device=?", "van-b")) == 10
    assert _upload(ing, "van-a", _van_batch("van-a", rec_a, epoch="e10")) == "stored"
    print("van-a derived after the good record:", q(s, "SELECT COUNT(*) FROM derived WHERE device=?", "van-a"))
    assert q(s, "SELECT COUNT(*) FROM derived WHERE device=?", "van-a")[0][0] >= 10


def test_stored_records_are_checked_once_not_per_batch(make: MakeStore, tmp_path: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Deriving a batch reads its van's records; each used to be checked again (JSON, fields,
    trial conversions) with every batch (issue 13 review). Now a record is checked once per
    text: three versions, eight NO2 batches, three checks; still right and still skipped
    when unusable."""
    s = make()
    ing = Ingestor(s)
    with CalibrationStore.for_data_dir(tmp_path / "van-a", clock=FakeClock()) as cs:  # three versions, one sensor
        recs = [cs.confirm(cs.add("no2", SERIAL, "sheet", sheet_values(slope=1.0 + v / 10), technician="t",
                                  device="van-a").id) for v in range(3)]
    for i, rec in enumerate(recs):
        assert _upload(ing, "van-a", _van_batch("van-a", rec, epoch=f"r{i}")) == "stored"
    checks: list[str] = []
    real = rcal.check_record
    monkeypatch.setattr(rcal, "check_record", lambda text: checks.append(text) or real(text))
    getattr(rcal, "_CHECKED", {}).clear()  # what earlier tests checked does not count here
    for k in range(8):
        no2 = Batch("van-a", f"n{k}", 1, 5, [_no2_sample(i, T0 + 100 * k + i, 320.0 + i, cal=recs[-1].id)
                                             for i in range(1, 6)])
        assert _upload(ing, "van-a", no2) == "stored"
    stored = q(s, "SELECT COUNT(*) FROM calibrations WHERE device=?", "van-a")[0][0]
    derived = q(s, "SELECT COUNT(*) FROM derived WHERE device=? AND epoch LIKE ?", "van-a", "n%")[0][0]
    print(f"{stored} stored records, 8 NO2 batches: {len(checks)} record checks, {derived} values derived")
    assert derived == 40, "every NO2 value of the eight batches calibrated"
    assert len(checks) == stored, checks
