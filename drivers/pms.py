"""Plantower PMS5003 / PMS7003 / PMSA003 particulate-matter sensors (UART 9600 8N1).

Three layers, each usable alone:

* pure protocol functions: ``decode_frame`` (one whole frame -> typed record),
  ``build_data_frame`` (what a sensor sends; the simulator uses it) and the
  command builders, all without I/O;
* ``PMSParser``: fed arbitrary chunks of the byte stream, returns the frames
  whose checksum holds and silently resynchronises after garbage;
* ``PMSx003Driver``: the ``SensorDriver`` for the agent, active or passive mode,
  sleep/wake and the warm-up flag.

Data frame (32 bytes, big-endian words): ``42 4D 00 1C``, PM1/PM2.5/PM10 at
CF=1, PM1/PM2.5/PM10 "atmospheric environment", six particle counts per 0.1 L,
a reserved word, and a 16-bit sum of bytes 0..29. Command acks are short frames
of length 4 (``42 4D 00 04 CMD DATA CHK``).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from drivers.base import Reading
from drivers.serialport import SerialLike, SerialSensor, read_available, read_until_deadline
from drivers.options import DriverOptions, Option, baudrate, serial_port
from core.errors import ChecksumError, FrameError, ReadError, SensorTimeout

log = logging.getLogger(__name__)

START = b"\x42\x4d"
DATA_LENGTH = 28  # bytes after the length word in a data frame
ACK_LENGTH = 4  # bytes after the length word in a command ack
FRAME_SIZE = 4 + DATA_LENGTH
ACK_SIZE = 4 + ACK_LENGTH
COMMAND_SIZE = 7

CMD_MODE = 0xE1  # data 0 = passive, 1 = active
CMD_READ = 0xE2  # passive mode: send one frame
CMD_SLEEP = 0xE4  # data 0 = sleep, 1 = wake

WARMUP_S = 30.0  # datasheet: data not stable until 30 s after wake

_WORDS = struct.Struct(">13H")  # 12 values + reserved word, bytes 4..29


def checksum(data: bytes) -> int:
    """16-bit sum of ``data`` (every PMS frame and command uses it)."""
    return sum(data) & 0xFFFF


@dataclass(frozen=True, slots=True)
class PMSFrame:
    """One data frame. Mass in µg/m³; counts per 0.1 L of air, as on the wire."""

    pm1_cf1: int
    pm25_cf1: int
    pm10_cf1: int
    pm1: int
    pm25: int
    pm10: int
    n0_3: int
    n0_5: int
    n1_0: int
    n2_5: int
    n5_0: int
    n10: int
    reserved: int = 0
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def all_zero(self) -> bool:
        """True for the all-zero payload a PMS sends while its fan spins up."""
        return not any(
            (self.pm1_cf1, self.pm25_cf1, self.pm10_cf1, self.pm1, self.pm25, self.pm10,
             self.n0_3, self.n0_5, self.n1_0, self.n2_5, self.n5_0, self.n10)
        )

    def counts_per_cm3(self) -> dict[str, float]:
        """Particle counts converted from per 0.1 L (100 cm³) to per cm³."""
        return {
            "n0_3": self.n0_3 / 100.0,
            "n0_5": self.n0_5 / 100.0,
            "n1_0": self.n1_0 / 100.0,
            "n2_5": self.n2_5 / 100.0,
            "n5_0": self.n5_0 / 100.0,
            "n10": self.n10 / 100.0,
        }


@dataclass(frozen=True, slots=True)
class PMSAck:
    """The sensor's answer to a mode or sleep command."""

    command: int
    data: int
    raw: bytes = field(default=b"", repr=False, compare=False)


PMSMessage = PMSFrame | PMSAck


# -- pure decoding --------------------------------------------------------------


