"""PM's best value: the van's gain, then hygroscopic growth undone (issue 15, PM2.5 fidelity).

The arithmetic is checked against kappa-Koehler solved for the wet diameter (not the closed
mass ratio the receiver uses); the served value through the receiver's real ``Ingestor`` on
SQLite and PostgreSQL: the ``observations`` view, the maps, the measurement export, with the
raw value kept and the correction named, and ``humid`` only above 95 % RH.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import pytest

from drivers.base import Reading
from core.calibration import CalibrationRecord
from edge.calibration import CalibrationStore, SensorCalibration, apply_record
from core.errors import ConfigError
from core.sample import Sample, TimeSource
from receiver.aggregate import Period, Rule, build
from receiver.config import load_receiver_config
from receiver.export import export_measurements
from receiver.ingest import Ingestor
from receiver.mapunits import H3Snapper
from receiver.pm_humidity import DEFAULT_KAPPA, dry_pm, dry_pm10, growth_factor
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_calibration import T0, FakeClock, _cal_sample
from tests.test_store_contract import MakeStore, make, q  # noqa: F401  (make: fixture, used by name)
from core.wire import Batch, encode_batch

LAT, LON = 52.3702, 4.8952  # parked in one H3 cell: one pass, the map value is the usable values' mean
RECEIVED = int(T0 * 1000) + 3_600_000
SERIAL = "van-p/pm"  # edge/calibration.py sensor_calibrations: <device id>/<sensor name>
N = 60  # PM samples, one a second
SENTINEL_AT = 30  # this second's PM2.5 is the PMS5003's 65535 "no value"


# -- the arithmetic, against an independent computation ----------------------------------


def _koehler_mass_ratio(rh: float, kappa: float) -> float:
    """Wet/dry mass by solving kappa-Koehler (Petters & Kreidenweis 2007, no Kelvin term) for the
    wet diameter: a_w = (D^3 - Dd^3) / (D^3 - Dd^3 (1 - kappa)), bisection on x = D/Dd; the water
    taken up (density 1) over the dry mass (density 1.65)."""
    aw = rh / 100.0
    lo, hi = 1.0, 100.0
    for _ in range(200):
        x = (lo + hi) / 2
        a = (x**3 - 1) / (x**3 - 1 + kappa)
        lo, hi = (x, hi) if a < aw else (lo, x)
    x = (lo + hi) / 2
    return 1.0 + (x**3 - 1) * 1.0 / 1.65


@pytest.mark.parametrize("kappa", [0.05, 0.09, 0.22, 0.6])
@pytest.mark.parametrize("rh", [10.0, 45.0, 70.0, 85.0, 95.0])
def test_growth_is_kappa_koehler_solved_for_the_wet_diameter(rh: float, kappa: float) -> None:
    want = _koehler_mass_ratio(rh, kappa)
    assert math.isclose(growth_factor(rh, kappa), want, rel_tol=1e-9)
    assert math.isclose(dry_pm(20.0, rh, kappa), 20.0 / want, rel_tol=1e-9)  # type: ignore[arg-type]


def test_pm10_grows_fine_and_coarse_apart() -> None:
    # 12 of fine mass at kappa 0.22, 18 of coarse at 0.09, RH 80 %
    want = 12.0 / _koehler_mass_ratio(80.0, 0.22) + 18.0 / _koehler_mass_ratio(80.0, 0.09)
    assert math.isclose(dry_pm10(30.0, 12.0, 80.0, 0.22, 0.09), want, rel_tol=1e-9)  # type: ignore[arg-type]
    assert math.isclose(dry_pm10(30.0, None, 80.0, 0.22, 0.09), 30.0 / _koehler_mass_ratio(80.0, 0.09),
                        rel_tol=1e-9)  # type: ignore[arg-type]


def test_no_correction_where_it_cannot_be_trusted() -> None:
    assert dry_pm(10.0, 95.0, 0.22) is not None
    for rh in (95.01, 99.0, 100.0, -1.0, None, math.nan):
        assert dry_pm(10.0, rh, 0.22) is None, rh
    with pytest.raises(ValueError):
        growth_factor(100.0, 0.22)


def test_kappa_from_the_config(tmp_path: Any) -> None:
    assert load_receiver_config(None).pm_kappa == DEFAULT_KAPPA == {"pm1": 0.22, "pm25": 0.22, "pm10": 0.09}
    p = tmp_path / "r.toml"
    p.write_text("[receiver]\npm_kappa = { pm25 = 0.3 }\n")
    assert load_receiver_config(p).pm_kappa == {"pm1": 0.22, "pm25": 0.3, "pm10": 0.09}
    for bad in ("{ pm2 = 0.3 }", "{ pm25 = -0.1 }", "{ pm25 = 'x' }", "{ pm25 = 4.0 }"):
        p.write_text(f"[receiver]\npm_kappa = {bad}\n")
        with pytest.raises(ConfigError, match="pm_kappa"):
            load_receiver_config(p)


# -- served through the receiver ---------------------------------------------------------


def _rh(i: int) -> float:
    return 40.0 + i  # 41 .. 100 %RH over the minute: both sides of 75 % and of 95 %


def _raw25(i: int) -> float:
    return 20.0 + 0.1 * i


def _raw10(i: int) -> float:
    return 32.0 + 0.2 * i


def _pm_record(tmp_path: Any, **values: float) -> CalibrationRecord:
    """The van's PM co-location record, confirmed on its own calibration store."""
    with CalibrationStore.for_data_dir(tmp_path / "van-p", clock=FakeClock(T0 - 600)) as cs:
        return cs.confirm(cs.add("pm", SERIAL, "colocation", {"quantity": "pm25", **values}, technician="t",
                                 device="van-p").id)


