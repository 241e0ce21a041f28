"""Issue 15 point 3 (tester's findings, v4): a section name either works end to end or is refused.

* Names with a meaning at the receiver (``gps``: the track; ``calibration``: records) are
  refused by the config schema for any other driver, so PM never hides under them.
* Names the receiver's schema refuses (too long, control characters) are refused by the
  config schema too, naming the key: otherwise the van stores them and the receiver
  refuses whole batches (GPS, NO2 and noise with them).
* Every driver labels its samples with its section name, so two sound sensors on one van are
  two series for the quality checks (a stuck module is found beside a live microphone), and the
  receiver finds NO2 samples by their keys.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from drivers.i2c import BusRetry, FakeI2CBus
from drivers.noise.capture import MicrophoneDriver
from drivers.noise.levels import LevelMeter, MeterConfig
from drivers.sound_module import SoundLevelModule
from core.calibration import CALIBRATION_SENSOR
from edge.cli import main as edge_cli
from edge.config import CALIBRATION_SECTION, GPS_SECTION, parse_config
from core.errors import ConfigError, PayloadError
from core.sample import Sample, TimeSource
from edge.runtime import check_config_data
from receiver.aggregate import NOT_MEASUREMENTS
from receiver.store import quality_rows
from receiver.validate import check_batch
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_dgs_no2 import open_driver  # noqa: F401  (fixture: a DGS simulator on a pty)
from tests.test_store_contract import make  # noqa: F401  (fixture: SQLite and PostgreSQL stores)
from simulator.i2c_devices import FakeSoundModule
from core.wire import MAX_NAME_CHARS, Batch

T0 = 1_780_000_000_000


def _pm(name: str) -> dict:
    return {"sensors": {name: {"driver": "pms5003", "port": "/dev/ttyUSB0"}}}


def test_the_reserved_names_are_the_receivers() -> None:
    assert {GPS_SECTION, CALIBRATION_SECTION} == set(NOT_MEASUREMENTS)
    assert CALIBRATION_SECTION == CALIBRATION_SENSOR


@pytest.mark.parametrize("name", ["gps", "calibration"])
def test_pm_under_a_reserved_name_is_refused_with_the_key(name: str) -> None:
    errors = check_config_data(_pm(name))
    assert [e.key for e in errors] == [f"sensors.{name}"], errors
    assert "reserved" in errors[0].problem


def test_a_position_driver_may_use_gps_or_any_free_name() -> None:
    # Position drivers label their samples "gps" whatever the section: the track is built either way.
    for name in ("gps", "position"):
        assert parse_config({"sensors": {name: {"driver": "nmea-gps", "port": "/dev/ttyACM0"}}}).sensors
    with pytest.raises(ConfigError):  # not the calibration name, though
        parse_config({"sensors": {"calibration": {"driver": "gpsd"}}})


@pytest.mark.parametrize("name", ["p" * (MAX_NAME_CHARS + 1), "front\tpm", "pm\x00", "pm\n"])
def test_names_the_receiver_refuses_are_refused_by_config_check(name: str, tmp_path: Path) -> None:
    # What the receiver does with such a name: the whole batch, GPS and all, is refused.
    gps = Sample("gps", T0, 0, TimeSource.GPS, {"lat": 52.1, "lon": 4.6}, (), 1)
    pm = Sample(name, T0, 0, TimeSource.GPS, {"pm25": 5.0}, (), 2)
    with pytest.raises(PayloadError):
        check_batch(Batch("van-x", "e1", 1, 2, [gps, pm]))
    errors = check_config_data(_pm(name))
    assert len(errors) == 1 and errors[0].key.startswith("sensors."), errors
    assert "sensor name" in errors[0].problem


def test_a_name_at_the_limit_works_and_the_cli_names_the_bad_key(tmp_path: Path) -> None:
    ok = "p" * MAX_NAME_CHARS
    assert check_config_data(_pm(ok)) == []
    check_batch(Batch("van-x", "e1", 1, 1, [Sample(ok, T0, 0, TimeSource.GPS, {"pm25": 5.0}, (), 1)]))
    cfg = tmp_path / "tab.toml"
    cfg.write_text('[sensors."front\\tpm"]\ndriver = "pms5003"\nport = "/dev/ttyUSB0"\n')
    res = CliRunner().invoke(edge_cli, ["config", "check", str(cfg)])
    assert res.exit_code != 0 and "sensors.'front\\tpm'" in res.stderr and "control characters" in res.stderr


@pytest.mark.parametrize("typed, meant", [("SPS30", "sps30"), ("PMS5003", "pms5003"), ("Microphone", "microphone"),
                                          ("DGS-NO2", "dgs-no2")])
def test_unknown_driver_near_miss_ignores_case(typed: str, meant: str) -> None:
    (err,) = check_config_data({"sensors": {"front": {"driver": typed}}})
    assert err.key == "sensors.front.driver" and f"did you mean {meant!r}" in err.problem


# -- labels ---------------------------------------------------------------------------------------


def test_noise_and_no2_drivers_label_samples_with_their_section_name(open_driver) -> None:
    from simulator.microphone import CalibratorTone
    from tests.test_dgs_no2 import wait_for
    from tests.test_no2 import rig as no2_rig

    assert _module("street").read().sensor == "street"
    drv, _, _ = no2_rig(name="nox-front")
    assert drv.read().sensor == "nox-front"
    _, dgs, _ = open_driver(name="nox-rear")
    assert wait_for(dgs.read).sensor == "nox-rear"
    mic = MicrophoneDriver(CalibratorTone(1000.0, 94.0), LevelMeter(MeterConfig()), name="mic-b")
    try:
        from drivers.noise.capture import wait_for_seconds

        assert wait_for_seconds(mic, 1)
        assert mic.read().sensor == "mic-b"
    finally:
        mic.close()


def _module(name: str) -> SoundLevelModule:
    return SoundLevelModule(FakeI2CBus({0x48: FakeSoundModule(source=lambda: 65.0)}), name=name,
                            retry=BusRetry(sleep=lambda s: None))


def test_a_stuck_sound_module_beside_a_microphone_is_found() -> None:
    """The tester's case: the module sticks at 65 dB for 60 s while a microphone is alive."""
    module = _module("street")
    mic_name = "mic"
    samples, seq = [], 1
    for i in range(60):
        r = module.read()
        assert r is not None and r.sensor == "street"
        for sensor, vals in ((r.sensor, r.values), (mic_name, {"laeq": 60.0 + (i % 7) * 0.37})):
            samples.append(Sample(sensor, T0 + i * 1000, 0, TimeSource.GPS, dict(vals), (), seq))
            seq += 1
    rows, _ = quality_rows(Batch("van-x", "e1", 1, seq - 1, samples), lambda sensor, q, first: ([], 0))
    stuck = {(r[2], r[3]) for r in rows if "stuck" in r[4]}
    module_seqs = {s.seq for s in samples if s.sensor == "street"}
    # Every second of the stuck module from the run's threshold on is flagged, none of the microphone's.
    assert stuck and {seq for seq, q in stuck if q == "laeq"} <= module_seqs
    assert len([1 for seq, q in stuck if q == "laeq"]) >= 30


