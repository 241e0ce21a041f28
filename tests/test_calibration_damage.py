"""A damaged calibration store never stops the van, and never goes silent (issue 15, tester v4).

* The file is no database: ``edge run`` keeps measuring; the calibrated sensors' readings go
  out uncalibrated, flagged ``cal_unavailable``; the error is logged once; the heartbeat shows
  it; when the file is readable again the records apply again, without a restart.
* One record row is damaged: warned once and counted, the sensor's readings flagged.
* A missing file is recreated with a warning.
* ``serial = 0`` (a TOML integer) is refused with a message; with two microphones
  ``edge noise calibrate --serial MIC-B`` finds the one that has that serial.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from buffer.store import Buffer
from drivers.i2c import BusRetry, FakeI2CBus
from drivers.sound_module import SoundLevelModule
from edge.calibration import CalibrationAnnouncer, CalibrationStore, attach_calibrations
from edge.calibration_guard import GuardedStore
from core.clock import SimClock
from edge.config import parse_config
from core.errors import ConfigError
from edge.runtime import check_config_data
from edge.technician import technician_group
from simulator.i2c_devices import FakeSoundModule
from tests.test_service import notify_socket  # noqa: F401  (fixture: a fake systemd socket)
from core.wire import decode_batch

DEVICE = "van-017"
LEVEL = 65.0
OFFSET = 2.0  # the record's offset: calibrated readings are LEVEL + OFFSET


def _cfg(data: Path):
    return parse_config({"device": {"id": DEVICE, "data_dir": str(data)},
                         "sensors": {"street": {"driver": "sound-module", "bus": "sim"}}})


def _module() -> SoundLevelModule:
    return SoundLevelModule(FakeI2CBus({0x48: FakeSoundModule(source=lambda: LEVEL)}), name="street",
                            retry=BusRetry(sleep=lambda s: None), reset_each_read=True)


def _good_store(data: Path) -> bytes:
    """A store with an active noise record for the module; returns the file's bytes (the backup)."""
    with CalibrationStore.for_data_dir(data) as s:
        s.confirm(s.add("noise", f"{DEVICE}/street", "acoustic", {"offset_db": OFFSET}, technician="t").id)
        s._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return (data / "calibration.sqlite").read_bytes()


def _damage(data: Path) -> None:
    for extra in ("-wal", "-shm"):
        (data / f"calibration.sqlite{extra}").unlink(missing_ok=True)
    (data / "calibration.sqlite").write_bytes(b"this is not a database" * 200)


def test_damaged_file_runs_uncalibrated_flagged_and_recovers(tmp_path: Path, caplog) -> None:
    data = tmp_path / "data"
    backup = _good_store(data)
    _damage(data)
    clock = SimClock(1_780_000_000.0)
    caplog.set_level(logging.WARNING)
    guard = GuardedStore.for_data_dir(data, clock=clock, retry_s=60.0)
    (drv,) = attach_calibrations([_module()], _cfg(data), guard)
    drv.poll_every = 1
    announcer = CalibrationAnnouncer(guard, poll_every=1)  # must not fail either
    for _ in range(5):
        r = drv.read()
        assert r.values["laeq"] == LEVEL and "cal" not in r.values, r
        assert "cal_unavailable" in r.flags
        assert announcer.read() is None
    health = guard.health()
    assert health["available"] is False and "not a database" in health["problem"]
    assert drv.unavailable_readings == 5
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "cannot be read" in r.getMessage()]
    assert len(errors) == 1  # once, not once per read
    # The file is put right (a technician restores the backup): within the retry time, no restart.
    (data / "calibration.sqlite").write_bytes(backup)
    assert "cal_unavailable" in drv.read().flags  # not retried before retry_s
    clock.advance(61.0)
    r = drv.read()
    assert r.values["laeq"] == LEVEL + OFFSET and r.values["cal"] == f"noise:{DEVICE}/street:v1", r
    assert "cal_unavailable" not in r.flags
    assert guard.health()["available"] is True
    assert any("readable again" in x.getMessage() for x in caplog.records)
    assert announcer.read() is not None  # the record is announced once it can be read
    guard.close()


