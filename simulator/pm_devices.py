"""Byte-level fake PM sensors on real pseudo-terminals.

Each simulator owns a pty pair: a driver opens ``device_path`` (the slave) with
``serial_for_url`` exactly as it would open ``/dev/ttyUSB0``, and a background
thread speaks the sensor's protocol on the master side: it answers commands,
pushes frames in active mode, goes silent when asleep, sends all-zero values
while warming up after a wake, and flips a byte of an outgoing frame with a
configurable probability (seeded, so a failing test replays).

Values come from ``source() -> (pm1, pm25, pm10)`` so the van simulator can feed
route-dependent concentrations. ``disconnect()``/``reconnect()`` make the
device vanish and come back (on a new path, like a re-enumerated USB adapter).

All fd work happens on the simulator thread; other threads only post requests,
so no fd is closed under a ``select`` that is using it.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import select
import threading
import time
import tty
from collections.abc import Callable

from drivers import pms, sds011, sps30
from core.errors import ReadError

log = logging.getLogger(__name__)

Source = Callable[[], tuple[float, float, float]]


def constant_source(pm1: float = 5.0, pm25: float = 8.0, pm10: float = 12.0) -> Source:
    """A source that always reports the same concentrations."""
    return lambda: (pm1, pm25, pm10)


class PtySensor:
    """The pty plumbing, thread, timing and corruption shared by every fake sensor."""

    #: how long the loop waits for input before doing periodic work
    TICK_S = 0.005

    def __init__(
        self,
        source: Source,
        *,
        warmup_s: float = 0.0,
        corrupt_probability: float = 0.0,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.warmup_s = warmup_s
        self.corrupt_probability = corrupt_probability
        self._rng = random.Random(seed)
        self._clock = clock
        self._master: int | None = None
        self._slave: int | None = None
        self._path: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._requests: queue.Queue[tuple[str, object, threading.Event]] = queue.Queue()
        self._woke_at = clock()
        self.frames_sent = 0
        self.frames_corrupted = 0
        self.bytes_dropped = 0
        self.commands_received: list[int] = []

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> PtySensor:
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        self._open_pty()
        self._stop.clear()
        self._woke_at = self._clock()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=5)
        self._close_pty()

    def __enter__(self) -> PtySensor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def device_path(self) -> str:
        if self._path is None:
            raise RuntimeError("simulator has no pty (not started or disconnected)")
        return self._path

    # -- requests from other threads ---------------------------------------------

    def _request(self, what: str, arg: object = None) -> None:
        done = threading.Event()
        self._requests.put((what, arg, done))
        if not done.wait(timeout=5):
            raise RuntimeError(f"simulator did not handle {what!r}")

    def disconnect(self) -> None:
        """The adapter vanishes: the pty is closed, the driver's port breaks."""
        self._request("disconnect")

    def reconnect(self) -> str:
        """The adapter comes back (as a power-cycled sensor) on a new path, returned."""
        self._request("reconnect")
        return self.device_path

    def inject(self, data: bytes) -> None:
        """Send raw bytes (garbage, half frames) as they are, never corrupted."""
        self._request("inject", data)

    # -- pty ---------------------------------------------------------------------

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        # Raw at once: a cooked slave would echo our own output back to us as
        # "commands" and mangle CR/LF bytes before the driver sets raw mode.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self._path = os.ttyname(slave)

    def _close_pty(self) -> None:
        for fd in (self._master, self._slave):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._master = self._slave = None
        self._path = None

    def _write_raw(self, data: bytes) -> None:
        if self._master is None:
            return
        try:
            written = os.write(self._master, data)
        except BlockingIOError:
            written = 0
        except OSError:
            return
        # Nobody reads the port and its buffer is full: a real UART drops
        # bytes too, it never waits for the host.
        self.bytes_dropped += len(data) - written

    def send_frame(self, frame: bytes) -> None:
        """Send one frame, maybe with one byte flipped (line noise)."""
        if self.corrupt_probability and self._rng.random() < self.corrupt_probability:
            buf = bytearray(frame)
            buf[self._rng.randrange(len(buf))] ^= self._rng.randrange(1, 256)
            frame = bytes(buf)
            self.frames_corrupted += 1
        self.frames_sent += 1
        self._write_raw(frame)

    # -- loop --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._handle_requests()
            master = self._master
            if master is None:
                time.sleep(self.TICK_S)
                continue
            try:
                ready, _, _ = select.select([master], [], [], self.TICK_S)
            except (OSError, ValueError):
                continue
            if ready:
                try:
                    data = os.read(master, 4096)
                except BlockingIOError:
                    data = b""
                except OSError:
                    # EIO: no process has the slave open; only our copy, so
                    # this is rare, but never let it kill the thread.
                    data = b""
                if data:
                    self.on_bytes(data)
            self.tick(self._clock())

    def _handle_requests(self) -> None:
        while True:
            try:
                what, arg, done = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                if what == "disconnect":
                    self._close_pty()
                elif what == "reconnect":
                    self._close_pty()
                    self._open_pty()
                    self.power_cycle()
                elif what == "inject":
                    assert isinstance(arg, bytes)
                    self._write_raw(arg)
            finally:
                done.set()

    # -- sensor behaviour (subclasses) -------------------------------------------

    def warming_up(self, now: float) -> bool:
        return now - self._woke_at < self.warmup_s

    def mark_woken(self) -> None:
        self._woke_at = self._clock()

    def power_cycle(self) -> None:
        """Back to power-on defaults (volatile settings lost)."""
        self.mark_woken()

    def on_bytes(self, data: bytes) -> None:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        """Periodic work (active-mode pushes)."""

    def values(self, now: float) -> tuple[float, float, float]:
        """(pm1, pm25, pm10) from the source, or zeros while warming up."""
        if self.warming_up(now):
            return (0.0, 0.0, 0.0)
        pm1, pm25, pm10 = self.source()
        return (max(0.0, pm1), max(0.0, pm25), max(0.0, pm10))


