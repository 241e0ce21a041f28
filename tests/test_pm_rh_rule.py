"""One RH rule for PM, honest RH sources, corrected PM records (issue 15, tester v15's probes,
probes/test_v15_pm_attack.py on branch v15, adopted into the suite with their invariants).

Oracle: kappa-Koehler solved for the wet diameter by bisection (tests/test_pm_humidity.py, not the
receiver's closed mass ratio), applied by this file's own arithmetic to the values it sent. Everything goes
through the real receiver (``Ingestor`` -> SQLiteStore / PostgresStore on a throwaway cluster).

Each test states the invariant it attacks. A test that fails here is a finding, not a broken probe:
the RH rule is receiver/quality.py ``pm_rh`` (docs/datalab.md).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np
import pytest

from core.sample import Sample, TimeSource
from receiver.aggregate import Period, QUANTITY_KEYS, read_tracks
from receiver.export import export_measurements
from receiver.ingest import Ingestor
from receiver.pm_derive import recompute_pm
from tests.test_pm_humidity import _koehler_mass_ratio as koehler  # wet-diameter bisection
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_store_contract import MakeStore, make, q  # noqa: F401  (fixture, used by name)
from core.wire import Batch, encode_batch

T0 = 1_795_000_000.0
RECEIVED = int(T0 * 1000) + 3_600_000
LAT, LON = 52.3702, 4.8952
KAPPA25, KAPPA10 = 0.22, 0.09


def ms(t_s: float) -> int:
    return int(round((T0 + t_s) * 1000))


class Van:
    """Builds one van's samples with seqs in order; batches cut wherever the probe wants."""

    def __init__(self, device: str = "van-x", epoch: str = "e1") -> None:
        self.device, self.epoch, self.seq = device, epoch, 0
        self.samples: list[Sample] = []

    def add(self, sensor: str, t_s: float, values: dict[str, Any]) -> Sample:
        self.seq += 1
        src = TimeSource.GPS
        s = Sample(sensor, ms(t_s), ms(t_s), src, values, (), self.seq, "boot")
        self.samples.append(s)
        return s

    def gps(self, t_s: float) -> None:
        self.add("gps", t_s, {"lat": LAT, "lon": LON, "fix_quality": 1})

    def batch(self, samples: list[Sample]) -> Batch:
        return Batch(self.device, self.epoch, samples[0].seq, samples[-1].seq, samples)


def upload(s: Any, b: Batch) -> None:
    out = Ingestor(s).handle(f"datalab/v1/{b.device}/batch", encode_batch(b), RECEIVED)
    assert out.ack is not None and out.ack.status == "stored", out.ack


def observed(s: Any, device: str, quantity: str) -> dict[int, tuple[float | None, Any, Any, str]]:
    """t_utc_ms -> (value, calibration, raw_value, quality) from the observations view."""
    rows = q(s, "SELECT t_utc_ms, value, calibration, raw_value, quality FROM observations"
                " WHERE device=? AND quantity=?", device, quantity)
    return {int(t): (None if v is None else float(v), c, r, qual or "") for t, v, c, r, qual in rows}


# -- (1a) humid flag and growth correction must agree on which RH they read -----------------------

@pytest.mark.parametrize("own,other", [(97.0, 90.0), (90.0, 97.0)])
def test_humid_flag_and_correction_read_the_same_rh(make: MakeStore, own: float, other: float) -> None:
    """PM sample with its own RH, and another sensor's RH stamped in the same millisecond.

    Invariant (docs/datalab.md): a PM value is either growth-corrected (RH <= 95) or flagged
    ``humid`` (RH > 95) and left out of maps. Never both uncorrected and unflagged."""
    s = make()
    v = Van("van-tie")
    for i in range(1, 41):
        v.gps(i)
        v.add("pms5003", i + 0.001, {"pm25": 20.0 + 0.1 * i, "pm10": 30.0 + 0.2 * i, "rh": own})
        v.add("dgs", i + 0.001, {"no2_ppb": 10.0, "no2_rh_pct": other})
    upload(s, v.batch(v.samples))
    got = observed(s, "van-tie", "pm25")
    assert len(got) == 40
    bad = [(t, val, cal, qual) for t, (val, cal, raw, qual) in got.items()
           if (cal is None or "kappa" not in str(cal)) and "humid" not in qual.split(",")]
    assert not bad, f"{len(bad)} of 40 PM values neither corrected nor flagged humid, e.g. {bad[0]}"


