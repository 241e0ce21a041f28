"""The I2C seam (byte order, retries, the fake bus) and the ADS1115 driver
against its register model."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.ads1115 import (
    ADS1115,
    Mux,
    counts_to_volts,
    parse_mux,
    single_shot_config,
    swap16,
    to_signed16,
)
from drivers.i2c import BusRetry, FakeI2CBus, I2CBus, SMBusAdapter
from core.clock import SimClock
from core.errors import BusError, ConfigError, ReadError, RecoverableError, SensorTimeout
from simulator.i2c_devices import FakeADS1115


class EchoDevice:
    """A device model that answers fixed bytes and records writes: to test the bus itself."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.writes: list[tuple[int, bytes]] = []

    def read_register(self, register: int, length: int) -> bytes:
        return self.answer[:length]

    def write_register(self, register: int, data: bytes) -> None:
        self.writes.append((register, data))


def make_adc(*, fsr_v: float = 4.096, data_rate: int = 128, **fake_kw):
    clock = SimClock(0.0)
    fake = FakeADS1115(clock=clock, **fake_kw)
    bus = FakeI2CBus({0x49: fake})
    adc = ADS1115(bus, fsr_v=fsr_v, data_rate=data_rate, clock=clock)
    return adc, fake, bus, clock


# ----------------------------------------------------------------- the bus


def test_fake_bus_word_read_is_little_endian_like_smbus():
    dev = EchoDevice(b"\x12\x34")  # 0x12 is the first byte on the wire
    bus = FakeI2CBus({0x20: dev})
    assert bus.read_word_data(0x20, 0) == 0x3412
    assert bus.read_i2c_block_data(0x20, 0, 2) == [0x12, 0x34]
    assert bus.read_byte_data(0x20, 0) == 0x12


def test_fake_bus_word_write_sends_low_byte_first():
    dev = EchoDevice(b"")
    bus = FakeI2CBus({0x20: dev})
    bus.write_word_data(0x20, 1, 0x1234)
    bus.write_i2c_block_data(0x20, 2, [0x12, 0x34])
    assert dev.writes == [(1, b"\x34\x12"), (2, b"\x12\x34")]
    assert [t.data for t in bus.log] == [b"\x34\x12", b"\x12\x34"]


def test_fake_bus_is_an_i2cbus_and_missing_address_nacks():
    bus = FakeI2CBus()
    assert isinstance(bus, I2CBus)
    assert isinstance(SMBusAdapter(1), I2CBus)
    with pytest.raises(OSError) as exc:
        bus.read_byte_data(0x50, 0)
    assert exc.value.errno == errno.EREMOTEIO


def test_fake_bus_rejects_out_of_range_values():
    bus = FakeI2CBus({0x20: EchoDevice(b"")})
    with pytest.raises(ValueError):
        bus.write_byte_data(0x20, 0, 256)
    with pytest.raises(ValueError):
        bus.write_word_data(0x20, 0, 0x10000)


def test_swap_and_sign_helpers():
    assert swap16(0x3412) == 0x1234
    assert swap16(swap16(0xBEEF)) == 0xBEEF
    assert to_signed16(0x7FFF) == 32767
    assert to_signed16(0x8000) == -32768
    assert to_signed16(0xFFFF) == -1
    assert counts_to_volts(-32768, 2.048) == -2.048
    assert counts_to_volts(16384, 4.096) == 2.048


# ----------------------------------------------------------------- retries


def test_retry_recovers_and_counts():
    sleeps: list[float] = []
    retry = BusRetry(3, backoff_s=0.01, sleep=sleeps.append)
    calls = {"n": 0}

    def flaky() -> int:
        calls["n"] += 1
        if calls["n"] < 3:
            raise OSError(errno.EIO, "glitch")
        return 42

    assert retry.call("op", flaky) == 42
    assert retry.stats.retries == 2
    assert retry.stats.failures == 0
    assert retry.stats.transactions == 1
    assert sleeps == [0.01, 0.02]