# -- Plantower -------------------------------------------------------------------


class PMSSimulator(PtySensor):
    """A PMS5003: active mode at power-on, passive on command, sleep/wake, 8-byte acks."""

    def __init__(self, source: Source, *, period_s: float = 0.1, **kwargs: object) -> None:
        super().__init__(source, **kwargs)  # type: ignore[arg-type]
        self.period_s = period_s
        self.mode = "active"
        self.asleep = False
        self._inbuf = bytearray()
        self._next_push = 0.0

    def power_cycle(self) -> None:
        super().power_cycle()
        self.mode = "active"
        self.asleep = False
        self._inbuf.clear()

    def build_frame(self, now: float) -> bytes:
        pm1, pm25, pm10 = self.values(now)
        atm = (round(pm1), round(pm25), round(pm10))
        # CF=1 equals atmospheric below ~30 µg/m³ and reads higher above it.
        cf1 = tuple(v if v < 30 else round(v * 1.3) for v in atm)
        counts = (
            round(pm1 * 40 + pm25 * 10),
            round(pm1 * 12 + pm25 * 3),
            round(pm25 * 5),
            round((pm10 - pm25) * 2 + pm25),
            round(max(0.0, pm10 - pm25)),
            round(max(0.0, pm10 - pm25) / 2),
        )
        return pms.build_data_frame(pm_cf1=cf1, pm_atm=atm, counts=counts)  # type: ignore[arg-type]

    def on_bytes(self, data: bytes) -> None:
        buf = self._inbuf
        buf += data
        while True:
            start = buf.find(pms.START)
            if start < 0:
                del buf[: max(0, len(buf) - 1)]
                return
            del buf[:start]
            if len(buf) < pms.COMMAND_SIZE:
                return
            try:
                command, value = pms.decode_command(bytes(buf[: pms.COMMAND_SIZE]))
            except ReadError:
                del buf[:1]
                continue
            del buf[: pms.COMMAND_SIZE]
            self.commands_received.append(command)
            self.handle(command, value)

    def handle(self, command: int, value: int) -> None:
        now = self._clock()
        if command == pms.CMD_SLEEP:
            if value == 0:
                # State first, reply second: the driver may act on the reply
                # before this thread runs another line.
                was_asleep, self.asleep = self.asleep, True
                if not was_asleep:
                    self.send_frame(pms.build_ack(pms.CMD_SLEEP, 0))
            elif self.asleep:
                self.asleep = False  # wake: no ack
                self.mark_woken()
                self._next_push = now + self.period_s
            return
        if self.asleep:
            return  # fan and MCU logic idle: only the wake command matters
        if command == pms.CMD_MODE:
            self.mode = "active" if value else "passive"
            self.send_frame(pms.build_ack(pms.CMD_MODE, value & 0xFF))
        elif command == pms.CMD_READ and self.mode == "passive":
            self.send_frame(self.build_frame(now))

    def tick(self, now: float) -> None:
        if self.asleep or self.mode != "active" or now < self._next_push:
            return
        self._next_push = now + self.period_s
        self.send_frame(self.build_frame(now))