def decode_frame(frame: bytes) -> PMSMessage:
    """Decode one whole frame (data or ack); raise ``FrameError``/``ChecksumError``.

    The checksum is verified before any field is read, so a corrupt frame can
    never leak a value.
    """
    if len(frame) < 4 or frame[:2] != START:
        raise FrameError("PMS frame does not start with 42 4D")
    length = (frame[2] << 8) | frame[3]
    if length not in (DATA_LENGTH, ACK_LENGTH):
        raise FrameError(f"PMS frame length {length} is neither 28 (data) nor 4 (ack)")
    if len(frame) != 4 + length:
        raise FrameError(f"PMS frame of length {length} has {len(frame)} bytes, want {4 + length}")
    expected = (frame[-2] << 8) | frame[-1]
    actual = checksum(frame[:-2])
    if expected != actual:
        raise ChecksumError(f"PMS checksum {actual:04X} != {expected:04X}")
    if length == ACK_LENGTH:
        return PMSAck(command=frame[4], data=frame[5], raw=bytes(frame))
    return PMSFrame(*_WORDS.unpack_from(frame, 4), raw=bytes(frame))


def build_data_frame(
    *,
    pm_cf1: tuple[int, int, int],
    pm_atm: tuple[int, int, int],
    counts: tuple[int, int, int, int, int, int],
    reserved: int = 0x9700,
) -> bytes:
    """The 32-byte frame a sensor sends for these values (for simulators and tests)."""
    words = [*pm_cf1, *pm_atm, *counts, reserved]
    words = [max(0, min(0xFFFF, int(w))) for w in words]
    body = START + struct.pack(">H", DATA_LENGTH) + _WORDS.pack(*words)
    return body + struct.pack(">H", checksum(body))


def build_ack(command: int, data: int) -> bytes:
    """The 8-byte ack a sensor sends for ``command`` (``42 4D 00 04 CMD DATA CHK``)."""
    body = START + bytes((0x00, ACK_LENGTH, command & 0xFF, data & 0xFF))
    return body + struct.pack(">H", checksum(body))


# -- commands -------------------------------------------------------------------


def build_command(command: int, data: int = 0) -> bytes:
    """``42 4D CMD DATAH DATAL CHKH CHKL`` with the 16-bit sum of the first five bytes."""
    body = START + bytes((command & 0xFF,)) + struct.pack(">H", data & 0xFFFF)
    return body + struct.pack(">H", checksum(body))


def decode_command(frame: bytes) -> tuple[int, int]:
    """Decode one 7-byte host command into ``(command, data)`` (the simulator's side)."""
    if len(frame) != COMMAND_SIZE or frame[:2] != START:
        raise FrameError("not a 7-byte PMS command")
    if checksum(frame[:5]) != (frame[5] << 8) | frame[6]:
        raise ChecksumError("PMS command checksum mismatch")
    return frame[2], (frame[3] << 8) | frame[4]


def cmd_passive_mode() -> bytes:
    return build_command(CMD_MODE, 0)


def cmd_active_mode() -> bytes:
    return build_command(CMD_MODE, 1)


def cmd_passive_read() -> bytes:
    return build_command(CMD_READ, 0)


def cmd_sleep() -> bytes:
    return build_command(CMD_SLEEP, 0)


def cmd_wake() -> bytes:
    return build_command(CMD_SLEEP, 1)


# -- stream parser --------------------------------------------------------------