def test_the_receiver_recomputes_no2_under_any_section_name(make, tmp_path: Path) -> None:
    """A corrected NO2 record reaches samples labelled with a free section name (found by no2_we_mv)."""
    import dataclasses
    import math

    from receiver.ingest import Ingestor
    from tests.test_best_value import T0, _confirmed, _correct, _day, _observed, _ppb, _records, _upload
    from tests.test_best_value import LATER, RECEIVED

    s = make()
    ing = Ingestor(s)
    v1 = _confirmed(tmp_path, "van-a")
    day = _day("van-a", v1)
    renamed = [dataclasses.replace(x, sensor="nox-front") if x.sensor == "no2" else x for x in day.samples]
    assert sum(x.sensor == "nox-front" for x in renamed) > 50
    _upload(ing, dataclasses.replace(day, samples=renamed), RECEIVED)
    _, v2 = _correct(tmp_path, "van-a", T0 + 19.5, slope=0.8, intercept_ppb=-3.0)
    _upload(ing, _records("van-a", 200, v2), LATER)
    got = _observed(s, "van-a")
    late = {i: v for i, v in got.items() if i >= 20}
    assert len(late) > 30
    for i, (v, cal) in late.items():
        assert cal == v2.id and math.isclose(v, _ppb(v2, i), rel_tol=1e-9), (i, v, cal)
