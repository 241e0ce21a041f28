"""PCB Artists I2C sound level module (default address 0x48).

Registers (PCB Artists programming manual): 0x06 CONTROL (bits 2:1 weighting
00 Z / 01 A / 10 C, bit 0 power down, bits 7:5 reserved = 0), 0x07/0x08
averaging time in ms (TAVG high, TAVG low: write the high byte first, the
module applies the value on the low byte; 1000 = slow, 125 = fast), 0x09
RESET (bit 1 clears min/max, bit 2 clears history), 0x0A current level dB,
0x0B/0x0C min/max since reset, 0x14.. history of 100 levels.
A level register that reads 0 has not been computed yet and means "no value".

The module measures levels only; no audio ever crosses the bus.
"""

from __future__ import annotations

from collections.abc import Callable

from drivers.base import Reading
from drivers.i2c import BusRetry, BusStats, I2CBus
from drivers.options import DriverOptions, Option, i2c_address, i2c_bus
from core.errors import ConfigError

DEFAULT_ADDRESS = 0x48

REG_CONTROL = 0x06
REG_TAVG_HIGH = 0x07
REG_TAVG_LOW = 0x08
REG_RESET = 0x09
REG_DECIBEL = 0x0A
REG_MIN = 0x0B
REG_MAX = 0x0C

RESET_MIN_MAX = 0b0010
RESET_HISTORY = 0b0100

WEIGHTING_BITS = {"Z": 0b00, "A": 0b01, "C": 0b10}
_WEIGHTING_MASK = 0b110
_RESERVED_MASK = 0xE0

FAST_MS = 125
SLOW_MS = 1000


def level_keys(weighting: str) -> tuple[str, str, str]:
    """The value keys (Leq, min, max) for a weighting: ``laeq`` only when A-weighted.

    A C- or Z-weighted level is another quantity (low frequencies count in full), so it
    must never travel as ``laeq`` and be mapped as A-weighted noise (issue 15).
    """
    w = weighting.lower()
    return f"l{w}eq", f"l{w}min", f"l{w}max"


def control_with_weighting(control: int, weighting: str) -> int:
    """CONTROL with bits 2:1 set to ``weighting``.

    Interrupt bits are kept; reserved bits and power-down are cleared.
    """
    try:
        bits = WEIGHTING_BITS[weighting.upper()]
    except (KeyError, AttributeError):
        raise ConfigError("noise.weighting", f"{weighting!r} is not one of Z, A, C") from None
    # Power-down (bit 0) is cleared on purpose: writing it back as 1 would switch the module off.
    return (control & ~(_WEIGHTING_MASK | _RESERVED_MASK | 0x01)) | (bits << 1)


def averaging_bytes(ms: int) -> tuple[int, int]:
    """(high, low) bytes of the averaging time, in the order they must be written."""
    if not isinstance(ms, int) or not 1 <= ms <= 0xFFFF:
        raise ConfigError("noise.averaging_ms", f"{ms!r} is not an integer 1..65535 ms")
    return ms >> 8, ms & 0xFF


class SoundLevelModule:
    """``SensorDriver`` for the module: Reading(sensor=<section name>, values={laeq, lamin, lamax}).

    The keys follow the configured weighting: ``lceq lcmin lcmax`` for C, ``lzeq lzmin
    lzmax`` for Z (see :func:`level_keys`).

    Configuration (weighting, averaging time, an initial min/max reset) is
    written on the first read, so building the driver needs no bus. With
    ``reset_each_read`` the min/max are cleared after each read, making
    lamin/lamax the extremes of one sampling interval rather than since start.
    A 0 in a level register means the module has not computed it yet: a 0
    current level gives ``None``; a 0 min or max is left out of the values.
    """

    def __init__(
        self,
        bus: I2CBus,
        address: int = DEFAULT_ADDRESS,
        *,
        weighting: str = "A",
        averaging_ms: int = SLOW_MS,
        reset_each_read: bool = False,
        retry: BusRetry | None = None,
        sleep: Callable[[float], None] | None = None,
        name: str = "sound_module",
    ) -> None:
        self.bus = bus
        self.address = address
        self.weighting = weighting.upper() if isinstance(weighting, str) else weighting
        control_with_weighting(0, self.weighting)  # validate now: config errors are fatal at start
        averaging_bytes(averaging_ms)
        self.averaging_ms = averaging_ms
        self.reset_each_read = reset_each_read
        self.retry = retry or (BusRetry(sleep=sleep) if sleep else BusRetry())
        self.name = name
        self._configured = False
        self._names: dict[tuple[str, int], str] = {}

    @property
    def stats(self) -> BusStats:
        return self.retry.stats

    def _what(self, op: str, register: int) -> str:
        """The transaction's name for a BusError, made once per register (reads run every second)."""
        key = (op, register)
        what = self._names.get(key)
        if what is None:
            what = self._names[key] = f"sound@0x{self.address:02x} {op} 0x{register:02x}"
        return what

    def _read(self, register: int) -> int:
        return self.retry.call(self._what("read", register), self.bus.read_byte_data, self.address, register)

    def _write(self, register: int, value: int) -> None:
        self.retry.call(
            self._what("write", register), self.bus.write_byte_data, self.address, register, value
        )

    def set_weighting(self, weighting: str) -> None:
        """Read-modify-write CONTROL so the interrupt bits keep their setting."""
        new = control_with_weighting(self._read(REG_CONTROL), weighting)
        self._write(REG_CONTROL, new)
        self.weighting = weighting.upper()

    def set_averaging_ms(self, ms: int) -> None:
        high, low = averaging_bytes(ms)
        self._write(REG_TAVG_HIGH, high)  # high first: the module latches on the low byte
        self._write(REG_TAVG_LOW, low)
        self.averaging_ms = ms

    def reset_min_max(self) -> None:
        self._write(REG_RESET, RESET_MIN_MAX)

    def configure(self) -> None:
        self.set_weighting(self.weighting)
        self.set_averaging_ms(self.averaging_ms)
        # Clear the power-on "pop" out of min/max, as the manual recommends.
        self.reset_min_max()
        self._configured = True

    def read(self) -> Reading | None:
        if not self._configured:
            self.configure()
        level = self._read(REG_DECIBEL)
        if level == 0:
            return None
        eq, lo_key, hi_key = level_keys(self.weighting)
        values: dict[str, float] = {eq: float(level)}
        lo, hi = self._read(REG_MIN), self._read(REG_MAX)
        if lo:
            values[lo_key] = float(lo)
        if hi:
            values[hi_key] = float(hi)
        if self.reset_each_read:
            self.reset_min_max()
        meta = {
            "weighting": self.weighting,
            "averaging_ms": self.averaging_ms,
            "bus_retries": self.stats.retries,
        }
        # Labelled by its section, like every driver: two sound sensors on one van are two series.
        return Reading(sensor=self.name, values=values, meta=meta)

    def close(self) -> None:
        """The module keeps measuring on its own; nothing to release on our side."""


# [sensors.NAME] options of driver = "sound-module" (edge/driver_factory.py builds it).
OPTIONS = DriverOptions({
    "bus": i2c_bus(),
    "address": i2c_address(0x48),
    "weighting": Option("A", choices=tuple(WEIGHTING_BITS)),
    "averaging_ms": Option(1000, lo=1, hi=0xFFFF, unit="ms"),
})
