"""Time to build the street aggregates (segments and H3 cells) for a simulated fleet month.

The fleet: 50 vans, 22 working days (December 2026's first 22 weekdays: one calendar
month, the period built), three measured sensors (PM, NO2, noise) at 1 Hz, and
``BENCH_AGG_HOURS`` hours a day. BENCH_AGG_HOURS=8 is the full month, 95 million
positioned samples, *measured*: about 30 minutes on the 2-core VM while other
benchmarks ran (12 minutes of it generating the 22.5 GB store). The default, 1 hour a day
(12 M samples, a few minutes), is *scaled* x8 to the month, and the row says
"SCALED" in its name. BENCH_AGG_VANS and BENCH_AGG_DAYS shrink the fleet for tests.

How the load is produced (fast, and not through the receiver's ingest, whose speed
is bench_ingest's business): each van-day is a :class:`simulator.route.Drive` along
the shipped route (speed limits, acceleration, delivery stops, red lights), each van
and each day starting at another point of the loop, so every day covers a different
stretch. Its odometer is evaluated every second with numpy and turned into positions
with the route's own interpolation. Values depend on the road class plus seeded noise;
the PM sensor's first 30 s of a shift are flagged ``warming_up`` (left out of maps, as
in real data). Rows go straight into the store's ``samples`` and ``positions`` tables
(the SQLiteStore schema, all its indexes) in the order the receiver would write them:
60-second batches of all vans interleaved in time, one executemany per chunk, with
``journal_mode=OFF, synchronous=OFF`` for the generator only; SQLite itself turns
each staged van-second into its three samples and positions, and the positions are
written by a second process in parallel (see :func:`generate`). GPS samples and fixes
are not generated: the aggregation never reads them.

Timed: ``datalab-receiver aggregate --scheme segment|h3:10 --period 2026-12`` on that
store, in process. Baseline, same run: SQLite reading the same positioned samples
(the join of samples and positions, nothing else).

Measured at full size (2026-11-26, load average 2-8 from other benchmarks): segments
327 s, H3 res 10 352 s, reading 80 s, for 95,040,000 samples; generation 740 s.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import shutil
import sqlite3
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from receiver.store import SQLiteStore
from simulator.route import MOVE, Drive, DriveParams, Route

VANS = 50
DAYS = 22
BATCH_S = 60  # the agent's default batch.max_age_s: how ingest interleaves vans
WARMUP_S = 30
# December 2026 has 23 weekdays: 22 working days fit one calendar month (the --period built).
START = dt.datetime(2026, 12, 1, 7, 0, tzinfo=dt.timezone.utc)  # 08:00 in Amsterdam
PERIOD = "2026-12"
SENSORS = ("pm", "no2", "noise")
CHUNK_ROWS = 200_000  # van-seconds staged at a time


class RouteArrays:
    """:meth:`Route.position_at` for many distances at once (same interpolation, in numpy)."""

    def __init__(self, route: Route) -> None:
        segs = route.segments
        self.route = route
        self.start = np.array([s.start_m for s in segs])
        self.length = np.array([s.length_m for s in segs])
        self.lat0, self.lat1 = np.array([s.lat0 for s in segs]), np.array([s.lat1 for s in segs])
        self.lon0, self.lon1 = np.array([s.lon0 for s in segs]), np.array([s.lon1 for s in segs])
        self.busy = np.array([s.road_class in ("primary", "secondary") for s in segs])

    def at(self, distance_m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lat, lon, busy road) at each distance along the route."""
        r = self.route
        d = distance_m % r.length_m if r.closed else np.clip(distance_m, 0.0, r.length_m)
        i = np.clip(np.searchsorted(self.start, d, side="right") - 1, 0, len(self.start) - 1)
        f = np.clip((d - self.start[i]) / self.length[i], 0.0, 1.0)
        return (self.lat0[i] + f * (self.lat1[i] - self.lat0[i]), self.lon0[i] + f * (self.lon1[i] - self.lon0[i]),
                self.busy[i])


