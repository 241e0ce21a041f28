"""ADS1115 reads per second through the fake bus.

What this measures is the host-side cost of one single-shot read (driver,
retry wrapper, byte swapping, the register model), with a simulated clock so
the conversion wait costs nothing. On a Pi the chip's own conversion time
(1 / data rate, e.g. 7.8 ms at 128 SPS) dominates; this number says how much
CPU a read costs on top of that, and whether retries change it.

    python bench/bench_ads1115.py [seconds-per-case]
"""

from __future__ import annotations

import sys
import time

from drivers.ads1115 import ADS1115
from drivers.i2c import BusRetry, FakeI2CBus
from drivers.no2 import LinearTemperature, No2B43F
from core.no2_sheet import No2Calibration
from core.clock import SimClock
from simulator.i2c_devices import FakeADS1115


def _rig(data_rate: int = 860) -> tuple[ADS1115, FakeADS1115, FakeI2CBus]:
    clock = SimClock(0.0)
    fake = FakeADS1115(clock=clock)
    fake.source = lambda ch: 0.3 + 0.01 * ch
    bus = FakeI2CBus({0x49: fake}, keep_log=False)
    adc = ADS1115(bus, data_rate=data_rate, clock=clock, retry=BusRetry(sleep=clock.sleep))
    return adc, fake, bus


def _rate(fn, seconds: float) -> tuple[float, int]:
    """Calls per second of ``fn`` over about ``seconds`` of wall time."""
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(100):
            fn()
        n += 100
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start), n


def run(seconds: float = 0.5) -> list[dict]:
    rows: list[dict] = []

    adc, _, bus = _rig()
    rate, n = _rate(lambda: adc.read_volts("AIN0"), seconds)
    rows.append({"name": "ads1115_reads_per_s", "value": round(rate), "unit": "reads/s"})
    rows.append({"name": "ads1115_us_per_read", "value": round(1e6 / rate, 2), "unit": "µs"})
    rows.append(
        {
            "name": "ads1115_bus_transactions_per_read",
            "value": round(adc.stats.transactions / n, 2),
            "unit": "transactions",
        }
    )

    # One glitch every 10 reads: the cost of retrying (the backoff is simulated time).
    adc, _, bus = _rig()
    counter = {"i": 0}

    def glitchy() -> None:
        counter["i"] += 1
        if counter["i"] % 10 == 0:
            bus.fail_next(1)
        adc.read_volts("AIN0")

    rate, n = _rate(glitchy, seconds)
    rows.append(
        {"name": "ads1115_reads_per_s_10pct_glitches", "value": round(rate), "unit": "reads/s"}
    )
    rows.append(
        {
            "name": "ads1115_retries_per_read_10pct_glitches",
            "value": round(adc.stats.retries / n, 3),
            "unit": "retries",
        }
    )

    # The whole NO2 driver: three conversions (WE, AE, temperature) and the AAN 803 formula.
    adc, _, _ = _rig()
    cal = No2Calibration("bench", 295.0, 300.0, 10.0, 5.0, -0.3547, -0.73)
    no2 = No2B43F(adc, cal, temp_channel="AIN2", temp_from_mv=LinearTemperature(0.0, 10.0))
    rate, _ = _rate(no2.read, seconds)
    rows.append({"name": "no2_b43f_readings_per_s", "value": round(rate), "unit": "readings/s"})
    return rows


def main(argv: list[str]) -> None:
    seconds = float(argv[1]) if len(argv) > 1 else 0.5
    rows = run(seconds)
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  {'value':>12}  unit")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['value']:>12}  {r['unit']}")


if __name__ == "__main__":
    main(sys.argv)
