"""A fast synthetic DataLab store for the aggregate, API and dashboard tests (not a test module).

Vans drive the shipped route at a steady 10 m/s for a few minutes a day, one sample
per sensor per second, written straight into ``samples``/``positions`` (the ingest
path has its own tests; these need many days of data in well under a second).
Values depend on the road class, so maps show structure and medians are known.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from receiver.store import SQLiteStore
from simulator.route import Route

LEVELS = {"primary": (20.0, 72.0), "secondary": (14.0, 66.0)}  # road class -> (pm25, laeq)
DEFAULT_LEVEL = (9.0, 56.0)


def make_store(path: Path, *, days: int = 3, vans: int = 2, minutes: float = 30.0, speed_mps: float = 10.0,
               start: dt.datetime = dt.datetime(2026, 11, 2, 8, 0, tzinfo=dt.timezone.utc)) -> Path:
    store = SQLiteStore(path)
    route = Route.load()
    samples, positions, batches = [], [], []
    for v in range(vans):
        device = f"van-{v + 1:03d}"
        for d in range(days):
            epoch = f"e{d}"
            t0 = int((start + dt.timedelta(days=d, minutes=7 * v)).timestamp() * 1000)
            seq = 0
            for s in range(int(minutes * 60)):
                pos = route.position_at(300.0 * v + speed_mps * s)
                pm25, laeq = LEVELS.get(pos.road_class, DEFAULT_LEVEL)
                t = t0 + s * 1000
                for sensor, vals in (
                    ("pm", {"pm1": pm25 * 0.7, "pm25": pm25 + (s % 3) - 1, "pm10": pm25 * 1.5, "rh": 60.0}),
                    ("no2", {"no2_ppb": pm25 + 5 + d, "no2_we_mv": 300.0}),
                    ("noise", {"laeq": laeq + (s % 5) - 2, "lamax": laeq + 6, "lamin": laeq - 6}),
                ):
                    seq += 1
                    samples.append((device, epoch, seq, sensor, t, s * 1000, "gps", "b", json.dumps(vals), "",
                                    f"{device}:{epoch}", t + 500))
                    positions.append((device, epoch, seq, t, "exact", pos.lat, pos.lon, speed_mps, 1))
            batches.append((f"{device}:{epoch}:1-{seq}", device, epoch, 1, seq, seq, "x", t0 + seq * 1000))
        store.record_status(device, {
            "online": v == 0, "device": device, "backlog_samples": 120 * v, "backlog_batches": v,
            "oldest_unsent_age_s": 42.0 * v or None, "sensor_errors": {"pm": 3} if v == 1 else {},
            "disk_free_bytes": 12_000_000_000, "cpu_temp_c": 51.5, "time_source": "gps",
        }, int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000) - 30_000)
    c = store.conn
    c.execute("BEGIN")
    c.executemany("INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", samples)
    c.executemany("INSERT INTO positions VALUES (?,?,?,?,?,?,?,?,?)", positions)
    c.executemany("INSERT INTO batches VALUES (?,?,?,?,?,?,?,?)", batches)
    # GPS fixes: one per second per van-day, for the tracks API.
    c.execute("INSERT INTO fixes SELECT p.device, p.epoch, p.seq, p.t_utc_ms, p.lat, p.lon, p.speed_mps, 1"
              " FROM positions p JOIN samples s USING (device, epoch, seq) WHERE s.sensor = 'pm'")
    c.execute("COMMIT")
    store.close()
    return path


def flag_values(path: Path, changes: list[tuple[str, str, int, dict, str, dict[str, str]]]) -> None:
    """Give samples new values and flags: (device, epoch, seq, values to set, sample flags, quality
    flags per quantity). The values are merged into ``vals`` (None: JSON null); quality rows are
    what the receiver's derivation would have written (receiver/quality.py)."""
    conn = SQLiteStore(path).conn
    conn.execute("BEGIN")
    for device, epoch, seq, values, flags, quality in changes:
        (vals,) = conn.execute("SELECT vals FROM samples WHERE device = ? AND epoch = ? AND seq = ?",
                               (device, epoch, seq)).fetchone()
        conn.execute("UPDATE samples SET vals = ?, flags = ? WHERE device = ? AND epoch = ? AND seq = ?",
                     (json.dumps({**json.loads(vals), **values}), flags, device, epoch, seq))
        conn.executemany("INSERT OR REPLACE INTO quality VALUES (?,?,?,?,?)",
                         [(device, epoch, seq, q, f) for q, f in quality.items()])
    conn.execute("COMMIT")
    conn.close()


def with_aggregates(path: Path, schemes: tuple[str, ...] = ("segment", "h3:10"), min_passes: int = 4,
                    min_days: int = 2) -> Path:
    """Build the all-time street maps of a synthetic store (the API and dashboard tests serve them)."""
    from receiver import dbapi
    from receiver.aggregate import Period, Rule, build
    from receiver.mapunits import make_snapper

    conn = dbapi.connect(path)
    for scheme in schemes:
        build(conn, make_snapper(scheme), [Period("all")], rule=Rule(min_passes, min_days))
    conn.close()
    return path


def copy_to_postgres(src: Path, dsn: str, schemes: tuple[str, ...] = ("segment", "h3:10")) -> None:
    """The synthetic SQLite store's raw tables into a PostgreSQL store; street maps built there."""
    from receiver import dbapi
    from receiver.aggregate import Period, Rule, build
    from receiver.mapunits import make_snapper
    from receiver.store_pg import PostgresStore

    PostgresStore(dsn).close()  # the schema
    a, b = dbapi.connect(src), dbapi.connect(dsn)
    tables = {
        "samples": "device, epoch, seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags, batch_id, "
                   "received_utc_ms",
        "positions": "device, epoch, seq, t_utc_ms, state, lat, lon, speed_mps, fix_quality",
        "fixes": "device, epoch, seq, t_utc_ms, lat, lon, speed_mps, fix_quality",
        "batches": "batch_id, device, epoch, first_seq, last_seq, n_samples, sha256, received_utc_ms",
        "device_status": "device, received_utc_ms, online, status",
        "quality": "device, epoch, seq, quantity, flags",
    }
    with dbapi.transaction(b):
        for table, cols in tables.items():
            marks = ",".join("CAST(? AS jsonb)" if c.strip() == "vals" else "?" for c in cols.split(","))
            dbapi.executemany(b, f"INSERT INTO {table} ({cols}) VALUES ({marks})",
                              dbapi.fetchall(a, f"SELECT {cols} FROM {table}"))
    for scheme in schemes:
        build(b, make_snapper(scheme), [Period("all")], rule=Rule(4, 2))
    a.close()
    b.close()
