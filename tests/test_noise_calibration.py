"""Issue 15 point 5: the microphone calibration by serial is applied by the agent.

End to end with the real pieces: a simulated microphone whose capsule reads 1.3 dB low
(its sensitivity is off the data sheet) with a simulated 94 dB / 1 kHz calibrator seated
on it; ``edge noise calibrate --serial`` through its CLI; the agent's own drivers, built
and wrapped as edge/runtime.py does, reading the same calibration store.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from click.testing import CliRunner

from edge.calibration import CalibrationStore, attach_calibrations
from core.clock import SystemClock
from edge.config import load_config
from edge.driver_factory import build_drivers
from edge.technician import technician_group
from simulator.microphone import CalibratorTone

SERIAL = "ICS43434-0042"
ERROR_DB = -1.3  # the capsule reads this far off: 94 dB reads 92.7 dB, as in the issue


def van_config(tmp_path: Path, serial: str | None = SERIAL) -> Path:
    cfg = tmp_path / "agent.toml"
    line = f'serial = "{serial}"\n' if serial else ""
    cfg.write_text(f'[device]\nid = "van-017"\ndata_dir = "{tmp_path / "data"}"\n\n'
                   f'[sensors.mic]\ndriver = "microphone"\ndevice = "sim"\n{line}')
    return cfg


def agent_drivers(cfg_path: Path) -> tuple[list[Any], CalibrationStore]:
    """The agent's noise driver over the calibrator-on-microphone, calibrated as runtime wraps it."""
    cfg = load_config(cfg_path)
    mic = CalibratorTone(1000.0, 94.0, sensitivity_error_db=ERROR_DB, speed=8.0)
    drivers = build_drivers(cfg.sensors, {"clock": SystemClock(), "hardware": SimpleNamespace(microphone=mic)})
    store = CalibrationStore.for_data_dir(cfg.device.data_dir)
    return attach_calibrations(drivers, cfg, store), store


def next_laeq(driver: Any, timeout_s: float = 20.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = driver.read()
        if r is not None and "warming_up" not in r.flags:
            return float(r.values["laeq"])
        time.sleep(0.02)
    raise AssertionError("no level from the microphone")


def calibrate(cfg: Path, *extra: str) -> Any:
    return CliRunner().invoke(technician_group(), ["noise", "calibrate", "--config", str(cfg), "--seconds", "4",
                                                   "--sim-error-db", str(ERROR_DB), "--yes", *extra])


def test_calibration_by_serial_is_applied_by_the_running_agent_and_at_start(tmp_path: Path) -> None:
    cfg = van_config(tmp_path)
    (mic,), store = agent_drivers(cfg)
    try:
        before = next_laeq(mic)
        assert abs(before - (94.0 + ERROR_DB)) < 0.15  # the fault of the issue: 92.7 on 94 dB
        r = calibrate(cfg, "--serial", SERIAL)
        assert r.exit_code == 0, r.output
        (rec,) = store.history("noise", SERIAL)
        assert rec.status == "active"
        # The running agent picks the new record up (it watches the store), no restart.
        deadline = time.monotonic() + 30
        level = before
        while time.monotonic() < deadline and abs(level - 94.0) > 0.1:
            level = next_laeq(mic)
        assert abs(level - 94.0) <= 0.1, level
    finally:
        mic.close()
        store.close()
    # A fresh start applies it from the first reading, and says which record did.
    (mic2,), store2 = agent_drivers(cfg)
    try:
        deadline = time.monotonic() + 20
        while (r := mic2.read()) is None or "warming_up" in r.flags:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert abs(r.values["laeq"] - 94.0) <= 0.1 and r.values["cal"] == f"noise:{SERIAL}:v1"
    finally:
        mic2.close()
        store2.close()


def test_a_serial_the_agent_does_not_look_up_is_refused_not_stored(tmp_path: Path) -> None:
    cfg = van_config(tmp_path, serial=None)  # the agent knows this microphone as van-017/mic
    r = calibrate(cfg, "--serial", SERIAL)
    assert r.exit_code == 1
    assert "van-017/mic" in r.output and f'serial = "{SERIAL}"' in r.output
    with CalibrationStore.for_data_dir(tmp_path / "data") as s:
        assert s.history() == []
    # Without --serial it goes under the id the agent uses.
    assert calibrate(cfg).exit_code == 0
    with CalibrationStore.for_data_dir(tmp_path / "data") as s:
        assert [x.serial for x in s.history()] == ["van-017/mic"]


def test_a_reload_that_changes_the_serial_applies_that_serials_record(tmp_path: Path) -> None:
    """SIGHUP path: the running van re-reads agent.toml; the microphone is rebuilt and looked up anew."""
    from edge.runtime import Runtime, load_full_config
    from edge.systemd_supervisor import Notifier

    data = tmp_path / "data"
    conf = tmp_path / "agent.toml"

    def write(serial: str) -> None:
        conf.write_text(f'[device]\nid = "van-017"\ndata_dir = "{data}"\n[uplink]\nport = 1\n'
                        f'[simulation]\nenabled = true\ndevices = "hardware"\nnoise = "microphone"\n'
                        f'[sensors.mic]\ndriver = "microphone"\ndevice = "sim"\nserial = "{serial}"\n')

    write("MIC-A")
    with CalibrationStore.for_data_dir(data) as s:  # the capsule MIC-B was calibrated on the bench
        s.confirm(s.add("noise", "MIC-B", "acoustic", {"offset_db": 1.3}, technician="t").id)
    cfg, svc = load_full_config(conf)
    rt = Runtime(cfg, svc, config_path=conf, notifier=Notifier(""))
    try:
        def mic() -> Any:
            (d,) = [d for d in rt.agent.drivers if d.name == "mic"]
            d.inner.refresh()
            return d.inner

        assert mic().sc.serial == "MIC-A" and mic().record is None
        write("MIC-B")  # the technician swapped the capsule and edited the file; then SIGHUP
        result = rt.reload()
        assert result is not None and result.rebuilt == ["mic"]
        assert mic().sc.serial == "MIC-B" and mic().record.id == "noise:MIC-B:v1"
    finally:
        rt.close()
