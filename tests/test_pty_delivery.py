"""Virtual time cannot outrun a pseudo-terminal (simulator/pty_delivery.py).

A pty delivers what its master wrote to the slave's reader asynchronously. The
simulated GPS receiver writes an epoch as its van's virtual clock reaches a
second; the clock then waits until the epoch is readable, so the driver, read
once per virtual second like the agent does, finds that very second's epoch
every time. Without the wait, a loaded kernel made 15-35 % of a clock-step
run's epochs 1-5 virtual seconds late (tests/test_clock_step_faults.py).
"""

from __future__ import annotations

import datetime as dt
import os
import tty
from collections.abc import Iterator

import pytest

from core.clock import SimClock
from edge.config import parse_config
from edge.driver_factory import build_drivers
from simulator.gps_device import nmea_epoch, ReceiverState
from simulator.hardware import GPS_TTFF_S, SimulatedHardware
from simulator.pty_delivery import PTY_INPUT_MAX, queued, wait_queued
from simulator.world import VanWorld

T0 = 1_795_000_000.0


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    yield master, slave
    os.close(master)
    os.close(slave)


def _epoch() -> bytes:
    state = ReceiverState(utc=dt.datetime(2026, 11, 18, tzinfo=dt.timezone.utc), fix=(52.12, 4.66, 8.0, 90.0))
    return b"".join(nmea_epoch(state))


def test_written_bytes_are_readable_once_waited_for(pty) -> None:
    master, slave = pty
    data = _epoch()
    for _ in range(200):
        n = os.write(master, data)
        assert wait_queued(slave, n, timeout_s=5.0)
        assert queued(slave) == n == len(data)
        assert os.read(slave, 4096) == data


def test_a_port_nobody_reads_does_not_hold_the_writer(pty) -> None:
    master, slave = pty
    for _ in range(3):
        os.write(master, b"x" * 4096)  # more than the line discipline holds: the rest waits in the kernel
    # capped at what the slave's queue can hold, so reached rather than timed out
    assert wait_queued(slave, 3 * 4096, timeout_s=5.0)
    assert queued(slave) == PTY_INPUT_MAX


def test_nothing_written_is_not_taken_for_delivered(pty) -> None:
    _, slave = pty
    assert not wait_queued(slave, 1, timeout_s=0.05)


def test_the_driver_reads_each_epoch_in_the_virtual_second_it_was_sent() -> None:
    clock = SimClock(T0)
    world = VanWorld(clock, shift_start_utc=T0)
    hw = SimulatedHardware(world, clock)
    cfg = parse_config({"sensors": {"gps": {"driver": "nmea-gps", "port": "sim:gps"}}})
    (drv,) = build_drivers(cfg.sensors, {"clock": clock, "world": world, "hardware": hw})
    seconds = 400
    try:
        late, fixed, run = [], 0, 0
        for _ in range(seconds):
            clock.sleep(1.0)  # the receiver sends this second's epoch
            reading = drv.read()
            now = clock.elapsed
            run = run + 1 if now >= GPS_TTFF_S and not world.truth_at(T0 + now).van.gps_blocked else 0
            if run < 3:
                # No fix; or one of the first two after none, which complete only with the next epoch
                # (a fix's sentence set differs from a void epoch's: the driver learns its cycle's last
                # sentence anew, drivers.nmea.FixAssembler).
                continue
            fixed += 1
            # every read has this very second's fix (its time of day), not an earlier one or none
            tod = reading.meta["tod"] if reading is not None else None
            if tod != (T0 + now) % 86400:
                late.append((now, tod and tod - T0 % 86400))
    finally:
        drv.close()
        hw.close()
    assert fixed > seconds / 2 and not late, f"(virtual second, second of the fix read) {late[:10]}"
    assert hw.gps.late_deliveries == 0
    assert hw.gps.epochs_sent == seconds + 1