def test_retry_gives_up_with_bus_error_which_is_recoverable():
    retry = BusRetry(2, sleep=lambda s: None)

    def dead() -> None:
        raise OSError(errno.EREMOTEIO, "nack")

    with pytest.raises(BusError) as exc:
        retry.call("read thing", dead)
    assert isinstance(exc.value, ReadError) and isinstance(exc.value, RecoverableError)
    assert "read thing" in str(exc.value)
    assert isinstance(exc.value.__cause__, OSError)
    assert retry.stats.failures == 1 and retry.stats.retries == 1


def test_retry_does_not_swallow_programming_errors():
    retry = BusRetry(3, sleep=lambda s: None)

    def broken() -> None:
        raise TypeError("bug")

    with pytest.raises(TypeError):
        retry.call("op", broken)
    assert retry.stats.retries == 0


def test_smbus_adapter_opens_lazily_and_missing_bus_is_a_bus_error():
    adapter = SMBusAdapter(bus_number=987)  # no /dev/i2c-987 anywhere: construction must not care
    adc = ADS1115(adapter, clock=SimClock(0.0))
    with pytest.raises(BusError):
        adc.read_volts("AIN0")
    assert adc.stats.retries == adc.retry.attempts - 1
    adapter.close()


# ----------------------------------------------------------------- ADS1115


def test_reads_volts_with_correct_byte_order():
    adc, fake, _, _ = make_adc(fsr_v=4.096)
    fake.set_voltage(0, 1.0)  # 1.0 V / 4.096 V * 32768 = 8000 = 0x1F40
    assert adc.read_counts("AIN0") == 8000
    # Had the driver not swapped, it would have read 0x401F = 16415 counts.
    assert adc.read_volts("AIN0") == pytest.approx(1.0, abs=1e-12)


def test_config_word_goes_big_endian_on_the_wire():
    adc, fake, bus, _ = make_adc(fsr_v=2.048, data_rate=128)
    fake.set_voltage(1, 0.5)
    adc.read_volts("AIN1")
    expected = 0x8000 | (0b101 << 12) | (0b010 << 9) | 0x100 | (0b100 << 5) | 0b11
    assert expected == single_shot_config(Mux.AIN1, 2, 4) == 0xD583
    write = next(t for t in bus.log if t.op == "write_word_data")
    assert (write.register, write.data) == (1, b"\xd5\x83")  # high byte first, as the chip wants
    assert fake.regs[1] == 0x5583  # stored without OS; OS reads 1 once idle
    assert adc.read_config() == 0xD583


def test_negative_differential_input_is_signed():
    adc, fake, _, _ = make_adc(fsr_v=2.048)
    fake.set_voltage(0, 0.25)
    fake.set_voltage(1, 0.75)
    assert adc.read_counts("AIN0-AIN1") == -8000
    assert adc.read_volts(Mux.DIFF_0_1) == pytest.approx(-0.5)


def test_full_scale_saturates():
    adc, fake, _, _ = make_adc(fsr_v=4.096)
    fake.set_voltage(2, 5.0)
    assert adc.read_counts(2) == 32767
    fake.set_voltage(2, -5.0)  # single-ended against GND, saturates negative too
    assert adc.read_counts(2) == -32768


def test_pga_per_call_and_default():
    adc, fake, _, _ = make_adc(fsr_v=0.256)
    fake.set_voltage(3, 0.1)
    assert adc.read_counts("AIN3") == 12800  # 0.1 / 0.256 * 32768
    assert adc.read_counts("AIN3", fsr_v=6.144) == round(0.1 / 6.144 * 32768)
    assert adc.read_volts("AIN3", fsr_v=1.024) == pytest.approx(0.1, abs=1.024 / 32768)


