"""Register-level models of the I2C devices, to plug into ``drivers.i2c.FakeI2CBus``.

They model the registers the way the chips do (big-endian ADS1115 words, the
OS bit going 0 while a conversion runs, the sound module's high-then-low
averaging-time write), so the drivers are tested against behaviour, not
against a mirror of themselves.
"""

from __future__ import annotations

import errno
import math
import random
from collections.abc import Callable

from drivers.ads1115 import (
    CONFIG_RESET,
    DATA_RATE_SPS,
    MUX_INPUTS,
    OS_BIT,
    PGA_FSR,
    REG_CONFIG,
    REG_CONVERSION,
    REG_HI_THRESH,
    REG_LO_THRESH,
    MonotonicClock,
    Mux,
)


def _nack(what: str) -> OSError:
    return OSError(errno.EREMOTEIO, what)


class FakeADS1115:
    """An ADS1115 as its registers see it.

    Inputs: ``set_voltage(ch, volts)`` per AIN pin, or ``source(ch) -> volts``
    (a callable, for signals that change over time). Conversion takes one
    data-rate period of ``clock.monotonic()`` time when a clock is given;
    without one it completes after ``busy_polls`` config reads. ``stuck=True``
    models a chip that never finishes (to test the driver's timeout).
    """

    def __init__(
        self,
        *,
        source: Callable[[int], float] | None = None,
        clock: MonotonicClock | None = None,
        busy_polls: int = 0,
        stuck: bool = False,
    ) -> None:
        self.voltages = [0.0, 0.0, 0.0, 0.0]
        self.source = source
        self.clock = clock
        self.busy_polls = busy_polls
        self.stuck = stuck
        self.regs = {
            REG_CONVERSION: 0,
            REG_CONFIG: CONFIG_RESET,
            REG_LO_THRESH: 0x8000,
            REG_HI_THRESH: 0x7FFF,
        }
        self.conversions = 0
        self._converting = False
        self._started_at = 0.0
        self._polls_left = 0

    # -- test controls

    def set_voltage(self, channel: int, volts: float) -> None:
        self.voltages[channel] = volts

    def _input(self, channel: int | None) -> float:
        if channel is None:
            return 0.0
        return self.source(channel) if self.source is not None else self.voltages[channel]

    # -- chip behaviour

    def _now(self) -> float:
        return self.clock.monotonic() if self.clock is not None else 0.0

    def _finish_if_due(self) -> None:
        if not self._converting or self.stuck:
            return
        if self.clock is not None:
            period = 1.0 / DATA_RATE_SPS[(self.regs[REG_CONFIG] >> 5) & 0b111]
            if self._now() - self._started_at < period:
                return
        elif self._polls_left > 0:
            return
        self._convert()

    def _convert(self) -> None:
        config = self.regs[REG_CONFIG]
        mux = Mux((config >> 12) & 0b111)
        fsr = PGA_FSR[(config >> 9) & 0b111]
        pos, neg = MUX_INPUTS[mux]
        volts = self._input(pos) - self._input(neg)
        counts = 0 if math.isnan(volts) else round(volts / fsr * 32768)
        # The output saturates at the codes for +-FS, it does not wrap.
        counts = max(-0x8000, min(0x7FFF, counts))
        self.regs[REG_CONVERSION] = counts & 0xFFFF
        self._converting = False
        self.conversions += 1

    def _config_value(self) -> int:
        # Reading config returns what was written, with OS showing the state.
        value = self.regs[REG_CONFIG] & ~OS_BIT
        return value if self._converting else value | OS_BIT

    def read_register(self, register: int, length: int) -> bytes:
        if register not in self.regs:
            raise _nack(f"ads1115: no register {register}")
        if register == REG_CONFIG and self._converting:
            if self._polls_left > 0:
                self._polls_left -= 1
            else:
                self._finish_if_due()
        elif register == REG_CONVERSION:
            self._finish_if_due()
        value = self._config_value() if register == REG_CONFIG else self.regs[register]
        word = bytes([value >> 8, value & 0xFF])  # big-endian, as the chip sends it
        # Reads past the 2 bytes repeat the register (the pointer does not advance).
        return (word * ((length + 1) // 2))[:length]

    def write_register(self, register: int, data: bytes) -> None:
        if register not in self.regs or register == REG_CONVERSION:
            raise _nack(f"ads1115: register {register} is not writable")
        if len(data) != 2:
            raise _nack(f"ads1115: register writes are 2 bytes, got {len(data)}")
        value = (data[0] << 8) | data[1]  # big-endian on the wire
        if register != REG_CONFIG:
            self.regs[register] = value
            return
        self.regs[REG_CONFIG] = value & ~OS_BIT
        single_shot = bool(value & (1 << 8))
        if value & OS_BIT and single_shot and not self._converting:
            self._converting = True
            self._polls_left = self.busy_polls
            self._started_at = self._now()
        elif not single_shot:
            # Continuous mode: keep the conversion register current on every write.
            self._convert()


# PCB Artists sound level module registers.
SND_VERSION = 0x00
SND_SCRATCH = 0x05
SND_CONTROL = 0x06
SND_TAVG_HIGH = 0x07
SND_TAVG_LOW = 0x08
SND_RESET = 0x09
SND_DECIBEL = 0x0A
SND_MIN = 0x0B
SND_MAX = 0x0C
SND_HISTORY = 0x14
SND_HISTORY_LEN = 100


class FakeSoundModule:
    """The PCB Artists I2C sound level module (0x48) as its 8-bit registers see it.

    ``level_db`` (attribute or ``source()`` callable) is what the microphone
    hears. Every read of DECIBEL takes a new level, updates min/max and pushes
    the history. Register reads auto-increment. Levels are whole dB in a byte;
    0 means "not computed yet", as on the module.
    """

    WEIGHTINGS = {0b00: "Z", 0b01: "A", 0b10: "C"}

    def __init__(self, *, level_db: float = 0.0, source: Callable[[], float] | None = None,
                 fluctuation_db: float = 0.0, seed: int = 0) -> None:
        self.level_db = level_db
        self.source = source
        # The module measures in short steps and keeps their min and max: with traffic
        # passing, the fast level swings by several dB within one averaging time. 0 = the
        # level is steady within an interval (min = max = the level read).
        self.fluctuation_db = fluctuation_db
        self._rng = random.Random(f"sound:{seed}")
        self.regs = bytearray(0x80)
        self.regs[SND_VERSION] = 0x31
        self.regs[0x01:0x05] = bytes([0xDE, 0xCA, 0xFB, 0xAD])
        self.regs[SND_CONTROL] = 0x02  # A-weighting
        self.averaging_ms = 1000
        self.regs[SND_TAVG_HIGH], self.regs[SND_TAVG_LOW] = 0x03, 0xE8
        self._tavg_high_pending: int | None = None
        self.resets: list[int] = []
        self.powered_down = False

    @property
    def weighting(self) -> str:
        return self.WEIGHTINGS.get((self.regs[SND_CONTROL] >> 1) & 0b11, "reserved")

    def _sample(self) -> None:
        level = self.source() if self.source is not None else self.level_db
        fast = [level]
        if self.fluctuation_db > 0:
            # Eight fast levels of the interval; the register holds their energy mean.
            fast = [level + self._rng.gauss(0, self.fluctuation_db) for _ in range(8)]
            level = 10.0 * math.log10(sum(10.0 ** (f / 10.0) for f in fast) / len(fast))
        value = max(0, min(255, round(level)))
        if value == 0:
            return
        self.regs[SND_DECIBEL] = value
        for f in fast:
            v = max(1, min(255, round(f)))
            if self.regs[SND_MIN] == 0 or v < self.regs[SND_MIN]:
                self.regs[SND_MIN] = v
            if v > self.regs[SND_MAX]:
                self.regs[SND_MAX] = v
        hist = self.regs[SND_HISTORY : SND_HISTORY + SND_HISTORY_LEN]
        self.regs[SND_HISTORY : SND_HISTORY + SND_HISTORY_LEN] = bytes([value]) + hist[:-1]

    def read_register(self, register: int, length: int) -> bytes:
        if register + length > len(self.regs):
            raise _nack(f"sound module: read past register 0x{register:02x}")
        if register <= SND_DECIBEL < register + length and not self.powered_down:
            self._sample()
        return bytes(self.regs[register : register + length])

    def write_register(self, register: int, data: bytes) -> None:
        for offset, value in enumerate(data):
            self._write_one(register + offset, value)

    def _write_one(self, register: int, value: int) -> None:
        if register == SND_CONTROL:
            if value & 0xE0:
                raise _nack("sound module: reserved CONTROL bits 7:5 must be 0")
            self.regs[SND_CONTROL] = value & 0x1E
            if value & 0x01:
                self.powered_down = True
        elif register == SND_TAVG_HIGH:
            self._tavg_high_pending = value
            self.regs[SND_TAVG_HIGH] = value
        elif register == SND_TAVG_LOW:
            # The module takes the new time when the low byte arrives, using the
            # high byte written just before: that is why the high byte goes first.
            high = self._tavg_high_pending
            if high is None:
                high = self.regs[SND_TAVG_HIGH]
            self.regs[SND_TAVG_LOW] = value
            self.averaging_ms = (high << 8) | value
            self._tavg_high_pending = None
        elif register == SND_RESET:
            self.resets.append(value)
            if value & 0b0010:  # clear min/max
                self.regs[SND_MIN] = 0
                self.regs[SND_MAX] = 0
            if value & 0b0100:  # clear history
                self.regs[SND_HISTORY : SND_HISTORY + SND_HISTORY_LEN] = bytes(SND_HISTORY_LEN)
        elif register == SND_SCRATCH:
            self.regs[SND_SCRATCH] = value
        else:
            raise _nack(f"sound module: register 0x{register:02x} is read-only")
