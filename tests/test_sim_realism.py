"""The simulated devices' values are never constants (issue #18): a constant compresses to nothing and
flattered the bytes per value. Read back the way the agent reads them: NMEA text, I2C registers."""

from __future__ import annotations

import datetime as dt

from drivers.i2c import BusRetry, FakeI2CBus
from drivers.nmea import parse_sentence
from drivers.sound_module import SoundLevelModule
from simulator.gps_device import FakeGpsReceiver, nmea_epoch
from simulator.gps_sky import SkyModel
from simulator.i2c_devices import FakeSoundModule
from simulator.pty_devices import GpsError


def _gga_fields(line: bytes) -> list[str]:
    return line.decode().split("*")[0].split(",")


def test_gps_fix_fields_vary_like_a_receivers():
    position = GpsError(seed=3)
    gps = FakeGpsReceiver(position, utc_origin=dt.datetime(2026, 12, 6, 8, tzinfo=dt.timezone.utc),
                          sky=SkyModel(3).at)
    alts, hdops, used, speeds, courses, lats = set(), set(), set(), set(), set(), set()
    for t in range(300):
        lines = nmea_epoch(gps.state_at(float(t)))
        for line in lines:
            rec = parse_sentence(line)  # the driver's own parser accepts what the simulator sends
            assert rec is not None
        gga = next(_gga_fields(line) for line in lines if line[3:6] == b"GGA")
        used.add(int(gga[7]))
        hdops.add(gga[8])
        alts.add(gga[9])
        rmc = next(_gga_fields(line) for line in lines if line[3:6] == b"RMC")
        speeds.add(rmc[7])
        courses.add(rmc[8])
        lats.add(rmc[3])
    assert len(alts) > 20 and len(hdops) > 10 and len(used) >= 3
    assert len(speeds) > 100 and len(courses) > 100 and len(lats) > 200


def test_sky_model_stays_plausible_and_is_deterministic():
    a, b = SkyModel(5), SkyModel(5)
    skies = [a.at(float(t)) for t in range(3600)]
    assert skies == [b.at(float(t)) for t in range(3600)]
    assert all(4 <= s.sats_used <= s.sats_in_view <= 24 for s in skies)
    assert all(0.5 <= s.hdop < 5 and s.vdop > s.hdop and abs(s.altitude - 2.0) < 30 for s in skies)


def test_sound_module_extremes_differ_from_the_level_within_a_second():
    fake = FakeSoundModule(source=lambda: 62.0, fluctuation_db=3.0, seed=1)
    drv = SoundLevelModule(FakeI2CBus({0x48: fake}), reset_each_read=True, retry=BusRetry(sleep=lambda s: None))
    readings = [drv.read().values for _ in range(120)]  # type: ignore[union-attr]
    assert all(r["lamin"] <= r["laeq"] <= r["lamax"] for r in readings)
    assert sum(r["lamin"] < r["laeq"] < r["lamax"] for r in readings) > 100
    assert len({r["lamax"] for r in readings}) > 3 and len({r["lamin"] for r in readings}) > 3


def test_without_fluctuation_the_module_is_as_before():
    fake = FakeSoundModule(source=lambda: 62.0)
    drv = SoundLevelModule(FakeI2CBus({0x48: fake}), reset_each_read=True, retry=BusRetry(sleep=lambda s: None))
    assert drv.read().values == {"laeq": 62.0, "lamin": 62.0, "lamax": 62.0}  # type: ignore[union-attr]
