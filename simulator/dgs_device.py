"""A SPEC DGS-NO2 module behind a real pseudo-terminal, byte for byte.

The driver opens ``sim.port_name`` with ``serial.serial_for_url`` exactly as it
would open ``/dev/ttyUSB0``; a background thread plays the module on the
master side. Two firmware generations:

* ``"new"``: ``\\r`` -> one reading line; ``c`` -> a line every ``interval_s``
  until any character arrives; ``e`` -> EEPROM ``key=value`` lines;
  ``f`` -> the firmware date (``15SEP17``); other characters are ignored.
* ``"legacy"``: every character received is answered with one reading line
  (no firmware query, no EEPROM dump, no streaming); with
  ``legacy_any_char=False`` it answers ``\r`` only and ignores the rest.

``garble_next(n)`` replaces the next n replies by garbage; ``inject(b)`` writes
raw bytes; ``silent=True`` makes the module answer nothing.
"""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from collections.abc import Callable

NEW = "new"
LEGACY = "legacy"

DEFAULT_EEPROM = {
    "Barcode": "012017030207 110-202 NO2 1705 -25.03",
    "Serial_Number": "012017030207",
    "Part_Number": "110-202",
    "Gas": "NO2",
    "Date_Code": "1705",
    "Sensitivity_Code": "-25.03",
    "nA_per_PPM_x100": "-2503",
    "ADC_OC": "32768",
    "ADC_Zero": "32710",
    "T_Zero": "0",
    "RH_Zero": "0",
    "Average_Total": "2",
}

GARBAGE = b"\x00\xff#@!garbage, 12, x\xfe\r\n"


class DgsSimulator:
    """A DGS-NO2 module on a pty. ``start()``/``stop()``, or use it as a context manager."""

    def __init__(
        self,
        *,
        generation: str = NEW,
        serial: str = "012017030207",
        ppb: float = 25.0,
        ppb_source: Callable[[], float] | None = None,
        temp_c: float = 22.0,
        rh_pct: float = 45.0,
        firmware: str = "15SEP17",
        eeprom: dict[str, str] | None = None,
        interval_s: float = 1.0,
        uptime_clock: Callable[[], float] = time.monotonic,
        legacy_any_char: bool = True,
    ) -> None:
        if generation not in (NEW, LEGACY):
            raise ValueError(f"generation must be {NEW!r} or {LEGACY!r}")
        self.generation = generation
        self.serial = serial
        self.ppb = ppb
        self.ppb_source = ppb_source
        self.temp_c = temp_c
        self.rh_pct = rh_pct
        self.firmware = firmware
        self.eeprom = dict(DEFAULT_EEPROM if eeprom is None else eeprom)
        if eeprom is None:
            self.eeprom["Serial_Number"] = serial
        self.interval_s = interval_s
        self.legacy_any_char = legacy_any_char
        self._uptime_clock = uptime_clock
        self._powered_at = uptime_clock()
        self.silent = False
        self.received = bytearray()
        self.lines_sent = 0
        self._garble = 0
        self._streaming = False
        self._next_stream_at = 0.0
        self._master: int | None = None
        self._slave: int | None = None
        self.port_name = ""
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # -- lifecycle

    def start(self) -> DgsSimulator:
        master, slave = os.openpty()
        # Raw mode on the tty: no echo, no CR->NL translation (pyserial sets the
        # same when it opens the port, this just makes it true from the start).
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.port_name = os.ttyname(slave)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dgs-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        for fd in (self._master, self._slave):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._master = self._slave = None

    def __enter__(self) -> DgsSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls

    def garble_next(self, n: int = 1) -> None:
        with self._lock:
            self._garble += n

    def inject(self, data: bytes) -> None:
        self._write(data)

    @property
    def streaming(self) -> bool:
        return self._streaming

    # -- the module

    def reading_line(self) -> bytes:
        up = max(0, int(self._uptime_clock() - self._powered_at))
        days, rem = divmod(up, 86400)
        hours, rem = divmod(rem, 3600)
        minutes, seconds = divmod(rem, 60)
        ppb = self.ppb_source() if self.ppb_source is not None else self.ppb
        # Raw counts loosely follow the values, like the module's 16-bit ADC words.
        adc = max(0, min(0xFFFF, 32710 + round(ppb * 2.5)))
        t_raw = max(0, min(0xFFFF, round((self.temp_c + 45) / 175 * 65535)))
        rh_raw = max(0, min(0xFFFF, round(self.rh_pct / 100 * 65535)))
        fields = [
            self.serial,
            str(round(ppb)),
            str(round(self.temp_c)),
            str(round(self.rh_pct)),
            str(adc),
            str(t_raw),
            str(rh_raw),
            f"{days:02d}",
            f"{hours:02d}",
            f"{minutes:02d}",
            f"{seconds:02d}",
        ]
        return (", ".join(fields) + "\r\n").encode("ascii")

    def _reply(self, data: bytes) -> None:
        if self.silent:
            return
        with self._lock:
            if self._garble:
                self._garble -= 1
                data = GARBAGE
        self._write(data)
        self.lines_sent += 1

    def _write(self, data: bytes) -> None:
        if self._master is None:
            return
        try:
            os.write(self._master, data)
        except (BlockingIOError, OSError):
            pass  # nobody reading and the pty buffer is full: a real UART drops it too

    def _on_char(self, ch: int) -> None:
        if self.generation == LEGACY:
            if self.legacy_any_char or ch == ord("\r"):
                self._reply(self.reading_line())
            return
        if self._streaming:
            self._streaming = False  # any character ends continuous output
            return
        if ch == ord("\r"):
            self._reply(self.reading_line())
        elif ch == ord("c"):
            self._streaming = True
            self._next_stream_at = time.monotonic()
        elif ch == ord("f"):
            self._reply(f"{self.firmware}\r\n".encode("ascii"))
        elif ch == ord("e"):
            for key, value in self.eeprom.items():
                self._reply(f"{key}={value}\r\n".encode("ascii"))
        # anything else: ignored, as the module does

    def _run(self) -> None:
        assert self._master is not None
        master = self._master
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([master], [], [], 0.01)
            except (OSError, ValueError):
                return
            if ready:
                try:
                    data = os.read(master, 256)
                except BlockingIOError:
                    data = b""
                except OSError:
                    # EIO: no process has the slave open right now; wait for one.
                    time.sleep(0.01)
                    continue
                self.received += data
                for ch in data:
                    self._on_char(ch)
            if self._streaming and time.monotonic() >= self._next_stream_at:
                self._reply(self.reading_line())
                self._next_stream_at = time.monotonic() + self.interval_s
