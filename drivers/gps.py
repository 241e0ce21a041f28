"""GPS drivers: an NMEA receiver on a serial port, or gpsd over TCP.

Both produce the same ``Reading(sensor="gps", values={...})``:

``lat``, ``lon`` (degrees), ``alt`` (m above mean sea level), ``speed`` (m/s),
``course`` (degrees true), ``fix_quality`` (GGA indicator), ``fix_mode``
(1/2/3), ``sats_used``, ``sats_in_view``, ``hdop``, ``gps_time`` (UTC epoch
seconds, or None when the receiver's time cannot be trusted).

Both also expose ``time_fix()``: the latest trustworthy GPS time together with
the monotonic clock reading at which it was received, so the agent can map its
monotonic clock onto UTC without trusting the kernel clock.

Neither blocks: ``read()`` takes what has arrived, decodes it and returns.

When a fix was measured (issue 15, 1): a fix is the receiver's position at the
UTC second its sentences name, and its first bytes leave the receiver a few tens
of ms later. ``read()`` runs once per sampling tick, at any phase of the
receiver's second, so a fix timed at its read was 0.1-0.99 s late. The NMEA
driver therefore times bytes as they come off the port: with ``reader_thread``
a thread, every few seconds, blocks on the port for the first byte of the next
epoch (no polling) and stamps it with the monotonic clock; an epoch is timed
by its first timed sentence, and the epochs between probes are dated from the
timed one, as a receiver sends each epoch at the same latency after its
second. The probes cost a few wake-ups every ``probe_every_s``, not two or
three per epoch (issue 18's CPU budget). Each Reading carries that arrival (``meta[MEASURED_MONO]``) and, when
the receiver's time is confirmed, the fix's own UTC (``meta[MEASURED_UTC]``),
which the TimeKeeper prefers when it agrees with the spine: it has no output
latency at all. Without the thread (a simulated van, whose virtual clock the
sampling loop itself moves) bytes are timed at ``read()``.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from drivers.base import Reading
from drivers.nmea import TIMED_RECORDS, Fix, FixAssembler, SentenceFramer, parse_sentence, used_by_fix
from drivers.options import DriverOptions, Option, baudrate, serial_port
from core.errors import BusError, FrameError, ReadError
from core.timekeeping import MEASURED_MONO, MEASURED_UTC, unroll_gps_week

__all__ = ["NmeaGpsDriver", "GpsdSource", "DriverStats", "fix_values"]

MonotonicClock = Callable[[], float]

VALUE_KEYS = (
    "lat",
    "lon",
    "alt",
    "speed",
    "course",
    "fix_quality",
    "fix_mode",
    "sats_used",
    "sats_in_view",
    "hdop",
    "gps_time",
)


def _q(v: float | None, decimals: int) -> float | None:
    return None if v is None else round(v, decimals)


def fix_values(fix: Fix, gps_time: float | None) -> dict[str, Any]:
    """The Reading values for one fix.

    Rounded to what the receiver resolves (issue #18: NMEA's 1e-5 minutes is
    1.7e-7 degrees, knots to m/s give endless decimals): 1e-7 degrees (~1 cm),
    1 mm/s. The digits below are conversion noise that cost ~7 bytes a value on
    the wire and carry nothing.
    """
    return {
        "lat": _q(fix.lat, 7),
        "lon": _q(fix.lon, 7),
        "alt": fix.altitude,
        "speed": _q(fix.speed, 3),
        "course": fix.course,
        "fix_quality": fix.fix_quality,
        "fix_mode": fix.fix_mode,
        "sats_used": fix.sats_used,
        "sats_in_view": fix.sats_in_view,
        "hdop": fix.hdop,
        "gps_time": gps_time,
    }


@dataclass(slots=True)
class DriverStats:
    bytes: int = 0
    sentences: int = 0
    skipped: int = 0  # well-formed sentences left undecoded: no fix reads them (nmea.used_by_fix)
    checksum_errors: int = 0
    frame_errors: int = 0
    fixes: int = 0
    rollovers: int = 0  # fixes whose date was 1024 weeks behind (10-bit week number wrapped)
    chunks_lost: int = 0  # chunks the reader thread dropped because read() was not called for long
    probes: int = 0  # timing probes the thread made (each a few wake-ups)
    probes_untimed: int = 0  # probes that gave the port back without timing an epoch (quiet or busy line)
    fixes_superseded: int = 0  # fixes not handed out: a newer one completed in the same read()


# The shortest silence that ends a burst: above a USB serial adapter's delivery period (an
# FTDI chip hands bytes over every 16 ms), so a burst delivered in chunks is still one burst.
PROBE_BLOCKED_S = 0.02
# With the timing thread: completed fixes waiting to be handed out, one per read.
MAX_READY = 3
# Probe chunks kept for read() (a probe adds at most three).
MAX_CHUNKS = 64
# An untimed epoch is dated from a timed one at most this far away (50 ppm: 3 ms).
MAX_PREDICT_S = 60.0


@dataclass(frozen=True, slots=True)
class ProbeTiming:
    collect_s: float  # mid-burst: the first sleep over the rest of the burst
    quiet_s: float  # silence that ends a burst (the next byte is the first of an epoch)
    hold_s: float  # the longest a probe holds the port


class NmeaGpsDriver:
    """SensorDriver for an NMEA receiver on a serial port.

    ``port`` is an open pyserial port (``serial.serial_for_url(...)``, a pty in
    the tests). Each ``read()`` drains what the port holds (never waits for
    more), decodes it and returns a Reading for the newest fix completed
    since the previous call (older ones completed in the same call are
    counted in ``stats.fixes_superseded``), or None. With ``reader_thread``
    fixes are handed out one per call, oldest first (up to ``MAX_READY``
    wait), as a tick may complete two epochs (one whose end a probe was
    still reading, and the next).

    Corrupt sentences are dropped and counted in ``stats``; ``read()`` raises
    their error (a ``ReadError``) only when nothing valid arrived in that
    read, i.e. the port is producing nothing but garbage (wrong baud rate,
    bad wiring).

    ``time_fix()`` only reports times whose time of day two sentence types
    agreed on (RMC and GGA), unless ``require_confirmed_time`` is False: the
    NMEA checksum misses some double bit errors, and a wrong time sticks in
    the record forever. Its monotonic reading is taken when the bytes of the
    epoch's first timed sentence were read, so its precision is bounded by
    how often ``read()`` is called.

    ``rollover_pivot_utc``: no true fix is older than this (UTC seconds); a
    date up to 1024 weeks before it is a receiver whose 10-bit GPS week number
    wrapped, and is moved forward 1024 weeks (``core.timekeeping.unroll_gps_week``).
    None (the default, for decoding old logs) takes dates as they come.

    ``single_sentence``: the receiver sends one position sentence per epoch
    (``FixAssembler(single_sentence=True)``); its fixes carry the flag
    ``single_sentence`` (position not cross-checked by a second sentence) and
    None for what that sentence lacks (RMC: altitude, satellites, HDOP; GGA:
    date, hence no GPS time, flagged ``no_gps_time``).

    ``reader_thread``: time epochs by their bytes' arrival (module
    docstring): every ``probe_every_s`` a thread takes the port, blocks for
    the first byte of the next burst (at most ``block_s``, so ``close`` is
    prompt) and times it. ``collect_s`` and ``gap_s`` are upper bounds of
    how it sleeps over a burst it met midway and of the silence that ends a
    burst; the values used are derived from the epoch period and the burst's
    length at ``baudrate`` (``probe_timing()``), and a probe gives the port
    back after one epoch period whether it timed an epoch or not. Every byte
    the thread reads is handed to the next ``read()`` as it is read (one
    buffer under a lock), so no half-read epoch is ever cut short. Between
    probes ``read()`` drains the port as without the thread, and dates each
    epoch from the last timed one (epochs leave the receiver at a fixed
    latency after their second), up to ``MAX_PREDICT_S`` away.
    """

    def __init__(
        self,
        port: Any,
        name: str = "gps",
        clock: MonotonicClock = time.monotonic,
        *,
        assembler: FixAssembler | None = None,
        flush_after: float = 0.5,
        max_bytes_per_read: int = 65536,
        require_confirmed_time: bool = True,
        rollover_pivot_utc: float | None = None,
        single_sentence: bool = False,
        reader_thread: bool = False,
        baudrate: int | None = None,
        collect_s: float = 0.4,
        gap_s: float = 0.05,
        block_s: float = 1.0,
        probe_every_s: float = 4.0,
        retry_s: float = 1.0,
    ) -> None:
        self.name = name
        self._pivot = rollover_pivot_utc
        self._port = port
        self._clock = clock
        self._asm = assembler or FixAssembler(single_sentence=single_sentence)
        self._framer = SentenceFramer()
        self._flush_after = flush_after
        self._max_bytes = max_bytes_per_read
        self._require_confirmed = require_confirmed_time
        self._last_rx: float | None = None
        self._rx_by_tod: dict[float, float | None] = {}
        self._last_tod: float | None = None
        self._time_fix: tuple[float, float] | None = None
        self.last_fix: Fix | None = None
        self.stats = DriverStats()
        self._pending_t: float | None = None  # arrival of the first byte of the framer's unfinished line
        self._collect_s = collect_s
        # The line's speed sets how long a burst lasts (probe_timing); a pyserial port knows it.
        self._baudrate = baudrate or getattr(port, "baudrate", None)
        self._gap_s = gap_s
        self._block_s = block_s
        self._retry_s = retry_s
        self._chunks: deque[tuple[float, bytes, bool]] = deque()  # (arrival, bytes, timed)
        self._lock = threading.Lock()
        self._ready: deque[Reading] = deque()  # with the thread: fixes completed, not yet handed out
        self._probing = False
        self._probe_every_s = probe_every_s
        self._arrival_ref: tuple[float, float] | None = None  # (time of day, arrival) of a timed epoch
        self._reader_errors: deque[ReadError] = deque(maxlen=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if reader_thread:
            self._thread = threading.Thread(target=self._reader, name=f"{name}-reader", daemon=True)
            self._thread.start()

    # -- SensorDriver ------------------------------------------------------

    def read(self) -> Reading | None:
        now = self._clock()
        chunks = self._take_chunks(now)
        fixes: list[Fix] = []
        good = 0
        last_error: ReadError | None = None
        for t, data, timed in chunks:
            self._last_rx = t
            self.stats.bytes += len(data)
            if self._thread is None:
                first_t = later_t = t  # timed at the read
            else:
                # A line's arrival is known when its "$" is the byte the reader blocked for.
                first_t, later_t = (t if timed and data[:1] == b"$" else None), None
            line_t = self._pending_t if self._framer.pending() else first_t
            lines = self._framer.feed(data)
            if self._framer.pending():
                self._pending_t = later_t if lines else line_t
            for line in lines:
                rx, line_t = line_t, later_t
                if not used_by_fix(line):
                    # GST, GBS, the 2nd.. GSV of a group: ~40 % of a u-blox epoch, which no fix reads
                    # (issue #18: the GPS read was half the agent's CPU).
                    self.stats.skipped += 1
                    continue
                try:
                    rec = parse_sentence(line, satellites=False)
                except ReadError as exc:  # ChecksumError or FrameError
                    if isinstance(exc, FrameError):
                        self.stats.frame_errors += 1
                    else:
                        self.stats.checksum_errors += 1
                    last_error = exc
                    continue
                good += 1
                self.stats.sentences += 1
                if isinstance(rec, TIMED_RECORDS) and rec.tod is not None and rec.tod != self._last_tod:
                    self._last_tod = rec.tod
                    self._rx_by_tod[rec.tod] = rx
                    if rx is not None and self._thread is not None:
                        self._arrival_ref = (rec.tod, rx)
                    elif rx is None and self._arrival_ref is not None:
                        # Epochs leave the receiver at a fixed latency after their second:
                        # one timed epoch dates the untimed ones around it.
                        step = (rec.tod - self._arrival_ref[0]) % 86400.0
                        if step <= MAX_PREDICT_S:
                            self._rx_by_tod[rec.tod] = self._arrival_ref[1] + step
                    if len(self._rx_by_tod) > 8:
                        del self._rx_by_tod[next(iter(self._rx_by_tod))]
                fixes.extend(self._asm.feed(rec))
        if not chunks and self._last_rx is not None and now - self._last_rx >= self._flush_after:
            # The port went quiet: the receiver's cycle is over even if the
            # assembler has not learnt its last sentence yet.
            fixes.extend(self._asm.flush())

        if self._thread is not None:
            # A tick may complete two epochs (the probe was still reading the first one's end):
            # hand them out one per read, oldest first (each carries its own time), a few at most.
            self._ready.extend(self._accept(fix) for fix in fixes)
            while len(self._ready) > MAX_READY:
                self._ready.popleft()
                self.stats.fixes_superseded += 1
            if self._ready:
                return self._ready.popleft()
        else:
            reading = None
            for fix in fixes:
                reading = self._accept(fix)
            if reading is not None:
                self.stats.fixes_superseded += len(fixes) - 1
                return reading
        if last_error is not None and good == 0:
            raise last_error
        if not chunks and self._reader_errors:
            raise self._reader_errors.popleft()
        return None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            cancel = getattr(self._port, "cancel_read", None)  # pyserial: wakes a blocked read at once
            if cancel is not None:
                try:
                    cancel()
                except Exception:  # a port that already failed: the read timeout ends the wait
                    pass
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout=self._block_s + 1.0)
        try:
            self._port.close()
        except Exception:  # closing a port that already failed must not raise
            pass

    def epoch_health(self) -> dict[str, int]:
        """Epoch counters for the heartbeat: how many epochs gave no fix, and why."""
        st = self._asm.stats
        # Disjoint reasons that sum to dropped; a fix decoded but never handed out (a newer
        # one replaced it, or the hand-out queue overflowed) is lost too.
        superseded = self.stats.fixes_superseded
        return {
            "epochs": st.epochs + st.missed,
            "fixes": st.fixes - superseded,
            "dropped": st.dropped + superseded,
            "no_fix": st.no_fix,
            "unconfirmed": st.unconfirmed,
            "inconsistent": st.inconsistent,
            "incomplete": st.incomplete,
            "missed": st.missed,
            "superseded": superseded,
        }

    # -- time source ---------------------------------------------------------

    def time_fix(self) -> tuple[float, float] | None:
        """(UTC seconds, monotonic seconds when received) of the latest valid GPS time."""
        return self._time_fix

    # -- internals -------------------------------------------------------------

    def _take_chunks(self, now: float) -> list[tuple[float, bytes, bool]]:
        if self._thread is None:
            data = self._drain()
            return [(now, data, True)] if data else []
        with self._lock:
            out = list(self._chunks)
            self._chunks.clear()
            if not self._probing:
                # Between probes the tick reads the port itself, untimed: no wake-up of its own.
                data = self._drain()
                if data:
                    out.append((now, data, False))
        return out

    def _reader(self) -> None:
        """The timing thread: every ``probe_every_s``, take the port and time the first byte of a burst.

        Until an epoch has been timed it probes every second: fixes before the first timed
        epoch have no arrival of their own (issue 15 B3).
        """
        port = self._port
        wait = 0.0  # at once: the first epochs are timed too
        timed_once = False
        while not self._stop.wait(wait):
            self.stats.probes += 1
            try:
                with self._lock:
                    self._probing = True
                if getattr(port, "timeout", None) != self._block_s:
                    port.timeout = self._block_s  # bounded, so close() is prompt without cancel_read
                if self._probe(port):
                    timed_once = True
                else:
                    self.stats.probes_untimed += 1
            except ReadError as exc:  # ReconnectingPort: gone, or its reopen is not due yet
                self._reader_errors.append(exc)
            except (OSError, ValueError) as exc:
                if self._stop.is_set():
                    return
                self._reader_errors.append(BusError(f"{self.name}: serial port failed: {exc}"))
            finally:
                with self._lock:
                    self._probing = False
            wait = self._probe_every_s if timed_once else min(self._probe_every_s, 1.0)

    def probe_timing(self) -> ProbeTiming:
        """How the next probe gathers and how long it may hold the port, from the line's shape.

        The epoch period is learnt from the times of day, the burst's length from the bytes
        per epoch at the baud rate (10 bits a byte on the wire, 8N1). A busy line (924-byte
        bursts at 9600 baud leave 40 ms of 1 s quiet) must still look quiet between bursts.
        """
        period = self._asm.epoch_interval or 1.0
        epochs = self._asm.stats.epochs
        burst = 0.0
        if self._baudrate and epochs >= 2:
            burst = min(period, self.stats.bytes / epochs * 10.0 / self._baudrate)
        # Silence this long means the burst is over: above a USB adapter's delivery period
        # (PROBE_BLOCKED_S), at most gap_s, and below half the receiver's quiet gap.
        quiet = max(PROBE_BLOCKED_S, min(self._gap_s, 0.5 * (period - burst)))
        # Mid-burst, sleep over part of the rest in one go (fewer wake-ups). A sleep shorter
        # than the quiet gap cannot run past it into the next burst; on a busy line (gap of
        # tens of ms) half a burst, which rarely does (a probe that overshoots gives up at
        # hold_s and the next one tries again).
        gap = period - burst
        collect = min(self._collect_s, max(gap - quiet, 0.5 * burst)) if burst else min(self._collect_s, 0.5 * period)
        # The hard cap: after one epoch period the tick gets its port back, timed or not.
        return ProbeTiming(collect_s=collect, quiet_s=quiet, hold_s=max(period, 4 * quiet))

    def _probe(self, port: Any) -> bool:
        """Block for the first byte of the next burst and time it; whether one was timed.

        It hands every byte over as it reads it (``_hand_over``), so a tick during the probe
        decodes what the probe read (an epoch half-read by the tick is never cut short), and
        holds the port at most ``hold_s``. Only a byte that followed ``quiet_s`` of silence is
        timed: one that came back at once was mid-burst, so the probe sleeps over that burst,
        polls until a step finds the line quiet, and then blocks for the next burst's first
        byte. An epoch that began inside other bytes has no arrival rather than a wrong one.
        """
        timing = self.probe_timing()
        start = self._clock()
        self._pass_on(port)  # what waits began before we looked: untimed
        before = self._clock()
        first = port.read(1)
        if not first:
            return False  # quiet for block_s: no receiver talking
        t = self._clock()
        if t - before >= timing.quiet_s:
            self._hand_over(t, first, True)
            return True
        self._hand_over(t, first, False)
        step = timing.collect_s
        while self._clock() - start < timing.hold_s:
            if self._stop.wait(step):
                return False
            step = timing.quiet_s
            if self._pass_on(port):
                continue  # still inside a burst
            first = port.read(1)  # the line was quiet for a whole step: the next byte starts a burst
            if not first:
                return False
            self._hand_over(self._clock(), first, True)
            return True
        return False  # a line that never went quiet for quiet_s: give the port back (B1)

    def _pass_on(self, port: Any) -> int:
        """Hand over what the port holds now, untimed; how many bytes."""
        n = port.in_waiting
        if not n:
            return 0
        data = port.read(min(n, self._max_bytes))
        self._hand_over(self._clock(), data, False)
        return len(data)

    def _hand_over(self, t: float, data: bytes, timed: bool) -> None:
        """Queue bytes the thread read for the next ``read()``: one buffer for thread and tick."""
        if not data:
            return
        with self._lock:
            last = self._chunks[-1] if self._chunks else None
            if last is not None and not timed and not last[2]:
                self._chunks[-1] = (t, last[1] + data, False)  # untimed bytes join: few chunks per probe
            else:
                self._chunks.append((t, data, timed))
            while len(self._chunks) > MAX_CHUNKS:  # read() has not been called for minutes
                self._chunks.popleft()
                self.stats.chunks_lost += 1

    def _drain(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        try:
            while total < self._max_bytes:
                n = self._port.in_waiting
                if not n:
                    break
                chunk = self._port.read(min(n, self._max_bytes - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except (OSError, ValueError) as exc:
            # serial.SerialException is an OSError; ValueError is pyserial's
            # "operation on a closed port".
            raise BusError(f"{self.name}: serial port failed: {exc}") from exc
        return b"".join(chunks)

    def _accept(self, fix: Fix) -> Reading:
        self.stats.fixes += 1
        self.last_fix = fix
        gps_time = fix.utc_seconds if (fix.time_confirmed or not self._require_confirmed) else None
        if gps_time is not None and self._pivot is not None:
            gps_time, rolled = unroll_gps_week(gps_time, self._pivot)
            self.stats.rollovers += rolled
        rx = self._rx_by_tod.get(fix.tod)
        if gps_time is not None and rx is not None:
            self._time_fix = (gps_time, rx)
        flags: tuple[str, ...] = () if gps_time is not None else ("no_gps_time",)
        if fix.position_sentences < 2:
            flags += ("single_sentence",)  # the position was not cross-checked by a second sentence
        if self._thread is not None and rx is None and gps_time is None:
            # Neither its arrival (before the first timed epoch) nor its own time (date not yet
            # confirmed: the first fix of a run) is known: stamped at its read, up to a few s late.
            flags += ("time_untimed",)
        meta: dict[str, Any] = {"source": "nmea", "tod": fix.tod, "received_mono": rx, "sentences": len(fix.sentences)}
        if rx is not None:
            meta[MEASURED_MONO] = rx
        if gps_time is not None:
            meta[MEASURED_UTC] = gps_time
        return Reading(sensor="gps", values=fix_values(fix, gps_time), flags=flags, meta=meta)


# ---------------------------------------------------------------------------
# gpsd
# ---------------------------------------------------------------------------

WATCH_COMMAND = b'?WATCH={"enable":true,"json":true}\n'

# gpsd TPV "status" -> GGA fix quality, so both sources speak the same values.
_GPSD_STATUS_TO_QUALITY = {1: 1, 2: 2, 3: 4, 4: 5, 5: 6, 6: 6, 8: 8}


def _parse_gpsd_time(s: Any) -> dt.datetime | None:
    if not isinstance(s, str):
        return None
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class GpsdSource:
    """SensorDriver reading gpsd's JSON reports (TPV for the fix, SKY for satellites).

    ``sock`` may be an already connected socket; otherwise (and after any
    failure) the source connects to ``host:port`` itself, at most once per
    ``reconnect_interval`` seconds of ``clock``. A lost or refused connection
    is a ``ReadError``: recoverable, the next ``read()`` tries again.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 2947,
        *,
        name: str = "gps",
        sock: socket.socket | None = None,
        clock: MonotonicClock = time.monotonic,
        connect_timeout: float = 1.0,
        reconnect_interval: float = 2.0,
        socket_factory: Callable[..., socket.socket] = socket.create_connection,
        min_year: int = 2000,
        max_year: int = 2079,
        max_buffer: int = 1 << 20,
    ) -> None:
        self.name = name
        self.host, self.port = host, port
        self._clock = clock
        self._connect_timeout = connect_timeout
        self._reconnect_interval = reconnect_interval
        self._factory = socket_factory
        self._min_year, self._max_year = min_year, max_year
        self._max_buffer = max_buffer
        self._sock: socket.socket | None = None
        self._watching = False
        self._next_connect = float("-inf")
        self._buf = bytearray()
        self._sky: dict[str, Any] = {}
        self._last_time: str | None = None
        self._time_fix: tuple[float, float] | None = None
        self.connects = 0
        self.bad_reports = 0
        if sock is not None:
            self._adopt(sock)

    # -- SensorDriver ------------------------------------------------------

    def read(self) -> Reading | None:
        now = self._clock()
        if self._sock is None:
            self._connect(now)
        data, closed, err = self._recv_available()
        reading: Reading | None = None
        if data:
            reading = self._consume(data, now)
        if closed or err is not None:
            self._drop(now)
            if reading is None:
                why = "closed the connection" if closed else f"connection failed: {err}"
                raise ReadError(f"{self.name}: gpsd at {self.host}:{self.port} {why}")
        return reading

    def close(self) -> None:
        self._drop(self._clock())

    def time_fix(self) -> tuple[float, float] | None:
        """(UTC seconds, monotonic seconds when received) of the latest TPV time with a fix."""
        return self._time_fix

    # -- connection ----------------------------------------------------------

    def _adopt(self, sock: socket.socket) -> None:
        self._sock = sock
        self._watching = False
        self._buf.clear()

    def _connect(self, now: float) -> None:
        if now < self._next_connect:
            raise ReadError(
                f"{self.name}: gpsd at {self.host}:{self.port} unavailable, retry in {self._next_connect - now:.1f} s"
            )
        self._next_connect = now + self._reconnect_interval
        try:
            sock = self._factory((self.host, self.port), timeout=self._connect_timeout)
        except OSError as exc:
            raise ReadError(f"{self.name}: cannot connect to gpsd at {self.host}:{self.port}: {exc}") from exc
        self.connects += 1
        self._adopt(sock)

    def _drop(self, now: float) -> None:
        sock, self._sock = self._sock, None
        self._watching = False
        self._buf.clear()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _recv_available(self) -> tuple[bytes, bool, OSError | None]:
        """Everything the socket holds now: (data, peer closed, error)."""
        sock = self._sock
        assert sock is not None
        chunks: list[bytes] = []
        try:
            if not self._watching:
                # Blocking send of a few bytes: fine, the kernel buffer is empty.
                sock.settimeout(self._connect_timeout)
                sock.sendall(WATCH_COMMAND)
                self._watching = True
            sock.setblocking(False)
            while True:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    return b"".join(chunks), False, None
                if not chunk:
                    return b"".join(chunks), True, None
                chunks.append(chunk)
        except OSError as exc:
            return b"".join(chunks), False, exc

    # -- reports -------------------------------------------------------------

    def _consume(self, data: bytes, now: float) -> Reading | None:
        self._buf += data
        *lines, rest = bytes(self._buf).split(b"\n")
        self._buf = bytearray(rest)
        if len(self._buf) > self._max_buffer:
            self._buf.clear()  # a runaway line: drop it rather than grow
            self.bad_reports += 1
        newest: dict[str, Any] | None = None
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                rep = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                self.bad_reports += 1
                continue
            if not isinstance(rep, dict):
                self.bad_reports += 1
                continue
            cls = rep.get("class")
            if cls == "SKY":
                self._update_sky(rep)
            elif cls == "TPV":
                if self._tpv_has_fix(rep):
                    newest = rep
        if newest is None:
            return None
        return self._tpv_reading(newest, now)

    def _update_sky(self, rep: dict[str, Any]) -> None:
        sats = rep.get("satellites")
        if isinstance(sats, list):
            self._sky["sats_in_view"] = len(sats)
            self._sky["sats_used"] = sum(1 for s in sats if isinstance(s, dict) and s.get("used"))
        for key, name in (("nSat", "sats_in_view"), ("uSat", "sats_used")):
            if isinstance(rep.get(key), int):
                self._sky[name] = rep[key]
        if _num(rep.get("hdop")) is not None:
            self._sky["hdop"] = float(rep["hdop"])

    @staticmethod
    def _tpv_has_fix(rep: dict[str, Any]) -> bool:
        mode = rep.get("mode")
        return isinstance(mode, int) and mode >= 2 and _num(rep.get("lat")) is not None and _num(rep.get("lon")) is not None

    def _tpv_reading(self, rep: dict[str, Any], now: float) -> Reading | None:
        t_str = rep.get("time")
        # gpsd repeats the TPV of an epoch as sentences of it arrive; one
        # Reading per epoch.
        if t_str is not None and t_str == self._last_time:
            return None
        self._last_time = t_str if isinstance(t_str, str) else None
        t = _parse_gpsd_time(t_str)
        gps_time = None
        if t is not None and self._min_year <= t.year <= self._max_year:
            gps_time = t.timestamp()
            self._time_fix = (gps_time, now)
        status = rep.get("status", 1)
        quality = _GPSD_STATUS_TO_QUALITY.get(status, 1) if isinstance(status, int) else 1
        alt = _num(rep.get("altMSL"))
        if alt is None:
            alt = _num(rep.get("alt"))
        values = {
            "lat": float(rep["lat"]),
            "lon": float(rep["lon"]),
            "alt": alt,
            "speed": _num(rep.get("speed")),
            "course": _num(rep.get("track")),
            "fix_quality": quality,
            "fix_mode": int(rep["mode"]),
            "sats_used": self._sky.get("sats_used"),
            "sats_in_view": self._sky.get("sats_in_view"),
            "hdop": self._sky.get("hdop"),
            "gps_time": gps_time,
        }
        flags = () if gps_time is not None else ("no_gps_time",)
        meta: dict[str, Any] = {"source": "gpsd", "received_mono": now}
        if gps_time is not None:
            meta[MEASURED_UTC] = gps_time  # the TPV's time is the fix's: it places the fix (core/timekeeping.py)
        return Reading(sensor="gps", values=values, flags=flags, meta=meta)


# [sensors.NAME] options of driver = "nmea-gps" (edge/driver_factory.py builds it). collect_s and gap_s
# are upper bounds for the timing probe; the values used follow from the baud and epoch rates
# (NmeaGpsDriver.probe_timing), so few vans need to set them.
NMEA_OPTIONS = DriverOptions({
    "port": serial_port("the GPS receiver's port, e.g. port = \"/dev/ttyACM0\""),
    "baudrate": baudrate(9600),
    "single_sentence": Option(False, check=lambda v: None,
                              doc="true (one position sentence per epoch: RMC, GGA or GNS only) or false"),
    "collect_s": Option(0.4, lo=0.0, lo_open=True, hi=1.0, unit="seconds"),
    "gap_s": Option(0.05, lo=0.0, lo_open=True, hi=1.0, unit="seconds"),
})
# driver = "gpsd": a gpsd daemon's JSON on TCP.
GPSD_OPTIONS = DriverOptions({
    "host": Option("127.0.0.1", check=lambda v: None if v.strip() else "empty: name gpsd's host"),
    "port": Option(2947, lo=1, hi=65535),
})
