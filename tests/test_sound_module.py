"""PCB Artists I2C sound level module driver against its register model."""

from __future__ import annotations

import pytest

from drivers.ads1115 import ADS1115
from drivers.base import SensorDriver
from drivers.i2c import BusRetry, FakeI2CBus
from drivers.sound_module import SoundLevelModule, averaging_bytes, control_with_weighting
from core.clock import SimClock
from core.errors import BusError, ConfigError
from simulator.i2c_devices import FakeADS1115, FakeSoundModule


def rig(levels=(55.0,), **kw):
    seq = iter(levels)
    last = {"v": levels[-1]}

    def source() -> float:
        last["v"] = next(seq, last["v"])
        return last["v"]

    fake = FakeSoundModule(source=source)
    bus = FakeI2CBus({0x48: fake})
    kw.setdefault("retry", BusRetry(sleep=lambda s: None))
    return SoundLevelModule(bus, **kw), fake, bus


def test_is_a_sensor_driver_and_reads_levels():
    drv, fake, _ = rig([62.0])
    assert isinstance(drv, SensorDriver)
    r = drv.read()
    assert r is not None
    assert r.sensor == drv.name == "sound_module"  # labelled by its section name
    assert r.values == {"laeq": 62.0, "lamin": 62.0, "lamax": 62.0}
    assert r.meta["weighting"] == "A" and r.meta["averaging_ms"] == 1000


def test_min_max_track_since_reset():
    drv, _, _ = rig([60.0, 48.0, 71.0, 65.0])
    values = [drv.read().values for _ in range(4)]
    assert [v["laeq"] for v in values] == [60.0, 48.0, 71.0, 65.0]
    assert values[-1]["lamin"] == 48.0 and values[-1]["lamax"] == 71.0


def test_reset_each_read_gives_per_interval_extremes():
    drv, fake, _ = rig([60.0, 48.0, 71.0, 65.0], reset_each_read=True)
    drv.read()
    drv.read()
    drv.read()
    r = drv.read()
    assert r.values == {"laeq": 65.0, "lamin": 65.0, "lamax": 65.0}
    assert fake.resets.count(0b0010) == 1 + 4  # once at configure, then after every read


def test_zero_level_means_not_computed_yet():
    drv, fake, _ = rig([0.0])
    assert drv.read() is None
    fake.source = None
    fake.level_db = 58.0
    assert drv.read().values["laeq"] == 58.0


def test_configure_writes_weighting_and_averaging_high_byte_first():
    drv, fake, bus = rig(weighting="C", averaging_ms=125)
    drv.read()
    assert fake.weighting == "C"
    assert fake.regs[0x06] == 0b100
    assert fake.averaging_ms == 125
    writes = [(t.register, t.data) for t in bus.log if t.op == "write_byte_data"]
    tavg = [w for w in writes if w[0] in (0x07, 0x08)]
    assert tavg == [(0x07, b"\x00"), (0x08, b"\x7d")]
    assert (0x09, b"\x02") in writes  # min/max cleared after power-on pop


def test_averaging_over_255_ms_splits_into_two_bytes():
    drv, fake, _ = rig(averaging_ms=1000)
    drv.configure()
    assert fake.averaging_ms == 1000
    assert (fake.regs[0x07], fake.regs[0x08]) == (0x03, 0xE8)
    drv.set_averaging_ms(300)
    assert fake.averaging_ms == 300
    assert averaging_bytes(300) == (0x01, 0x2C)


@pytest.mark.parametrize("weighting, bits", [("Z", 0b000), ("A", 0b010), ("c", 0b100)])
def test_each_weighting(weighting, bits):
    drv, fake, _ = rig(weighting=weighting)
    r = drv.read()
    assert fake.regs[0x06] == bits
    assert r.meta["weighting"] == weighting.upper()


def test_weighting_change_keeps_interrupt_bits():
    drv, fake, _ = rig()
    fake.regs[0x06] = 0b11010  # interrupt type + enable + A
    drv.set_weighting("Z")
    assert fake.regs[0x06] == 0b11000
    assert control_with_weighting(0b11011, "C") == 0b11100  # never writes power-down back


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError) as exc:
        rig(weighting="B")
    assert exc.value.key == "noise.weighting"
    for ms in (0, 70000, 12.5):
        with pytest.raises(ConfigError) as exc:
            rig(averaging_ms=ms)
        assert exc.value.key == "noise.averaging_ms"


def test_bus_errors_retried_and_reported():
    drv, _, bus = rig([60.0])
    bus.fail_next(2)
    r = drv.read()
    assert r.values["laeq"] == 60.0
    assert r.meta["bus_retries"] == 2
    bus.fail_next(3)
    with pytest.raises(BusError):
        drv.read()
    assert drv.stats.failures == 1


def test_module_absent_is_a_bus_error():
    drv = SoundLevelModule(FakeI2CBus(), retry=BusRetry(sleep=lambda s: None))
    with pytest.raises(BusError):
        drv.read()


def test_shares_the_bus_with_the_adc_at_0x49():
    clock = SimClock(0.0)
    adc_fake = FakeADS1115(clock=clock)
    adc_fake.set_voltage(0, 1.0)
    bus = FakeI2CBus({0x48: FakeSoundModule(level_db=50.0), 0x49: adc_fake})
    snd = SoundLevelModule(bus)
    adc = ADS1115(bus, clock=clock)  # default address 0x49
    assert snd.read().values["laeq"] == 50.0
    assert adc.read_volts("AIN0") == pytest.approx(1.0)
    assert {t.addr for t in bus.log} == {0x48, 0x49}
