"""Opening serial ports, and keeping a USB-serial port usable across unplugs.

A PM sensor on a USB-serial adapter in a van disappears now and then (a loose
connector, a brown-out of the hub). The agent must not die or restart for
that: the read that hit the hole fails with a recoverable ``ReadError``, and a
later read reopens the port once it is back. ``ReconnectingPort`` does exactly
that around any opener, so tests can hand it a pseudo-terminal or ``loop://``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import serial

from core.errors import BusError, DeviceNotFound

log = logging.getLogger(__name__)

#: A callable returning monotonic seconds (``time.monotonic`` on a Pi).
MonotonicClock = Callable[[], float]


class SerialLike(Protocol):
    """The part of ``serial.Serial`` the PM drivers use."""

    timeout: float | None

    @property
    def in_waiting(self) -> int: ...

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes) -> int | None: ...

    def reset_input_buffer(self) -> None: ...

    def close(self) -> None: ...


# What a vanished port raises: pyserial wraps most errno failures in
# SerialException, but some calls (ioctl for in_waiting, termios) leak OSError.
PORT_GONE = (serial.SerialException, OSError)


def open_port(url: str, baudrate: int, timeout: float = 0.1) -> serial.SerialBase:
    """Open ``url`` (a device path, a pty path or a pyserial URL such as ``loop://``).

    ``timeout`` bounds each ``read`` call; drivers loop over short reads so
    they can honour their own deadlines.
    """
    return serial.serial_for_url(url, baudrate=baudrate, timeout=timeout)


def port_opener(url: str, baudrate: int, timeout: float = 0.1) -> Callable[[], SerialLike]:
    """An opener for ``ReconnectingPort`` bound to one URL."""

    def _open() -> SerialLike:
        return open_port(url, baudrate=baudrate, timeout=timeout)

    return _open


class ReconnectingPort:
    """A serial port that survives being unplugged.

    Every I/O error closes the underlying port and raises ``BusError`` (a
    ``ReadError``: recoverable). Later calls try to reopen it, at most once per
    ``retry_interval_s`` of the injected ``clock`` so a missing adapter does not
    turn the sampling loop into an open() busy-loop. After a successful reopen
    the ``on_reopen`` callbacks run, so a driver can restore the sensor's mode
    (the sensor may have been power-cycled together with the adapter).
    """

    def __init__(
        self,
        opener: Callable[[], SerialLike],
        *,
        clock: MonotonicClock = time.monotonic,
        retry_interval_s: float = 2.0,
        require_at_start: bool = True,
        label: str = "serial port",
    ) -> None:
        self._opener = opener
        self._clock = clock
        self._retry_interval_s = retry_interval_s
        self._label = label
        self._port: SerialLike | None = None
        self._last_attempt: float | None = None
        self._reopen_callbacks: list[Callable[[], None]] = []
        self.reconnects = 0
        self.failures = 0
        try:
            self._port = opener()
        except PORT_GONE as exc:
            if require_at_start:
                raise DeviceNotFound(f"{label}: cannot open: {exc}") from exc
            self._last_attempt = clock()
            log.warning("%s not available at start (%s); will retry", label, exc)

    # -- state -------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._port is not None

    def on_reopen(self, callback: Callable[[], None]) -> None:
        """Run ``callback()`` after each successful reopen (not after the first open)."""
        self._reopen_callbacks.append(callback)

    @property
    def timeout(self) -> float | None:
        return self._port.timeout if self._port is not None else None

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        if self._port is not None:
            self._port.timeout = value

    # -- I/O -----------------------------------------------------------------

    def _ensure(self) -> SerialLike:
        if self._port is not None:
            return self._port
        now = self._clock()
        if self._last_attempt is not None and now - self._last_attempt < self._retry_interval_s:
            raise BusError(f"{self._label} is gone; next reopen attempt not due yet")
        self._last_attempt = now
        try:
            port = self._opener()
        except PORT_GONE as exc:
            raise BusError(f"{self._label} is gone: reopen failed: {exc}") from exc
        self._port = port
        self.reconnects += 1
        log.info("%s reopened", self._label)
        for callback in self._reopen_callbacks:
            # A callback talks to the port too; if the port dies again
            # underneath it, that surfaces as BusError to the caller.
            callback()
        return port

    def _lost(self, exc: BaseException) -> BusError:
        self.failures += 1
        port, self._port = self._port, None
        self._last_attempt = self._clock()
        if port is not None:
            try:
                port.close()
            except PORT_GONE:
                pass  # closing a vanished device may fail too; it is gone either way
        log.warning("%s lost: %s", self._label, exc)
        return BusError(f"{self._label} lost: {exc}")

    def read(self, size: int = 1) -> bytes:
        port = self._ensure()
        try:
            return port.read(size)
        except PORT_GONE as exc:
            raise self._lost(exc) from exc

    def write(self, data: bytes) -> int | None:
        port = self._ensure()
        try:
            return port.write(data)
        except PORT_GONE as exc:
            raise self._lost(exc) from exc

    @property
    def in_waiting(self) -> int:
        port = self._ensure()
        try:
            return port.in_waiting
        except PORT_GONE as exc:
            raise self._lost(exc) from exc

    def reset_input_buffer(self) -> None:
        port = self._ensure()
        try:
            port.reset_input_buffer()
        except PORT_GONE as exc:
            raise self._lost(exc) from exc

    def close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except PORT_GONE:
                pass


def read_available(port: SerialLike, limit: int = 4096) -> bytes:
    """Whatever is already buffered on ``port``, without waiting for more."""
    waiting = port.in_waiting
    if waiting <= 0:
        return b""
    return port.read(min(waiting, limit))


def read_until_deadline(
    port: SerialLike,
    done: Callable[[bytes], bool],
    timeout_s: float,
    *,
    chunk: int = 64,
    expect: Callable[[], int] | None = None,
) -> None:
    """Read chunks into ``done(chunk)`` until it returns True or ``timeout_s`` passes.

    The deadline uses the real ``time.monotonic`` on purpose: it bounds real
    blocking on the wire, while drivers keep their injected clock for sensor
    state (warm-up), which tests freeze or jump.

    Without ``expect``, each read takes what is waiting, or blocks for one
    byte (at most the port's read timeout) when nothing is. ``expect()``, when
    given, says how many bytes would complete the answer the caller waits
    for: each read asks for that many and returns as soon as they are in (or
    the port's read timeout passes), so a whole frame costs one wake-up and
    one read instead of a check, a byte, a check and the rest.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        if expect is not None:
            size = max(1, min(expect(), chunk))
        else:
            waiting = port.in_waiting
            size = max(1, min(waiting, chunk)) if waiting else 1
        data = port.read(size)
        if data and done(data):
            return


class SerialSensor:
    """What every serial PM driver shares: its port, clock, parser, warm-up and reconnect hook.

    ``warm_since`` is when the sensor last started (power-on, wake or measurement
    start), shifted back by ``warmup_s`` when the caller knows it is already warm.
    A port that can reopen itself (``ReconnectingPort``) calls ``_after_reopen``.
    """

    def __init__(
        self,
        port: SerialLike,
        clock: Callable[[], float],
        name: str,
        parser: Any,
        *,
        warmup_s: float,
        timeout_s: float,
        assume_warm: bool,
    ) -> None:
        self.name = name
        self._port = port
        self._clock = clock
        self._parser = parser
        self._warmup_s = warmup_s
        self._timeout_s = timeout_s
        self._asleep = False
        now = clock()
        self._warm_since = now - warmup_s if assume_warm else now
        on_reopen = getattr(port, "on_reopen", None)
        if on_reopen is not None:
            on_reopen(self._after_reopen)

    @property
    def parser(self) -> Any:
        """The stream parser, whose counters tell how many frames were rejected."""
        return self._parser

    @property
    def asleep(self) -> bool:
        return self._asleep

    def _after_reopen(self) -> None:  # pragma: no cover - each driver overrides it
        pass

    def close(self) -> None:
        self._port.close()
