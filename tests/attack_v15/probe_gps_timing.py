"""v15 attack, point 1/3: epoch stamps within 50 ms over a real pty, with my own receiver:
epochs leave at a latency that jitters 20-400 ms (the receiver's output load varies), the
bytes come sentence by sentence at 9600 baud, the receiver goes silent for 6 s (longer
than any prediction window) and comes back, and the agent's tick phase is not the epoch's.
The truth is the monotonic instant my writer put the epoch's first byte on the pty.

Run: .venv/bin/python -m pytest tests/attack_v15/probe_gps_timing.py -q -p no:cacheprovider -s
"""

from __future__ import annotations

import datetime as dt
import os
import random
import threading
import time
import tty

import pytest
import serial

from drivers.gps import NmeaGpsDriver
from tests.attack_v15.probe_gps_single import gga, nmea, rmc

BAUD = 9600
T0 = dt.datetime(2026, 12, 6, 10, 0, 0, tzinfo=dt.timezone.utc)


class JitterReceiver:
    def __init__(self, seconds: int, silent: range = range(0), seed: int = 15,
                 latency: tuple[float, float] = (0.02, 0.40)) -> None:
        self.latency = latency
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.name = os.ttyname(self.slave)
        self.first_byte: dict[float, float] = {}  # tod -> mono of the first byte written
        self.rng = random.Random(seed)
        self.seconds, self.silent = seconds, silent
        self.base = int(time.monotonic()) + 1.0
        self.stop = threading.Event()
        self.th = threading.Thread(target=self.run, daemon=True)
        self.th.start()

    def run(self) -> None:
        for k in range(self.seconds):
            if k in self.silent:
                continue
            utc = T0 + dt.timedelta(seconds=k)
            lat, lon = 52.5 + k * 1e-5, 13.4
            lines = [rmc(utc, lat, lon), gga(utc, lat, lon), nmea("GPGSA,A,3,01,02,03,04,05,06,07,08,,,,,1.5,0.9,1.2"),
                     nmea("GPGSV,1,1,04,01,40,083,46,02,17,308,41,03,07,344,39,04,22,228,45")]
            start = self.base + k + self.rng.uniform(*self.latency)
            t = start
            for i, ln in enumerate(lines):
                b = ln.encode()
                pause = t - time.monotonic()
                if pause > 0 and self.stop.wait(pause):
                    return
                if i == 0:
                    self.first_byte[utc.hour * 3600 + utc.minute * 60 + utc.second] = time.monotonic()
                os.write(self.master, b)
                t += len(b) * 10 / BAUD  # the next sentence leaves after this one at the baud rate

    def close(self) -> None:
        self.stop.set()
        self.th.join(2)
        os.close(self.master)
        os.close(self.slave)


@pytest.mark.parametrize("latency", [(0.137, 0.137), (0.11, 0.16), pytest.param((0.02, 0.40), marks=pytest.mark.xfail(
    reason="design: between probes an epoch is dated from the last timed one, assuming a fixed latency"))],
                         ids=["fixed-latency", "jitter-50ms", "jitter-380ms"])
@pytest.mark.parametrize("phase,silent", [(0.71, range(0)), (0.13, range(5, 11))], ids=["steady", "silent6s"])
def test_epoch_stamps_within_50ms(phase, silent, latency):
    """Truth: the first byte's write instant. With a jittering latency the driver's predicted
    epochs (between probes) carry the reference epoch's latency; the error against the epoch's
    own UTC second (base+k) is printed too: that is the measurement instant."""
    n = 18
    rx = JitterReceiver(n, silent, latency=latency)
    port = serial.serial_for_url(rx.name, baudrate=BAUD, timeout=0)
    drv = NmeaGpsDriver(port, reader_thread=True, baudrate=BAUD)
    got = []
    try:
        for k in range(n + 2):
            pause = rx.base + k + phase - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            r = drv.read()
            if r is not None:
                got.append(r)
    finally:
        drv.close()
        rx.close()
    errs, untimed, sec = [], [], []
    for r in got:
        tod = r.meta["tod"]
        mono = r.meta.get("received_mono")
        if tod not in rx.first_byte:
            continue
        if mono is None:
            untimed.append(tod)
            continue
        errs.append((tod, (mono - rx.first_byte[tod]) * 1000))
        sec.append((mono - (rx.base + tod - 36000)) * 1000)
    spread = (max(sec) - min(sec)) if sec else float("nan")
    print(f"\n{latency} phase {phase} {silent}: {len(got)} fixes, {len(errs)} timed, untimed {len(untimed)};"
          f" vs first byte ms: {[round(e, 1) for _, e in errs]}; vs UTC second: spread {spread:.1f} ms")
    assert len(errs) >= (n - len(silent)) * 0.6, (len(errs), len(got), untimed)
    bad = [(t, round(e, 1)) for t, e in errs if abs(e) > 50]
    assert not bad, f"{len(bad)} of {len(errs)} epochs stamped > 50 ms from their first byte: {bad}"
