"""Wait until bytes written to a pseudo-terminal can be read on its other side.

A write to a pty master returns once the kernel has queued the bytes; a
kernel worker (``flush_to_ldisc``) moves them into the slave's line
discipline later, and only then does a reader see them (``in_waiting``,
``TIOCINQ``). On an idle machine that takes microseconds, on a loaded one
milliseconds. Real time does not notice. A simulated van's virtual clock
does: it moves a second per tick, a few milliseconds of real time apart, so
a few milliseconds of kernel latency put an epoch several *virtual* seconds
late (measured: 1-5 s for 15-35 % of the GPS epochs of a clock-step run on a
loaded test machine). A device that emits in lock-step with virtual time
therefore waits here until its bytes are readable before the clock moves on.
"""

from __future__ import annotations

import fcntl
import struct
import termios
import time
from typing import Callable

__all__ = ["PTY_INPUT_MAX", "queued", "wait_queued"]

# The slave's line discipline holds at most this many unread bytes in raw mode
# (N_TTY_BUF_SIZE 4096 less one); the rest waits in the kernel's flip buffer.
PTY_INPUT_MAX = 4095


def queued(fd: int) -> int:
    """Bytes a reader of the tty ``fd`` would get now (``TIOCINQ``, pyserial's ``in_waiting``)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCINQ, b"\0\0\0\0"))[0]


def wait_queued(
    fd: int,
    at_least: int,
    timeout_s: float,
    *,
    now: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Wait (real time, at most ``timeout_s``) until ``fd`` holds ``at_least`` readable bytes.

    ``at_least`` is capped at ``PTY_INPUT_MAX``: nobody reading, the queue stops there. True
    when reached. Sleeps between looks (from 50 us, doubling to 2 ms) rather than spinning:
    the kernel worker that delivers the bytes needs the CPU this thread would burn.
    """
    want = min(at_least, PTY_INPUT_MAX)
    if queued(fd) >= want:
        return True
    deadline = now() + timeout_s
    pause = 50e-6
    while now() < deadline:
        sleep(pause)
        if queued(fd) >= want:
            return True
        pause = min(2 * pause, 0.002)
    return False