# -- (1b) the served value must not depend on where the van cut its batches -----------------------

def _slow_rh_van(device: str) -> Van:
    """PM every second without an RH of its own; the van's RH from another sensor every 20 s
    (a DGS-NO2's ``no2_rh_pct``), rising from 70 to 94 % over 2 minutes."""
    v = Van(device)
    for i in range(0, 121):
        v.gps(i)
        v.add("pms5003", i + 0.2, {"pm25": 20.0 + 0.01 * i, "pm10": 30.0 + 0.02 * i})
        if i % 20 == 0:
            v.add("dgs", i + 0.5, {"no2_ppb": 10.0, "no2_rh_pct": 70.0 + i / 5.0})
    return v


def _cut(v: Van, at_s: float) -> list[Batch]:
    a = [x for x in v.samples if x.t_utc_ms < ms(at_s)]
    b = [x for x in v.samples if x.t_utc_ms >= ms(at_s)]
    return [v.batch(a), v.batch(b)]


def test_pm_best_value_does_not_depend_on_batch_cuts(make: MakeStore) -> None:
    """Same samples, one upload vs two (cut at 55 s, a second before the van's next RH
    reading). Invariant: same best value, same flags, for every PM sample."""
    s = make()
    one, two = _slow_rh_van("van-one"), _slow_rh_van("van-two")
    upload(s, one.batch(one.samples))
    for b in _cut(two, 55.0):
        upload(s, b)
    a, b = observed(s, "van-one", "pm25"), observed(s, "van-two", "pm25")
    assert sorted(a) == sorted(b) and len(a) == 121
    diff = [(round((t - ms(0)) / 1000, 1), a[t][:2], b[t][:2]) for t in a
            if a[t][0] != b[t][0] or a[t][1] != b[t][1]]
    assert not diff, f"{len(diff)} PM values differ by batch cut: {diff[:6]}"


def test_pm_uncorrected_only_if_flagged_after_neighbouring_batch(make: MakeStore) -> None:
    """Batch 1: the only RH within 30 s of PM at 59 s is 97 % at 30.5 s. Batch 2: 80 % at 60 s.
    After both arrive, the closest RH to PM@59 is 80 % (humid flag re-judged at the edge).
    Invariant: that value is either corrected at ~80 % or still flagged humid."""
    s = make()
    v = Van("van-edge")
    for i in range(0, 91):
        v.gps(i)
        v.add("pms5003", i + 0.2, {"pm25": 20.0 + 0.01 * i, "pm10": 30.0 + 0.02 * i})
        if i == 30:
            v.add("dgs", i + 0.5, {"no2_ppb": 10.0, "no2_rh_pct": 97.0})
        if i == 60:
            v.add("dgs", i + 0.1, {"no2_ppb": 10.0, "no2_rh_pct": 80.0})
    for b in _cut(v, 59.5):
        upload(s, b)
    got = observed(s, "van-edge", "pm25")
    val, cal, _, qual = got[ms(59.2)]
    humid = "humid" in qual.split(",")
    corrected = cal is not None and "kappa" in str(cal)
    assert humid or corrected, (f"PM@59.2 s: value {val} (raw 20.59, at 80 % RH it should be "
                                f"{20.59 / koehler(80.0, KAPPA25):.2f}), calibration {cal}, flags {qual!r}")


