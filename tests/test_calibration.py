"""Calibration records: store semantics, sheets, provenance on readings, fits, tones, receiver."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from drivers.base import Reading
from drivers.noise.levels import MeterConfig
from core.no2_sheet import no2_ppb
from core.calibration import (
    EPA_PM25_HUMIDITY,
    CalibrationError,
    CalibrationRecord,
    no2_ppb_from_record,
    no2_values_from_sheet,
    provenance,
)
from edge.calibration import (
    CalibratedDriver,
    CalibrationAnnouncer,
    CalibrationStore,
    SensorCalibration,
    import_sheet,
    record_from_config,
)
from edge.config import parse_config
from core.sample import Sample, TimeSource
from edge.technician.fitting import fit, hourly, load_device_csv, load_reference
from edge.technician.noise import analyse_tone
from simulator.hardware import SIM_NO2_CAL
from simulator.microphone import sine

SERIAL = SIM_NO2_CAL.serial
T0 = 1_795_000_000.0


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def utc(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path, clock):
    s = CalibrationStore.for_data_dir(tmp_path, clock=clock)
    yield s
    s.close()


def sheet_values(**over):
    return {**no2_values_from_sheet(SIM_NO2_CAL), **over}


# -- store semantics -----------------------------------------------------------------------

def test_pending_has_no_effect_and_confirm_supersedes(store, clock):
    r1 = store.add("no2", SERIAL, "sheet", sheet_values(), technician="ann")
    assert r1.id == f"no2:{SERIAL}:v1" and r1.status == "pending"
    assert store.active("no2", SERIAL) is None, "a proposal takes no effect"
    assert store.active("no2", SERIAL, at=T0 + 10) is None
    g0 = store.generation()
    a1 = store.confirm(r1.id)
    assert a1.status == "active" and a1.valid_from == T0 and a1.supersedes is None
    assert store.generation() == g0 + 1

    clock.t = T0 + 3600
    r2 = store.add("no2", SERIAL, "zero", sheet_values(intercept_ppb=-3.0), technician="bob")
    assert store.active("no2", SERIAL).id == a1.id, "still v1 until v2 is confirmed"
    a2 = store.confirm(r2.id)
    assert a2.supersedes == a1.id and a2.version == 2
    old = store.get(a1.id)
    assert old.status == "superseded" and old.valid_to == T0 + 3600
    assert store.active("no2", SERIAL).id == a2.id
    # validity windows answer "which calibration made this value?"
    assert store.active("no2", SERIAL, at=T0 + 10).id == a1.id
    assert store.active("no2", SERIAL, at=T0 + 3600).id == a2.id
    assert store.active("no2", SERIAL, at=T0 - 1) is None
    assert [r.id for r in store.history(serial=SERIAL)] == [a1.id, a2.id]
    assert provenance(a2) == f"no2:{SERIAL}:v2" and provenance(None) is None


def test_confirm_errors_change_nothing(store):
    r = store.add("no2", SERIAL, "sheet", sheet_values(), technician="ann")
    store.confirm(r.id)
    with pytest.raises(CalibrationError):
        store.confirm(r.id)  # already active
    with pytest.raises(CalibrationError):
        store.confirm("no2:nope:v9")
    with pytest.raises(CalibrationError):
        store.add("no2", SERIAL, "sheet", {"we_e_mv": 1.0}, technician="ann")  # incomplete sheet
    with pytest.raises(CalibrationError):
        store.add("no2", SERIAL, "guess", sheet_values(), technician="ann")
    with pytest.raises(CalibrationError):
        store.add("noise", "mic", "acoustic", {"offset_db": 35.0}, technician="ann")
    assert [x.status for x in store.history()] == ["active"]


def test_retroactive_record_and_discard(store, clock):
    a1 = store.confirm(store.add("no2", SERIAL, "sheet", sheet_values(), technician="a").id)
    clock.t = T0 + 10 * 86400
    p = store.add("no2", SERIAL, "colocation", sheet_values(slope=1.2), technician="a", valid_from=T0 + 86400)
    store.discard(p.id)
    assert store.get(p.id) is None
    p = store.add("no2", SERIAL, "colocation", sheet_values(slope=1.2), technician="a", valid_from=T0 + 86400)
    a3 = store.confirm(p.id)
    assert a3.valid_from == T0 + 86400 and store.get(a1.id).valid_to == T0 + 86400
    assert store.active("no2", SERIAL, at=T0 + 2 * 86400).id == a3.id
    with pytest.raises(CalibrationError):
        store.discard(a3.id)


def test_record_json_round_trip(store):
    r = store.confirm(store.add("pm", "van-1/pm", "humidity", EPA_PM25_HUMIDITY, technician="x", device="van-1").id)
    assert CalibrationRecord.from_json(r.to_json()) == r
    with pytest.raises(ValueError):
        CalibrationRecord.from_json('{"id": 1}')


# -- sheets ----------------------------------------------------------------------------------

def test_import_sheet_formats(tmp_path):
    (tmp_path / "kv.csv").write_text("Serial,202123456\nWEe,295\nAEe,300\nWEo,12\nAEo,6\n"
                                     "Sensitivity (nA/ppb),-0.3547\nBoard gain,-0.73\n")
    sn, cal = import_sheet(tmp_path / "kv.csv")
    assert sn == "202123456" and cal.we_o_mv == 12 and math.isclose(cal.sensitivity_mv_per_ppb, 0.258931)

    (tmp_path / "rows.csv").write_text("serial,WEe,AEe,WEt,AEt,sensitivity,gain\n"
                                       "202000001,295,300,307,306,-0.30,-0.73\n"
                                       "202000002,290,301,310,309,-0.35,-0.73\n")
    sn, cal = import_sheet(tmp_path / "rows.csv", "202000002")
    assert sn == "202000002" and cal.we_o_mv == 20 and cal.ae_o_mv == 8  # total - electronic zero
    with pytest.raises(CalibrationError, match="2 sheets"):
        import_sheet(tmp_path / "rows.csv")
    with pytest.raises(CalibrationError, match="no sheet for serial"):
        import_sheet(tmp_path / "rows.csv", "999")

    (tmp_path / "s.json").write_text(json.dumps({"serial": "A1", "we_e_mv": 295, "ae_e_mv": 300, "we_o_mv": 1,
                                                 "ae_o_mv": 2, "sensitivity_na_per_ppb": -0.3,
                                                 "gain_mv_per_na": -0.73}))
    assert import_sheet(tmp_path / "s.json")[0] == "A1"
    (tmp_path / "s.toml").write_text('[no2.calibration."B2"]\nwe_e_mv = 295\nae_e_mv = 300\nwe_o_mv = 1\n'
                                     'ae_o_mv = 2\nsensitivity_na_per_ppb = -0.3\ngain_mv_per_na = -0.73\n')
    assert import_sheet(tmp_path / "s.toml")[0] == "B2"
    (tmp_path / "bad.json").write_text(json.dumps({"serial": "A1", "we_e_mv": 295}))
    with pytest.raises(CalibrationError, match="ae_e_mv"):
        import_sheet(tmp_path / "bad.json")


# -- provenance on readings -------------------------------------------------------------------

class FakeNo2:
    name = "no2"

    def read(self) -> Reading:
        return Reading("no2", {"no2_ppb": 1.0, "no2_we_mv": 330.0, "no2_ae_mv": 306.0, "no2_temp_c": 15.0})

    def close(self) -> None:
        pass


def test_calibrated_driver_carries_the_record_id(store):
    drv = CalibratedDriver(FakeNo2(), store, SensorCalibration("no2", SERIAL), poll_every=1)
    assert "cal" not in drv.read().values, "no record: the driver's own value, untagged"
    rec = store.confirm(store.add("no2", SERIAL, "zero", sheet_values(intercept_ppb=-3.0, slope=1.1),
                                  technician="a").id)
    r = drv.read()
    expected = -3.0 + 1.1 * no2_ppb(330.0, 306.0, 15.0, SIM_NO2_CAL, 1)
    assert r.values["cal"] == rec.id and math.isclose(r.values["no2_ppb"], expected)
    assert r.values["no2_we_mv"] == 330.0, "raw inputs untouched"


def test_pm_and_noise_records_apply(store):
    class Pm:
        name = "pm"

        def __init__(self, values):
            self.values = values

        def read(self):
            return Reading("pm", dict(self.values))

        def close(self):
            pass

    rec = store.confirm(store.add("pm", "v/pm", "humidity", EPA_PM25_HUMIDITY, technician="a").id)
    r = CalibratedDriver(Pm({"pm25": 20.0, "pm25_cf1": 30.0, "rh": 80.0}), store,
                         SensorCalibration("pm", "v/pm"), poll_every=1).read()
    assert math.isclose(r.values["pm25_cal"], 0.524 * 30 - 0.0862 * 80 + 5.75) and r.values["cal"] == rec.id
    r = CalibratedDriver(Pm({"pm25": 20.0, "pm25_cf1": 30.0}), store, SensorCalibration("pm", "v/pm")).read()
    assert r.values["pm25_cal"] is None and "cal_input_missing" in r.flags

    store.confirm(store.add("noise", "v/noise", "acoustic", {"offset_db": 1.5}, technician="a").id)
    r = CalibratedDriver(Pm({"laeq": 60.0, "lamax": 70.0}), store,
                         SensorCalibration("noise", "v/noise", base_offset_db=0.5)).read()
    assert r.values["laeq"] == 61.0 and r.values["lamax"] == 71.0


def test_announcer_sends_active_records_at_start_and_on_change(store, clock):
    a1 = store.confirm(store.add("no2", SERIAL, "sheet", sheet_values(), technician="a").id)
    ann = CalibrationAnnouncer(store, poll_every=1)
    first = ann.read()
    assert first.sensor == "calibration" and first.values["id"] == a1.id
    assert CalibrationRecord.from_json(first.values["record"]) == a1
    assert ann.read() is None
    store.add("no2", SERIAL, "zero", sheet_values(intercept_ppb=-1.0), technician="a")
    assert ann.read() is None, "a pending proposal is not announced"
    clock.t += 60
    a2 = store.confirm(f"no2:{SERIAL}:v2")
    got = {ann.read().values["id"], ann.read().values["id"]}
    assert got == {a1.id, a2.id}, "the new record and the superseded one (its valid_to changed)"
    assert ann.read() is None


def test_record_from_config_makes_provenance_of_the_configured_sheet(store):
    cfg = parse_config({"device": {"id": "van-9"},
                        "sensors": {"no2": {"driver": "no2-b43f", "bus": "sim", "serial": SERIAL}}})
    made = record_from_config(cfg, store)
    assert [r.id for r in made] == [f"no2:{SERIAL}:v1"] and made[0].method == "sheet"
    assert record_from_config(cfg, store) == [], "only once"


# -- co-location fit ----------------------------------------------------------------------

def _reference_csv(path, hours, values):
    # Luchtmeetnet stamps an hour by its end.
    lines = ["station_number,formula,value,timestamp_measured"]
    lines += [f"NL10636,PM25,{v:.4f},{_iso(h + 3600)}" for h, v in zip(hours, values)]
    path.write_text("\n".join(lines) + "\n")


def _iso(t):
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def test_colocation_fit_recovers_known_slope_and_intercept(tmp_path):
    rng = np.random.default_rng(1)
    h0 = 1_795_000_000 // 3600 * 3600
    hours = [h0 + 3600 * i for i in range(72)]
    dev_hourly = 10 + 8 * np.sin(np.arange(72) / 5.0) + rng.normal(0, 2, 72)
    true = 1.5 + 0.8 * dev_hourly  # reference = 1.5 + 0.8 * device
    _reference_csv(tmp_path / "ref.csv", hours, [999.0 if i == 5 else v for i, v in enumerate(true)])
    # Hour 5 was first published wrong and revised: the revision is a later row for the same hour.
    text = (tmp_path / "ref.csv").read_text()
    text += f"NL10636,PM25,{true[5]:.4f},{_iso(hours[5] + 3600)}\n"
    (tmp_path / "ref.csv").write_text(text)
    lines = ["time,value"]
    for i, h in enumerate(hours):
        for m in range(60):  # per-minute device data averaging to the hourly value
            lines.append(f"{h + 60 * m},{dev_hourly[i] + (0.5 if m % 2 else -0.5):.4f}")
    (tmp_path / "dev.csv").write_text("\n".join(lines) + "\n")
    ref = load_reference(tmp_path / "ref.csv", formula="PM25")
    assert ref.revised == 1 and math.isclose(ref.hours[hours[5]], true[5], abs_tol=1e-3)
    fr = fit(hourly(load_device_csv(tmp_path / "dev.csv")), ref.hours)
    assert fr.n == 72 and fr.r2 > 0.999
    assert math.isclose(fr.slope, 0.8, abs_tol=1e-3) and math.isclose(fr.intercept, 1.5, abs_tol=1e-2)
    assert fr.accepted(0.7, 48) == (True, "accepted")
    assert not fr.accepted(0.7, 100)[0]


# -- acoustic calibration -----------------------------------------------------------------

def test_tone_at_1khz_gives_the_offset_and_500hz_is_refused():
    cfg = MeterConfig()
    res = analyse_tone(sine(1000.0, 92.7, 4.0), cfg)
    assert abs(res["frequency_hz"] - 1000.0) < 1.0
    assert math.isclose(res["offset_db"], 1.3, abs_tol=0.05)
    with pytest.raises(CalibrationError, match="500 Hz"):
        analyse_tone(sine(500.0, 94.0, 4.0), cfg)
    wobble = sine(1000.0, 94.0, 4.0) * np.repeat([1.0, 1.3, 0.8, 1.2], 48_000)
    with pytest.raises(CalibrationError, match="not steady"):
        analyse_tone(wobble, cfg)


# -- the receiver's side ------------------------------------------------------------------

def _no2_sample(seq, t_s, we=330.0, cal=None):
    vals = {"no2_ppb": 10.0, "no2_we_mv": we, "no2_ae_mv": 306.0, "no2_temp_c": 12.0}
    if cal:
        vals["cal"] = cal
    return Sample("no2", int(t_s * 1000), seq * 1000, TimeSource.GPS, vals, (), seq, "boot")


def _cal_sample(seq, t_s, rec):
    return Sample("calibration", int(t_s * 1000), seq * 1000, TimeSource.GPS,
                  {"id": rec.id, "record": rec.to_json()}, (), seq, "boot")


def test_receiver_stores_records_and_recomputes_from_raw(tmp_path, store, clock):
    from receiver.calibration import ensure_tables, ingest_calibrations
    from receiver.store import SQLiteStore
    from core.wire import Batch

    rs = SQLiteStore(tmp_path / "datalab.sqlite")
    ensure_tables(rs.conn)
    a1 = store.confirm(store.add("no2", SERIAL, "sheet", sheet_values(), technician="a", device="van-1").id)
    samples = [_cal_sample(1, T0, a1)] + [_no2_sample(i, T0 + i, 320 + i, cal=a1.id) for i in range(2, 12)]
    b1 = Batch("van-1", "e1", 1, 11, samples)

    def ingest(batch):
        rs.ingest(batch, f"sha-{batch.first_seq}", int(T0 * 1000) + 10**7)
        with rs.conn:
            rs.conn.execute("BEGIN")
            ingest_calibrations(rs.conn, batch, int(T0 * 1000))

    ingest(b1)
    c = rs.conn
    assert c.execute("SELECT id, kind, serial, version, status FROM calibrations").fetchall() == [
        (a1.id, "no2", SERIAL, 1, "active")]
    got = dict(c.execute("SELECT seq, value FROM derived WHERE calibration=?", (a1.id,)).fetchall())
    assert len(got) == 10
    assert math.isclose(got[5], no2_ppb_from_record(a1.values, 325.0, 306.0, 12.0))

    # A corrected, retroactive record (a co-location) arrives later: derived values are redone.
    clock.t = T0 + 86400
    p = store.add("no2", SERIAL, "colocation", sheet_values(slope=1.25, intercept_ppb=2.0), technician="a",
                  device="van-1", valid_from=T0)
    a2 = store.confirm(p.id)
    ingest(Batch("van-1", "e1", 12, 13, [_cal_sample(12, T0 + 86400, store.get(a1.id)), _cal_sample(13, T0 + 86400, a2)]))
    rows = dict(c.execute("SELECT seq, value FROM derived").fetchall())
    cals = {r[0] for r in c.execute("SELECT calibration FROM derived")}
    assert cals == {a2.id}
    assert math.isclose(rows[5], 2.0 + 1.25 * no2_ppb(325.0, 306.0, 12.0, SIM_NO2_CAL, 1))
    raw = json.loads(c.execute("SELECT vals FROM samples WHERE seq=5").fetchone()[0])
    assert raw["no2_ppb"] == 10.0 and raw["cal"] == a1.id, "raw samples untouched"
    # Re-announcing the same records (agent restart) changes nothing.
    ingest(Batch("van-1", "e1", 14, 14, [_cal_sample(14, T0 + 86401, a2)]))
    assert c.execute("SELECT count(*) FROM calibrations").fetchone()[0] == 2
    # A backlog sample arriving after its record is derived on arrival.
    ingest(Batch("van-1", "e1", 15, 15, [_no2_sample(15, T0 + 100, 340.0, cal=a1.id)]))
    assert c.execute("SELECT calibration FROM derived WHERE seq=15").fetchone()[0] == a2.id
    rs.close()
