"""TI ADS1115 16-bit ADC over I2C, single-shot conversions.

Register facts (datasheet): pointer 0x00 conversion (signed 16-bit), 0x01
config (reset 0x8583). Config bits: 15 OS (write 1 = start a single shot; read
0 = converting, 1 = idle), 14:12 MUX, 11:9 PGA, 8 MODE (1 = single-shot),
7:5 data rate, 4 COMP_MODE, 3 COMP_POL, 2 COMP_LAT, 1:0 COMP_QUE (11 = off).
Registers are big-endian on the wire; SMBus word transfers are little-endian,
so every word is byte-swapped on the way in and out.

Default address 0x49 (ADDR to VDD): 0x48 is taken by the sound level module.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Protocol

from core.clock import SystemClock
from core.errors import ConfigError, SensorTimeout
from drivers.i2c import BusRetry, BusStats, I2CBus

REG_CONVERSION = 0x00
REG_CONFIG = 0x01
REG_LO_THRESH = 0x02
REG_HI_THRESH = 0x03

CONFIG_RESET = 0x8583

OS_BIT = 1 << 15
MODE_SINGLE_SHOT = 1 << 8
COMP_QUE_OFF = 0b11

DEFAULT_ADDRESS = 0x49


class Mux(IntEnum):
    """Input multiplexer codes (config bits 14:12): differential pairs, then single-ended."""

    DIFF_0_1 = 0
    DIFF_0_3 = 1
    DIFF_1_3 = 2
    DIFF_2_3 = 3
    AIN0 = 4
    AIN1 = 5
    AIN2 = 6
    AIN3 = 7


# (positive input, negative input or None for GND) per MUX code; shared with the fake.
MUX_INPUTS: Mapping[Mux, tuple[int, int | None]] = {
    Mux.DIFF_0_1: (0, 1),
    Mux.DIFF_0_3: (0, 3),
    Mux.DIFF_1_3: (1, 3),
    Mux.DIFF_2_3: (2, 3),
    Mux.AIN0: (0, None),
    Mux.AIN1: (1, None),
    Mux.AIN2: (2, None),
    Mux.AIN3: (3, None),
}

# Full-scale range in volts -> PGA code. Codes 6 and 7 also mean 0.256 V.
PGA_CODES: Mapping[float, int] = {6.144: 0, 4.096: 1, 2.048: 2, 1.024: 3, 0.512: 4, 0.256: 5}
PGA_FSR: Mapping[int, float] = {**{c: v for v, c in PGA_CODES.items()}, 6: 0.256, 7: 0.256}

# Samples per second -> data-rate code.
DATA_RATE_CODES: Mapping[int, int] = {8: 0, 16: 1, 32: 2, 64: 3, 128: 4, 250: 5, 475: 6, 860: 7}
DATA_RATE_SPS: Mapping[int, int] = {c: r for r, c in DATA_RATE_CODES.items()}


class MonotonicClock(Protocol):
    """What the ADC needs from a clock: ``core.clock.Clock`` fits."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


# ---------------------------------------------------------------- pure helpers


def parse_mux(spec: str | int | Mux) -> Mux:
    """``"AIN2"``, ``2`` (single-ended AIN2) or ``"AIN0-AIN1"`` -> ``Mux``."""
    if isinstance(spec, Mux):
        return spec
    if isinstance(spec, int):
        if 0 <= spec <= 3:
            return Mux(Mux.AIN0 + spec)
        raise ConfigError("ads1115.channel", f"single-ended channel must be 0..3, not {spec}")
    text = str(spec).strip().upper().replace(" ", "")
    if "-" in text:
        pos, _, neg = text.partition("-")
        try:
            pair = (int(pos.removeprefix("AIN")), int(neg.removeprefix("AIN")))
        except ValueError:
            pair = (-1, -1)
        for mux, inputs in MUX_INPUTS.items():
            if inputs == pair:
                return mux
        raise ConfigError("ads1115.channel", f"no such differential pair: {spec!r}")
    try:
        return Mux[text]
    except KeyError:
        raise ConfigError(
            "ads1115.channel", f"unknown channel {spec!r} (AIN0..AIN3 or AINx-AINy)"
        ) from None


def pga_code(fsr_v: float) -> int:
    for fsr, code in PGA_CODES.items():
        if abs(fsr - fsr_v) < 1e-9:
            return code
    raise ConfigError("ads1115.fsr", f"{fsr_v} V is not one of {sorted(PGA_CODES)}")


def data_rate_code(sps: int) -> int:
    try:
        return DATA_RATE_CODES[int(sps)]
    except (KeyError, ValueError, TypeError):
        raise ConfigError(
            "ads1115.data_rate", f"{sps} SPS is not one of {sorted(DATA_RATE_CODES)}"
        ) from None


def single_shot_config(mux: Mux, pga: int, dr: int) -> int:
    """Config word that starts one conversion: OS=1, MODE=1, comparator disabled."""
    return OS_BIT | (int(mux) << 12) | (pga << 9) | MODE_SINGLE_SHOT | (dr << 5) | COMP_QUE_OFF


def swap16(word: int) -> int:
    """SMBus word (low byte first) <-> ADS1115 register value (high byte first)."""
    return ((word & 0xFF) << 8) | (word >> 8)


# OS_BIT as it sits in an SMBus word read (the register's bytes swapped).
_OS_BIT_SWAPPED = swap16(OS_BIT)