# -- (1c) a late RH-fitted record re-derives the van's PM: nothing else may change ---------------

def test_recompute_reproduces_what_ingest_derived(make: MakeStore) -> None:
    """recompute_pm runs on a late RH-fitted PM record (pm_derive.derive_batch_pm) and after a
    kappa change. With the same kappa it must reproduce the derived values ingest wrote."""
    s = make()
    v = _slow_rh_van("van-rc")
    for b in _cut(v, 55.0):
        upload(s, b)
    before = {t: x[:2] for t, x in observed(s, "van-rc", "pm25").items()}
    before10 = {t: x[:2] for t, x in observed(s, "van-rc", "pm10").items()}
    conn = s.conn
    if hasattr(conn, "transaction"):
        with conn.transaction():
            recompute_pm(conn, "van-rc", {"pm1": 0.22, "pm25": KAPPA25, "pm10": KAPPA10})
    else:
        with conn:
            recompute_pm(conn, "van-rc", {"pm1": 0.22, "pm25": KAPPA25, "pm10": KAPPA10})
    after = {t: x[:2] for t, x in observed(s, "van-rc", "pm25").items()}
    after10 = {t: x[:2] for t, x in observed(s, "van-rc", "pm10").items()}
    d = [(round((t - ms(0)) / 1000, 1), before[t], after[t]) for t in before if before[t] != after[t]]
    d10 = [t for t in before10 if before10[t] != after10[t]]
    assert not d and not d10, f"recompute changed {len(d)} PM2.5 and {len(d10)} PM10 values: {d[:4]}"


def test_pm_without_any_rh_is_kept_out_or_marked(make: MakeStore) -> None:
    """A van whose RH sensor is dead (no RH within 30 s): its PM cannot be dried. Invariant
    asked of issue 15 ("humid for PM" out of maps; the bench's "no humidity handling" row):
    an uncorrectable wet value does not reach the published map unmarked. The docs say it is
    served uncorrected (docs/datalab.md): this probe measures what the map then takes."""
    s = make()
    v = Van("van-dry")
    for i in range(0, 60):
        v.gps(i)
        v.add("pms5003", i + 0.2, {"pm25": 20.0 + 0.01 * i, "pm10": 30.0})
    upload(s, v.batch(v.samples))
    (track,) = [tr for tr in read_tracks(s.conn, Period("all")) if tr.device == "van-dry"]
    j = QUANTITY_KEYS.index("pm25")
    kept = int((~track.excluded[:, j] & ~np.isnan(track.values[:, j])).sum())
    obs = observed(s, "van-dry", "pm25")
    flagged = sum(1 for x in obs.values() if x[3])
    assert kept == 0 or flagged == len(obs), (
        f"{kept} of {len(obs)} PM values with no RH reach the map uncorrected and unflagged "
        f"(calibration {sorted({str(x[1]) for x in obs.values()})})")


# -- (2) a corrected PM record: the best value follows the record valid at its time --------------

