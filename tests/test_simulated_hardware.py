"""The real drivers, built from configuration, over a van's simulated hardware."""

from __future__ import annotations

import pytest

from core.clock import SimClock
from edge.config import SensorConfig, parse_config
from core.errors import ConfigError
from edge.driver_factory import build_drivers
from simulator.fleet import HARDWARE_SENSORS, NOISE_MICROPHONE, NOISE_MODULE
from simulator.hardware import SimulatedHardware
from simulator.world import VanWorld

T0 = 1_795_000_000.0


@pytest.fixture
def van():
    clock = SimClock(T0)
    world = VanWorld(clock, shift_start_utc=T0, seed=3)
    hw = SimulatedHardware(world, clock, seed=3, noise="microphone")
    yield clock, world, hw
    hw.close()


def sensors(extra=None):
    cfg = parse_config({"sensors": {**HARDWARE_SENSORS, **(extra or {})}})
    return cfg.sensors


def run(clock, drivers, seconds):
    out = {d.name: [] for d in drivers}
    for _ in range(seconds):
        for d in drivers:
            r = d.read()
            if r is not None:
                out[d.name].append(r)
        clock.sleep(1.0)
    return out


def test_real_drivers_read_the_simulated_world(van):
    clock, world, hw = van
    drivers = build_drivers(sensors({"noise": NOISE_MODULE}), {"clock": clock, "world": world, "hardware": hw})
    try:
        got = run(clock, drivers, 90)
    finally:
        for d in drivers:
            d.close()
    air = world.truth().air
    pm = [r for r in got["pm"] if "warming_up" not in r.flags]
    assert len(got["pm"]) >= 85 and pm, "the PMS answered its passive reads"
    assert any("warming_up" in r.flags for r in got["pm"][:25])
    assert abs(pm[-1].values["pm25"] - air.pm25) < max(5.0, 0.5 * air.pm25)
    no2 = got["no2"][-1].values
    # the ADS1115 volts went through AAN 803 algorithm 1 back to about the true level
    assert abs(no2["no2_ppb"] - air.no2_ppb) < 10
    assert 250 < no2["no2_we_mv"] < 400 and abs(no2["no2_temp_c"] - air.temp_c) < 0.2
    gps = got["gps"]
    assert gps, "fixes after the receiver's time to first fix"
    last = gps[-1].values
    van_now = world.truth_at(T0 + 89).van
    assert abs(last["lat"] - van_now.lat) < 0.001 and abs(last["lon"] - van_now.lon) < 0.001
    assert len(got["noise"]) >= 85 and 30 < got["noise"][-1].values["laeq"] < 100


def test_microphone_meter_keeps_pace_with_virtual_time(van):
    clock, world, hw = van
    drivers = build_drivers(
        parse_config({"sensors": {"noise": NOISE_MICROPHONE}}).sensors,
        {"clock": clock, "world": world, "hardware": hw},
    )
    try:
        got = run(clock, drivers, 70)
    finally:
        for d in drivers:
            d.close()
    levels = got["noise"]
    assert len(levels) >= 68  # one per virtual second, however fast the loop runs
    truth = world.truth_at(T0 + 60).air.noise_laeq_db
    assert abs(levels[60].values["laeq"] - truth) < 3.0
    assert any("la90" in r.values for r in levels)  # the minute statistics arrived


@pytest.mark.parametrize(
    "sc, key",
    [
        (SensorConfig("pm", "pms5003", {"port": "sim:pm", "speed": 1}), "sensors.pm.speed"),
        (SensorConfig("pm", "pms5003", {}), "sensors.pm.port"),
        (SensorConfig("pm", "pms5003", {"port": "sim:pm", "mode": "turbo"}), "sensors.pm.mode"),
        (SensorConfig("no2", "no2-b43f", {"bus": 1}), "sensors.no2.serial"),
        (SensorConfig("no2", "no2-b43f", {"bus": "one", "serial": "x"}), "sensors.no2.bus"),
        (SensorConfig("no2", "no2-b43f", {"bus": 1, "serial": "x"}), "sensors.no2.calibration_file"),
        (SensorConfig("gps", "nmea-gps", {"port": "sim:gps"}), "sensors.gps.port"),
        (SensorConfig("x", "laser-cannon", {}), "sensors.x.driver"),
    ],
)
def test_bad_sensor_options_name_the_key(sc, key):
    with pytest.raises(ConfigError) as exc:
        build_drivers([sc], {"clock": SimClock(T0)})
    assert exc.value.key == key