def _day(rec: CalibrationRecord | None, own_rh: bool = True, sentinel: bool = False,
         announce: bool = True) -> Batch:
    """A GPS fix and a PM sample per second, the PM calibrated on the van by ``rec`` (the real
    ``apply_record``). ``own_rh=False``: the RH comes in a BME280 sample 0.4 s after the PM; ``sentinel``: PM2.5 is
    65535 at SENTINEL_AT; ``announce=False``: the record itself comes in another upload."""
    samples = [_cal_sample(1, T0, rec)] if rec is not None and announce else []
    seq = 2
    for i in range(1, N + 2):
        t_ms = int((T0 + i) * 1000)
        samples.append(Sample("gps", t_ms, t_ms, TimeSource.GPS, {"lat": LAT, "lon": LON, "fix_quality": 1},
                              (), seq, "boot"))
        seq += 1
        if i > N:
            break
        vals: dict[str, Any] = {"pm25": 65535.0 if sentinel and i == SENTINEL_AT else _raw25(i), "pm10": _raw10(i)}
        if own_rh:
            vals["rh"] = _rh(i)
        r = Reading(sensor="pms5003", values=vals)
        if rec is not None:
            r = apply_record(r, rec, SensorCalibration("pm", SERIAL))
        samples.append(Sample("pms5003", t_ms + 1, t_ms + 1, TimeSource.GPS, r.values, (), seq, "boot"))
        seq += 1
        if not own_rh:
            samples.append(Sample("bme280", t_ms + 401, t_ms + 401, TimeSource.GPS, {"rh_pct": _rh(i)}, (),
                                  seq, "boot"))
            seq += 1
    return Batch("van-p", "e1", samples[0].seq or 1, seq - 1, samples)


def _upload(s: Any, batch: Batch) -> None:
    out = Ingestor(s).handle(f"datalab/v1/{batch.device}/batch", encode_batch(batch), RECEIVED)
    assert out.ack is not None and out.ack.status == "stored", out.ack


def _observed(s: Any, quantity: str) -> dict[int, tuple[float, str | None, Any, str]]:
    """second -> (value, calibration, raw_value, quality) of ``quantity`` in the observations view."""
    rows = q(s, "SELECT t_utc_ms, value, calibration, raw_value, quality FROM observations"
                " WHERE device='van-p' AND quantity=?", quantity)
    return {round((t - 1) / 1000 - T0): (float(v), c, r, qual) for t, v, c, r, qual in rows}


def _want25(i: int, slope: float, intercept: float) -> float:
    gained = intercept + slope * _raw25(i)
    return gained / _koehler_mass_ratio(_rh(i), 0.22) if _rh(i) <= 95 else gained


