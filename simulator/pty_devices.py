"""Simulated serial devices in a process of their own, in real time.

``python -m simulator.pty_devices --json ports.json`` starts a Plantower PMS5003
and a u-blox-like GPS receiver on pseudo-terminals, writes their paths to
``ports.json`` and runs until killed. An agent in another process then reads
them through the real drivers at the devices' real rates: what the CPU
benchmark measures (the devices' own work is not the agent's).

As a van meets them (issue #18): the GPS keeps present UTC on whole seconds
(so the agent gets trusted time: its plausible-time floor rejects anything
before the build), sends the sentence mix of a u-blox capture when
``--nmea-mix`` names one (13-23 sentences a second), and each epoch leaves
50 ms after its second, as a receiver's solution does; the PM readings are
noisy, and so are the GPS position, speed, course, satellites, HDOP and altitude
(``GpsError``, simulator/gps_sky.py): a constant compresses to nothing and flatters
the bytes per value.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import signal
import threading
import time
from pathlib import Path

from simulator.gps_device import FakeGpsReceiver
from simulator.gps_sky import SkyModel
from simulator.nmea_mix import load_capture_mix
from simulator.pm_devices import PMSSimulator


def circle(t: float) -> tuple[float, float, float, float]:
    """A van going round at 8 m/s near Alphen's station."""
    a = t / 120.0
    return (52.1244 + 0.002 * math.sin(a), 4.6578 + 0.003 * math.cos(a), 8.0, (math.degrees(a) + 90) % 360)


class GpsError:
    """What a receiver reports around ``circle``: never constants (issue #18).

    The position error wanders (mean-reverting, about 1.5 m: a receiver's error is
    correlated from one second to the next, not white), the speed follows traffic
    (slowing, speeding up) with a little noise, the course jitters. Call with
    non-decreasing t; deterministic for a seed.
    """

    def __init__(self, seed: int = 1) -> None:
        self._rng = random.Random(f"gps-error:{seed}")
        self._north = self._east = 0.0  # metres
        self._second: int | None = None

    def __call__(self, t: float) -> tuple[float, float, float, float]:
        lat, lon, _speed, course = circle(t)
        second = math.floor(t)
        g = self._rng.gauss
        while self._second is None or self._second < second:
            self._second = second if self._second is None else self._second + 1
            self._north = 0.95 * self._north + g(0.0, 0.35)
            self._east = 0.95 * self._east + g(0.0, 0.35)
        speed = max(0.0, 8.0 + 3.0 * math.sin(t / 23.0) + g(0.0, 0.15))
        return (lat + self._north / 111_320.0, lon + self._east / (111_320.0 * math.cos(math.radians(lat))),
                speed, (course + g(0.0, 0.8)) % 360)


def noisy_pm(rng: random.Random) -> tuple[float, float, float]:
    """PM1, PM2.5, PM10 in µg/m³ around a town background, with the sensor's scatter."""
    base = 12.0 + rng.gauss(0.0, 2.0)
    return (max(0.0, base * 0.65), max(0.0, base), max(0.0, base * 1.6 + rng.gauss(0.0, 1.5)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", required=True, help="where to write the device paths")
    ap.add_argument("--nmea-mix", type=Path, help="a u-blox capture whose sentence mix the GPS sends")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    pm = PMSSimulator(lambda: noisy_pm(rng), warmup_s=0.0)
    pm.start()
    # Whole UTC seconds: the receiver's clock t counts seconds since t0, a UTC second.
    t0 = float(math.floor(time.time()))
    mix = load_capture_mix(args.nmea_mix) if args.nmea_mix else None
    gps = FakeGpsReceiver(
        GpsError(args.seed),
        clock=lambda: time.time() - t0,
        utc_origin=dt.datetime.fromtimestamp(t0, dt.timezone.utc),
        talker="GN" if mix else "GP",
        mix=mix,
        output_delay_s=0.05,
        sky=SkyModel(args.seed).at,  # satellites, HDOP and altitude move
    )
    gps.start(background=True)
    Path(args.json).write_text(json.dumps({"pm": pm.device_path, "gps": gps.port_name}))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    gps.stop()
    pm.stop()


if __name__ == "__main__":
    main()
