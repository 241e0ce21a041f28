"""SPEC Sensors DGS-NO2 digital gas sensor module (UART 9600 8N1, ASCII).

Commands are single characters: ``\\r`` asks for one reading, ``c`` starts
continuous output, ``e`` dumps the EEPROM as ``key=value`` lines, ``f`` asks the
firmware date. A reading line has 11 fields separated by ", ":

    serial, ppb, T °C, RH %, ADC raw, T raw, RH raw, day, hour, minute, second

(the last four are the module's time since power-on).

Two firmware generations are in the field. The newer one answers ``f`` with
its date (e.g. ``15SEP17``), dumps its EEPROM and honours ``c``. The older one
does not know these commands: it answers *any* character with one reading
line (or nothing), so it is identified by its answer to ``f`` and driven
on demand only; its serial number comes from the reading lines.

The sensor needs about an hour after power-on to stabilise; readings in that
window carry the ``warming_up`` flag (time measured on the injected clock).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from drivers.base import Reading
from drivers.options import DriverOptions, baudrate, serial_port
from core.errors import BusError, ConfigError, FrameError, SensorTimeout

WARM_UP_S = 3600.0
_FIELDS = 11
_FIRMWARE_RE = re.compile(r"^\d{2}(JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC)\d{2}$")
_SERIAL_RE = re.compile(r"^[0-9A-Za-z]{4,20}$")
_MAX_LINE = 256  # longer than any real line: anything past this is noise
_MAX_EEPROM_LINES = 64  # the dump has about 20 keys
_POLL_S = 0.05  # one blocking port read; bounds how far a deadline can overshoot

T = TypeVar("T")


class SerialPort(Protocol):
    """The pyserial calls the driver uses (``serial.serial_for_url`` objects fit).

    No ``readline``: the driver splits lines itself, so wrappers that only
    offer read/write (a reconnecting port) fit too.
    """

    timeout: float | None

    @property
    def in_waiting(self) -> int: ...

    def write(self, data: bytes) -> int | None: ...

    def read(self, size: int = 1) -> bytes: ...

    def reset_input_buffer(self) -> None: ...

    def close(self) -> None: ...


class MonotonicClock(Protocol):
    def monotonic(self) -> float: ...


# ------------------------------------------------------------------ pure parsing


@dataclass(frozen=True, slots=True)
class DgsLine:
    """One decoded reading line."""

    serial: str
    ppb: float
    temp_c: float
    rh_pct: float
    adc_raw: int
    temp_raw: int
    rh_raw: int
    days: int
    hours: int
    minutes: int
    seconds: int

    @property
    def uptime_s(self) -> int:
        """The module's own time since power-on."""
        return ((self.days * 24 + self.hours) * 60 + self.minutes) * 60 + self.seconds


def _text(line: str | bytes | bytearray) -> str:
    if isinstance(line, (bytes, bytearray)):
        try:
            return line.decode("ascii")
        except UnicodeDecodeError:
            raise FrameError(f"non-ASCII bytes in line: {line[:40]!r}") from None
    return line


def parse_reading_line(line: str | bytes) -> DgsLine:
    """Decode one reading line; ``FrameError`` on anything that is not one."""
    text = _text(line).strip()
    if not text:
        raise FrameError("empty line")
    if len(text) > _MAX_LINE:
        raise FrameError(f"line too long ({len(text)} chars)")
    parts = text.split(", ")
    if len(parts) != _FIELDS:
        raise FrameError(
            f"expected {_FIELDS} fields separated by ', ', got {len(parts)}: {text[:60]!r}"
        )
    serial = parts[0].strip()
    if not _SERIAL_RE.match(serial):
        raise FrameError(f"bad serial number field: {serial!r}")

    def number(i: int, name: str) -> float:
        try:
            value = float(parts[i])
        except ValueError:
            raise FrameError(f"{name} is not a number: {parts[i]!r}") from None
        if not math.isfinite(value):
            raise FrameError(f"{name} is not finite: {parts[i]!r}")
        return value

    def integer(i: int, name: str, lo: int, hi: int) -> int:
        s = parts[i].strip()
        if not s.lstrip("-").isdigit():
            raise FrameError(f"{name} is not an integer: {parts[i]!r}")
        value = int(s)
        if not lo <= value <= hi:
            raise FrameError(f"{name} out of range {lo}..{hi}: {value}")
        return value

    ppb = number(1, "ppb")
    temp_c = number(2, "temperature")
    rh = number(3, "humidity")
    # Physically impossible values mean a corrupted line, not a reading.
    if not -40.0 <= temp_c <= 85.0:
        raise FrameError(f"temperature out of range: {temp_c}")
    if not 0.0 <= rh <= 100.0:
        raise FrameError(f"humidity out of range: {rh}")
    return DgsLine(
        serial=serial,
        ppb=ppb,
        temp_c=temp_c,
        rh_pct=rh,
        adc_raw=integer(4, "ADC raw", 0, 0xFFFFFF),
        temp_raw=integer(5, "T raw", 0, 0xFFFF),
        rh_raw=integer(6, "RH raw", 0, 0xFFFF),
        days=integer(7, "day", 0, 99999),
        hours=integer(8, "hour", 0, 23),
        minutes=integer(9, "minute", 0, 59),
        seconds=integer(10, "second", 0, 59),
    )


