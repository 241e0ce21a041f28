"""A fake NMEA GPS receiver that speaks bytes over a real pseudo-terminal.

Two layers:

* ``nmea_epoch(state)`` is pure: one navigation epoch's sentences (RMC, VTG,
  GGA, GSA, GSV) for a receiver state, with correct checksums. Tests and the
  benchmark use it without any pty.
* ``FakeGpsReceiver`` runs a receiver along ``position(t)`` on an injected
  clock: once per whole second of that clock, ``output_delay_s`` late
  (background thread), or on demand
  (``emit()``), it writes an epoch to the master side of ``os.openpty()``; the
  driver opens the slave side (``port_name``) with ``serial.serial_for_url``.

Receiver behaviour modelled after u-blox parts:

* ``position(t) -> None`` means no fix (tunnel, urban canyon): void sentences
  (RMC status V, GGA quality 0, GSA fix type 1, empty position fields).
* Before its first fix the receiver has no idea of the date and counts time
  from a default date (1980-01-06, the GPS epoch, by default) since power-on;
  after a fix it keeps real time even while the fix is lost. Either way the
  sentences are void, so a correct decoder takes no time from them.
* Optional byte corruption: each byte flips one random bit with probability
  ``corrupt_prob`` (seeded, reproducible), as line noise on a UART would.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import math
import os
import random
import threading
import time
import tty
from dataclasses import dataclass
from typing import Callable

from simulator.gps_sky import Sky
from simulator.pty_delivery import queued, wait_queued

__all__ = ["ReceiverState", "nmea_epoch", "sentence", "FakeGpsReceiver", "PositionFn"]

PositionFn = Callable[[float], "tuple[float, float, float, float] | None"]

KNOT_MPS = 1852.0 / 3600.0

# NMEA 4.10 GNSS system ids (GSA field 18) and the PRN range each talker uses
# in GSV/GSA (u-blox numbering: GLONASS 65-96, others from 1).
_SYSTEM_ID = {"GP": 1, "GN": 1, "GL": 2, "GA": 3, "GB": 4, "BD": 4, "GQ": 5, "GI": 6}
_FIRST_PRN = {"GL": 65}


def sentence(body: str) -> bytes:
    """``body`` (between ``$`` and ``*``) framed with its checksum and CR LF."""
    c = 0
    for ch in body.encode("ascii"):
        c ^= ch
    return f"${body}*{c:02X}\r\n".encode("ascii")


@dataclass(frozen=True, slots=True)
class ReceiverState:
    """What the receiver knows at one epoch."""

    utc: dt.datetime  # the receiver's idea of UTC (a default date before its first fix)
    fix: tuple[float, float, float, float] | None  # lat, lon, speed m/s, course deg; None = no fix
    talker: str = "GP"
    altitude: float = 48.5
    geoid_sep: float = 47.0
    sats_used: int = 9
    sats_in_view: int = 12
    hdop: float = 0.92
    pdop: float = 1.61
    vdop: float = 1.32
    nmea_410: bool = True  # RMC navigation status, GSV signal id, GSA system id
    # A receiver set up to send one position sentence per epoch: "RMC", "GGA" or "GNS"
    # (Meinberg, Hemisphere ...); None = the u-blox set.
    only: str | None = None


def _lat(v: float) -> tuple[str, str]:
    a = abs(v)
    d = int(a)
    m = (a - d) * 60.0
    if round(m, 5) >= 60.0:  # 59.999996' prints as 60.00000
        d, m = d + 1, 0.0
    return f"{d:02d}{m:08.5f}", "N" if v >= 0 else "S"


def _lon(v: float) -> tuple[str, str]:
    a = abs(v)
    d = int(a)
    m = (a - d) * 60.0
    if round(m, 5) >= 60.0:
        d, m = d + 1, 0.0
    return f"{d:03d}{m:08.5f}", "E" if v >= 0 else "W"


def nmea_epoch(state: ReceiverState) -> list[bytes]:
    """The sentences of one epoch, in u-blox order: RMC, VTG, GGA, GSA, GSV...

    With ``state.only`` the epoch is that one sentence (RMC, GGA or GNS).
    """
    if state.only is not None:
        return [_only(state)]
    t = state.utc
    hms = f"{t.hour:02d}{t.minute:02d}{t.second:02d}.{t.microsecond // 10000:02d}"
    dmy = f"{t.day:02d}{t.month:02d}{t.year % 100:02d}"
    tk = state.talker
    ext = state.nmea_410
    out: list[bytes] = []
    if state.fix is not None:
        lat, lon, speed, course = state.fix
        la, ns = _lat(lat)
        lo, ew = _lon(lon)
        kn = speed / KNOT_MPS
        crs = f"{course % 360.0:.2f}"
        out.append(sentence(f"{tk}RMC,{hms},A,{la},{ns},{lo},{ew},{kn:.3f},{crs},{dmy},,,A" + (",V" if ext else "")))
        out.append(sentence(f"{tk}VTG,{crs},T,,M,{kn:.3f},N,{speed * 3.6:.3f},K,A"))
        out.append(
            sentence(
                f"{tk}GGA,{hms},{la},{ns},{lo},{ew},1,{state.sats_used:02d},{state.hdop:.2f},"
                f"{state.altitude:.1f},M,{state.geoid_sep:.1f},M,,"
            )
        )
        used = _prns(tk, state.sats_used)
        slots = [f"{p:02d}" for p in used[:12]] + [""] * (12 - min(12, len(used)))
        gsa = f"{tk}GSA,A,3,{','.join(slots)},{state.pdop:.2f},{state.hdop:.2f},{state.vdop:.2f}"
    else:
        out.append(sentence(f"{tk}RMC,{hms},V,,,,,,,{dmy},,,N" + (",V" if ext else "")))
        out.append(sentence(f"{tk}VTG,,,,,,,,,N"))
        out.append(sentence(f"{tk}GGA,{hms},,,,,0,00,99.99,,,,,,"))
        gsa = f"{tk}GSA,A,1,{',' * 11},99.99,99.99,99.99"
    if ext:
        gsa += f",{_SYSTEM_ID.get(tk, 1)}"
    out.append(sentence(gsa))
    out.extend(_gsv(state))
    return out


def _only(state: ReceiverState) -> bytes:
    """The single position sentence of a one-sentence receiver."""
    full = nmea_epoch(dataclasses.replace(state, only=None))
    tk = state.talker
    if state.only in ("RMC", "GGA"):
        return next(s for s in full if s[3:6].decode() == state.only)
    if state.only != "GNS":
        raise ValueError(f"only: RMC, GGA or GNS, not {state.only!r}")
    t = state.utc
    hms = f"{t.hour:02d}{t.minute:02d}{t.second:02d}.{t.microsecond // 10000:02d}"
    # One mode character per constellation (GPS, GLONASS): autonomous, or no fix.
    if state.fix is None:
        body = f"{tk}GNS,{hms},,,,,NN,00,99.99,,,,"
    else:
        la, ns = _lat(state.fix[0])
        lo, ew = _lon(state.fix[1])
        body = (f"{tk}GNS,{hms},{la},{ns},{lo},{ew},AA,{state.sats_used:02d},{state.hdop:.2f},"
                f"{state.altitude:.1f},{state.geoid_sep:.1f},,")
    return sentence(body + (",V" if state.nmea_410 else ""))


def _prns(talker: str, n: int) -> list[int]:
    first = _FIRST_PRN.get(talker, 1)
    return [first + 2 * i for i in range(n)]


def _gsv(state: ReceiverState) -> list[bytes]:
    # u-blox sends GSV under the constellation's talker, never "GN".
    tk = "GP" if state.talker == "GN" else state.talker
    sats = _prns(tk, state.sats_in_view)
    n_msgs = max(1, math.ceil(len(sats) / 4))
    out = []
    for m in range(n_msgs):
        chunk = sats[4 * m : 4 * m + 4]
        blocks = []
        for i, prn in enumerate(chunk):
            el = 10 + (prn * 7) % 80
            az = (prn * 37) % 360
            snr = f"{25 + (prn % 20):02d}" if state.fix is not None else ""
            blocks.append(f"{prn:02d},{el:02d},{az:03d},{snr}")
        body = f"{tk}GSV,{n_msgs},{m + 1},{len(sats):02d}"
        if blocks:
            body += "," + ",".join(blocks)
        if state.nmea_410:
            body += ",1"  # signal id: L1 C/A (or E1, B1I...)
        out.append(sentence(body))
    return out


class FakeGpsReceiver:
    """A GPS receiver on a pseudo-terminal, moving along ``position(t)``.

    ``t`` is the injected ``clock``'s reading in whole seconds; UTC at ``t``
    is ``utc_origin + t``. Use as a context manager, or ``start()``/``stop()``.
    """

    def __init__(
        self,
        position: PositionFn,
        *,
        clock: Callable[[], float] = time.monotonic,
        utc_origin: dt.datetime = dt.datetime(2024, 5, 6, 7, 30, tzinfo=dt.timezone.utc),
        talker: str = "GP",
        corrupt_prob: float = 0.0,
        seed: int = 0,
        default_date: dt.date = dt.date(1980, 1, 6),
        nmea_410: bool = True,
        sats_used: int = 9,
        sats_in_view: int = 12,
        poll_interval: float = 0.005,
        output_delay_s: float = 0.0,
        only: str | None = None,
        mix: list[list[str]] | None = None,
        sky: Callable[[float], Sky] | None = None,
    ) -> None:
        if not 0.0 <= corrupt_prob <= 1.0:
            raise ValueError("corrupt_prob must be within [0, 1]")
        self.position = position
        self.clock = clock
        self.utc_origin = utc_origin
        self.talker = talker
        self.corrupt_prob = corrupt_prob
        self.default_date = default_date
        self.nmea_410 = nmea_410
        self.sats_used = sats_used
        self.sats_in_view = sats_in_view
        self.poll_interval = poll_interval
        # A real receiver starts sending an epoch some tens of ms after the second it is for
        # (the solution is computed first): the background thread sends that much late.
        self.output_delay_s = output_delay_s
        self.only = only
        # A captured u-blox sentence mix (simulator/nmea_mix.py) sent after RMC, VTG, GGA
        # instead of our own GSA and GSV; None = our 7-sentence epoch.
        self.mix = mix
        # Satellites, dilution and altitude over time (simulator/gps_sky.py); None = constants.
        self.sky = sky
        self._rng = random.Random(seed)
        self._power_on: float | None = None
        self._has_fixed = False
        self._master: int | None = None
        self._slave: int | None = None
        self._port_name = ""
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last_sec: int | None = None
        self.epochs_sent = 0
        self.bytes_dropped = 0
        self.bytes_corrupted = 0
        self.late_deliveries = 0  # emit_readable() epochs the kernel had not delivered within its timeout

    # -- pure-ish generation ---------------------------------------------------

    def state_at(self, t: float) -> ReceiverState:
        """Receiver state at clock reading ``t`` (remembers whether it ever had a fix)."""
        if self._power_on is None:
            self._power_on = t
        fix = self.position(t)
        if fix is not None:
            self._has_fixed = True
        if self._has_fixed:
            utc = self.utc_origin + dt.timedelta(seconds=t)
        else:
            # No almanac time yet: the RTC counts from the default date.
            base = dt.datetime.combine(self.default_date, dt.time(), tzinfo=dt.timezone.utc)
            utc = base + dt.timedelta(seconds=t - self._power_on)
        extra: dict[str, float] = {}
        used, in_view = self.sats_used, self.sats_in_view
        if self.sky is not None:
            sky = self.sky(t)
            used, in_view = sky.sats_used, sky.sats_in_view
            extra = {"altitude": sky.altitude, "hdop": sky.hdop, "pdop": sky.pdop, "vdop": sky.vdop}
        return ReceiverState(
            utc=utc,
            fix=fix,
            talker=self.talker,
            sats_used=used if fix is not None else 0,
            sats_in_view=in_view if fix is not None else min(in_view, 3),
            nmea_410=self.nmea_410,
            only=self.only,
            **extra,  # type: ignore[arg-type]
        )

    def lines_at(self, t: float) -> list[bytes]:
        if self.mix is not None:
            from simulator.nmea_mix import mixed_epoch  # it imports this module

            return mixed_epoch(self.state_at(t), self.mix, self.epochs_sent)
        return nmea_epoch(self.state_at(t))

    def utc_at(self, t: float) -> dt.datetime:
        return self.utc_origin + dt.timedelta(seconds=t)

    # -- pty ---------------------------------------------------------------------

    @property
    def port_name(self) -> str:
        """Path of the pty slave, for ``serial.serial_for_url``."""
        if not self._port_name:
            raise RuntimeError("receiver not started")
        return self._port_name

    def start(self, background: bool = True) -> "FakeGpsReceiver":
        """Open the pty; with ``background`` also emit once per second of ``clock``."""
        if self._master is None:
            master, slave = os.openpty()
            # Raw slave: no echo back into the master, no CR->LF translation.
            tty.setraw(slave)
            os.set_blocking(master, False)
            self._master, self._slave = master, slave
            self._port_name = os.ttyname(slave)
        if background and self._thread is None:
            self._stop.clear()
            # Switched on part-way into a second: that second's epoch would leave late, at a
            # latency no real receiver has (and a timing driver would date later epochs from it).
            # The first goes out at the next second, like every later one. Decided here, not in
            # the thread, which a loaded machine may start long after.
            now = self.clock() - self.output_delay_s
            self._last_sec = math.floor(now) if now > math.floor(now) else None
            self._thread = threading.Thread(target=self._run, name="fake-gps", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        with self._lock:
            for fd in (self._master, self._slave):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._master = self._slave = None

    def __enter__(self) -> "FakeGpsReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def emit(self, t: float | None = None) -> bytes:
        """Send one epoch now (for clock reading ``t``, default now); returns the bytes sent."""
        if t is None:
            t = self.clock()
        data = b"".join(self.lines_at(t))
        data = self._corrupt(data)
        self._write(data)
        self.epochs_sent += 1
        return data

    def emit_readable(self, t: float, timeout_s: float = 2.0) -> bytes:
        """``emit(t)``, then wait until its bytes are readable on the port (``simulator.pty_delivery``).

        For a receiver driven by a virtual clock: a pty delivers asynchronously, and what the
        receiver sent at a virtual second must be in the port before the reader's next look,
        however far the clock then jumps. Waits at most ``timeout_s`` of real time (a reader
        that stopped reading must not hang the clock); a timeout is counted in
        ``late_deliveries``.
        """
        slave = self._slave
        if slave is None:
            raise RuntimeError("receiver not started")
        before, dropped = queued(slave), self.bytes_dropped
        data = self.emit(t)
        written = len(data) - (self.bytes_dropped - dropped)
        if not wait_queued(slave, before + written, timeout_s):
            self.late_deliveries += 1
        return data

    def write_raw(self, data: bytes) -> None:
        """Send arbitrary bytes (garbage, a truncated sentence...)."""
        self._write(data)

    def _corrupt(self, data: bytes) -> bytes:
        p = self.corrupt_prob
        if p <= 0.0:
            return data
        buf = bytearray(data)
        rng = self._rng
        for i in range(len(buf)):
            if rng.random() < p:
                buf[i] ^= 1 << rng.randrange(8)
                self.bytes_corrupted += 1
        return bytes(buf)

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._master is None:
                raise RuntimeError("receiver not started")
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self._master, view)
                except BlockingIOError:
                    # Nobody is reading and the pty buffer is full: a UART
                    # overruns the same way, the bytes are lost.
                    self.bytes_dropped += len(view)
                    return
                except OSError as exc:
                    if exc.errno in (errno.EIO, errno.EBADF):
                        self.bytes_dropped += len(view)
                        return
                    raise
                view = view[n:]

    def _run(self) -> None:
        while not self._stop.is_set():
            sec = math.floor(self.clock() - self.output_delay_s)
            if sec != self._last_sec:
                self._last_sec = sec
                try:
                    self.emit(float(sec))
                except RuntimeError:
                    return
            self._stop.wait(self.poll_interval)
