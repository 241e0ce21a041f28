"""SPEC DGS-NO2: line parsing as a pure function, and the driver over a real pty simulator."""

from __future__ import annotations

import time

import pytest
import serial

from drivers.base import SensorDriver
from drivers.dgs_no2 import (
    DgsNo2,
    eeprom_sensitivity_na_per_ppm,
    eeprom_serial,
    is_firmware_date,
    parse_eeprom,
    parse_reading_line,
)
from core.clock import SimClock
from core.errors import BusError, ConfigError, FrameError, ReadError, SensorTimeout
from simulator.dgs_device import DgsSimulator

LINE = b"012017030207, 27, 23, 38, 25712, 25344, 21524, 01, 02, 03, 04\r\n"

# ------------------------------------------------------------------ pure parsing


def test_parse_reading_line():
    d = parse_reading_line(LINE)
    assert d.serial == "012017030207"  # kept as text: leading zeros matter
    assert (d.ppb, d.temp_c, d.rh_pct) == (27.0, 23.0, 38.0)
    assert (d.adc_raw, d.temp_raw, d.rh_raw) == (25712, 25344, 21524)
    assert (d.days, d.hours, d.minutes, d.seconds) == (1, 2, 3, 4)
    assert d.uptime_s == 86400 + 2 * 3600 + 3 * 60 + 4


def test_parse_accepts_str_negative_ppb_and_decimals():
    d = parse_reading_line("111717020111, -3, 21.5, 40.2, 25712, 25344, 21524, 00, 00, 01, 38")
    assert d.ppb == -3.0 and d.temp_c == 21.5 and d.rh_pct == 40.2


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\r\n",
        b"hello world\r\n",
        b"012017030207, 27, 23, 38, 25712, 25344, 21524, 01, 02, 03\r\n",  # 10 fields
        b"012017030207, 27, 23, 38, 25712, 25344, 21524, 01, 02, 03, 04, 05\r\n",  # 12 fields
        b"012017030207,27,23,38,25712,25344,21524,01,02,03,04\r\n",  # wrong separator
        b"012017030207, 2x7, 23, 38, 25712, 25344, 21524, 01, 02, 03, 04\r\n",  # ppb not a number
        b"012017030207, nan, 23, 38, 25712, 25344, 21524, 01, 02, 03, 04\r\n",
        b"012017030207, 27, 23, 38, 25712, 25344, 21524, 01, 25, 03, 04\r\n",  # hour 25
        b"012017030207, 27, 23, 138, 25712, 25344, 21524, 01, 02, 03, 04\r\n",  # RH 138 %
        b"012017030207, 27, 130, 38, 25712, 25344, 21524, 01, 02, 03, 04\r\n",  # 130 °C
        b"012017030207, 27, 23, 38, 25712, 25344, 21524, 01, 02, 61, 04\r\n",  # minute 61
        b"012017030207, 27, 23, 38, -5, 25344, 21524, 01, 02, 03, 04\r\n",  # negative raw count
        b"0120\xff7030207, 27, 23, 38, 25712, 25344, 21524, 01, 02, 03, 04\r\n",  # non-ASCII
        b"0120 17030207, 27, 23, 38, 25712, 25344, 21524, 01, 02, 03, 04\r\n",  # bad serial
        b"\x00\xff#@!garbage, 12, x\xfe\r\n",
        b"1" * 400,
    ],
)
def test_garbage_is_a_frame_error(garbage):
    with pytest.raises(FrameError):
        parse_reading_line(garbage)


def test_frame_error_is_a_recoverable_read_error():
    with pytest.raises(ReadError):
        parse_reading_line(b"junk")


def test_parse_eeprom_and_its_fields():
    ee = parse_eeprom(
        [
            b"Serial_Number = 012017030207\r\n",
            "Gas=NO2",
            "no equals here",
            b"\xff\xfe",
            "Sensitivity_Code=-25.03",
        ]
    )
    assert ee == {"Serial_Number": "012017030207", "Gas": "NO2", "Sensitivity_Code": "-25.03"}
    assert eeprom_serial(ee) == "012017030207"
    assert eeprom_sensitivity_na_per_ppm(ee) == -25.03
    assert eeprom_sensitivity_na_per_ppm({"nA_per_PPM_x100": "-2503"}) == pytest.approx(-25.03)
    assert eeprom_sensitivity_na_per_ppm({}) is None