def parse_eeprom(lines: Iterable[str | bytes]) -> dict[str, str]:
    """``key=value`` lines (spaces around ``=`` allowed) -> dict; other lines are skipped."""
    out: dict[str, str] = {}
    for raw in lines:
        try:
            text = _text(raw).strip()
        except FrameError:
            continue
        key, sep, value = text.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def is_firmware_date(text: str | bytes) -> bool:
    """True for the newer generation's answer to ``f`` (``DDMMMYY``, e.g. ``15SEP17``)."""
    try:
        return bool(_FIRMWARE_RE.match(_text(text).strip().upper()))
    except FrameError:
        return False


def eeprom_serial(eeprom: dict[str, str]) -> str | None:
    for key, value in eeprom.items():
        if key.lower().startswith("serial") and value:
            return value
    return None


def eeprom_sensitivity_na_per_ppm(eeprom: dict[str, str]) -> float | None:
    """``Sensitivity_Code`` (nA/ppm) or else ``nA_per_PPM_x100`` / 100; None when absent."""
    lowered = {k.lower(): v for k, v in eeprom.items()}
    for key, scale in (("sensitivity_code", 1.0), ("na_per_ppm_x100", 0.01)):
        if key in lowered:
            try:
                return float(lowered[key]) * scale
            except ValueError:
                return None
    return None


# ------------------------------------------------------------------ the driver


@dataclass
class DgsInfo:
    """What the start-up probe learned."""

    generation: str  # "new" (answers f/e/c) or "legacy"
    firmware: str | None
    serial: str | None
    sensitivity_na_per_ppm: float | None
    eeprom: dict[str, str] = field(default_factory=dict)