def test_a_damaged_record_row_is_warned_counted_and_flagged(tmp_path: Path, caplog) -> None:
    data = tmp_path / "data"
    _good_store(data)
    store = CalibrationStore.for_data_dir(data)
    store._db.execute("UPDATE calibrations SET record = '{broken' WHERE id = ?", (f"noise:{DEVICE}/street:v1",))
    caplog.set_level(logging.WARNING)
    (drv,) = attach_calibrations([_module()], _cfg(data), store)
    drv.poll_every = 1
    for _ in range(3):
        r = drv.read()
        assert "cal_unavailable" in r.flags and r.values["laeq"] == LEVEL
    assert store.damaged == {f"noise:{DEVICE}/street:v1"}
    assert store.all_active() == []  # the announcer's read does not fail on it
    warnings = [r for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1
    store.close()


def test_a_missing_file_is_created_with_a_warning(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    CalibrationStore.for_data_dir(tmp_path).close()
    assert any("did not exist" in r.getMessage() for r in caplog.records)
    caplog.clear()
    CalibrationStore.for_data_dir(tmp_path).close()  # there now: nothing to say
    assert not any("did not exist" in r.getMessage() for r in caplog.records)


def test_edge_run_with_a_damaged_calibration_file_keeps_measuring(tmp_path: Path) -> None:
    data, conf = tmp_path / "data", tmp_path / "agent.toml"
    data.mkdir()
    (data / "calibration.sqlite").write_bytes(b"this is not a database" * 200)
    conf.write_text(f'[device]\nid = "{DEVICE}"\ndata_dir = "{data}"\n[uplink]\nhost = "127.0.0.1"\nport = 1\n'
                    '[simulation]\nenabled = true\ndevices = "hardware"\nshift_hours = 0.01\n'
                    '[sensors.gps]\ndriver = "nmea-gps"\nport = "sim:gps"\n'
                    '[sensors.street]\ndriver = "sound-module"\nbus = "sim"\n')
    p = subprocess.run([sys.executable, "-m", "edge.cli", "run", "--config", str(conf), "--drain-timeout", "1"],
                       capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr.count("cannot be read") == 1, p.stderr[-2000:]
    buf = Buffer(data / "buffer.sqlite", DEVICE)
    try:
        while buf.seal(20_000, 1_780_000_000_000) is not None:
            pass
        samples = [s for b in buf.pending(1000) for s in decode_batch(b.payload).samples]
    finally:
        buf.close()
    street = [s for s in samples if s.sensor == "street"]
    assert len(street) > 10 and all("cal_unavailable" in s.flags for s in street)
    assert not any("cal_unavailable" in s.flags for s in samples if s.sensor != "street")  # GPS untouched
    assert (data / "calibration.sqlite").read_bytes().startswith(b"this is not a database")  # left as found


@pytest.mark.parametrize("value", [0, 12345, 1.5, True])
def test_a_serial_that_is_no_text_is_refused(value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"sensors": {"mic": {"driver": "microphone", "serial": value}}})
    assert exc.value.key == "sensors.mic.serial" and "quotes" in exc.value.problem
    (err,) = check_config_data({"sensors": {"mic": {"driver": "microphone", "serial": value}}})
    assert err.key == "sensors.mic.serial"


def test_two_microphones_the_serial_alone_finds_the_sensor(tmp_path: Path) -> None:
    data, conf = tmp_path / "data", tmp_path / "agent.toml"
    conf.write_text(f'[device]\nid = "{DEVICE}"\ndata_dir = "{data}"\n'
                    '[sensors.mic]\ndriver = "microphone"\ndevice = "sim"\nserial = "MIC-A"\n'
                    '[sensors.mic2]\ndriver = "microphone"\ndevice = "sim"\nserial = "MIC-B"\n')
    res = CliRunner().invoke(technician_group(), ["noise", "calibrate", "--config", str(conf), "--seconds", "4",
                                                  "--serial", "MIC-B", "--yes"])
    assert res.exit_code == 0, res.output
    with CalibrationStore.for_data_dir(data) as s:
        assert [r.id for r in s.history()] == ["noise:MIC-B:v1"]
    # An unknown serial still asks which sensor (nothing stored).
    res = CliRunner().invoke(technician_group(), ["noise", "calibrate", "--config", str(conf), "--seconds", "4",
                                                  "--serial", "MIC-C", "--yes"])
    assert res.exit_code != 0 and "--sensor" in res.output
    with CalibrationStore.for_data_dir(data) as s:
        assert len(s.history()) == 1


def test_the_heartbeat_shows_a_damaged_calibration_file(tmp_path: Path, notify_socket) -> None:
    from tests.test_service import _runtime

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "calibration.sqlite").write_bytes(b"this is not a database" * 200)
    rt = _runtime(tmp_path, notify_socket.path)  # builds without raising: the van runs
    try:
        for _ in range(3):
            time.sleep(0.06)  # the simulated clock runs 20x: a new PM reading each time
            rt.agent.sample()
        cal = rt.agent.status()["calibration"]
        assert cal["available"] is False and "not a database" in cal["problem"]
        assert cal["uncalibrated_readings"].get("pm", 0) >= 1, cal
        assert all("cal_unavailable" in s.flags for s in rt.agent._pending if s.sensor == "pm")
    finally:
        rt.close()
