"""Clocks are passed in, like gpiozero's pin factories.

The agent never calls ``time.time()`` itself: it asks a ``Clock``. On a Pi that
is ``SystemClock``; the simulator passes a ``SimClock`` that runs an 8-hour
shift in seconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from typing import Callable, Protocol

from core.sample import TimeSource


class Clock(Protocol):
    def utc(self) -> float:
        """Seconds since the Unix epoch, as this clock believes."""

    def monotonic(self) -> float:
        """Seconds on a clock that never steps (same boot)."""

    def sleep(self, seconds: float) -> None:
        """Wait; a simulated clock just moves on."""

    def source(self) -> TimeSource:
        """How far ``utc()`` can be trusted right now."""


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>; only 'status' is read. The padding at the
    # end covers the reserved fields of every Linux ABI.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    # find_library runs ldconfig: do it once, not at every stamp.
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def kernel_clock_synchronised() -> bool:
    """True when the kernel says an NTP daemon disciplines the clock (adjtimex)."""
    try:
        libc = _load_libc()
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return False
    return state not in (-1, _TIME_ERROR) and not (tx.status & _STA_UNSYNC)


class SystemClock:
    """The Pi's own clock. Its trust comes from NTP (adjtimex), asked at most once a second."""

    def __init__(self) -> None:
        self._source = TimeSource.UNSYNC
        self._source_checked = -1e9

    def utc(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def source(self) -> TimeSource:
        now = time.monotonic()
        if now - self._source_checked >= 1.0:
            self._source_checked = now
            self._source = TimeSource.NTP if kernel_clock_synchronised() else TimeSource.UNSYNC
        return self._source


class SimClock:
    """Virtual time for simulations and tests.

    ``speedup=None`` runs as fast as the caller can go (``sleep`` only advances
    the virtual clock); a number makes ``sleep`` also wait for the real time
    ``seconds / speedup``.

    ``trusted_after`` and ``boot_error_s`` model a Pi that boots with a stale
    clock: until that many virtual seconds have passed, ``utc()`` is off by
    ``boot_error_s`` and ``source()`` says UNSYNC; then NTP steps it right.
    ``true_utc()`` is the real time, for simulated GPS receivers.
    """

    def __init__(
        self,
        start_utc: float,
        *,
        speedup: float | None = None,
        trusted_source: TimeSource = TimeSource.NTP,
        trusted_after: float = 0.0,
        boot_error_s: float = 0.0,
    ) -> None:
        self._t0 = start_utc
        self._elapsed = 0.0
        self._speedup = speedup
        self._trusted_source = trusted_source
        self._trusted_after = trusted_after
        self._boot_error = boot_error_s
        self._step = 0.0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[float], None]] = []

    def on_advance(self, listener: Callable[[float], None]) -> None:
        """Call ``listener(elapsed)`` after every advance, in the advancing thread.

        Simulated devices use this to emit their bytes in lock-step with virtual
        time: what a device "sent" during a sleep is in the port before the
        agent's next read, however fast the simulation runs.
        """
        self._listeners.append(listener)

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the clock started."""
        with self._lock:
            return self._elapsed

    def true_utc(self) -> float:
        with self._lock:
            return self._t0 + self._elapsed

    def utc(self) -> float:
        with self._lock:
            t = self._t0 + self._elapsed + self._step
            return t if self._elapsed >= self._trusted_after else t + self._boot_error

    def monotonic(self) -> float:
        with self._lock:
            return 1000.0 + self._elapsed

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._elapsed += seconds
            elapsed = self._elapsed
        for listener in self._listeners:
            listener(elapsed)

    def step(self, seconds: float) -> None:
        """Step the system clock (as NTP or an administrator would); monotonic time is unmoved."""
        with self._lock:
            self._step += seconds

    def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self._speedup:
            time.sleep(seconds / self._speedup)
        self.advance(seconds)

    def source(self) -> TimeSource:
        with self._lock:
            elapsed = self._elapsed
        return self._trusted_source if elapsed >= self._trusted_after else TimeSource.UNSYNC