# -- Nova SDS011 -------------------------------------------------------------------


class SDS011Simulator(PtySensor):
    """An SDS011: active reporting every ``period_s``, query mode, sleep, id, firmware, period.

    A sleeping SDS011 answers nothing, except that the work command wakes it
    (and is then acknowledged). A working period of N minutes pushes one frame
    every ``N * 60 * minute_s`` seconds (``minute_s`` shortens minutes for tests).
    """

    def __init__(
        self,
        source: Source,
        *,
        period_s: float = 0.1,
        device_id: int = 0xA160,
        firmware: tuple[int, int, int] = (15, 7, 10),
        minute_s: float = 60.0,
        **kwargs: object,
    ) -> None:
        super().__init__(source, **kwargs)  # type: ignore[arg-type]
        self.period_s = period_s
        self.device_id = device_id
        self.firmware = firmware
        self.minute_s = minute_s
        self.query_mode = False
        self.asleep = False
        self.working_period = 0
        self._inbuf = bytearray()
        self._next_push = 0.0

    def power_cycle(self) -> None:
        # Mode, id and period survive power-off on a real SDS011; sleep does not.
        super().power_cycle()
        self.asleep = False
        self._inbuf.clear()

    def data_frame(self, now: float) -> bytes:
        _, pm25, pm10 = self.values(now)
        return sds011.build_data_frame(pm25, pm10, self.device_id)

    def reply(self, command: int, d1: int = 0, d2: int = 0, d3: int = 0) -> None:
        self.send_frame(sds011.build_reply(command, d1, d2, d3, self.device_id))

    def on_bytes(self, data: bytes) -> None:
        buf = self._inbuf
        buf += data
        while True:
            start = buf.find(bytes((sds011.HEAD, sds011.KIND_COMMAND)))
            if start < 0:
                del buf[: max(0, len(buf) - 1)]
                return
            del buf[:start]
            if len(buf) < sds011.COMMAND_SIZE:
                return
            try:
                command = sds011.decode_command(bytes(buf[: sds011.COMMAND_SIZE]))
            except ReadError:
                del buf[:1]
                continue
            del buf[: sds011.COMMAND_SIZE]
            if command.device_id not in (sds011.ANY_ID, self.device_id):
                continue
            self.commands_received.append(command.command)
            self.handle(command)

    def handle(self, c: sds011.SDSCommand) -> None:
        now = self._clock()
        d1, d2 = c.data[0], c.data[1]
        if self.asleep:
            if c.command == sds011.CMD_SLEEP_WORK and d1 == 1 and d2 == 1:
                self.asleep = False
                self.mark_woken()
                self._next_push = now + self.period_s
                self.reply(sds011.CMD_SLEEP_WORK, 1, 1)
            return
        if c.command == sds011.CMD_REPORTING_MODE:
            if d1 == 1:
                self.query_mode = d2 == 1
            self.reply(c.command, d1, 1 if self.query_mode else 0)
        elif c.command == sds011.CMD_QUERY_DATA:
            if self.query_mode:
                self.send_frame(self.data_frame(now))
        elif c.command == sds011.CMD_SET_ID:
            self.device_id = (c.data[10] << 8) | c.data[11]
            self.reply(c.command)
        elif c.command == sds011.CMD_SLEEP_WORK:
            if d1 == 1 and d2 == 0:
                self.asleep = True
                self.reply(c.command, 1, 0)
            else:
                self.reply(c.command, d1, 1)
        elif c.command == sds011.CMD_FIRMWARE:
            self.reply(c.command, *self.firmware)
        elif c.command == sds011.CMD_WORKING_PERIOD:
            if d1 == 1 and d2 <= sds011.MAX_WORKING_PERIOD_MIN:
                self.working_period = d2
                self._next_push = now + self._push_interval()
            self.reply(c.command, d1, self.working_period)

    def _push_interval(self) -> float:
        if self.working_period:
            return self.working_period * self.minute_s
        return self.period_s

    def tick(self, now: float) -> None:
        if self.asleep or self.query_mode or now < self._next_push:
            return
        self._next_push = now + self._push_interval()
        self.send_frame(self.data_frame(now))


# -- Sensirion SPS30 -------------------------------------------------------------------


