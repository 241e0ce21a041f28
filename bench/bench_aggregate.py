"""Time to build the street aggregates (segments and H3 cells) for a simulated fleet month.

A month of a 50-van fleet at 1 Hz (22 working days of 8 hours, three measured
sensors) is 95 million positioned samples. Generating and storing that many
rows takes longer than the aggregation itself, so by default this bench builds
``hours_per_day`` hours a day (``BENCH_AGG_HOURS``, default 1) and scales the
time linearly to 8 hours (the build is linear in samples: one pass over them,
per van, in time order); set BENCH_AGG_HOURS=8 for the full month.

Baseline, same run: a plain SELECT over the same positioned samples (the cost
of only reading them).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

from receiver.store import SQLiteStore
from simulator.route import Route

VANS = 50
DAYS = 22


def generate(path: Path, hours: float, vans: int = VANS, days: int = DAYS) -> int:
    SQLiteStore(path).close()
    route = Route.load()
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    n = 0
    start = dt.datetime(2026, 11, 2, 7, 0, tzinfo=dt.timezone.utc)
    for d in range(days):
        day = start + dt.timedelta(days=d + 2 * (d // 5))  # weekdays
        for v in range(vans):
            device, epoch = f"van-{v + 1:03d}", f"e{v}"
            t0 = int(day.timestamp() * 1000)
            base = (d * 86400 + 1) * 3
            samples, positions = [], []
            for s in range(int(hours * 3600)):
                pos = route.position_at((1500.0 * v + 8.0 * (s + d * 977)) % route.length_m)
                t = t0 + s * 1000
                busy = pos.road_class in ("primary", "secondary")
                for k, (sensor, vals) in enumerate((
                    ("pm", {"pm25": 12.0 + 6 * busy + (s % 5), "pm10": 20.0 + 9 * busy}),
                    ("no2", {"no2_ppb": 15.0 + 20 * busy + (s % 7)}),
                    ("noise", {"laeq": 56.0 + 12 * busy + (s % 3)}),
                )):
                    seq = base + 3 * s + k
                    samples.append((device, epoch, seq, sensor, t, s * 1000, "gps", "", json.dumps(vals), "",
                                     "synthetic", t))
                    positions.append((device, epoch, seq, t, "interpolated", pos.lat, pos.lon, 8.0, 1))
            db.executemany("INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", samples)
            db.executemany("INSERT INTO positions VALUES (?,?,?,?,?,?,?,?,?)", positions)
            db.commit()
            n += len(samples)
    db.close()
    return n


def run() -> list[dict]:
    from click.testing import CliRunner

    from receiver.commands import datalab_commands

    hours = float(os.environ.get("BENCH_AGG_HOURS", "1"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-agg-"))
    store = tmp / "month.sqlite"
    n = generate(store, hours)
    db = sqlite3.connect(store)
    t0 = time.perf_counter()
    db.execute("SELECT count(*), sum(length(s.vals)) FROM samples s JOIN positions p USING (device, epoch, seq)").fetchone()
    read_s = time.perf_counter() - t0
    db.close()
    rows = []
    for scheme in ("segment", "h3:10"):
        t0 = time.perf_counter()
        r = CliRunner().invoke(datalab_commands, ["aggregate", "--store", str(store), "--scheme", scheme,
                                                  "--period", "2026-11"])
        took = time.perf_counter() - t0
        if r.exit_code != 0:
            raise RuntimeError(r.output)
        scale = 8.0 / hours
        rows.append({
            "name": f"street aggregates, month of {VANS} vans ({scheme})",
            "value": round(took * scale, 1), "unit": "s",
            "baseline": round(read_s * scale, 1), "baseline_name": "reading the samples",
            "target": None, "ok": None,
            "note": (f"measured {took:.1f} s for {n:,} samples ({hours:g} h/day)"
                     + ("" if hours == 8 else f", scaled x{scale:g} to 8 h/day")),
        })
    return rows


if __name__ == "__main__":
    from bench import print_table

    print_table(run())
