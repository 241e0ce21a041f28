"""The PM housing's warming as a calibration record (issue 15, h15b): recorded by the technician
(``edge pm housing``), carried like any record, applied by the receiver on SQLite and PostgreSQL.

The served PM is checked against an independent computation: the ambient RH taken to the
housing's temperature with the IAPWS saturation pressure (tests/test_pm_housing_rh.py), not
the Magnus form the receiver uses, then kappa-Koehler solved for the wet diameter
(tests/test_pm_humidity.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from core.calibration import CalibrationError, CalibrationRecord
from core.calibration_rules import check_record
from core.errors import PayloadError
from core.sample import Sample, TimeSource
from core.wire import Batch
from edge.calibration import CalibrationStore
from edge.technician import technician_group
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_calibration import T0, FakeClock, _cal_sample
from tests.test_pm_housing_rh import iapws_es_hpa
from tests.test_pm_humidity import LAT, LON, _koehler_mass_ratio, _upload
from tests.test_store_contract import MakeStore, make, q  # noqa: F401  (make: fixture, used by name)

N = 40
AMBIENT_C = 10.0
SERIAL = "van-h/pms5003"


def _rh(i: int) -> float:
    return 50.0 + i  # 51 .. 90 %RH ambient: all correctable


def _raw25(i: int) -> float:
    return 20.0 + 0.1 * i


def _day(device: str, epoch: str = "e1") -> Batch:
    """A fix, a PM sample (no RH of its own) and 0.4 s later the DGS-NO2's ambient RH and
    temperature, each second: the shipped van."""
    samples, seq = [], 1
    for i in range(1, N + 1):
        t = int((T0 + i) * 1000)
        samples += [
            Sample("gps", t, t, TimeSource.GPS, {"lat": LAT, "lon": LON, "fix_quality": 1}, (), seq, "boot"),
            Sample("pms5003", t + 1, t + 1, TimeSource.GPS, {"pm25": _raw25(i)}, (), seq + 1, "boot"),
            Sample("no2", t + 401, t + 401, TimeSource.GPS,
                   {"no2_ppb": 20.0, "no2_temp_c": AMBIENT_C, "no2_rh_pct": _rh(i)}, (), seq + 2, "boot"),
        ]
        seq += 3
    return Batch(device, epoch, 1, seq - 1, samples)


def _record(tmp_path: Path, device: str, warming: float, at: float) -> CalibrationRecord:
    """The van's housing record, as ``edge pm housing`` makes it on the van's store (confirmed at ``at``)."""
    with CalibrationStore.for_data_dir(tmp_path / device, clock=FakeClock(at)) as cs:
        return cs.confirm(cs.add("pm_housing", f"{device}/pms5003", "warming", {"warming_c": warming},
                                 technician="t", device=device).id)


def _announce(s: Any, device: str, epoch: str, rec: CalibrationRecord) -> None:
    """The record reaches the receiver as the agent's announcer sends it: a calibration sample."""
    _upload(s, Batch(device, epoch, 1, 1, [_cal_sample(1, T0 + 3600, rec)]))


def _served(s: Any, device: str = "van-h") -> dict[int, tuple[float, str | None]]:
    rows = q(s, "SELECT t_utc_ms, value, calibration FROM observations WHERE device=? AND quantity='pm25'", device)
    return {round((t - 1) / 1000 - T0): (float(v), c) for t, v, c in rows}


def _want(i: int, warming: float) -> float:
    """Independent: IAPWS vapour pressure conserved, kappa-Koehler for the wet diameter."""
    rh = _rh(i) * iapws_es_hpa(AMBIENT_C) / iapws_es_hpa(AMBIENT_C + warming)
    return _raw25(i) / _koehler_mass_ratio(rh, 0.22)


def test_a_housing_record_changes_the_served_pm_and_a_correction_recomputes(make: MakeStore,
                                                                           tmp_path: Path) -> None:
    s = make()
    _upload(s, _day("van-h"))
    before = _served(s)
    assert len(before) == N
    for i, (v, cal) in before.items():  # no record: ambient RH, and the id says nothing of a housing
        assert math.isclose(v, _want(i, 0.0), rel_tol=2e-3) and cal == "kappa-koehler:0.22", (i, v, cal)

    v1 = _record(tmp_path, "van-h", 1.5, T0 - 600)
    _announce(s, "van-h", "e2", v1)
    after = _served(s)
    for i, (v, cal) in after.items():
        assert math.isclose(v, _want(i, 1.5), rel_tol=2e-3), (i, v, _want(i, 1.5))
        assert cal == f"kappa-koehler:0.22+{v1.id}", cal
        assert v > before[i][0], "the housing's drier air: less water to take off"
    # The size of the step at 85 %RH ambient (i=35): what the record buys there, in ug/m3.
    assert after[35][0] - before[35][0] == pytest.approx(_want(35, 1.5) - _want(35, 0.0), rel=0.02)

    v2 = _record(tmp_path, "van-h", 2.5, T0 - 300)  # the enclosure measured again: v2 supersedes v1
    assert v2.id.endswith(":v2")
    _announce(s, "van-h", "e3", v2)
    for i, (v, cal) in _served(s).items():
        assert math.isclose(v, _want(i, 2.5), rel_tol=2e-3) and cal == f"kappa-koehler:0.22+{v2.id}", (i, v, cal)
    kept = q(s, "SELECT version, status, received_utc_ms FROM calibrations WHERE device='van-h'"
                " AND kind='pm_housing' ORDER BY version")
    assert [(v, st) for v, st, _ in kept] == [(1, "superseded"), (2, "active")], "the old version is kept"
    assert all(r for _, _, r in kept), "received time stored"