class SPS30Simulator(PtySensor):
    """An SPS30: idle / measuring / sleeping states, one new measurement per ``period_s``.

    Sleeping, it ignores everything until a 0xFF wake pulse, after which a wake
    command within 100 ms is accepted. Commands that are not allowed in the
    current state get state 0x43, as on the real sensor.
    """

    def __init__(
        self,
        source: Source,
        *,
        period_s: float = 0.05,
        serial_number: str = "SIM30A1B2C3D4E5F",
        product_type: str = "00080000",
        **kwargs: object,
    ) -> None:
        super().__init__(source, **kwargs)  # type: ignore[arg-type]
        self.period_s = period_s
        self.serial = serial_number
        self.product = product_type
        self.state = "idle"  # idle | measuring | sleeping
        self.fan_cleanings = 0
        self._splitter = sps30.ShdlcSplitter()
        self._next_sample = 0.0
        self._fresh = False
        self._pulse_until = 0.0

    def power_cycle(self) -> None:
        super().power_cycle()
        self.state = "idle"
        self._fresh = False
        self._splitter.reset()

    def measurement(self, now: float) -> sps30.SPS30Measurement:
        pm1, pm25, pm10 = self.values(now)
        pm4 = (pm25 + pm10) / 2
        size = 0.6 if pm25 else 0.0
        return sps30.SPS30Measurement(
            pm1, pm25, pm4, pm10, pm1 * 6.5, pm1 * 7.6, pm25 * 4.1, pm4 * 3.5, pm10 * 3.3, size
        )

    def respond(self, command: int, state: int = 0, data: bytes = b"") -> None:
        self.send_frame(sps30.build_miso(command, state, data))

    def on_bytes(self, data: bytes) -> None:
        now = self._clock()
        if self.state == "sleeping" and sps30.WAKE_PULSE[0] in data:
            self._pulse_until = now + 0.1
        for content, _raw in self._splitter.feed(data):
            try:
                request = sps30.decode_mosi(content)
            except ReadError:
                continue
            self.commands_received.append(request.command)
            self.handle(request, now)

    def handle(self, r: sps30.SPS30Request, now: float) -> None:
        cmd = r.command
        if self.state == "sleeping":
            if cmd == sps30.CMD_WAKE and now <= self._pulse_until:
                self.state = "idle"
                self.mark_woken()
                self.respond(cmd)
            return  # UART is off: no answer at all
        not_allowed = sps30.STATE_NOT_ALLOWED
        if cmd == sps30.CMD_START:
            if r.data != sps30.START_FLOAT and r.data != b"\x01\x05":
                self.respond(cmd, 0x04)
            elif self.state == "measuring":
                self.respond(cmd, not_allowed)
            else:
                self.state = "measuring"
                self.mark_woken()
                self._next_sample = now + self.period_s
                self._fresh = False
                self.respond(cmd)
        elif cmd == sps30.CMD_STOP:
            if self.state != "measuring":
                self.respond(cmd, not_allowed)
            else:
                self.state = "idle"
                self.respond(cmd)
        elif cmd == sps30.CMD_READ:
            if self.state != "measuring":
                self.respond(cmd, not_allowed)
            elif not self._fresh:
                self.respond(cmd)  # empty: nothing new since the last read
            else:
                self._fresh = False
                self.respond(cmd, 0, sps30.encode_measurement(self.measurement(now)))
        elif cmd == sps30.CMD_SLEEP:
            if self.state != "idle":
                self.respond(cmd, not_allowed)
            else:
                self.state = "sleeping"
                self._pulse_until = 0.0
                self.respond(cmd)
        elif cmd == sps30.CMD_WAKE:
            self.respond(cmd)  # already awake: harmless
        elif cmd == sps30.CMD_FAN_CLEAN:
            if self.state != "measuring":
                self.respond(cmd, not_allowed)
            else:
                self.fan_cleanings += 1
                self.respond(cmd)
        elif cmd == sps30.CMD_DEVICE_INFO:
            which = r.data[:1]
            if which == bytes((sps30.INFO_SERIAL_NUMBER,)):
                self.respond(cmd, 0, self.serial.encode() + b"\x00")
            elif which == bytes((sps30.INFO_PRODUCT_TYPE,)):
                self.respond(cmd, 0, self.product.encode() + b"\x00")
            else:
                self.respond(cmd, 0x04)
        elif cmd == sps30.CMD_RESET:
            self.state = "idle"
            self._fresh = False
            self.respond(cmd)
        else:
            self.respond(cmd, 0x02)

    def tick(self, now: float) -> None:
        if self.state == "measuring" and now >= self._next_sample:
            self._next_sample = now + self.period_s
            self._fresh = True
