"""The I2C seam: a bus Protocol, the smbus2 adapter, retries, and a register-level fake.

Drivers talk to an ``I2CBus``: the subset of ``smbus2.SMBus`` they use, with the
same argument order and, crucially, the same byte order. SMBus word transfers
put the *low* byte first on the wire, so ``read_word_data`` of a device that
sends big-endian registers (the ADS1115) returns the bytes swapped. The fake
here keeps that behaviour so a driver that forgets to swap fails its tests.

Linux reports a NACK or a glitch on the bus as ``OSError`` (EREMOTEIO, EIO,
ETIMEDOUT). ``BusRetry`` retries those a few times, counts what it did, and
turns the final failure into ``BusError``, the project's recoverable error.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from core.errors import BusError

T = TypeVar("T")


@runtime_checkable
class I2CBus(Protocol):
    """The part of ``smbus2.SMBus`` the drivers use (same names, same semantics)."""

    def read_byte_data(self, i2c_addr: int, register: int) -> int: ...

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None: ...

    def read_word_data(self, i2c_addr: int, register: int) -> int:
        """16 bits; the first byte on the wire is the LOW byte of the result."""

    def write_word_data(self, i2c_addr: int, register: int, value: int) -> None:
        """16 bits; the LOW byte of ``value`` goes first on the wire."""

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]: ...

    def write_i2c_block_data(self, i2c_addr: int, register: int, data: Sequence[int]) -> None: ...


class SMBusAdapter:
    """A real Linux I2C bus (``/dev/i2c-N``) through smbus2, opened on first use.

    Opening lazily lets the agent build its drivers (and validate config) on a
    machine without the bus; the first transaction raises ``OSError`` there,
    which the retry helper reports as ``BusError``.
    """

    def __init__(self, bus_number: int = 1) -> None:
        self.bus_number = bus_number
        self._bus: Any = None
        self._lock = threading.Lock()

    def _smbus(self) -> Any:
        with self._lock:
            if self._bus is None:
                import smbus2  # imported here so the tests never need /dev/i2c-*

                self._bus = smbus2.SMBus(self.bus_number)
            return self._bus

    def read_byte_data(self, i2c_addr: int, register: int) -> int:
        return int(self._smbus().read_byte_data(i2c_addr, register))

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None:
        self._smbus().write_byte_data(i2c_addr, register, value)

    def read_word_data(self, i2c_addr: int, register: int) -> int:
        return int(self._smbus().read_word_data(i2c_addr, register))

    def write_word_data(self, i2c_addr: int, register: int, value: int) -> None:
        self._smbus().write_word_data(i2c_addr, register, value)

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]:
        return list(self._smbus().read_i2c_block_data(i2c_addr, register, length))

    def write_i2c_block_data(self, i2c_addr: int, register: int, data: Sequence[int]) -> None:
        self._smbus().write_i2c_block_data(i2c_addr, register, list(data))

    def close(self) -> None:
        with self._lock:
            if self._bus is not None:
                self._bus.close()
                self._bus = None


# --------------------------------------------------------------------------- retries


@dataclass
class BusStats:
    """What the retry helper did, for the driver to report in ``Reading.meta``."""

    transactions: int = 0  # operations attempted (a retried one counts once)
    retries: int = 0  # extra attempts after an OSError
    failures: int = 0  # operations that gave up and raised BusError


class BusRetry:
    """Retry ``OSError`` from bus transactions, then raise ``BusError``.

    A van's I2C wiring picks up glitches (ignition, long cables): one failed
    transaction is common and worth a quick second try; several in a row mean
    the device is gone and the read should fail fast so the tick is not lost.
    ``sleep`` is injected so the tests do not wait for the backoff.
    """

    def __init__(
        self,
        attempts: int = 3,
        *,
        backoff_s: float = 0.002,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._sleep = sleep
        self.stats = BusStats()

    def call(self, what: str, op: Callable[..., T], *args: Any) -> T:
        """Run ``op(*args)``; ``what`` names the transaction in the error message."""
        self.stats.transactions += 1
        # First attempt outside the loop: it is the one that almost always works,
        # and a driver makes several of these calls per reading.
        try:
            return op(*args)
        except OSError as exc:
            last: OSError | None = exc
        for attempt in range(1, self.attempts):
            self.stats.retries += 1
            # Linear backoff: enough for a bus glitch to pass, short enough for a tick.
            self._sleep(self.backoff_s * attempt)
            try:
                return op(*args)
            except OSError as exc:
                last = exc
        self.stats.failures += 1
        raise BusError(f"{what}: failed after {self.attempts} attempts: {last}") from last


# --------------------------------------------------------------------------- the fake


class I2CDevice(Protocol):
    """A register-level device model behind ``FakeI2CBus``.

    Every I2C register transaction is "set the register pointer, then move n
    bytes", so a device model only needs these two methods; the bus maps the
    SMBus calls onto them with SMBus byte order. Raise ``OSError`` to NACK.
    """

    def read_register(self, register: int, length: int) -> bytes: ...

    def write_register(self, register: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class Transaction:
    """One logged bus call: ``op`` is the SMBus method name; ``data`` the bytes in wire order."""

    op: str
    addr: int
    register: int
    data: bytes


class FakeI2CBus:
    """An ``I2CBus`` that routes each transaction by address to a device model.

    An address with no device raises ``OSError(EREMOTEIO)`` like the Linux
    driver does on a NACK. ``fail_next(n)`` makes the next n transactions fail
    with ``OSError`` (optionally only for one address) to exercise retries.
    ``log`` keeps every transaction in wire byte order for byte-order tests.
    """

    def __init__(
        self, devices: dict[int, I2CDevice] | None = None, *, keep_log: bool = True
    ) -> None:
        self.devices: dict[int, I2CDevice] = dict(devices or {})
        self.keep_log = keep_log
        self.log: list[Transaction] = []
        self._fail_budget = 0
        self._fail_addr: int | None = None
        self._fail_errno = errno.EIO
        self._lock = threading.Lock()

    def attach(self, addr: int, device: I2CDevice) -> None:
        self.devices[addr] = device

    def fail_next(self, n: int, *, addr: int | None = None, err: int = errno.EIO) -> None:
        """The next ``n`` transactions (to ``addr``, or to any address) raise OSError(err)."""
        self._fail_budget = n
        self._fail_addr = addr
        self._fail_errno = err

    def _device(self, op: str, addr: int, register: int, data: bytes = b"") -> I2CDevice:
        if self.keep_log:
            self.log.append(Transaction(op, addr, register, data))
        if self._fail_budget > 0 and (self._fail_addr is None or self._fail_addr == addr):
            self._fail_budget -= 1
            raise OSError(self._fail_errno, f"injected fault on 0x{addr:02x}")
        device = self.devices.get(addr)
        if device is None:
            raise OSError(errno.EREMOTEIO, f"no device answers at 0x{addr:02x}")
        return device

    @staticmethod
    def _check_byte(value: int) -> None:
        if not 0 <= value <= 0xFF:
            raise ValueError(f"byte out of range: {value}")

    def read_byte_data(self, i2c_addr: int, register: int) -> int:
        with self._lock:
            return self._device("read_byte_data", i2c_addr, register).read_register(register, 1)[0]

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None:
        self._check_byte(value)
        with self._lock:
            data = bytes([value])
            self._device("write_byte_data", i2c_addr, register, data).write_register(register, data)

    def read_word_data(self, i2c_addr: int, register: int) -> int:
        with self._lock:
            raw = self._device("read_word_data", i2c_addr, register).read_register(register, 2)
        # SMBus word: first byte on the wire is the low byte of the result.
        return raw[0] | (raw[1] << 8)

    def write_word_data(self, i2c_addr: int, register: int, value: int) -> None:
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"word out of range: {value}")
        data = bytes([value & 0xFF, value >> 8])  # low byte first, as SMBus sends it
        with self._lock:
            self._device("write_word_data", i2c_addr, register, data).write_register(register, data)

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]:
        if not 1 <= length <= 32:  # the SMBus block limit
            raise ValueError(f"block length out of range: {length}")
        with self._lock:
            device = self._device("read_i2c_block_data", i2c_addr, register)
            return list(device.read_register(register, length))

    def write_i2c_block_data(self, i2c_addr: int, register: int, data: Sequence[int]) -> None:
        for b in data:
            self._check_byte(b)
        payload = bytes(data)
        with self._lock:
            self._device("write_i2c_block_data", i2c_addr, register, payload).write_register(
                register, payload
            )

    def close(self) -> None:
        """Nothing to release; present so the fake can stand in for ``SMBusAdapter``."""