def test_corrected_pm_record_recomputes_what_it_covers(make: MakeStore, tmp_path: Any) -> None:
    """Van applied PM record v1 (slope 0.9) on board; the technician then corrects it (v2,
    slope 0.8, same validity). Issue 15.4: a corrected record recomputes what it covers."""
    from edge.calibration import CalibrationStore, SensorCalibration, apply_record
    from drivers.base import Reading
    from tests.test_calibration import FakeClock, _cal_sample

    serial = "van-c/pm"
    with CalibrationStore.for_data_dir(tmp_path / "van-c", clock=FakeClock(T0 - 600)) as cs:
        r1 = cs.confirm(cs.add("pm", serial, "colocation", {"quantity": "pm25", "slope": 0.9, "intercept": 0.0},
                               technician="t", device="van-c", valid_from=T0 - 600).id)
    s = make()
    v = Van("van-c")
    v.samples.append(_cal_sample(1, T0, r1))
    v.seq = 1
    for i in range(1, 31):
        v.gps(i)
        r = apply_record(Reading(sensor="pms5003", values={"pm25": 20.0, "pm10": 30.0, "rh": 50.0}),
                         r1, SensorCalibration("pm", serial))
        v.add("pms5003", i + 0.2, r.values)
    upload(s, v.batch(v.samples))
    with CalibrationStore.for_data_dir(tmp_path / "van-c", clock=FakeClock(T0 + 3600)) as cs:
        r2 = cs.confirm(cs.add("pm", serial, "colocation", {"quantity": "pm25", "slope": 0.8, "intercept": 0.0},
                               technician="t", device="van-c", valid_from=T0 - 600).id)
    upload(s, Batch("van-c", "e2", 1, 1, [_cal_sample(1, T0 + 3600, r2)]))
    got = observed(s, "van-c", "pm25")
    want = 0.8 * 20.0 / koehler(50.0, KAPPA25)
    vals = sorted({round(x[0], 4) for x in got.values()})
    cals = sorted({str(x[1]) for x in got.values()})
    assert all(math.isclose(x[0], want, rel_tol=1e-9) for x in got.values()), \
        f"served {vals} with {cals}; record {r2.id} valid then gives {want:.4f} (v1 gave {0.9 * 20 / koehler(50.0, KAPPA25):.4f})"


def test_a_late_rh_fitted_record_leaves_other_values_alone(make: MakeStore, tmp_path: Any) -> None:
    """The real trigger of recompute_pm: a PM record with its own RH term reaches the receiver
    after the van's values (pm_derive.derive_batch_pm). The van's values carry no ``cal`` of it
    (say it was for PM1, or never applied): none of its PM2.5 values should move."""
    from edge.calibration import CalibrationStore
    from tests.test_calibration import FakeClock, _cal_sample

    s = make()
    v = _slow_rh_van("van-late")
    for b in _cut(v, 55.0):
        upload(s, b)
    before = {t: x[:2] for t, x in observed(s, "van-late", "pm25").items()}
    with CalibrationStore.for_data_dir(tmp_path / "van-late", clock=FakeClock(T0 + 600)) as cs:
        rec = cs.confirm(cs.add("pm", "van-late/pm1", "colocation",
                                {"quantity": "pm1", "slope": 1.0, "intercept": 0.0, "rh_coef": -0.05},
                                technician="t", device="van-late").id)
    upload(s, Batch("van-late", "e2", 1, 1, [_cal_sample(1, T0 + 3600, rec)]))
    after = {t: x[:2] for t, x in observed(s, "van-late", "pm25").items()}
    moved = [(round((t - ms(0)) / 1000, 1), before[t][0], after[t][0]) for t in before if before[t] != after[t]]
    assert not moved, f"a late PM1 record moved {len(moved)} PM2.5 values: {moved}"




# -- (6) the demo fleet's value-level PM grows as the bench's model says, and sends no RH --------