class PMSParser:
    """Splits a PMS byte stream into verified frames.

    ``feed`` may be given any chunking of the stream (one byte at a time or
    many frames at once). On a bad length or checksum it drops a single byte
    and searches for the next ``42 4D``: a false start inside garbage must not
    swallow a real frame that begins a few bytes later. The buffer never holds
    more than one frame's worth of bytes past a start marker.
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

    def bytes_to_complete(self, size: int = FRAME_SIZE) -> int:
        """Bytes still missing from the frame being received (at least 1).

        A frame whose length word has not arrived yet is taken to be ``size``
        bytes long. After ``feed`` the buffer is empty, a lone 0x42, or the
        start of a frame with a valid length.
        """
        buf = self._buf
        if len(buf) >= 4:
            return max(1, 4 + ((buf[2] << 8) | buf[3]) - len(buf))
        return max(1, size - len(buf))

    def feed(self, data: bytes) -> list[PMSMessage]:
        self._buf += data
        out: list[PMSMessage] = []
        buf = self._buf
        while True:
            start = buf.find(START)
            if start < 0:
                # Keep a trailing 0x42: it may be the first half of a start marker.
                keep = 1 if buf[-1:] == START[:1] else 0
                self.garbage_bytes += len(buf) - keep
                del buf[: len(buf) - keep]
                break
            if start:
                self.garbage_bytes += start
                del buf[:start]
            if len(buf) < 4:
                break
            length = (buf[2] << 8) | buf[3]
            if length not in (DATA_LENGTH, ACK_LENGTH):
                self.frame_errors += 1
                self.last_error = FrameError(f"PMS frame length {length} is invalid")
                del buf[:1]
                continue
            if len(buf) < 4 + length:
                break
            try:
                message = decode_frame(bytes(buf[: 4 + length]))
            except ChecksumError as exc:
                self.checksum_errors += 1
                self.last_error = exc
                del buf[:1]
                continue
            del buf[: 4 + length]
            self.frames += 1
            out.append(message)
        return out


# -- driver ---------------------------------------------------------------------

Mode = Literal["active", "passive"]


class PMSx003Driver(SerialSensor):
    """``SensorDriver`` for a Plantower PMS5003/7003/A003 on a serial port.

    ``read`` in active mode drains what the sensor has pushed and returns the
    newest frame (``None`` if nothing new; ``SensorTimeout`` when nothing valid
    arrived for ``stale_after_s``). In passive mode it asks for one frame and
    waits at most ``timeout_s``. Readings within ``warmup_s`` of wake-up (the
    driver start counts as one: the sensor may have just been powered) or with
    an all-zero payload carry the ``warming_up`` flag.

    The port should be opened with a short read timeout (0.1 s); a
    ``ReconnectingPort`` makes the driver survive an unplugged adapter, and the
    mode is re-sent after it comes back.
    """

    def __init__(
        self,
        port: SerialLike,
        clock: Callable[[], float] = time.monotonic,
        name: str = "pm",
        *,
        mode: Mode = "active",
        warmup_s: float = WARMUP_S,
        timeout_s: float = 1.0,
        stale_after_s: float = 10.0,
        assume_warm: bool = False,
    ) -> None:
        if mode not in ("active", "passive"):
            raise ValueError(f"PMS mode must be 'active' or 'passive', not {mode!r}")
        self._mode: Mode = mode
        self._stale_after_s = stale_after_s
        # The mode is sent lazily on the first read so that constructing a
        # driver never blocks or fails; after a reconnect it is sent again.
        self._needs_setup = True
        super().__init__(port, clock, name, PMSParser(), warmup_s=warmup_s, timeout_s=timeout_s,
                         assume_warm=assume_warm)
        self._last_frame_at = clock()

    # -- properties --------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    # -- commands ------------------------------------------------------------

    def set_mode(self, mode: Mode, *, wait_ack: bool = True) -> None:
        """Switch active/passive; with ``wait_ack`` raise ``SensorTimeout`` if unacknowledged."""
        if mode not in ("active", "passive"):
            raise ValueError(f"PMS mode must be 'active' or 'passive', not {mode!r}")
        self._mode = mode
        self._port.write(cmd_active_mode() if mode == "active" else cmd_passive_mode())
        self._needs_setup = False
        if wait_ack:
            self._wait_ack(CMD_MODE)

    def sleep(self) -> None:
        """Stop the fan and laser; ``read`` returns ``None`` until ``wake``."""
        self._port.write(cmd_sleep())
        self._asleep = True
        try:
            self._wait_ack(CMD_SLEEP)
        except SensorTimeout:
            # Some firmware does not ack; the sensor sleeps all the same.
            log.debug("%s: no ack for sleep", self.name)
        self._parser.reset()

    def wake(self) -> None:
        """Start the fan again; readings are flagged ``warming_up`` for ``warmup_s``."""
        self._port.write(cmd_wake())  # no ack by design
        self._asleep = False
        self._warm_since = self._clock()
        self._last_frame_at = self._warm_since
        # Re-assert the mode on the next read: some units come back in active mode.
        self._needs_setup = True

    # -- reading -------------------------------------------------------------

    def read(self) -> Reading | None:
        if self._asleep:
            return None
        if self._needs_setup:
            self.set_mode(self._mode, wait_ack=False)
        if self._mode == "passive":
            return self._read_passive()
        return self._read_active()

    def _read_active(self) -> Reading | None:
        errors_before = self._parser.checksum_errors + self._parser.frame_errors
        # One read call even when nothing is buffered: it is what notices a
        # vanished port (in_waiting alone reports 0 on a hung-up tty).
        waiting = self._port.in_waiting
        data = self._port.read(waiting if waiting else 1)
        frames = [m for m in self._parser.feed(data) if isinstance(m, PMSFrame)]
        now = self._clock()
        if frames:
            self._last_frame_at = now
            return self._to_reading(frames[-1], now)
        if self._parser.checksum_errors + self._parser.frame_errors > errors_before:
            raise self._parser.last_error or ReadError("PMS: corrupt frame")
        if now - self._last_frame_at > self._stale_after_s:
            raise SensorTimeout(f"PMS: no valid frame for {now - self._last_frame_at:.1f} s")
        return None

    def _read_passive(self) -> Reading | None:
        # Bytes already waiting answer no request of ours (line noise, a late frame):
        # parse them away first, so that an error in them does not end our wait.
        self._parser.feed(read_available(self._port))
        self._parser.reset()
        errors_before = self._parser.checksum_errors + self._parser.frame_errors
        self._port.write(cmd_passive_read())
        found: list[PMSFrame] = []

        def take(chunk: bytes) -> bool:
            found.extend(m for m in self._parser.feed(chunk) if isinstance(m, PMSFrame))
            # A corrupt answer is still the answer: waiting out the timeout would
            # only stall the sampling loop for a frame that is not coming.
            # (unless more bytes are already waiting: they may hold the good frame).
            errors = self._parser.checksum_errors + self._parser.frame_errors
            return bool(found) or (errors > errors_before and not self._port.in_waiting)

        # The answer is one 32-byte data frame: ask the port for what completes it.
        read_until_deadline(self._port, take, self._timeout_s, expect=self._parser.bytes_to_complete)
        if found:
            now = self._clock()
            self._last_frame_at = now
            return self._to_reading(found[-1], now)
        if self._parser.checksum_errors + self._parser.frame_errors > errors_before:
            raise self._parser.last_error or ReadError("PMS: corrupt frame")
        raise SensorTimeout(f"PMS: no frame within {self._timeout_s} s of a passive read")

    def _wait_ack(self, command: int) -> PMSAck:
        acks: list[PMSAck] = []

        def take(chunk: bytes) -> bool:
            acks.extend(
                m for m in self._parser.feed(chunk)
                if isinstance(m, PMSAck) and m.command == command
            )
            return bool(acks)

        read_until_deadline(self._port, take, self._timeout_s)
        if not acks:
            raise SensorTimeout(f"PMS: no ack for command {command:02X}")
        return acks[-1]

    def _after_reopen(self) -> None:
        # The adapter (and likely the sensor) was power-cycled: mode and
        # warm-up start over, and half a frame from before is meaningless.
        # The mode goes out at once, before the command that triggered the
        # reopen, so a passive read is not sent to a sensor back in active mode.
        self._parser.reset()
        self._needs_setup = True
        self._asleep = False
        self._warm_since = self._last_frame_at = self._clock()
        self.set_mode(self._mode, wait_ack=False)

    def _to_reading(self, frame: PMSFrame, now: float) -> Reading:
        flags: tuple[str, ...] = ()
        if frame.all_zero or now - self._warm_since < self._warmup_s:
            flags = ("warming_up",)
        values: dict[str, float] = {
            "pm1": float(frame.pm1),
            "pm25": float(frame.pm25),
            "pm10": float(frame.pm10),
            "pm1_cf1": float(frame.pm1_cf1),
            "pm25_cf1": float(frame.pm25_cf1),
            "pm10_cf1": float(frame.pm10_cf1),
            **frame.counts_per_cm3(),
        }
        return Reading(
            sensor=self.name,
            values=values,
            flags=flags,
            meta={"device": "pmsx003", "mode": self._mode},
        )


# [sensors.NAME] options of driver = "pms5003" / "pms7003" / "pmsa003" (edge/driver_factory.py builds it).
OPTIONS = DriverOptions({
    "port": serial_port(),
    "baudrate": baudrate(9600),
    # passive: the driver asks for each frame (and can put the sensor to sleep); active: it streams.
    "mode": Option("passive", choices=("active", "passive")),
})