def test_another_vans_record_does_not_apply(make: MakeStore, tmp_path: Path) -> None:
    s = make()
    _upload(s, _day("van-h"))
    _upload(s, _day("van-o"))
    _announce(s, "van-o", "e2", _record(tmp_path, "van-o", 3.0, T0 - 600))
    for i, (v, cal) in _served(s, "van-h").items():
        assert math.isclose(v, _want(i, 0.0), rel_tol=2e-3) and cal == "kappa-koehler:0.22"
    assert all(c.endswith("pm_housing:van-o/pms5003:v1") for _, c in _served(s, "van-o").values())


def test_a_record_before_its_values_applies_at_ingest(make: MakeStore, tmp_path: Path) -> None:
    s = make()
    rec = _record(tmp_path, "van-h", 1.5, T0 - 600)
    _announce(s, "van-h", "e0", rec)
    _upload(s, _day("van-h"))
    for i, (v, cal) in _served(s).items():
        assert math.isclose(v, _want(i, 1.5), rel_tol=2e-3) and cal == f"kappa-koehler:0.22+{rec.id}"


@pytest.mark.parametrize("warming", [-0.5, 10.5, float("nan")])
def test_a_bad_warming_is_refused_everywhere(tmp_path: Path, warming: float) -> None:
    with CalibrationStore.for_data_dir(tmp_path / "v", clock=FakeClock(T0)) as cs:
        with pytest.raises(CalibrationError):
            cs.add("pm_housing", SERIAL, "warming", {"warming_c": warming}, technician="t", device="van-h")
        assert cs.history() == [], "nothing stored"
    # The receiver's admission check (the same rule) refuses one that reached it anyway.
    bad = {"id": f"pm_housing:{SERIAL}:v1", "kind": "pm_housing", "serial": SERIAL, "version": 1,
           "method": "warming", "values": {"warming_c": 12.0}, "valid_from": T0, "status": "active"}
    with pytest.raises(PayloadError, match="warming"):
        check_record(json.dumps(bad))
    with pytest.raises(PayloadError, match="warming"):
        check_record(json.dumps({**bad, "values": {}}))


def test_the_technician_command(tmp_path: Path) -> None:
    run = CliRunner().invoke
    van = ["--simulate", "--data-dir", str(tmp_path / "data")]
    r = run(technician_group(), ["pm", "housing", "--warming", "12", "--yes", *van])
    assert r.exit_code != 0 and "[0, 10]" in r.output, r.output
    r = run(technician_group(), ["pm", "housing", "--housing-temp", "13.1", "--yes", *van])
    assert r.exit_code != 0 and "--ambient-temp" in r.output, r.output
    r = run(technician_group(), ["pm", "housing", "--housing-temp", "13.1", "--ambient-temp", "11.5", "--yes", *van])
    assert r.exit_code == 0, r.output
    with CalibrationStore.for_data_dir(tmp_path / "data") as cs:
        (rec,) = cs.history()
        assert (rec.kind, rec.method, rec.status) == ("pm_housing", "warming", "active")
        assert rec.values == {"warming_c": 1.6}
        assert cs.all_active() == [rec], "the agent's announcer sends every active record: this one too"


def test_the_humid_flag_reads_the_housing_rh(make: MakeStore, tmp_path: Path) -> None:
    """Ambient 97 %RH at 10 degC is ~88 % in a housing 1.5 degC warmer: with the record the
    value is corrected and not flagged ``humid``; without it, flagged and served wet."""
    s = make()
    rec = _record(tmp_path, "van-h", 1.5, T0 - 600)
    _announce(s, "van-h", "e0", rec)
    t = int((T0 + 1) * 1000)
    fog = [Sample("gps", t, t, TimeSource.GPS, {"lat": LAT, "lon": LON, "fix_quality": 1}, (), 1, "boot"),
           Sample("pms5003", t + 1, t + 1, TimeSource.GPS, {"pm25": 30.0}, (), 2, "boot"),
           Sample("no2", t + 401, t + 401, TimeSource.GPS,
                  {"no2_ppb": 20.0, "no2_temp_c": AMBIENT_C, "no2_rh_pct": 97.0}, (), 3, "boot")]
    for device in ("van-h", "van-o"):
        _upload(s, Batch(device, "e1", 1, 3, fog))
    rows = {d: (float(v), c, qual) for d, v, c, qual in q(
        s, "SELECT device, value, calibration, quality FROM observations WHERE quantity='pm25'")}
    rh = 97.0 * iapws_es_hpa(AMBIENT_C) / iapws_es_hpa(AMBIENT_C + 1.5)
    v, cal, qual = rows["van-h"]
    assert math.isclose(v, 30.0 / _koehler_mass_ratio(rh, 0.22), rel_tol=2e-3) and cal.endswith(rec.id)
    assert "humid" not in (qual or "")
    v, cal, qual = rows["van-o"]  # no record: ambient 97 % is above 95 %
    assert v == 30.0 and cal is None and "humid" in qual.split(",")
