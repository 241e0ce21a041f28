"""Sensirion SPS30 particulate-matter sensor over UART (115200 8N1, SHDLC framing).

Frames are delimited by ``7E`` flags. Host to sensor (MOSI): ``ADR CMD LEN
DATA.. CHK``; sensor to host (MISO): ``ADR CMD STATE LEN DATA.. CHK``. CHK is
the bitwise NOT of the low byte of the sum of every byte between the flags,
computed before byte stuffing. Stuffing covers everything between the flags,
CHK included (``7E 7D 11 13`` -> ``7D 5E/5D/31/33``); it is undone byte by byte,
because chained ``bytes.replace`` calls corrupt sequences such as ``7D 5D 5E``.

Layers: pure functions (``stuff``/``unstuff``, ``build_mosi``/``build_miso``,
``decode_miso``/``decode_mosi``, ``decode_measurement``, the ``cmd_*``
builders), ``ShdlcSplitter``/``SPS30Parser`` (stream -> verified frames with
resync) and ``SPS30Driver`` (the ``SensorDriver``).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from drivers.base import Reading
from drivers.serialport import SerialLike, SerialSensor, read_available, read_until_deadline
from drivers.options import DriverOptions, baudrate, serial_port
from core.errors import ChecksumError, FrameError, ReadError, SensorTimeout

log = logging.getLogger(__name__)

FLAG = 0x7E
ESCAPE = 0x7D
_STUFF = {0x7E: 0x5E, 0x7D: 0x5D, 0x11: 0x31, 0x13: 0x33}
_UNSTUFF = {v: k for k, v in _STUFF.items()}

CMD_START = 0x00
CMD_STOP = 0x01
CMD_READ = 0x03
CMD_SLEEP = 0x10
CMD_WAKE = 0x11
CMD_FAN_CLEAN = 0x56
CMD_DEVICE_INFO = 0xD0
CMD_RESET = 0xD3

INFO_PRODUCT_TYPE = 0x00
INFO_SERIAL_NUMBER = 0x03

START_FLOAT = b"\x01\x03"  # sub-command 1, output format 3 = big-endian IEEE-754 float
MEASUREMENT_SIZE = 40

# Low 7 bits of the MISO state byte; bit 7 flags a device error (read the
# device status register for details) on an otherwise valid answer.
STATE_ERRORS = {
    0x01: "wrong data length for this command",
    0x02: "unknown command",
    0x03: "no access right for this command",
    0x04: "illegal command parameter or parameter out of range",
    0x28: "internal function argument out of range",
    0x43: "command not allowed in the current state",
}
STATE_NOT_ALLOWED = 0x43
STATE_DEVICE_ERROR_FLAG = 0x80

# A wake-up needs a falling edge on RX first: one 0xFF byte (its start bit),
# then the wake command within 100 ms (SPS30 datasheet, UART wake-up).
WAKE_PULSE = b"\xff"

WARMUP_S = 30.0  # start-up time is 8..30 s depending on concentration
MAX_FRAME = 2 * (5 + 255 + 1)  # worst case: every byte stuffed


class SPS30CommandError(ReadError):
    """The sensor refused a command (non-zero state byte)."""

    def __init__(self, command: int, state: int) -> None:
        self.command = command
        self.state = state
        reason = STATE_ERRORS.get(state & 0x7F, "unknown error")
        super().__init__(
            f"SPS30 refused command 0x{command:02X}: state 0x{state & 0x7F:02X} ({reason})"
        )


class SPS30StateError(SPS30CommandError):
    """State 0x43: e.g. fan cleaning while idle, sleep while measuring."""


def checksum(content: bytes) -> int:
    """Bitwise NOT of the low byte of the sum (over the unstuffed content, CHK excluded)."""
    return (~sum(content)) & 0xFF


def stuff(content: bytes) -> bytes:
    out = bytearray()
    for b in content:
        if b in _STUFF:
            out += bytes((ESCAPE, _STUFF[b]))
        else:
            out.append(b)
    return bytes(out)


def unstuff(stuffed: bytes) -> bytes:
    """Undo byte stuffing one byte at a time; raise ``FrameError`` on a bad escape."""
    out = bytearray()
    escaped = False
    for b in stuffed:
        if escaped:
            if b not in _UNSTUFF:
                raise FrameError(f"SPS30: invalid escape 7D {b:02X}")
            out.append(_UNSTUFF[b])
            escaped = False
        elif b == ESCAPE:
            escaped = True
        elif b == FLAG:
            raise FrameError("SPS30: flag byte inside a frame")
        else:
            out.append(b)
    if escaped:
        raise FrameError("SPS30: frame ends in the middle of an escape")
    return bytes(out)


def _wrap(content: bytes) -> bytes:
    return bytes((FLAG,)) + stuff(content + bytes((checksum(content),))) + bytes((FLAG,))


def build_mosi(command: int, data: bytes = b"", address: int = 0) -> bytes:
    """A whole host frame, flags and stuffing included."""
    if len(data) > 255:
        raise ValueError("SHDLC data is at most 255 bytes")
    return _wrap(bytes((address, command, len(data))) + data)


def build_miso(command: int, state: int = 0, data: bytes = b"", address: int = 0) -> bytes:
    """A whole sensor frame (for simulators and tests)."""
    if len(data) > 255:
        raise ValueError("SHDLC data is at most 255 bytes")
    return _wrap(bytes((address, command, state, len(data))) + data)


def verify(stuffed_content: bytes) -> bytes:
    """Unstuff the bytes between two flags and check CHK; return content without CHK."""
    content = unstuff(stuffed_content)
    if len(content) < 4:
        raise FrameError(f"SPS30: frame of {len(content)} bytes is too short")
    if checksum(content[:-1]) != content[-1]:
        raise ChecksumError(f"SPS30 checksum {checksum(content[:-1]):02X} != {content[-1]:02X}")
    return content[:-1]


@dataclass(frozen=True, slots=True)
class SPS30Response:
    address: int
    command: int
    state: int
    data: bytes
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def error_code(self) -> int:
        return self.state & 0x7F

    @property
    def device_error(self) -> bool:
        return bool(self.state & STATE_DEVICE_ERROR_FLAG)


@dataclass(frozen=True, slots=True)
class SPS30Request:
    address: int
    command: int
    data: bytes


def decode_miso(content: bytes, raw: bytes = b"") -> SPS30Response:
    """``ADR CMD STATE LEN DATA`` (CHK already checked and removed) -> response."""
    if len(content) < 4:
        raise FrameError("SPS30: MISO frame too short")
    length = content[3]
    if len(content) != 4 + length:
        raise FrameError(f"SPS30: LEN says {length} data bytes, frame has {len(content) - 4}")
    return SPS30Response(content[0], content[1], content[2], bytes(content[4:]), raw=raw)


def decode_mosi(content: bytes) -> SPS30Request:
    """``ADR CMD LEN DATA`` (CHK already checked and removed) -> request (the sensor's side)."""
    if len(content) < 3:
        raise FrameError("SPS30: MOSI frame too short")
    length = content[2]
    if len(content) != 3 + length:
        raise FrameError(f"SPS30: LEN says {length} data bytes, frame has {len(content) - 3}")
    return SPS30Request(content[0], content[1], bytes(content[3:]))


def decode_frame(frame: bytes) -> SPS30Response:
    """Decode one whole MISO frame including both flags (pure; for fixtures and tests)."""
    if len(frame) < 2 or frame[0] != FLAG or frame[-1] != FLAG:
        raise FrameError("SPS30 frame must start and end with 7E")
    return decode_miso(verify(frame[1:-1]), raw=bytes(frame))


@dataclass(frozen=True, slots=True)
class SPS30Measurement:
    """Mass in µg/m³, number concentrations in #/cm³, typical particle size in µm."""

    pm1: float
    pm25: float
    pm4: float
    pm10: float
    nc0_5: float
    nc1: float
    nc2_5: float
    nc4: float
    nc10: float
    typical_size: float

    @property
    def all_zero(self) -> bool:
        return not any((self.pm1, self.pm25, self.pm4, self.pm10, self.nc0_5, self.nc1,
                        self.nc2_5, self.nc4, self.nc10))

    def as_values(self) -> dict[str, float]:
        return {
            "pm1": self.pm1, "pm25": self.pm25, "pm4": self.pm4, "pm10": self.pm10,
            "nc0_5": self.nc0_5, "nc1": self.nc1, "nc2_5": self.nc2_5, "nc4": self.nc4,
            "nc10": self.nc10, "typical_size": self.typical_size,
        }


_FLOATS = struct.Struct(">10f")


def decode_measurement(data: bytes) -> SPS30Measurement:
    """The 40-byte read-values payload (big-endian float32 mode)."""
    if len(data) != MEASUREMENT_SIZE:
        raise FrameError(f"SPS30: measurement has {len(data)} bytes, want {MEASUREMENT_SIZE}")
    return SPS30Measurement(*_FLOATS.unpack(data))


def encode_measurement(m: SPS30Measurement) -> bytes:
    return _FLOATS.pack(m.pm1, m.pm25, m.pm4, m.pm10, m.nc0_5, m.nc1, m.nc2_5, m.nc4, m.nc10,
                        m.typical_size)


def decode_string(data: bytes) -> str:
    """Device-info strings are NUL-terminated ASCII."""
    return data.split(b"\x00", 1)[0].decode("ascii", errors="replace")


def check_state(response: SPS30Response) -> SPS30Response:
    """Raise ``SPS30StateError``/``SPS30CommandError`` for a refused command."""
    code = response.error_code
    if code == STATE_NOT_ALLOWED:
        raise SPS30StateError(response.command, response.state)
    if code:
        raise SPS30CommandError(response.command, response.state)
    return response


# -- commands ----------------------------------------------------------------------


def cmd_start() -> bytes:
    return build_mosi(CMD_START, START_FLOAT)


def cmd_stop() -> bytes:
    return build_mosi(CMD_STOP)


def cmd_read() -> bytes:
    return build_mosi(CMD_READ)


def cmd_sleep() -> bytes:
    return build_mosi(CMD_SLEEP)


def cmd_wake() -> bytes:
    """``7E 00 7D 31 00 EE 7E``: the command byte 0x11 is itself stuffed."""
    return build_mosi(CMD_WAKE)


def cmd_fan_clean() -> bytes:
    return build_mosi(CMD_FAN_CLEAN)


def cmd_device_info(which: int) -> bytes:
    return build_mosi(CMD_DEVICE_INFO, bytes((which,)))


def cmd_reset() -> bytes:
    return build_mosi(CMD_RESET)


# -- stream parsing -------------------------------------------------------------------


class ShdlcSplitter:
    """Cuts a byte stream at ``7E`` flags into verified, unstuffed frame contents.

    Every flag closes whatever came since the previous flag; an empty span is
    the gap between an end flag and the next start flag. Bytes before the first
    flag are an unknown partial frame and are dropped unjudged. A span longer
    than any legal frame is dropped as garbage so the buffer stays bounded.
    """

    def __init__(self) -> None:
        self._span = bytearray()
        self._synced = False
        self.frames = 0
        self.checksum_errors = 0
        self.frame_errors = 0
        self.garbage_bytes = 0
        self.last_error: ReadError | None = None

    def reset(self) -> None:
        self._span.clear()
        self._synced = False

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Return ``(content_without_chk, raw_frame)`` for every good frame in ``data``."""
        out: list[tuple[bytes, bytes]] = []
        for b in data:
            if b != FLAG:
                if self._synced:
                    self._span.append(b)
                    if len(self._span) > MAX_FRAME:
                        self.frame_errors += 1
                        self.garbage_bytes += len(self._span)
                        self.last_error = FrameError("SPS30: no closing flag")
                        self._span.clear()
                        self._synced = False
                else:
                    self.garbage_bytes += 1
                continue
            if self._synced and self._span:
                stuffed = bytes(self._span)
                self._span.clear()
                try:
                    content = verify(stuffed)
                except ChecksumError as exc:
                    self.checksum_errors += 1
                    self.last_error = exc
                except FrameError as exc:
                    self.frame_errors += 1
                    self.last_error = exc
                else:
                    self.frames += 1
                    out.append((content, b"\x7e" + stuffed + b"\x7e"))
            self._synced = True
        return out


class SPS30Parser:
    """``ShdlcSplitter`` plus MISO decoding: stream -> ``SPS30Response`` list."""

    def __init__(self) -> None:
        self.splitter = ShdlcSplitter()
        self.frame_errors = 0  # MISO frames with a good CHK but an inconsistent LEN
        self._last_error: ReadError | None = None

    @property
    def checksum_errors(self) -> int:
        return self.splitter.checksum_errors

    @property
    def errors(self) -> int:
        return self.splitter.checksum_errors + self.splitter.frame_errors + self.frame_errors

    @property
    def last_error(self) -> ReadError | None:
        return self._last_error or self.splitter.last_error

    def reset(self) -> None:
        self.splitter.reset()

    def feed(self, data: bytes) -> list[SPS30Response]:
        out: list[SPS30Response] = []
        for content, raw in self.splitter.feed(data):
            try:
                out.append(decode_miso(content, raw=raw))
            except FrameError as exc:
                self.frame_errors += 1
                self._last_error = exc
        return out


# -- driver ---------------------------------------------------------------------------


class SPS30Driver(SerialSensor):
    """``SensorDriver`` for an SPS30 on UART.

    The SPS30 never pushes data: ``read`` asks for the values measured since
    the last read (``None`` when there is nothing new; it measures once per
    second). The measurement is started lazily on the first read and again
    after a reconnect. Readings within ``warmup_s`` of a start or wake, or with
    all-zero values, are flagged ``warming_up``; a set device-error bit in the
    state byte adds ``device_error``.
    """

    def __init__(
        self,
        port: SerialLike,
        clock: Callable[[], float] = time.monotonic,
        name: str = "pm",
        *,
        warmup_s: float = WARMUP_S,
        timeout_s: float = 1.0,
        assume_warm: bool = False,
    ) -> None:
        self._measuring = False
        self._needs_start = True
        super().__init__(port, clock, name, SPS30Parser(), warmup_s=warmup_s, timeout_s=timeout_s,
                         assume_warm=assume_warm)

    @property
    def measuring(self) -> bool:
        return self._measuring

    # -- transactions -----------------------------------------------------------

    def _transact(self, frame: bytes, command: int, *, check: bool = True) -> SPS30Response:
        # Bytes already waiting answer no request of ours (a late reply, line
        # noise): parse them away and drop any half frame, so that neither is
        # taken for this answer nor spoils its start flag.
        self._parser.feed(read_available(self._port))
        self._parser.reset()
        errors_before = self._parser.errors
        self._port.write(frame)
        found: list[SPS30Response] = []

        def take(chunk: bytes) -> bool:
            found.extend(r for r in self._parser.feed(chunk) if r.command == command)
            # SHDLC is strictly request/response: a rejected frame is almost
            # surely our answer, so fail now instead of waiting out the timeout.
            return bool(found) or self._parser.errors > errors_before

        read_until_deadline(self._port, take, self._timeout_s)
        if not found:
            if self._parser.errors > errors_before and self._parser.last_error is not None:
                raise self._parser.last_error
            raise SensorTimeout(
                f"SPS30: no answer to command 0x{command:02X} within {self._timeout_s} s"
            )
        response = found[-1]
        return check_state(response) if check else response

    def start(self) -> None:
        """Start measuring (float output). Tolerates a sensor that already measures."""
        try:
            self._transact(cmd_start(), CMD_START)
        except SPS30StateError:
            # Already measuring (e.g. the agent restarted): restart cleanly so
            # the output format is surely float.
            self._transact(cmd_stop(), CMD_STOP)
            self._transact(cmd_start(), CMD_START)
        self._measuring = True
        self._needs_start = False
        self._warm_since = self._clock()

    def stop(self) -> None:
        self._transact(cmd_stop(), CMD_STOP)
        self._measuring = False

    def sleep(self) -> None:
        """Stop measuring (sleep is only allowed when idle) and sleep; ``read`` returns None."""
        if self._measuring:
            self.stop()
        self._transact(cmd_sleep(), CMD_SLEEP)
        self._asleep = True
        self._parser.reset()

    def wake(self, *, start: bool = True) -> None:
        """Wake up (pulse + stuffed wake frame) and, by default, start measuring again."""
        self._port.write(WAKE_PULSE)
        self._transact(cmd_wake(), CMD_WAKE)
        self._asleep = False
        self._measuring = False
        self._needs_start = start
        if start:
            self.start()

    def fan_clean(self) -> None:
        """Run the fan at full speed for 10 s (only while measuring: else SPS30StateError)."""
        self._transact(cmd_fan_clean(), CMD_FAN_CLEAN)

    def serial_number(self) -> str:
        response = self._transact(cmd_device_info(INFO_SERIAL_NUMBER), CMD_DEVICE_INFO)
        return decode_string(response.data)

    def product_type(self) -> str:
        response = self._transact(cmd_device_info(INFO_PRODUCT_TYPE), CMD_DEVICE_INFO)
        return decode_string(response.data)

    def reset(self) -> None:
        """Soft reset: the sensor comes back idle."""
        self._transact(cmd_reset(), CMD_RESET)
        self._measuring = False
        self._needs_start = True

    # -- reading -------------------------------------------------------------------

    def read(self) -> Reading | None:
        if self._asleep:
            return None
        if self._needs_start:
            self.start()
        try:
            response = self._transact(cmd_read(), CMD_READ)
        except SPS30StateError:
            # Not measuring after all: the sensor was reset or power-cycled
            # behind our back (e.g. with the adapter, across a reconnect).
            # Start again and ask once more; a second refusal propagates.
            self._needs_start = True
            self.start()
            response = self._transact(cmd_read(), CMD_READ)
        if not response.data:
            return None  # no new measurement since the last read
        measurement = decode_measurement(response.data)
        now = self._clock()
        flags: list[str] = []
        if measurement.all_zero or now - self._warm_since < self._warmup_s:
            flags.append("warming_up")
        if response.device_error:
            flags.append("device_error")
        return Reading(
            sensor=self.name,
            values=measurement.as_values(),
            flags=tuple(flags),
            meta={"device": "sps30"},
        )

    def _after_reopen(self) -> None:
        self._parser.reset()
        self._measuring = False
        self._asleep = False
        self._needs_start = True


# [sensors.NAME] options of driver = "sps30" (edge/driver_factory.py builds it).
OPTIONS = DriverOptions({"port": serial_port(), "baudrate": baudrate(115200)})
