"""Issue 15 point 3: products select by quantity and unit, never by a section name.

A van may call its sensor tables anything (``[sensors.pms5003]``, ``[sensors.nox]``):
the maps, exports and API must still find its PM2.5, PM10 and NO2, because the value
keys (``pm25``, ``pm10``, ``no2_ppb``) name the quantity and fix the unit.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from edge.cli import main as edge_cli
from receiver import dbapi
from receiver.aggregate import QUANTITIES, Period, Rule, build, usable_values
from receiver.config import ReceiverConfig
from receiver.export import measurements
from receiver.flag_policy import FlagPolicy
from receiver.mapunits import make_snapper
from receiver.mqtt_consumer import ReceiverService
from simulator.fleet import default_shift_start, van_config

RENAMED = {"[sensors.pm]": "[sensors.pms5003]", "[sensors.no2]": "[sensors.nox]"}


def renamed_van(device: str, data_dir: Path, port: int, hours: float) -> str:
    """The fleet's hardware van (real drivers over simulated devices), sections renamed."""
    text = van_config(device, data_dir, port, seed=11, hours=hours, offset_m=0.0,
                      start_utc=default_shift_start(), devices="hardware", noise="module")
    for old, new in RENAMED.items():
        assert old in text  # the fleet's names: renaming must really happen
        text = text.replace(old, new)
    # The PCB Artists module set to C weighting: its levels must arrive as LCeq, not LAeq.
    assert 'driver = "sound-module"\n' in text
    return text.replace('driver = "sound-module"\n', 'driver = "sound-module"\nweighting = "C"\n')


def test_values_are_selected_by_key_whatever_the_sensor_name() -> None:
    assert usable_values("pms5003", {"pm25": 5, "pm10": 8, "pm1": 2}, "") == {"pm25": 5.0, "pm10": 8.0}
    assert usable_values("nox", {"no2_ppb": 12.5, "no2_we_mv": 300}, "") == {"no2_ppb": 12.5}
    # A sound module set to C weighting: its level is LCeq, never mistaken for LAeq.
    assert usable_values("street", {"lceq": 70.0, "lcmax": 80.0}, "") == {"lceq": 70.0}
    assert QUANTITIES["lceq"].unit == "dB(C)" and QUANTITIES["laeq"].unit == "dB(A)"
    # GPS and calibration records are no measurement even if a key looked like one.
    assert usable_values("gps", {"pm25": 5}, "") == {}


def test_config_check_is_quiet_about_free_section_names_and_explains_unknown_drivers(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(renamed_van("van-names", tmp_path / "van", 1883, 0.1))
    res = CliRunner().invoke(edge_cli, ["config", "check", str(good)])
    assert res.exit_code == 0, res.stderr
    assert "warning" not in res.stderr and "OK" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('driver = "pms5003"', 'driver = "pms5004"'))
    res = CliRunner().invoke(edge_cli, ["config", "check", str(bad)])
    assert res.exit_code != 0
    # Names the key, suggests the near miss and says what the known drivers measure.
    assert "sensors.pms5003.driver" in res.stderr and "did you mean 'pms5003'" in res.stderr
    assert "PM2.5" in res.stderr and "NO2" in res.stderr and "section name is free" in res.stderr


def test_renamed_sections_reach_the_map_through_agent_and_receiver(tmp_path: Path, mosquitto) -> None:
    store = tmp_path / "store.sqlite"
    svc = ReceiverService(ReceiverConfig(store=str(store), port=mosquitto.port, client_id="rx-names"))
    svc.start()
    try:
        assert svc.subscribed.wait(10)
        vdir = tmp_path / "van"
        vdir.mkdir()
        cfg = vdir / "agent.toml"
        cfg.write_text(renamed_van("van-names", vdir, mosquitto.port, hours=0.1))
        agent = subprocess.run([sys.executable, "-m", "edge.cli", "run", "--config", str(cfg)],
                               capture_output=True, timeout=300)
        assert agent.returncode == 0, agent.stderr.decode()[-2000:]
        conn = dbapi.connect(store)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the agent drains before it exits; derivation may lag
            sensors = dict(dbapi.fetchall(conn, "SELECT sensor, count(*) FROM samples GROUP BY sensor"))
            if sensors.get("pms5003") and sensors.get("nox"):
                break
            time.sleep(0.5)
        # Every driver labels its samples with the section's name (the case of the issue), never
        # "pm" or "no2": the receiver finds them by their keys.
        assert "pms5003" in sensors and "pm" not in sensors, sensors
        assert "nox" in sensors and "no2" not in sensors, sensors
        # This van has no RH sensor (a PMS5003 and an ISB NO2 send none): its PM is flagged
        # rh_missing and the default policy leaves it out (issue 15, tester v15). Names are the
        # point here, so the map is built with a policy that keeps those values.
        flags = {f for (f,) in dbapi.fetchall(conn, "SELECT flags FROM quality WHERE quantity = 'pm25'")}
        assert flags and all("rh_missing" in f.split(",") for f in flags), flags
        keep_wet = FlagPolicy(FlagPolicy().exclude, FlagPolicy().exclude_pm - {"rh_missing"})
        (rep,) = build(conn, make_snapper("segment"), [Period("all")], rule=Rule(1, 1), policy=keep_wet)
        rows = dbapi.fetchall(conn, "SELECT quantity, unit, count(*) FROM aggregates"
                                    " WHERE scheme = 'segment' AND published = 1 GROUP BY quantity, unit")
        got = {(q, u): n for q, u, n in rows}
        for q, u in (("pm25", "µg/m³"), ("pm10", "µg/m³"), ("no2_ppb", "ppb"), ("lceq", "dB(C)")):
            assert got.get((q, u), 0) > 5, got  # map units, for a 6-minute drive
        assert not any(q == "laeq" for q, _ in got), got  # C-weighted levels are never mapped as A
        # The measurement export finds them by quantity too.
        seen = {r["quantity"] for r in measurements(conn, device="van-names")}
        assert {"pm25", "pm10", "no2_ppb"} <= seen
        conn.close()
    finally:
        svc.stop()


def test_every_driver_says_what_it_measures() -> None:
    from edge.driver_factory import FACTORIES, MEASURES

    assert sorted(d for ds in MEASURES.values() for d in ds) == sorted(FACTORIES)


def test_sound_module_names_its_levels_for_its_weighting() -> None:
    from tests.test_sound_module import rig

    for weighting, keys in (("A", {"laeq", "lamin", "lamax"}), ("C", {"lceq", "lcmin", "lcmax"}),
                            ("Z", {"lzeq", "lzmin", "lzmax"})):
        drv, _, _ = rig(weighting=weighting)
        r = drv.read()
        assert set(r.values) == keys, weighting
        assert set(usable_values("noise", r.values, "")) == {f"l{weighting.lower()}eq"}