def test_source_callable_drives_the_inputs():
    adc, fake, _, _ = make_adc(fsr_v=4.096)
    fake.source = lambda ch: 0.5 * (ch + 1)
    assert [round(adc.read_volts(ch), 6) for ch in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert adc.read_volts("AIN2-AIN3") == pytest.approx(-0.5)


def test_waits_for_conversion_on_the_injected_clock():
    adc, fake, _, clock = make_adc(data_rate=8)
    fake.set_voltage(0, 1.0)
    t0 = clock.monotonic()
    adc.read_volts("AIN0")
    assert clock.monotonic() - t0 >= 1 / 8  # one 8 SPS conversion period, simulated
    assert clock.monotonic() - t0 < 1 / 8 + 0.02
    assert fake.conversions == 1


def test_polls_os_bit_until_ready():
    clock = SimClock(0.0)
    fake = FakeADS1115(busy_polls=3)  # no clock: busy for 3 config reads
    bus = FakeI2CBus({0x49: fake})
    adc = ADS1115(bus, clock=clock)
    fake.set_voltage(0, 1.0)
    assert adc.read_volts("AIN0") == pytest.approx(1.0)
    config_reads = [t for t in bus.log if t.op == "read_word_data" and t.register == 1]
    assert len(config_reads) == 4  # 3 busy answers, then ready


def test_conversion_timeout():
    adc, fake, _, clock = make_adc(data_rate=860, stuck=True)
    t0 = clock.monotonic()
    with pytest.raises(SensorTimeout):
        adc.read_volts("AIN0")
    assert clock.monotonic() - t0 == pytest.approx(adc.timeout_s, abs=0.002)


def test_bus_errors_are_retried_and_reported():
    adc, fake, bus, _ = make_adc()
    fake.set_voltage(0, 1.0)
    bus.fail_next(2, addr=0x49)
    assert adc.read_volts("AIN0") == pytest.approx(1.0)
    assert adc.stats.retries == 2
    assert adc.stats.failures == 0


def test_bus_errors_beyond_the_retry_budget_raise_bus_error():
    adc, _, bus, _ = make_adc()
    bus.fail_next(adc.retry.attempts)
    with pytest.raises(BusError):
        adc.read_volts("AIN0")
    assert adc.stats.failures == 1
    # the bus is fine again: the next read works
    assert adc.read_volts("AIN0") == 0.0


def test_wrong_address_is_a_bus_error():
    clock = SimClock(0.0)
    bus = FakeI2CBus({0x49: FakeADS1115()})
    adc = ADS1115(bus, address=0x4A, clock=clock)
    with pytest.raises(BusError):
        adc.read_volts("AIN0")


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"fsr_v": 3.3}, "ads1115.fsr"),
        ({"data_rate": 100}, "ads1115.data_rate"),
        ({"address": 0x50}, "ads1115.address"),
    ],
)
def test_bad_configuration_is_a_config_error(kwargs, key):
    with pytest.raises(ConfigError) as exc:
        ADS1115(FakeI2CBus(), clock=SimClock(0.0), **kwargs)
    assert exc.value.key == key


def test_parse_mux():
    assert parse_mux("ain0") == Mux.AIN0
    assert parse_mux(3) == Mux.AIN3
    assert parse_mux("AIN1-AIN3") == Mux.DIFF_1_3
    assert parse_mux(Mux.DIFF_2_3) == Mux.DIFF_2_3
    for bad in ("AIN4", "AIN1-AIN2", 7, "x"):
        with pytest.raises(ConfigError):
            parse_mux(bad)


def test_fake_chip_rejects_what_the_chip_rejects():
    fake = FakeADS1115()
    with pytest.raises(OSError):
        fake.write_register(0, b"\x00\x00")  # conversion register is read-only
    with pytest.raises(OSError):
        fake.read_register(4, 2)
    assert fake.read_register(1, 2) == b"\x85\x83"  # power-on config 0x8583


@settings(max_examples=60, deadline=None)
@given(
    volts=st.floats(min_value=-2.0, max_value=2.0, allow_nan=False),
    fsr=st.sampled_from([6.144, 4.096, 2.048]),
)
def test_round_trip_within_one_lsb(volts, fsr):
    adc, fake, _, _ = make_adc(fsr_v=fsr, data_rate=860)
    fake.set_voltage(0, volts)
    fake.set_voltage(1, 0.0)
    assert abs(adc.read_volts("AIN0-AIN1") - volts) <= fsr / 32768
