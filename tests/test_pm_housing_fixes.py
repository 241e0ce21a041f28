"""What the v15 tester found in the PM housing-RH correction (issue #15, f15), on SQLite and
PostgreSQL: a replaced enclosure's record takes effect; the served PM and its flags do not
depend on whether the housing record came before or after the values (also when the
re-judging is deferred past the read budget); an impossible ambient RH is never warmed into
a plausible housing RH.

Expected values: IAPWS vapour pressure and kappa-Koehler solved for the wet diameter
(tests/test_pm_housing_record.py ``_want``), not the receiver's Magnus form.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from core.sample import Sample, TimeSource
from core.wire import Batch
from edge.calibration import CalibrationStore
from receiver import requality
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_calibration import T0, FakeClock
from tests.test_pm_housing_record import N, _announce, _day, _record, _served, _want
from tests.test_pm_humidity import LAT, LON, _upload
from tests.test_store_contract import MakeStore, make, q  # noqa: F401  (make: fixture, used by name)

AMB_C = 10.0


def _enclosure(tmp_path: Path, device: str, serial: str, warming: float, at: float) -> Any:
    """A housing record of one enclosure (``edge pm housing --serial``), made on its own day."""
    with CalibrationStore.for_data_dir(tmp_path / serial.replace("/", "_"), clock=FakeClock(at)) as cs:
        return cs.confirm(cs.add("pm_housing", serial, "warming", {"warming_c": warming},
                                 technician="t", device=device).id)


@pytest.mark.parametrize("late", [False, True], ids=["record-first", "record-late"])
def test_a_replaced_enclosure_takes_effect(make: MakeStore, tmp_path: Path, late: bool) -> None:
    """encl-1 (warming 0, never closed) then encl-2 from T0+20.5 s (warming 6): each second is
    dried with the enclosure in effect then and names its record (old code: encl-1 throughout)."""
    s = make()
    r1 = _enclosure(tmp_path, "van-h", "van-h/encl-1", 0.0, T0 - 600)
    r2 = _enclosure(tmp_path, "van-h", "van-h/encl-2", 6.0, T0 + 20.5)
    _announce(s, "van-h", "e0", r1)
    if not late:
        _announce(s, "van-h", "e2", r2)
    _upload(s, _day("van-h"))
    if late:
        _announce(s, "van-h", "e2", r2)
    got = _served(s)
    assert sorted(got) == list(range(1, N + 1))
    for i, (v, cal) in got.items():
        warm, rid = (6.0, r2.id) if i >= 21 else (0.0, r1.id)
        assert math.isclose(v, _want(i, warm), rel_tol=3e-3), (i, v, _want(i, warm), cal)
        assert (cal or "").endswith("+" + rid), (i, cal, rid)


def _batch(device: str, rhs: list[float], epoch: str = "e1") -> Batch:
    """Each second a fix, a PM2.5 of 30 (no RH of its own) and the DGS-NO2's ambient RH at 10 degC."""
    samples, seq = [], 1
    for i, rh in enumerate(rhs, start=1):
        t = int((T0 + i) * 1000)
        samples += [
            Sample("gps", t, t, TimeSource.GPS, {"lat": LAT, "lon": LON, "fix_quality": 1}, (), seq, "boot"),
            Sample("pms5003", t + 1, t + 1, TimeSource.GPS, {"pm25": 30.0}, (), seq + 1, "boot"),
            Sample("no2", t + 401, t + 401, TimeSource.GPS,
                   {"no2_ppb": 20.0, "no2_temp_c": AMB_C, "no2_rh_pct": rh}, (), seq + 2, "boot"),
        ]
        seq += 3
    return Batch(device, epoch, 1, seq - 1, samples)


def _pm(s: Any, device: str) -> dict[int, tuple[float, str | None, str]]:
    rows = q(s, "SELECT t_utc_ms, value, calibration, quality FROM observations WHERE device=? AND quantity='pm25'",
             device)
    return {round((t - 1) / 1000 - T0): (round(float(v), 6), c, qual or "") for t, v, c, qual in rows}


@pytest.mark.parametrize("budget", [None, 5], ids=["within-budget", "deferred"])
def test_flags_do_not_depend_on_when_the_housing_record_arrives(
        make: MakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int | None) -> None:
    """Ambient 97 %RH (humid as measured) is ~88 % in a housing that warms 1.5 degC: corrected and
    not ``humid``. van-a's record comes first, van-b's after its values: the same served value and
    flags (old code: van-b's seconds stayed ``humid`` though corrected). With a tiny read budget
    the re-judging waits in ``humid_redo`` and the deriver settles it."""
    s = make()
    rhs = [97.0] * 5 + [80.0] * 5
    _announce(s, "van-a", "e0", _record(tmp_path, "van-a", 1.5, T0 - 600))
    _upload(s, _batch("van-a", rhs))
    _upload(s, _batch("van-b", rhs))
    assert all("humid" in _pm(s, "van-b")[i][2] for i in range(1, 6))  # as measured: humid
    if budget is not None:  # only the late record's re-judging goes over it
        assert s.counts().get("humid_windows_deferred", 0) == 0
        monkeypatch.setattr(requality, "HUMID_BUDGET", budget, raising=False)
    _announce(s, "van-b", "e2", _record(tmp_path, "van-b", 1.5, T0 - 600))
    if budget is not None:
        assert s.counts().get("humid_windows_deferred", 0) >= 1
        s.derive_pending()
    a, b = _pm(s, "van-a"), _pm(s, "van-b")
    assert len(a) == 10 and not any("humid" in a[i][2] for i in a)
    assert [(v, qual) for v, _c, qual in a.values()] == [(v, qual) for v, _c, qual in b.values()]
    assert all(v < 30.0 for v, _c, _q in b.values())  # growth undone at the housing's RH


@pytest.mark.parametrize("rh", [101.0, 130.0, 65535.0])
def test_impossible_ambient_rh_is_not_warmed_into_a_plausible_one(make: MakeStore, tmp_path: Path,
                                                                  rh: float) -> None:
    """130 % ambient would be ~90 % in a housing warming 6 degC (old code: PM corrected, unflagged).
    The RH reading is ``out_of_range``; the PM is served as measured, ``rh_missing``."""
    s = make()
    _announce(s, "van-x", "e0", _record(tmp_path, "van-x", 6.0, T0 - 600))
    _upload(s, _batch("van-x", [rh] * 3))
    pm = _pm(s, "van-x")
    assert len(pm) == 3
    for v, cal, qual in pm.values():
        assert v == 30.0 and cal is None and "rh_missing" in qual.split(","), (v, cal, qual)
    rhq = q(s, "SELECT quality FROM observations WHERE device='van-x' AND quantity='no2_rh_pct'")
    assert len(rhq) == 3 and all("out_of_range" in (r[0] or "") for r in rhq), rhq