def test_firmware_date():
    assert is_firmware_date(b"15SEP17\r\n")
    assert is_firmware_date("25SEP17")
    assert not is_firmware_date(LINE)
    assert not is_firmware_date(b"")
    assert not is_firmware_date("15XYZ17")


# ------------------------------------------------------------------ over the pty


@pytest.fixture
def open_driver():
    """Start a simulator, open its pty like a real port, build the driver; clean everything up."""
    made: list[tuple[DgsSimulator, DgsNo2]] = []

    def _open(generation: str = "new", *, mode: str = "on_demand", sim_kw=None, **drv_kw):
        sim = DgsSimulator(generation=generation, interval_s=0.02, **(sim_kw or {})).start()
        port = serial.serial_for_url(sim.port_name, baudrate=9600, timeout=0.3)
        clock = drv_kw.pop("clock", None) or SimClock(1_700_000_000.0)
        drv = DgsNo2(
            port, clock=clock, mode=mode, reply_timeout_s=0.3, eeprom_quiet_s=0.08, **drv_kw
        )
        made.append((sim, drv))
        return sim, drv, clock

    yield _open
    for sim, drv in made:
        try:
            drv.close()
        except Exception:
            pass
        sim.stop()


def wait_for(read, timeout_s: float = 2.0):
    """Poll a streaming driver until it has a reading (it returns None until a line arrives)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = read()
        if r is not None:
            return r
        time.sleep(0.01)
    raise AssertionError("no reading arrived")


def eventually(cond, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        time.sleep(0.005)


def inject_and_wait(sim: DgsSimulator, drv: DgsNo2, data: bytes) -> None:
    """Write bytes as the module and wait until the host side can read all of them
    (the pty hands them over asynchronously)."""
    sim.inject(data)
    eventually(lambda: drv.port.in_waiting >= len(data))


def test_new_generation_probe(open_driver):
    sim, drv, _ = open_driver("new", sim_kw={"serial": "012017030299"})
    assert isinstance(drv, SensorDriver)
    info = drv.start()
    assert info.generation == "new"
    assert info.firmware == "15SEP17"
    assert info.serial == "012017030299"
    assert info.sensitivity_na_per_ppm == -25.03
    assert info.eeprom["Gas"] == "NO2"
    assert bytes(sim.received[:3]) == b"\rfe"


def test_new_generation_on_demand_reading_and_warm_up(open_driver):
    sim, drv, clock = open_driver("new", sim_kw={"ppb": 31.4, "temp_c": 24.0, "rh_pct": 51.0})
    r = drv.read()
    assert r.sensor == drv.name == "dgs_no2"  # labelled by its section name
    assert r.values == {"no2_ppb": 31.0, "no2_temp_c": 24.0, "no2_rh_pct": 51.0}
    assert r.flags == ("warming_up",)
    assert r.meta["generation"] == "new" and r.meta["firmware"] == "15SEP17"
    assert r.meta["mode"] == "on_demand"
    clock.advance(3599.0)
    assert drv.read().flags == ("warming_up",)
    clock.advance(1.0)
    assert drv.read().flags == ()


def test_warm_up_counts_from_the_given_power_on_time(open_driver):
    clock = SimClock(0.0)
    _, drv, _ = open_driver("new", clock=clock, powered_on_at=clock.monotonic() - 4000.0)
    assert drv.read().flags == ()


def test_new_generation_continuous_takes_the_newest_line(open_driver):
    values = iter(range(1, 10_000))
    sim, drv, _ = open_driver("new", mode="continuous", sim_kw={"ppb_source": lambda: next(values)})
    drv.start()
    r1 = wait_for(drv.read)
    assert sim.streaming
    assert r1.meta["mode"] == "continuous"
    # Let at least two more lines (~70 bytes each) queue up: only the newest is reported.
    eventually(lambda: drv.port.in_waiting >= 150)
    r2 = wait_for(drv.read)
    assert r2.values["no2_ppb"] > r1.values["no2_ppb"] + 1
    drv.close()
    eventually(lambda: not sim.streaming)  # any character stops the stream


def test_continuous_read_returns_none_when_nothing_new(open_driver):
    sim, drv, _ = open_driver("new", mode="continuous")
    sim.interval_s = 10.0
    drv.start()
    wait_for(drv.read)  # the first line comes right after 'c'
    assert drv.read() is None


def test_continuous_skips_garbage_lines_and_counts_them(open_driver):
    sim, drv, _ = open_driver("new", mode="continuous")
    sim.interval_s = 10.0
    drv.start()
    wait_for(drv.read)
    inject_and_wait(sim, drv, b"\x00\xffnoise\r\n" + sim.reading_line())
    r = drv.read()
    assert r is not None and r.values["no2_ppb"] == 25.0
    assert drv.frame_errors == 1
    inject_and_wait(sim, drv, b"total garbage\r\n")
    with pytest.raises(FrameError):
        drv.read()
    assert drv.frame_errors == 2


def test_continuous_noise_without_line_ends_is_dropped(open_driver):
    sim, drv, _ = open_driver("new", mode="continuous")
    sim.interval_s = 10.0
    drv.start()
    wait_for(drv.read)
    inject_and_wait(sim, drv, b"\xaa" * 300)
    with pytest.raises(FrameError):
        drv.read()
    inject_and_wait(sim, drv, sim.reading_line())
    assert drv.read() is not None


def test_legacy_generation_probe_and_reading(open_driver):
    sim, drv, _ = open_driver("legacy", sim_kw={"serial": "111717020111", "ppb": 12.0})
    info = drv.start()
    assert info.generation == "legacy"
    assert info.firmware is None
    assert info.serial == "111717020111"  # from the reading line: no EEPROM dump on legacy
    assert info.sensitivity_na_per_ppm is None
    r = drv.read()
    assert r.values["no2_ppb"] == 12.0
    assert r.meta["generation"] == "legacy"


def test_legacy_generation_cannot_stream_and_is_polled(open_driver):
    sim, drv, _ = open_driver("legacy", mode="continuous")
    drv.start()
    assert b"c" not in sim.received  # never asked: it would only answer one line
    r = drv.read()
    assert r is not None and r.meta["mode"] == "on_demand"


def test_garbled_reply_is_a_frame_error_then_recovers(open_driver):
    sim, drv, _ = open_driver("new")
    drv.start()
    sim.garble_next(1)
    with pytest.raises(FrameError):
        drv.read()
    assert drv.frame_errors == 1
    r = drv.read()
    assert r.values["no2_ppb"] == 25.0
    assert r.meta["frame_errors"] == 1


def test_legacy_garbled_reply(open_driver):
    sim, drv, _ = open_driver("legacy")
    drv.start()
    sim.garble_next(1)
    with pytest.raises(FrameError):
        drv.read()
    assert drv.read() is not None


def test_silent_module_times_out(open_driver):
    sim, drv, _ = open_driver("new")
    sim.silent = True
    with pytest.raises(SensorTimeout):
        drv.read()


def test_module_going_silent_after_start_times_out(open_driver):
    sim, drv, _ = open_driver("new")
    drv.start()
    sim.silent = True
    with pytest.raises(SensorTimeout):
        drv.read()
    sim.silent = False
    assert drv.read() is not None


def test_bad_mode_is_a_config_error():
    class NoPort:
        timeout = None

    with pytest.raises(ConfigError) as exc:
        DgsNo2(NoPort(), clock=SimClock(0.0), mode="sometimes")  # type: ignore[arg-type]
    assert exc.value.key == "dgs_no2.mode"


def test_port_failures_are_recoverable_bus_errors(open_driver):
    sim, drv, _ = open_driver("new")
    drv.start()

    def unplugged(*args, **kwargs):
        raise serial.SerialException("device disconnected")

    drv.port.write = unplugged  # type: ignore[method-assign]
    with pytest.raises(BusError):
        drv.read()


def test_works_on_a_port_without_readline(open_driver):
    """Wrappers (e.g. a reconnecting port) may offer only read/write/in_waiting."""
    sim, drv, _ = open_driver("new")
    real = drv.port

    class Minimal:
        def __init__(self) -> None:
            self.timeout = real.timeout

        @property
        def in_waiting(self) -> int:
            return real.in_waiting

        def read(self, size: int = 1) -> bytes:
            real.timeout = self.timeout
            return real.read(size)

        def write(self, data: bytes) -> int | None:
            return real.write(data)

        def reset_input_buffer(self) -> None:
            real.reset_input_buffer()

        def close(self) -> None:
            real.close()

    drv.port = Minimal()  # type: ignore[assignment]
    assert drv.start().generation == "new"
    assert drv.read().values["no2_ppb"] == 25.0


def test_legacy_that_ignores_f_is_still_recognised(open_driver):
    sim, drv, _ = open_driver("legacy", sim_kw={"legacy_any_char": False})
    info = drv.start()
    assert (info.generation, info.firmware) == ("legacy", None)
    assert drv.read().values["no2_ppb"] == 25.0