def test_best_pm_is_gain_then_growth_undone_everywhere(make: MakeStore, tmp_path: Any) -> None:
    s = make()
    rec = _pm_record(tmp_path, slope=0.9, intercept=0.5)
    _upload(s, _day(rec, sentinel=True))

    got = _observed(s, "pm25")
    assert sorted(got) == list(range(1, N + 1))
    # A sentinel is never scaled or dried into a number: it stays 65535, which no product uses.
    assert got.pop(SENTINEL_AT)[:2] == (65535.0, None)
    for i, (v, cal, raw, qual) in got.items():
        assert float(raw) == _raw25(i), "the van's value is kept as it sent it"
        assert math.isclose(v, _want25(i, 0.9, 0.5), rel_tol=1e-9), (i, v)
        if _rh(i) <= 95:
            assert cal == f"{rec.id}+kappa-koehler:0.22" and "humid" not in qual, (i, cal, qual)
        else:  # growth not corrected: gain only, flagged humid
            assert cal == rec.id and "humid" in qual.split(","), (i, cal, qual)
    # PM10 has no record of its own: raw, its fine part (the calibrated PM2.5) and coarse part undone apart.
    for i, (v, cal, raw, _) in _observed(s, "pm10").items():
        if i == SENTINEL_AT:  # no PM2.5 beside it: all of PM10 takes the coarse kappa
            assert math.isclose(v, _raw10(i) / _koehler_mass_ratio(_rh(i), 0.09), rel_tol=1e-9), (v, cal)
            continue
        if _rh(i) > 95:
            assert float(v) == _raw10(i) and cal is None
            continue
        fine = 0.5 + 0.9 * _raw25(i)
        want = fine / _koehler_mass_ratio(_rh(i), 0.22) + (_raw10(i) - fine) / _koehler_mass_ratio(_rh(i), 0.09)
        assert math.isclose(v, want, rel_tol=1e-9) and cal == "kappa-koehler:0.22/0.09", (i, v, want, cal)
    # The van's pm25_cal stays what the van made.
    (cal_value,) = [r[0] for r in q(s, "SELECT value FROM observations WHERE device='van-p'"
                                       " AND quantity='pm25_cal' AND t_utc_ms=?", int((T0 + 10) * 1000) + 1)]
    assert math.isclose(float(cal_value), 0.5 + 0.9 * _raw25(10), rel_tol=1e-9)

    # Maps: one pass, the mean of the values the policy keeps (humid above 95 % left out).
    build(s.conn, H3Snapper(10), [Period("all")], rule=Rule(min_passes=1, min_days=1))
    ((map25, n_excl),) = q(s, "SELECT value, n_excluded FROM aggregates WHERE quantity='pm25'")
    kept = [i for i in got if _rh(i) <= 95]
    assert n_excl == N - len(kept) == 6  # 5 above 95 % RH, and the sentinel
    assert math.isclose(map25, sum(_want25(i, 0.9, 0.5) for i in kept) / len(kept), abs_tol=1e-3)
    assert map25 < sum(_raw25(i) for i in kept) / len(kept) - 3, "the map is not the raw, wet PM"

    # Export: best value, raw value, the correction named.
    out = io.StringIO()
    export_measurements(s.conn, out, "csv", quantities=("pm25", "no2_ppb"))
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == N
    for r in rows:
        i = round((int(r["t_utc_ms"]) - 1) / 1000 - T0)
        if i == SENTINEL_AT:
            assert (r["value"], r["humidity_corrected"], r["excluded"]) == ("65535.0", "0", "1")
            continue
        assert math.isclose(float(r["value"]), _want25(i, 0.9, 0.5), rel_tol=1e-9)
        assert float(r["raw_value"]) == _raw25(i)
        assert r["humidity_corrected"] == ("1" if _rh(i) <= 95 else "0")
        assert r["excluded"] == ("0" if _rh(i) <= 95 else "1")
        assert r["calibration"].startswith(rec.id)


def test_rh_from_another_sensor_within_30_s(make: MakeStore) -> None:
    s = make()
    _upload(s, _day(None, own_rh=False))
    got = _observed(s, "pm25")
    assert len(got) == N
    for i, (v, cal, raw, qual) in got.items():
        # The BME280 reading 0.4 s later is the closest (the one before it is 0.6 s off).
        if _rh(i) <= 95:
            assert math.isclose(v, _raw25(i) / _koehler_mass_ratio(_rh(i), 0.22), rel_tol=1e-9), i
            assert cal == "kappa-koehler:0.22"
        else:
            assert v == _raw25(i) and cal is None and "humid" in qual.split(",")


@pytest.mark.parametrize("record_first", [True, False])
def test_a_record_with_its_own_rh_term_is_not_corrected_twice(make: MakeStore, tmp_path: Any,
                                                               record_first: bool) -> None:
    """Whether the record reaches the receiver before its values or after them."""
    s = make()
    rec = _pm_record(tmp_path, slope=1.0, intercept=0.0, rh_coef=-0.05)
    _upload(s, _day(rec, announce=record_first))
    if not record_first:
        assert _observed(s, "pm25")[10][1] == f"{rec.id}+kappa-koehler:0.22"  # not known yet to have an RH term
        _upload(s, Batch("van-p", "e2", 1, 1, [_cal_sample(1, T0 + 3600, rec)]))
    for i, (v, cal, _, _) in _observed(s, "pm25").items():
        assert math.isclose(v, max(0.0, _raw25(i) - 0.05 * _rh(i)), rel_tol=1e-9) and cal == rec.id, (i, v, cal)


def test_a_kappa_of_the_receivers_config_is_the_one_applied(make: MakeStore) -> None:
    s = make(pm_kappa={"pm25": 0.4})
    _upload(s, _day(None))
    for i, (v, cal, _, _) in _observed(s, "pm25").items():
        if _rh(i) <= 95:
            assert math.isclose(v, _raw25(i) / _koehler_mass_ratio(_rh(i), 0.4), rel_tol=1e-9)
            assert cal == "kappa-koehler:0.4"
    rows = q(s, "SELECT vals FROM samples WHERE device='van-p' AND sensor='pms5003' ORDER BY seq")
    first = rows[0][0]
    first = json.loads(first) if isinstance(first, str) else first
    assert first["pm25"] == _raw25(1), "raw samples are never touched"
