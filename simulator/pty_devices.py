"""Simulated serial devices in a process of their own, in real time.

``python -m simulator.pty_devices --json ports.json`` starts a Plantower PMS5003
and a u-blox-like GPS receiver on pseudo-terminals, writes their paths to
``ports.json`` and runs until killed. An agent in another process then reads
them through the real drivers at the devices' real rates: what the CPU
benchmark measures (the devices' own work is not the agent's).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import threading
import time
from pathlib import Path

from simulator.gps_device import FakeGpsReceiver
from simulator.pm_devices import PMSSimulator


def circle(t: float) -> tuple[float, float, float, float]:
    """A van going round at 8 m/s near Alphen's station."""
    a = t / 120.0
    return (52.1244 + 0.002 * math.sin(a), 4.6578 + 0.003 * math.cos(a), 8.0, (math.degrees(a) + 90) % 360)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", required=True, help="where to write the device paths")
    args = ap.parse_args()
    t0 = time.monotonic()
    pm = PMSSimulator(lambda: (8.0, 12.0, 20.0), warmup_s=0.0)
    pm.start()
    gps = FakeGpsReceiver(lambda t: circle(t), clock=lambda: time.monotonic() - t0)
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