class DgsNo2:
    """``SensorDriver`` for a DGS-NO2 on an open serial port.

    ``mode="on_demand"`` sends ``\\r`` each tick and waits up to
    ``reply_timeout_s`` for the line. ``mode="continuous"`` sends ``c`` once
    and each ``read()`` takes the newest complete line that has arrived (None
    when none has); a legacy module cannot stream and is polled instead.
    The port is owned by the driver from ``start()`` on (its timeout is set).
    """

    MODES = ("on_demand", "continuous")

    def __init__(
        self,
        port: SerialPort,
        *,
        clock: MonotonicClock,
        mode: str = "on_demand",
        warm_up_s: float = WARM_UP_S,
        powered_on_at: float | None = None,
        reply_timeout_s: float = 1.5,
        eeprom_quiet_s: float = 0.3,
        io_clock: Callable[[], float] = time.monotonic,
        name: str = "dgs_no2",
    ) -> None:
        if mode not in self.MODES:
            raise ConfigError("dgs_no2.mode", f"must be one of {self.MODES}, not {mode!r}")
        self.port = port
        self.clock = clock
        self.mode = mode
        self.warm_up_s = warm_up_s
        # Default: the module was powered with the agent (the van's ignition).
        self.powered_on_at = clock.monotonic() if powered_on_at is None else powered_on_at
        self.reply_timeout_s = reply_timeout_s
        self.eeprom_quiet_s = eeprom_quiet_s
        # Reply deadlines are about the wire, so they run on real time (pyserial's
        # timeouts do), not on the injected clock that may be simulated.
        self._io_clock = io_clock
        self.name = name
        self.info: DgsInfo | None = None
        self.frame_errors = 0
        self._streaming = False
        self._buf = bytearray()

    # -- low level

    def _io(self, what: str, fn: Callable[..., T], *args: object) -> T:
        """Port failures (SerialException is an OSError, so is a vanished tty's EIO)
        become ``BusError``: recoverable, the agent carries on."""
        try:
            return fn(*args)
        except OSError as exc:
            raise BusError(f"{self.name}: {what}: {exc}") from exc

    def _send(self, data: bytes) -> None:
        self._io("write", self.port.write, data)
        flush = getattr(self.port, "flush", None)
        if flush:
            self._io("flush", flush)

    def _flush_input(self) -> None:
        self._buf.clear()
        self._io("reset input", self.port.reset_input_buffer)

    def _fill(self) -> bool:
        """Move what has arrived into the buffer; blocks at most one port timeout."""
        waiting = self._io("in_waiting", lambda: self.port.in_waiting)
        chunk = self._io("read", self.port.read, max(1, waiting))
        self._buf += chunk
        return bool(chunk)

    def _readline(self, timeout_s: float) -> bytes:
        """One line including its ``\n``; whatever arrived (maybe b"") at the deadline."""
        deadline = self._io_clock() + timeout_s
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                return line
            if len(self._buf) > _MAX_LINE or self._io_clock() >= deadline:
                line = bytes(self._buf)
                self._buf.clear()
                return line
            self._fill()

    def _ask(self, command: bytes) -> bytes:
        """Send one command, return its first answer line (b"" when nothing came)."""
        self._flush_input()
        self._send(command)
        return self._readline(self.reply_timeout_s)

    # -- start-up

    def start(self) -> DgsInfo:
        """Wake the module, tell the generation apart, read its EEPROM, start streaming."""
        # Short port reads so every wait honours its own deadline.
        self.port.timeout = _POLL_S
        # A first character wakes a module in standby and stops one left streaming
        # (which then stays silent), so ask twice before calling it absent.
        first = self._ask(b"\r")
        if not first.strip():
            first = self._ask(b"\r")
        if not first.strip():
            raise SensorTimeout(f"{self.name}: no answer to a reading request")
        serial: str | None = None
        try:
            serial = parse_reading_line(first).serial
        except FrameError:
            self.frame_errors += 1

        answer = self._ask(b"f")
        if is_firmware_date(answer):
            firmware: str | None = answer.decode("ascii").strip()
            generation = "new"
        else:
            # Legacy modules answer f with a reading (any char triggers one) or not at all.
            firmware, generation = None, "legacy"
            self._flush_input()

        eeprom: dict[str, str] = {}
        if generation == "new":
            self._flush_input()
            self._send(b"e")
            lines = []
            # The dump has no end marker: it is over when the line stops talking.
            line = self._readline(self.reply_timeout_s)
            # Bounded: a module that never stops talking must not hang the start.
            while line and len(lines) < _MAX_EEPROM_LINES:
                lines.append(line)
                line = self._readline(self.eeprom_quiet_s)
            eeprom = parse_eeprom(lines)
            serial = eeprom_serial(eeprom) or serial

        self.info = DgsInfo(
            generation=generation,
            firmware=firmware,
            serial=serial,
            sensitivity_na_per_ppm=eeprom_sensitivity_na_per_ppm(eeprom),
            eeprom=eeprom,
        )
        if self.mode == "continuous" and generation == "new":
            self._flush_input()
            self._send(b"c")
            self._streaming = True
        return self.info

    # -- reading

    @property
    def warming_up(self) -> bool:
        return self.clock.monotonic() - self.powered_on_at < self.warm_up_s

    def _reading(self, line: DgsLine) -> Reading:
        assert self.info is not None
        return Reading(
            sensor=self.name,  # the section name: products select NO2 by its keys
            values={"no2_ppb": line.ppb, "no2_temp_c": line.temp_c, "no2_rh_pct": line.rh_pct},
            flags=("warming_up",) if self.warming_up else (),
            meta={
                "serial": line.serial,
                "firmware": self.info.firmware,
                "generation": self.info.generation,
                "mode": "continuous" if self._streaming else "on_demand",
                "sensitivity_na_per_ppm": self.info.sensitivity_na_per_ppm,
                "uptime_s": line.uptime_s,
                "frame_errors": self.frame_errors,
            },
        )

    def _read_on_demand(self) -> Reading:
        raw = self._ask(b"\r")
        if not raw:
            raise SensorTimeout(f"{self.name}: no reading within {self.reply_timeout_s} s")
        if not raw.endswith(b"\n"):
            self.frame_errors += 1
            raise FrameError(f"{self.name}: truncated line {raw[:60]!r}")
        try:
            return self._reading(parse_reading_line(raw))
        except FrameError:
            self.frame_errors += 1
            raise

    def _read_stream(self) -> Reading | None:
        if self._io("in_waiting", lambda: self.port.in_waiting):
            self._fill()  # data is waiting: returns at once
        *complete, rest = self._buf.split(b"\n")
        self._buf = bytearray(rest)
        if len(self._buf) > _MAX_LINE:
            # Noise without line ends: drop it rather than grow without bound.
            self._buf.clear()
            self.frame_errors += 1
            raise FrameError(f"{self.name}: {_MAX_LINE}+ bytes without a line end")
        newest: DgsLine | None = None
        bad: list[bytes] = []
        for raw in complete:
            if not raw.strip():
                continue
            try:
                newest = parse_reading_line(raw)
            except FrameError:
                self.frame_errors += 1
                bad.append(bytes(raw))
        if newest is not None:
            return self._reading(newest)
        if bad:
            raise FrameError(f"{self.name}: no valid line, last garbage {bad[-1][:60]!r}")
        return None

    def read(self) -> Reading | None:
        if self.info is None:
            self.start()
        if self._streaming:
            return self._read_stream()
        return self._read_on_demand()

    def close(self) -> None:
        """Stop the stream (any character does) and release the port."""
        try:
            if self._streaming:
                self._send(b"\r")
                self._streaming = False
        finally:
            self.port.close()


# [sensors.NAME] options of driver = "dgs-no2" (edge/driver_factory.py builds it).
OPTIONS = DriverOptions({"port": serial_port(), "baudrate": baudrate(9600)})
