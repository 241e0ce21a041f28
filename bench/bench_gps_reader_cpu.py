"""CPU cost of timing GPS bytes as they arrive (issue 15, 1; issue 18's budget is 5 CPU-s per van-hour).

A simulated u-blox receiver (its own thread) writes one full epoch (RMC, VTG, GGA, GSA,
GSV x3, ~470 bytes) per second into a real pty in trickles of ``--trickle`` bytes, the way
a 9600-baud UART hands bytes over. The driver is read once a second at phase 0.7, like the
agent does. Reported, in CPU seconds per van-hour: the agent thread's ``read()`` calls
(drain + decode, or decode only) and the reader thread, for the in-tick driver and for the
reader-thread driver. The writer's cost is in neither.

    python -m bench.bench_gps_reader_cpu --seconds 30
"""

from __future__ import annotations

import argparse
import datetime as dt
import threading
import time

import serial

from drivers.gps import NmeaGpsDriver
from simulator.gps_device import FakeGpsReceiver


def run(seconds: int, reader: bool, trickle: int, collect_s: float) -> tuple[float, float, int]:
    sim = FakeGpsReceiver(lambda t: (51.45, -2.58, 12.0, 45.0), clock=time.monotonic,
                          utc_origin=dt.datetime(2026, 5, 6, tzinfo=dt.timezone.utc))
    sim.start(background=False)
    port = serial.serial_for_url(sim.port_name, baudrate=9600, timeout=0)
    drv = NmeaGpsDriver(port, reader_thread=reader, collect_s=collect_s)
    stop = threading.Event()
    t0 = time.monotonic() + 0.5

    def writer() -> None:
        k = 0
        while not stop.is_set():
            stop.wait(max(0.0, t0 + k - time.monotonic()))
            data = b"".join(sim.lines_at(float(k)))
            for i in range(0, len(data), trickle):  # 9600 baud: ~1 ms per byte
                sim.write_raw(data[i : i + trickle])
                time.sleep(trickle / 960.0)
            k += 1

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    fixes = 0
    agent_cpu = 0.0
    try:
        for k in range(seconds):
            time.sleep(max(0.0, t0 + k + 0.7 - time.monotonic()))
            c = time.thread_time()
            if drv.read() is not None:
                fixes += 1
            agent_cpu += time.thread_time() - c
        reader_cpu = 0.0
        if drv._thread is not None:  # the reader thread's own CPU clock
            reader_cpu = time.clock_gettime(time.pthread_getcpuclockid(drv._thread.ident))
        return agent_cpu / seconds * 3600.0, reader_cpu / seconds * 3600.0, fixes
    finally:
        stop.set()
        w.join(timeout=3.0)
        drv.close()
        sim.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--trickle", type=int, default=16, help="bytes per write (a UART FIFO interrupt)")
    ap.add_argument("--collect", type=float, default=0.5, help="the reader's collect_s")
    a = ap.parse_args()
    for reader in (False, True):
        agent, thread, fixes = run(a.seconds, reader, a.trickle, a.collect)
        print(f"reader_thread={reader!s:5}  read() {agent:5.2f} + reader thread {thread:5.2f} "
              f"= {agent + thread:5.2f} CPU-s per van-hour  ({fixes} fixes in {a.seconds} s)")


if __name__ == "__main__":
    main()