def to_signed16(value: int) -> int:
    return value - 0x10000 if value & 0x8000 else value


def counts_to_volts(counts: int, fsr_v: float) -> float:
    """volts = counts x FSR / 32768 (the datasheet's LSB = FSR / 2^15)."""
    return counts * fsr_v / 32768.0


# ---------------------------------------------------------------- the driver


class ADS1115:
    """One ADS1115 on a bus. Not a ``SensorDriver`` itself: sensor drivers read through it.

    ``read_volts(channel)`` runs one single-shot conversion: write config, sleep
    the nominal conversion time, poll OS until the chip says idle (bounded by
    ``timeout_s`` on the injected clock), read the conversion register. Bus
    glitches are retried by ``retry`` and counted in ``stats``.
    """

    def __init__(
        self,
        bus: I2CBus,
        address: int = DEFAULT_ADDRESS,
        *,
        fsr_v: float = 4.096,
        data_rate: int = 128,
        clock: MonotonicClock | None = None,
        retry: BusRetry | None = None,
        timeout_s: float | None = None,
    ) -> None:
        if not 0x48 <= address <= 0x4B:
            raise ConfigError("ads1115.address", f"0x{address:02x} is not 0x48..0x4B (ADDR pin)")
        self.bus = bus
        self.address = address
        self.fsr_v = fsr_v
        self._pga = pga_code(fsr_v)
        self.data_rate = data_rate
        self._dr = data_rate_code(data_rate)
        self.clock: MonotonicClock = clock or SystemClock()
        self.retry = retry or BusRetry(sleep=self.clock.sleep)
        # The datasheet allows +-10 % on the internal oscillator; a generous bound
        # still fails fast when the chip never reports ready.
        self.timeout_s = timeout_s if timeout_s is not None else 3.0 / data_rate + 0.05
        # Worked out once: a van reads two or three channels every second for years.
        # Sleeping through the conversion first saves polls (each poll is a bus
        # transaction that competes with the other devices on the bus). The
        # oscillator may run 10 % slow (datasheet), hence the margin.
        self._wait_s = self.conversion_time_s * 1.1
        self._poll_s = max(self.conversion_time_s / 10.0, 0.0005)
        self._what_read = {r: f"ads1115@0x{address:02x} read reg {r}" for r in (REG_CONVERSION, REG_CONFIG)}
        self._what_write = f"ads1115@0x{address:02x} write reg {REG_CONFIG}"
        self._start_words: dict[tuple[Mux, int], int] = {}  # (mux, pga) -> config word, byte-swapped

    @property
    def stats(self) -> BusStats:
        return self.retry.stats

    @property
    def conversion_time_s(self) -> float:
        return 1.0 / self.data_rate

    def _read_register(self, register: int) -> int:
        what = self._what_read.get(register) or f"ads1115@0x{self.address:02x} read reg {register}"
        word = self.retry.call(what, self.bus.read_word_data, self.address, register)
        return swap16(word)

    def _write_register(self, register: int, value: int) -> None:
        self.retry.call(
            f"ads1115@0x{self.address:02x} write reg {register}",
            self.bus.write_word_data,
            self.address,
            register,
            swap16(value),
        )

    def read_config(self) -> int:
        return self._read_register(REG_CONFIG)

    def _start_word(self, mux: Mux, pga: int) -> int:
        """The config word that starts a conversion, as the bus sends it (swapped)."""
        key = (mux, pga)
        word = self._start_words.get(key)
        if word is None:
            word = self._start_words[key] = swap16(single_shot_config(mux, pga, self._dr))
        return word

    def read_counts(self, channel: str | int | Mux, *, fsr_v: float | None = None) -> int:
        """One single-shot conversion on ``channel``; signed counts."""
        mux = parse_mux(channel)
        pga = self._pga if fsr_v is None else pga_code(fsr_v)
        # The three bus transactions are made here directly, not through
        # read_config()/_read_register(): this runs two or three times a
        # second for as long as the van drives, right after a sleep, when every
        # extra call is slow.
        retry, bus, addr, clock = self.retry, self.bus, self.address, self.clock
        retry.call(self._what_write, bus.write_word_data, addr, REG_CONFIG, self._start_word(mux, pga))
        deadline = clock.monotonic() + self.timeout_s
        clock.sleep(self._wait_s)
        read_word, what_config = bus.read_word_data, self._what_read[REG_CONFIG]
        # OS tested in the word as the bus returns it (bytes swapped): no swap per poll.
        while not retry.call(what_config, read_word, addr, REG_CONFIG) & _OS_BIT_SWAPPED:
            if clock.monotonic() >= deadline:
                raise SensorTimeout(
                    f"ads1115@0x{self.address:02x}: conversion not ready"
                    f" after {self.timeout_s:.3f} s"
                )
            clock.sleep(self._poll_s)
        word = retry.call(self._what_read[REG_CONVERSION], read_word, addr, REG_CONVERSION)
        return to_signed16(swap16(word))

    def read_volts(self, channel: str | int | Mux, *, fsr_v: float | None = None) -> float:
        fsr = self.fsr_v if fsr_v is None else fsr_v
        return counts_to_volts(self.read_counts(channel, fsr_v=fsr), fsr)

    def read_mv(self, channel: str | int | Mux, *, fsr_v: float | None = None) -> float:
        fsr = self.fsr_v if fsr_v is None else fsr_v
        return 1000.0 * counts_to_volts(self.read_counts(channel, fsr_v=fsr), fsr)