def test_value_level_sim_pm_grows_with_humidity_and_the_receiver_dries_it(make: MakeStore) -> None:
    """simulator/value_sensors.SimPM (the demo fleet's sim-pm) reported dry truth but sent ambient
    ``rh``: the receiver dried growth it never had (-22 % at 67 % RH). Now it grows in its warmed
    housing as simulator/sensor_errors.py's model does and sends no RH, like every shipped PM
    driver; the van's RH is SimNO2's ``no2_rh_pct`` (ambient, as the DGS-NO2 sends it).
    Invariants over 10 minutes of a van: the raw mean carries the growth; the served mean is the
    truth's within what correcting with ambient (not housing) RH leaves (a few %), never -22 %."""
    from core.clock import SimClock
    from simulator.sensor_errors import day_kappa, growth_factor, inlet_rh
    from simulator.value_sensors import SimNO2, SimPM
    from simulator.world import VanWorld

    clock = SimClock(T0)
    world = VanWorld(clock, shift_start_utc=T0, seed=3)
    pm, no2 = SimPM(world, seed=3), SimNO2(world, seed=3)
    v = Van("van-sim")
    truth, raw, grown = [], [], []
    clock.sleep(40.0)  # past its warm-up
    for _ in range(600):
        t = clock.utc() - T0
        v.gps(t)
        r = pm.read()
        assert not any(k == "rh" or k.endswith("rh_pct") for k in r.values), r.values  # no RH of its own
        air = world.truth().air
        truth.append(air.pm25)
        raw.append(r.values["pm25"])
        grown.append(air.pm25 * float(growth_factor(day_kappa(3, int(world.now_utc() // 86_400))[0],
                                                    inlet_rh(np.array([air.rh_pct])))[0]))
        v.add("pm", t + 0.2, dict(r.values))
        n = no2.read()
        assert 0.0 <= n.values["no2_rh_pct"] <= 100.0
        v.add("no2", t + 0.5, dict(n.values))
        clock.sleep(1.0)
    true_mean, raw_mean = float(np.mean(truth)), float(np.mean(raw))
    assert raw_mean == pytest.approx(float(np.mean(grown)), rel=0.03)  # it grew by the bench's model
    assert raw_mean > 1.1 * true_mean
    s = make()
    for a in range(0, len(v.samples), 120):
        upload(s, v.batch(v.samples[a:a + 120]))
    got = [x for x in observed(s, "van-sim", "pm25").values() if x[0] is not None]
    assert all("kappa" in str(x[1]) for x in got)  # every value dried with the van's ambient RH
    served = float(np.mean([x[0] for x in got]))
    assert abs(served - true_mean) <= 0.08 * true_mean, (
        f"served PM2.5 mean {served:.2f} µg/m³, truth {true_mean:.2f}, raw {raw_mean:.2f}")


def test_rh_from_the_next_upload_clears_rh_missing_and_corrects_together(make: MakeStore) -> None:
    """PM for 60 s with no RH of its own; the van's only RH (a DGS-NO2's ``no2_rh_pct``, 70 %)
    comes at 75 s in the next upload. PM within 30 s of it (45-59 s) is then corrected at 70 %
    and loses ``rh_missing``; earlier PM keeps the flag, served wet and left out of the map."""
    s = make()
    v = Van("van-late-rh")
    for i in range(0, 60):
        v.gps(i)
        v.add("pms5003", i + 0.2, {"pm25": 20.0 + 0.01 * i, "pm10": 30.0 + 0.02 * i})
    first = list(v.samples)
    v.gps(75)
    v.add("dgs", 75.0, {"no2_ppb": 10.0, "no2_rh_pct": 70.0})
    upload(s, v.batch(first))
    before = observed(s, "van-late-rh", "pm25")
    assert all("rh_missing" in x[3].split(",") for x in before.values())
    upload(s, v.batch(v.samples[len(first):]))
    got = observed(s, "van-late-rh", "pm25")
    for i in range(60):
        val, cal, _, qual = got[ms(i + 0.2)]
        if 75.0 - (i + 0.2) <= 30.0:
            assert "rh_missing" not in qual and val == pytest.approx((20.0 + 0.01 * i) / koehler(70.0, KAPPA25), rel=1e-9), i
            assert cal == "kappa-koehler:0.22"
        else:
            assert "rh_missing" in qual.split(",") and val == pytest.approx(20.0 + 0.01 * i) and cal is None, (i, val, cal, qual)
    (track,) = [tr for tr in read_tracks(s.conn, Period("all")) if tr.device == "van-late-rh"]
    j = QUANTITY_KEYS.index("pm25")
    kept = int((~track.excluded[:, j] & ~np.isnan(track.values[:, j])).sum())
    # 45.2 .. 58.2 s: the corrected ones with a position (59.2 s is in a 16 s GPS gap); the wet ones are out.
    assert kept == 14