def drive_at(drive: Drive, t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(odometer, speed) of :class:`Drive` for every second of a shift at once (its timeline in numpy)."""
    t0 = np.asarray(drive._t0)
    i = np.searchsorted(t0, t_s, side="right") - 1
    dt_ = t_s - t0[i]
    v0, a = np.asarray(drive._v0)[i], np.asarray(drive._a)[i]
    d = np.asarray(drive._d0)[i] + v0 * dt_ + 0.5 * a * dt_ * dt_
    speed = np.where(np.asarray(drive._kind)[i] == MOVE, np.maximum(0.0, v0 + a * dt_), 0.0)
    # Guard against the simulator's timeline changing shape under us.
    for k in (0, len(t_s) // 2, len(t_s) - 1):
        assert abs(d[k] - drive.odometer_at(float(t_s[k]))) < 1e-6
    return d, speed


def weekdays(first: dt.datetime, n: int) -> list[dt.datetime]:
    """The first ``n`` weekdays from ``first`` on."""
    out, day = [], first
    while len(out) < n:
        if day.weekday() < 5:
            out.append(day)
        day += dt.timedelta(days=1)
    return out


def van_day(rt: RouteArrays, van: int, day: int, seconds: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One van's shift: per second its position, speed and values (by road class, plus noise)."""
    offset = (1500.0 * van + 7816.0 * day) % rt.route.length_m  # every day another stretch
    drive = Drive(rt.route, seed=van * 1000 + day, start_offset_m=offset,
                  params=DriveParams(shift_s=max(seconds, 60)))
    odo, speed = drive_at(drive, np.arange(seconds, dtype=np.float64))
    lat, lon, busy = rt.at(offset + odo)
    n = seconds
    return {
        "lat": lat, "lon": lon, "speed": speed,
        "pm25": np.round(12.0 + 6 * busy + rng.gamma(2.0, 1.5, n), 1),
        "pm10": np.round(20.0 + 9 * busy + rng.gamma(2.0, 2.5, n), 1),
        "no2": np.round(15.0 + 20 * busy + rng.normal(0, 3, n), 1),
        "laeq": np.round(56.0 + 12 * busy + rng.normal(0, 2.5, n), 1),
    }


STAGE_DDL = """CREATE TEMP TABLE stage (device TEXT, epoch TEXT, seq0 INTEGER, t INTEGER, mono INTEGER,
    batch TEXT, lat REAL, lon REAL, speed REAL, pm25 REAL, pm10 REAL, no2 REAL, laeq REAL, warm INTEGER)"""
# One staged row per van-second becomes three samples (pm, no2, noise) and their positions, in
# SQLite's C code: Python binds a seventh of the parameters it would for the rows themselves.
FROM_STAGE = " FROM stage st CROSS JOIN temp.sensors k ORDER BY st.rowid, k.rowid"
SAMPLES_FROM_STAGE = (
    "INSERT INTO samples (device, epoch, seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags,"
    " batch_id, received_utc_ms) SELECT st.device, st.epoch, st.seq0 + k.k, k.sensor, st.t, st.mono, 'gps', 'boot',"
    " CASE k.k WHEN 0 THEN printf('{\"pm25\":%.1f,\"pm10\":%.1f}', st.pm25, st.pm10)"
    " WHEN 1 THEN printf('{\"no2_ppb\":%.1f}', st.no2) ELSE printf('{\"laeq\":%.1f}', st.laeq) END,"
    " CASE WHEN k.k = 0 AND st.warm THEN 'warming_up' ELSE '' END, st.batch, st.t + 2000" + FROM_STAGE)
POSITIONS_FROM_STAGE = (
    "INSERT INTO positions (device, epoch, seq, t_utc_ms, state, lat, lon, speed_mps, fix_quality)"
    " SELECT st.device, st.epoch, st.seq0 + k.k, st.t, 'interpolated', st.lat, st.lon, st.speed, 1" + FROM_STAGE)


def day_stage(rt: RouteArrays, day: int, when: dt.datetime, seconds: int, vans: int,
              seq_base: list[int]) -> list[tuple]:
    """All vans' seconds of one day, in ingest order (60 s batches, van by van, in time): stage rows."""
    rng = np.random.default_rng(day)
    t0 = int(when.timestamp() * 1000)
    per_van = [van_day(rt, v, day, seconds, rng) for v in range(vans)]
    van = np.repeat(np.arange(vans), seconds)
    sec = np.tile(np.arange(seconds), vans)
    order = np.lexsort((sec, van, sec // BATCH_S))
    van, sec = van[order], sec[order]
    col = {k: np.concatenate([p[k] for p in per_van])[order] for k in per_van[0]}
    seq0 = np.array(seq_base)[van] + sec * len(SENSORS)
    for v in range(vans):
        seq_base[v] += seconds * len(SENSORS)
    names = np.array([f"van-{v + 1:03d}" for v in range(vans)], dtype=object)[van].tolist()
    epochs = np.array([f"e{v + 1}" for v in range(vans)], dtype=object)[van].tolist()
    batches = [f"{d}:{day}:{w}" for d, w in zip(names, (sec // BATCH_S).tolist())]
    return list(zip(names, epochs, seq0.tolist(), (t0 + sec * 1000).tolist(), (sec * 1000).tolist(), batches,
                    col["lat"].tolist(), col["lon"].tolist(), col["speed"].tolist(), col["pm25"].tolist(),
                    col["pm10"].tolist(), col["no2"].tolist(), col["laeq"].tolist(),
                    (sec < WARMUP_S).astype(int).tolist()))


def _write(path: Path, table: str, hours: float, vans: int, days: int) -> int:
    """Fill ``table`` (samples or positions) of the store at ``path`` with the fleet's month; rows written."""
    db = sqlite3.connect(path, isolation_level=None)
    # A throwaway file: no journal, no fsync, a large page cache for the index inserts.
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-1000000")
    db.execute(STAGE_DDL)
    db.execute("CREATE TEMP TABLE sensors (k INTEGER, sensor TEXT)")
    db.executemany("INSERT INTO temp.sensors VALUES (?, ?)", list(enumerate(SENSORS)))
    insert = SAMPLES_FROM_STAGE if table == "samples" else POSITIONS_FROM_STAGE
    rt = RouteArrays(Route.load())
    seq_base = [1] * vans
    n = 0
    for d, when in enumerate(weekdays(START, days)):
        stage = day_stage(rt, d, when, int(hours * 3600), vans, seq_base)
        for a in range(0, len(stage), CHUNK_ROWS):
            db.execute("BEGIN")
            db.executemany("INSERT INTO stage VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", stage[a:a + CHUNK_ROWS])
            n += db.execute(insert).rowcount
            db.execute("DELETE FROM stage")
            db.execute("COMMIT")
    db.close()
    return n


def generate(path: Path, hours: float, vans: int = VANS, days: int = DAYS) -> int:
    """Write the fleet's month into a fresh SQLite store at ``path``; the number of samples.

    SQLite's B-tree inserts are most of the cost, and one file has one writer: the
    positions are written into a second store by a second process at the same time,
    then moved over with ``INSERT INTO positions SELECT * FROM side.positions``, which
    SQLite runs as a page-level transfer (same schema, empty table: no re-indexing).
    """
    side = path.with_name(path.stem + "-positions.sqlite")
    for p in (path, side):
        SQLiteStore(p).close()  # the receiver's schema and indexes
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        positions = pool.submit(_write, side, "positions", hours, vans, days)
        n = _write(path, "samples", hours, vans, days)
        if positions.result() != n:
            raise RuntimeError("samples and positions differ in number")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("ATTACH DATABASE ? AS side", (str(side),))
    db.execute("INSERT INTO main.positions SELECT * FROM side.positions")
    db.execute("DETACH DATABASE side")
    db.execute("PRAGMA journal_mode=WAL")  # back to what the receiver uses
    db.close()
    for f in side.parent.glob(side.name + "*"):
        f.unlink()
    return n


def read_baseline(path: Path) -> float:
    """Seconds for SQLite to read every positioned sample (the join, one value per row)."""
    db = sqlite3.connect(path)
    t0 = time.perf_counter()
    db.execute("SELECT count(*), sum(length(s.vals)) FROM samples s JOIN positions p USING (device, epoch, seq)"
               " WHERE p.state IN ('exact', 'interpolated')").fetchone()
    took = time.perf_counter() - t0
    db.close()
    return took


def measure(hours: float, vans: int = VANS, days: int = DAYS) -> list[dict]:
    """Generate the fleet's month, then time the aggregate command per scheme; bench table rows."""
    from click.testing import CliRunner

    from receiver.datalab_commands import datalab_commands

    tmp = Path(tempfile.mkdtemp(prefix="bench-agg-"))
    try:
        store = tmp / "month.sqlite"
        t0 = time.perf_counter()
        n = generate(store, hours, vans, days)
        gen_s = time.perf_counter() - t0
        size_gb = store.stat().st_size / 1e9
        read_s = read_baseline(store)
        scale = 8.0 / hours
        fleet = f"month of {VANS} vans" if (vans, days) == (VANS, DAYS) else f"{vans} vans x {days} days"
        how = "measured at full size" if hours == 8 else f"SCALED x{scale:g} from {hours:g} h/day"
        rows = []
        for scheme in ("segment", "h3:10"):
            t0 = time.perf_counter()
            r = CliRunner().invoke(datalab_commands, ["aggregate", "--store", str(store), "--scheme", scheme,
                                                      "--period", PERIOD])
            took = time.perf_counter() - t0
            if r.exit_code != 0:
                raise RuntimeError(r.output)
            rows.append({
                "name": f"street aggregates, {fleet} ({scheme}), {how.split(' from')[0]}",
                "value": round(took * scale, 1), "unit": "s",
                "baseline": round(read_s * scale, 1), "baseline_name": "reading the samples",
                "target": None, "ok": None,
                "note": (f"{how}: {took:.1f} s for {n:,} samples ({n / took / 1e6:.2f} M samples/s), "
                         f"reading them {read_s:.1f} s; generating them took {gen_s:.0f} s, "
                         f"store {size_gb:.1f} GB" + ("" if hours == 8 else "; the full month: BENCH_AGG_HOURS=8")),
            })
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the full month is 22.5 GB


def run() -> list[dict]:
    # Default: 1 h a day, scaled x8 (a few minutes with generation), so that python -m bench
    # stays short; the full month, measured, takes ~30 minutes here: BENCH_AGG_HOURS=8.
    return measure(float(os.environ.get("BENCH_AGG_HOURS", "1")),
                   int(os.environ.get("BENCH_AGG_VANS", str(VANS))),
                   int(os.environ.get("BENCH_AGG_DAYS", str(DAYS))))


if __name__ == "__main__":
    from bench import print_table

    print_table(run())
