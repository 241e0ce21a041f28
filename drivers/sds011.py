"""Nova Fitness SDS011 / SDS018 / SDS021 particulate-matter sensors (UART 9600 8N1).

Sensor to host, 10 bytes: ``AA C0 pm25 pm25 pm10 pm10 id id CHK AB`` for data
(little-endian tenths of µg/m³) and ``AA C5 CMD d1 d2 d3 id id CHK AB`` for
command replies; CHK is the low byte of the sum of bytes 2..7.
Host to sensor, 19 bytes: ``AA B4 CMD d1..d12 id id CHK AB``, CHK over bytes
2..16, id ``FF FF`` addressing any sensor.

The device id is kept as the 16-bit number whose bytes appear on the wire in
that order (``A1 60`` is ``0xA160``), the same order in data frames, replies
and commands.

Layers: pure functions (``decode_frame``, the ``cmd_*`` builders,
``decode_command`` and the reply interpreters), ``SDS011Parser`` (stream ->
verified frames with resync) and ``SDS011Driver`` (the ``SensorDriver``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from drivers.base import Reading
from drivers.serialport import SerialLike, SerialSensor, read_available, read_until_deadline
from drivers.options import DriverOptions, Option, baudrate, serial_port
from core.errors import ChecksumError, FrameError, ReadError, SensorTimeout

log = logging.getLogger(__name__)

HEAD = 0xAA
TAIL = 0xAB
KIND_DATA = 0xC0
KIND_REPLY = 0xC5
KIND_COMMAND = 0xB4
FRAME_SIZE = 10
COMMAND_SIZE = 19
ANY_ID = 0xFFFF

CMD_REPORTING_MODE = 0x02
CMD_QUERY_DATA = 0x04
CMD_SET_ID = 0x05
CMD_SLEEP_WORK = 0x06
CMD_FIRMWARE = 0x07
CMD_WORKING_PERIOD = 0x08

MAX_WORKING_PERIOD_MIN = 30
WARMUP_S = 30.0


def checksum(data: bytes) -> int:
    """Low byte of the plain sum (over bytes 2..7 of a frame, 2..16 of a command)."""
    return sum(data) & 0xFF


@dataclass(frozen=True, slots=True)
class SDSData:
    """One measurement: PM2.5 and PM10 in µg/m³ (0.1 resolution)."""

    pm25: float
    pm10: float
    device_id: int
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def all_zero(self) -> bool:
        return self.pm25 == 0 and self.pm10 == 0


@dataclass(frozen=True, slots=True)
class SDSReply:
    """A command reply (``AA C5``): the command it answers and data bytes d1..d3."""

    command: int
    d1: int
    d2: int
    d3: int
    device_id: int
    raw: bytes = field(default=b"", repr=False, compare=False)


SDSMessage = SDSData | SDSReply


# -- pure decoding / encoding -----------------------------------------------------


def decode_frame(frame: bytes) -> SDSMessage:
    """Decode one 10-byte sensor frame; raise ``FrameError``/``ChecksumError``."""
    if len(frame) != FRAME_SIZE:
        raise FrameError(f"SDS011 frame has {len(frame)} bytes, want {FRAME_SIZE}")
    if frame[0] != HEAD or frame[1] not in (KIND_DATA, KIND_REPLY):
        raise FrameError("SDS011 frame does not start with AA C0 / AA C5")
    if frame[9] != TAIL:
        raise FrameError("SDS011 frame does not end with AB")
    if checksum(frame[2:8]) != frame[8]:
        raise ChecksumError(f"SDS011 checksum {checksum(frame[2:8]):02X} != {frame[8]:02X}")
    device_id = (frame[6] << 8) | frame[7]
    if frame[1] == KIND_DATA:
        pm25 = (frame[2] | (frame[3] << 8)) / 10.0
        pm10 = (frame[4] | (frame[5] << 8)) / 10.0
        return SDSData(pm25=pm25, pm10=pm10, device_id=device_id, raw=bytes(frame))
    return SDSReply(frame[2], frame[3], frame[4], frame[5], device_id, raw=bytes(frame))


def _frame(kind: int, payload: bytes, device_id: int) -> bytes:
    body = payload + bytes(((device_id >> 8) & 0xFF, device_id & 0xFF))
    return bytes((HEAD, kind)) + body + bytes((checksum(body), TAIL))


def build_data_frame(pm25: float, pm10: float, device_id: int = 0xA160) -> bytes:
    """The data frame a sensor sends (for simulators and tests)."""
    a = max(0, min(0xFFFF, round(pm25 * 10)))
    b = max(0, min(0xFFFF, round(pm10 * 10)))
    return _frame(KIND_DATA, bytes((a & 0xFF, a >> 8, b & 0xFF, b >> 8)), device_id)


def build_reply(
    command: int, d1: int = 0, d2: int = 0, d3: int = 0, device_id: int = 0xA160
) -> bytes:
    """An ``AA C5`` reply frame (for simulators and tests)."""
    return _frame(KIND_REPLY, bytes((command, d1 & 0xFF, d2 & 0xFF, d3 & 0xFF)), device_id)


def build_command(command: int, data: bytes = b"", device_id: int = ANY_ID) -> bytes:
    """``AA B4 CMD d1..d12 id id CHK AB``; ``data`` fills d1.. and the rest is zero."""
    if len(data) > 12:
        raise ValueError("SDS011 commands carry at most 12 data bytes")
    body = bytes((command,)) + data.ljust(12, b"\x00") + bytes(
        ((device_id >> 8) & 0xFF, device_id & 0xFF)
    )
    return bytes((HEAD, KIND_COMMAND)) + body + bytes((checksum(body), TAIL))


@dataclass(frozen=True, slots=True)
class SDSCommand:
    """A host command as the sensor sees it (the simulator's side)."""

    command: int
    data: bytes  # d1..d12
    device_id: int


def decode_command(frame: bytes) -> SDSCommand:
    if len(frame) != COMMAND_SIZE or frame[0] != HEAD or frame[1] != KIND_COMMAND:
        raise FrameError("not a 19-byte SDS011 command")
    if frame[18] != TAIL:
        raise FrameError("SDS011 command does not end with AB")
    if checksum(frame[2:17]) != frame[17]:
        raise ChecksumError("SDS011 command checksum mismatch")
    return SDSCommand(frame[2], bytes(frame[3:15]), (frame[15] << 8) | frame[16])


def cmd_set_reporting_mode(query: bool, device_id: int = ANY_ID) -> bytes:
    """Reporting mode: ``query=False`` pushes a frame every second, ``True`` answers queries."""
    return build_command(CMD_REPORTING_MODE, bytes((1, 1 if query else 0)), device_id)


def cmd_get_reporting_mode(device_id: int = ANY_ID) -> bytes:
    return build_command(CMD_REPORTING_MODE, bytes((0, 0)), device_id)


def cmd_query_data(device_id: int = ANY_ID) -> bytes:
    return build_command(CMD_QUERY_DATA, b"", device_id)


def cmd_set_device_id(new_id: int, device_id: int = ANY_ID) -> bytes:
    if not 0 <= new_id <= 0xFFFF:
        raise ValueError("SDS011 device id is 16 bits")
    data = bytes(10) + bytes(((new_id >> 8) & 0xFF, new_id & 0xFF))  # d11, d12
    return build_command(CMD_SET_ID, data, device_id)


def cmd_sleep(device_id: int = ANY_ID) -> bytes:
    return build_command(CMD_SLEEP_WORK, bytes((1, 0)), device_id)


def cmd_work(device_id: int = ANY_ID) -> bytes:
    return build_command(CMD_SLEEP_WORK, bytes((1, 1)), device_id)


def cmd_get_sleep_work(device_id: int = ANY_ID) -> bytes:
    return build_command(CMD_SLEEP_WORK, bytes((0, 0)), device_id)


def cmd_firmware_version(device_id: int = ANY_ID) -> bytes:
    return build_command(CMD_FIRMWARE, b"", device_id)


def cmd_set_working_period(minutes: int, device_id: int = ANY_ID) -> bytes:
    """0 = continuous; 1..30 = measure about 30 s every ``minutes`` then sleep."""
    if not 0 <= minutes <= MAX_WORKING_PERIOD_MIN:
        raise ValueError(f"SDS011 working period must be 0..30 minutes, not {minutes}")
    return build_command(CMD_WORKING_PERIOD, bytes((1, minutes)), device_id)


def cmd_get_working_period(device_id: int = ANY_ID) -> bytes:
    return build_command(CMD_WORKING_PERIOD, bytes((0, 0)), device_id)


# -- reply interpretation (pure) ----------------------------------------------------


def reply_reporting_query(reply: SDSReply) -> bool:
    """True when the reply says the sensor is in query (passive) mode."""
    return reply.d2 == 1


def reply_working(reply: SDSReply) -> bool:
    """True when a sleep/work reply says the sensor works (fan on)."""
    return reply.d2 == 1


def reply_firmware(reply: SDSReply) -> tuple[int, int, int]:
    """Firmware date as ``(year, month, day)`` with a two-digit year."""
    return reply.d1, reply.d2, reply.d3


def reply_working_period(reply: SDSReply) -> int:
    return reply.d2


# -- stream parser ------------------------------------------------------------------


class SDS011Parser:
    """Splits an SDS011 byte stream into verified frames, resynchronising on ``AA C0|C5``.

    After a bad tail or checksum only the leading ``AA`` is dropped: the real
    frame may start inside the bytes that looked like a frame.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.frames = 0
        self.checksum_errors = 0
        self.frame_errors = 0
        self.garbage_bytes = 0
        self.last_error: ReadError | None = None

    def reset(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[SDSMessage]:
        self._buf += data
        buf = self._buf
        out: list[SDSMessage] = []
        while True:
            start = buf.find(HEAD)
            if start < 0:
                self.garbage_bytes += len(buf)
                buf.clear()
                break
            if start:
                self.garbage_bytes += start
                del buf[:start]
            if len(buf) < 2:
                break
            if buf[1] not in (KIND_DATA, KIND_REPLY):
                self.garbage_bytes += 1
                del buf[:1]
                continue
            if len(buf) < FRAME_SIZE:
                break
            try:
                message = decode_frame(bytes(buf[:FRAME_SIZE]))
            except ChecksumError as exc:
                self.checksum_errors += 1
                self.last_error = exc
                del buf[:1]
                continue
            except FrameError as exc:
                self.frame_errors += 1
                self.last_error = exc
                del buf[:1]
                continue
            del buf[:FRAME_SIZE]
            self.frames += 1
            out.append(message)
        return out


# -- driver -------------------------------------------------------------------------

Mode = Literal["active", "query"]


class SDS011Driver(SerialSensor):
    """``SensorDriver`` for an SDS011/SDS018/SDS021.

    Active mode: the sensor pushes a frame every second (or once per working
    period); ``read`` returns the newest one or ``None``. Query mode: ``read``
    asks for one frame and waits at most ``timeout_s``. Readings within
    ``warmup_s`` of waking (driver start included) or all-zero are flagged
    ``warming_up``. ``device_id`` addresses one sensor (``0xFFFF`` = any).
    """

    def __init__(
        self,
        port: SerialLike,
        clock: Callable[[], float] = time.monotonic,
        name: str = "pm",
        *,
        mode: Mode = "active",
        device_id: int = ANY_ID,
        warmup_s: float = WARMUP_S,
        timeout_s: float = 1.0,
        stale_after_s: float = 10.0,
        assume_warm: bool = False,
    ) -> None:
        if mode not in ("active", "query"):
            raise ValueError(f"SDS011 mode must be 'active' or 'query', not {mode!r}")
        self._mode: Mode = mode
        self._device_id = device_id
        self._stale_after_s = stale_after_s
        self._working_period = 0
        self._pending: SDSData | None = None  # data seen while waiting for a reply
        self._needs_setup = True
        super().__init__(port, clock, name, SDS011Parser(), warmup_s=warmup_s, timeout_s=timeout_s,
                         assume_warm=assume_warm)
        self._last_frame_at = clock()

    @property
    def mode(self) -> Mode:
        return self._mode

    # -- transactions --------------------------------------------------------

    def _transact(self, command: bytes, expect: int) -> SDSReply:
        """Send ``command`` and wait for the ``AA C5`` reply to ``expect``."""
        self._port.write(command)
        replies: list[SDSReply] = []

        def take(chunk: bytes) -> bool:
            for message in self._parser.feed(chunk):
                if isinstance(message, SDSReply):
                    if message.command == expect:
                        replies.append(message)
                else:
                    self._pending = message
            return bool(replies)

        read_until_deadline(self._port, take, self._timeout_s)
        if not replies:
            raise SensorTimeout(
                f"SDS011: no reply to command {expect:02X} within {self._timeout_s} s"
            )
        return replies[-1]

    def set_reporting_mode(self, mode: Mode) -> None:
        if mode not in ("active", "query"):
            raise ValueError(f"SDS011 mode must be 'active' or 'query', not {mode!r}")
        command = cmd_set_reporting_mode(mode == "query", self._device_id)
        reply = self._transact(command, CMD_REPORTING_MODE)
        if reply_reporting_query(reply) != (mode == "query"):
            raise ReadError(f"SDS011 did not switch to {mode} mode")
        self._mode = mode
        self._needs_setup = False

    def sleep(self) -> None:
        """Fan and laser off. A sleeping SDS011 answers nothing but the work command."""
        self._transact(cmd_sleep(self._device_id), CMD_SLEEP_WORK)
        self._asleep = True
        self._pending = None
        self._parser.reset()

    def wake(self) -> None:
        """Fan on; readings are flagged ``warming_up`` for ``warmup_s``."""
        reply = self._transact(cmd_work(self._device_id), CMD_SLEEP_WORK)
        if not reply_working(reply):
            raise ReadError("SDS011 did not confirm work mode")
        self._asleep = False
        self._warm_since = self._last_frame_at = self._clock()

    def firmware_version(self) -> tuple[int, int, int]:
        """Firmware date ``(yy, mm, dd)``."""
        return reply_firmware(self._transact(cmd_firmware_version(self._device_id), CMD_FIRMWARE))

    def set_working_period(self, minutes: int) -> None:
        """0 = continuous, 1..30 minutes = one sample per period (fan off in between)."""
        reply = self._transact(cmd_set_working_period(minutes, self._device_id), CMD_WORKING_PERIOD)
        if reply_working_period(reply) != minutes:
            raise ReadError(f"SDS011 reports period {reply.d2}, asked {minutes}")
        self._working_period = minutes

    def working_period(self) -> int:
        reply = self._transact(cmd_get_working_period(self._device_id), CMD_WORKING_PERIOD)
        self._working_period = reply_working_period(reply)
        return self._working_period

    def set_device_id(self, new_id: int) -> int:
        """Give the sensor a new id (kept through power-off); returns the id it reports."""
        reply = self._transact(cmd_set_device_id(new_id, self._device_id), CMD_SET_ID)
        self._device_id = reply.device_id
        return reply.device_id

    # -- reading ---------------------------------------------------------------

    def read(self) -> Reading | None:
        if self._asleep:
            return None
        if self._needs_setup:
            self._setup()
        if self._mode == "query":
            return self._read_query()
        return self._read_active()

    def _setup(self) -> None:
        # A previous run may have left the sensor asleep, and a sleeping SDS011
        # ignores everything but the work command: wake it, then set the mode.
        # The warm-up clock is not restarted here: construction (or the
        # reconnect) already started it, unless the caller said the sensor is warm.
        self._transact(cmd_work(self._device_id), CMD_SLEEP_WORK)
        self.set_reporting_mode(self._mode)

    def _stale_limit(self) -> float:
        # With a working period the sensor legitimately stays silent for minutes.
        return self._stale_after_s + 60.0 * self._working_period

    def _read_active(self) -> Reading | None:
        errors_before = self._parser.checksum_errors + self._parser.frame_errors
        waiting = self._port.in_waiting
        data = self._port.read(waiting if waiting else 1)
        newest = self._pending
        self._pending = None
        for message in self._parser.feed(data):
            if isinstance(message, SDSData):
                newest = message
        now = self._clock()
        if newest is not None:
            self._last_frame_at = now
            return self._to_reading(newest, now)
        if self._parser.checksum_errors + self._parser.frame_errors > errors_before:
            raise self._parser.last_error or ReadError("SDS011: corrupt frame")
        if now - self._last_frame_at > self._stale_limit():
            raise SensorTimeout(f"SDS011: no valid frame for {now - self._last_frame_at:.1f} s")
        return None

    def _read_query(self) -> Reading | None:
        # Stale bytes answer no request of ours: parse them away before asking.
        self._parser.feed(read_available(self._port))
        self._parser.reset()
        errors_before = self._parser.checksum_errors + self._parser.frame_errors
        self._pending = None
        self._port.write(cmd_query_data(self._device_id))
        found: list[SDSData] = []

        def take(chunk: bytes) -> bool:
            found.extend(m for m in self._parser.feed(chunk) if isinstance(m, SDSData))
            # A corrupt answer is still the answer: do not wait out the timeout.
            # (unless more bytes are already waiting: they may hold the good frame).
            errors = self._parser.checksum_errors + self._parser.frame_errors
            return bool(found) or (errors > errors_before and not self._port.in_waiting)

        read_until_deadline(self._port, take, self._timeout_s)
        if found:
            now = self._clock()
            self._last_frame_at = now
            return self._to_reading(found[-1], now)
        if self._parser.checksum_errors + self._parser.frame_errors > errors_before:
            raise self._parser.last_error or ReadError("SDS011: corrupt frame")
        raise SensorTimeout(f"SDS011: no answer to a query within {self._timeout_s} s")

    def _after_reopen(self) -> None:
        self._parser.reset()
        self._pending = None
        self._needs_setup = True
        self._asleep = False
        self._warm_since = self._last_frame_at = self._clock()

    def _to_reading(self, data: SDSData, now: float) -> Reading:
        flags: tuple[str, ...] = ()
        # Time only: unlike the PMS, 0.0/0.0 is a plausible SDS011 reading in
        # clean air (the fixtures hold 0.6), so zeros alone prove nothing.
        if now - self._warm_since < self._warmup_s:
            flags = ("warming_up",)
        return Reading(
            sensor=self.name,
            values={"pm25": data.pm25, "pm10": data.pm10},
            flags=flags,
            meta={"device": "sds011", "device_id": f"{data.device_id:04X}", "mode": self._mode},
        )


# [sensors.NAME] options of driver = "sds011" (edge/driver_factory.py builds it).
OPTIONS = DriverOptions({
    "port": serial_port(),
    "baudrate": baudrate(9600),
    "mode": Option("query", choices=("active", "query")),
})
