"""v15 attack, end to end through the receiver's Ingestor (SQLite and PostgreSQL): the van's
pm_housing record against the order records and values arrive in, its time window, and
broken ambient RH. Oracle: probe_pm_oracle's IAPWS/Murphy-Koop + kappa-Koehler (own code).

The test_pm_housing_record helpers are used only to build batches/records as the van sends them.
Run: .venv/bin/python -m pytest tests/attack_v15/probe_pm_housing_e2e.py -q -p no:cacheprovider
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from core.sample import Sample, TimeSource
from core.wire import Batch
from tests.attack_v15.probe_pm_oracle import oracle_housing_rh, oracle_mass_ratio
from tests.pg import pg_cluster  # noqa: F401
from tests.test_calibration import T0
from tests.test_pm_housing_record import _announce, _record
from tests.test_pm_humidity import LAT, LON, _upload
from tests.test_store_contract import MakeStore, make, q  # noqa: F401

AMB_C = 10.0


def _batch(device: str, epoch: str, rhs: list[float], temp: float = AMB_C, first: int = 1) -> Batch:
    samples, seq = [], 1
    for k, rh in enumerate(rhs):
        i = first + k
        t = int((T0 + i) * 1000)
        samples += [
            Sample("gps", t, t, TimeSource.GPS, {"lat": LAT, "lon": LON, "fix_quality": 1}, (), seq, "boot"),
            Sample("pms5003", t + 1, t + 1, TimeSource.GPS, {"pm25": 30.0}, (), seq + 1, "boot"),
            Sample("no2", t + 401, t + 401, TimeSource.GPS,
                   {"no2_ppb": 20.0, "no2_temp_c": temp, "no2_rh_pct": rh}, (), seq + 2, "boot"),
        ]
        seq += 3
    return Batch(device, epoch, 1, seq - 1, samples)


def _rows(s: Any, device: str) -> dict[int, tuple[float, str | None, str]]:
    rows = q(s, "SELECT t_utc_ms, value, calibration, quality FROM observations WHERE device=? AND quantity='pm25'",
             device)
    return {round((t - 1) / 1000 - T0): (float(v), c, qual or "") for t, v, c, qual in rows}


def test_served_value_and_flag_do_not_depend_on_arrival_order(make: MakeStore, tmp_path: Path) -> None:
    """Ambient 97 %RH at 10 C; housing warms 1.5 C -> ~88 % in the housing. The same data with the
    record arriving first (van-a) and arriving after the values (van-b) must serve the same thing."""
    s = make()
    rhs = [97.0] * 5 + [80.0] * 5
    _announce(s, "van-a", "e0", _record(tmp_path, "van-a", 1.5, T0 - 600))
    _upload(s, _batch("van-a", "e1", rhs))
    _upload(s, _batch("van-b", "e1", rhs))
    _announce(s, "van-b", "e2", _record(tmp_path, "van-b", 1.5, T0 - 600))
    a, b = _rows(s, "van-a"), _rows(s, "van-b")
    assert len(a) == len(b) == 10
    want88 = 30.0 / oracle_mass_ratio(oracle_housing_rh(97.0, AMB_C, 1.5), 0.22)
    assert math.isclose(a[1][0], want88, rel_tol=3e-3)
    diffs = [(i, a[i], b[i]) for i in a if (round(a[i][0], 6), a[i][2]) != (round(b[i][0], 6), b[i][2])]
    assert not diffs, "record-first vs record-late differ (second, record-first, record-late): " + repr(diffs[:3])


def test_record_window_mid_day(make: MakeStore, tmp_path: Path) -> None:
    """A record made at T0+5.5 s: seconds before it are dried with ambient RH, after it with housing RH."""
    s = make()
    _upload(s, _batch("van-w", "e1", [85.0] * 10))
    rec = _record(tmp_path, "van-w", 3.0, T0 + 5.5)
    _announce(s, "van-w", "e2", rec)
    got = _rows(s, "van-w")
    for i, (v, cal, _qual) in got.items():
        warm = 3.0 if i >= 6 else 0.0
        want = 30.0 / oracle_mass_ratio(oracle_housing_rh(85.0, AMB_C, warm), 0.22)
        assert math.isclose(v, want, rel_tol=3e-3), (i, v, want, cal)
        assert (rec.id in (cal or "")) == (i >= 6), (i, cal)


def test_two_records_over_time(make: MakeStore, tmp_path: Path) -> None:
    """Enclosure replaced at T0+5.5 (new serial, warming 0 -> 6): each second uses the one in effect."""
    s = make()
    from edge.calibration import CalibrationStore
    from tests.test_calibration import FakeClock
    with CalibrationStore.for_data_dir(tmp_path / "van-t", clock=FakeClock(T0 - 600)) as cs:
        r1 = cs.confirm(cs.add("pm_housing", "van-t/encl-1", "warming", {"warming_c": 0.0},
                               technician="t", device="van-t").id)
    with CalibrationStore.for_data_dir(tmp_path / "van-t2", clock=FakeClock(T0 + 5.5)) as cs:
        r2 = cs.confirm(cs.add("pm_housing", "van-t/encl-2", "warming", {"warming_c": 6.0},
                               technician="t", device="van-t").id)
    _announce(s, "van-t", "e0", r1)
    _upload(s, _batch("van-t", "e1", [90.0] * 10))
    _announce(s, "van-t", "e2", r2)
    got = _rows(s, "van-t")
    for i, (v, cal, _q) in got.items():
        warm, rid = (6.0, r2.id) if i >= 6 else (0.0, r1.id)
        want = 30.0 / oracle_mass_ratio(oracle_housing_rh(90.0, AMB_C, warm), 0.22)
        assert math.isclose(v, want, rel_tol=3e-3), (i, v, want, cal)
        assert (cal or "").endswith(rid), (i, cal, rid)


@pytest.mark.parametrize("rh", [130.0, 101.0])
def test_broken_ambient_rh_with_housing_record(make: MakeStore, tmp_path: Path, rh: float) -> None:
    """An ambient RH above 100 % is a broken reading. Without a housing record the PM is left
    uncorrected and out of the maps; with one, it must not become a corrected, unflagged value."""
    s = make()
    _announce(s, "van-x", "e0", _record(tmp_path, "van-x", 6.0, T0 - 600))
    _upload(s, _batch("van-x", "e1", [rh] * 3))
    _upload(s, _batch("van-y", "e1", [rh] * 3))
    x, y = _rows(s, "van-x"), _rows(s, "van-y")
    rhq = q(s, "SELECT quality FROM observations WHERE device='van-x' AND quantity='no2_rh_pct'")
    assert all(v == 30.0 for v, _c, _q in y.values())
    bad = {i: r for i, r in x.items() if r[0] != 30.0 and not r[2]}
    assert not bad, (f"ambient RH {rh} % (its own flags {rhq[:1]}) was taken into the housing and PM served "
                     f"corrected and unflagged: {bad}")


def test_export_excluded_does_not_depend_on_arrival_order(make: MakeStore, tmp_path: Path) -> None:
    """Point 2/4: the CSV export (read back with the csv module, not the project's reader) says
    whether a value is left out of the maps. The same data must say the same for both vans."""
    import csv
    import io

    from receiver.export import export_measurements
    s = make()
    rhs = [97.0] * 5 + [80.0] * 5
    _announce(s, "van-a", "e0", _record(tmp_path, "van-a", 1.5, T0 - 600))
    _upload(s, _batch("van-a", "e1", rhs))
    _upload(s, _batch("van-b", "e1", rhs))
    _announce(s, "van-b", "e2", _record(tmp_path, "van-b", 1.5, T0 - 600))
    out = io.StringIO()
    export_measurements(s.conn, out, "csv", positioned_only=False)
    rows = [r for r in csv.DictReader(io.StringIO(out.getvalue())) if r["quantity"] == "pm25"]
    by = {(r["device"], r["time_utc"]): r for r in rows}
    diffs = []
    for (dev, t), r in by.items():
        if dev != "van-a":
            continue
        o = by[("van-b", t)]
        if (r["value"], r["excluded"], r["unit"], r["flags"] if "flags" in r else None) != \
                (o["value"], o["excluded"], o["unit"], o["flags"] if "flags" in o else None):
            diffs.append((t, {k: r.get(k) for k in ("value", "excluded", "quality", "calibration")},
                          {k: o.get(k) for k in ("value", "excluded", "quality", "calibration")}))
    assert len(rows) == 20
    assert not diffs, f"{len(diffs)} exported rows differ by arrival order: {diffs[:2]}"
