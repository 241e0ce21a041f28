"""Street maps from mobile measurements: passes, pass means, the median across passes.

The pipeline (docs/datalab.md, after Apte et al. 2017 and Messier et al. 2018):

1. every sensor sample with a trusted position (``positions.state`` exact or
   interpolated) is assigned to a map unit: a ~30 m road segment or an H3 cell
   (:mod:`receiver.mapunits`);
2. each van's track is split into *passes*: a pass is a run of consecutive samples
   of one van in one unit. It ends when the van leaves the unit (or is not near any
   road), or when its samples stop for longer than ``max_gap_s`` (data missing:
   a tunnel, a reboot; what comes after is not the same drive);
3. each pass gives one mean per quantity. Noise levels are averaged on the energy
   scale, 10·log10(mean(10^(L/10))), never arithmetically;
4. the map value of a unit is the median of its pass means (a van parked for ten
   minutes then counts as one pass, not as 600 samples), with the number of passes
   and of distinct local days;
5. a unit is *published* only with at least ``min_passes`` passes on at least
   ``min_days`` distinct days. Unpublished rows stay in the table for the team
   (where to drive more) and are never served or exported.

Everything reads and writes through plain DB-API statements (:mod:`receiver.dbapi`),
so the same code builds the ``aggregates`` table on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from receiver import dbapi
from receiver.mapunits import Snapper

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Quantity:
    key: str  # the key in samples.vals
    sensor: str  # the samples.sensor that carries it
    unit: str
    label: str
    energy: bool = False  # averaged on the energy scale (sound levels)


QUANTITIES: dict[str, Quantity] = {
    "pm25": Quantity("pm25", "pm", "µg/m³", "PM2.5"),
    "pm10": Quantity("pm10", "pm", "µg/m³", "PM10"),
    "no2_ppb": Quantity("no2_ppb", "no2", "ppb", "NO2"),
    "laeq": Quantity("laeq", "noise", "dB(A)", "Noise LAeq", energy=True),
}
#: Samples with these flags are positioned but say nothing trustworthy about the air.
EXCLUDED_FLAGS = frozenset({"warming_up", "time_implausible"})
#: Sensor sentinels (e.g. -999) are not measurements.
SENTINEL_BELOW = -900.0
TRUSTED_POSITIONS = ("exact", "interpolated")

DEFAULT_MIN_PASSES = 4
DEFAULT_MIN_DAYS = 2
DEFAULT_MAX_GAP_S = 30.0
DEFAULT_TZ = "Europe/Amsterdam"


@dataclass(frozen=True, slots=True)
class Rule:
    """Publication rule: at least ``min_passes`` passes on at least ``min_days`` distinct days."""

    min_passes: int = DEFAULT_MIN_PASSES
    min_days: int = DEFAULT_MIN_DAYS

    def allows(self, n_passes: int, n_days: int) -> bool:
        return n_passes >= self.min_passes and n_days >= self.min_days


# -- statistics --------------------------------------------------------------------------


def energy_mean(levels: Iterable[float]) -> float:
    """10·log10(mean(10^(L/10))): the level of the average sound energy."""
    xs = list(levels)
    if not xs:
        raise ValueError("no levels")
    top = max(xs)  # factor out the loudest level so 10^(L/10) cannot overflow
    return top + 10.0 * math.log10(sum(10.0 ** ((x - top) / 10.0) for x in xs) / len(xs))


def mean_of(q: Quantity, xs: list[float]) -> float:
    return energy_mean(xs) if q.energy else sum(xs) / len(xs)


def median_of(q: Quantity, xs: list[float]) -> float:
    """The median; with an even count the two middle values are averaged the quantity's way."""
    s = sorted(xs)
    n = len(s)
    if n == 0:
        raise ValueError("no values")
    if n % 2:
        return s[n // 2]
    return mean_of(q, [s[n // 2 - 1], s[n // 2]])


# -- periods -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Period:
    """A named time window [start_ms, end_ms); None ends are open."""

    label: str
    start_ms: int | None = None
    end_ms: int | None = None

    def contains(self, t_ms: int) -> bool:
        return (self.start_ms is None or t_ms >= self.start_ms) and (self.end_ms is None or t_ms < self.end_ms)


def _local_ms(d: dt.date, tz: ZoneInfo) -> int:
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=tz).timestamp() * 1000)


def _next_month(d: dt.date) -> dt.date:
    return dt.date(d.year + (d.month == 12), d.month % 12 + 1, 1)


def parse_period(text: str, tz: str | ZoneInfo = DEFAULT_TZ) -> Period:
    """``all``, ``2026``, ``2026-11``, ``2026-11-24`` or ``2026-11-01..2026-11-14`` (inclusive days).

    Boundaries are local midnights in ``tz``: a "day" and a "month" are what people
    in the pilot city call one.
    """
    z = tz if isinstance(tz, ZoneInfo) else ZoneInfo(tz)
    text = text.strip()
    if text == "all":
        return Period("all")
    if ".." in text:
        a, b = text.split("..", 1)
        start, end = dt.date.fromisoformat(a), dt.date.fromisoformat(b)
        if end < start:
            raise ValueError(f"period {text!r} ends before it starts")
        return Period(text, _local_ms(start, z), _local_ms(end + dt.timedelta(days=1), z))
    if re.fullmatch(r"\d{4}", text):
        y = int(text)
        return Period(text, _local_ms(dt.date(y, 1, 1), z), _local_ms(dt.date(y + 1, 1, 1), z))
    if re.fullmatch(r"\d{4}-\d{2}", text):
        first = dt.date(int(text[:4]), int(text[5:]), 1)
        return Period(text, _local_ms(first, z), _local_ms(_next_month(first), z))
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        d = dt.date.fromisoformat(text)
        return Period(text, _local_ms(d, z), _local_ms(d + dt.timedelta(days=1), z))
    raise ValueError(f"cannot read period {text!r}: use all, YYYY, YYYY-MM, YYYY-MM-DD or A..B")


def months_in_data(conn: Any, tz: str = DEFAULT_TZ) -> list[Period]:
    """One period per local calendar month that has positioned samples."""
    row = dbapi.fetchall(conn, "SELECT min(t_utc_ms), max(t_utc_ms) FROM positions WHERE state IN (?, ?)",
                         TRUSTED_POSITIONS)[0]
    if row[0] is None:
        return []
    z = ZoneInfo(tz)
    first = dt.datetime.fromtimestamp(row[0] / 1000, z).date().replace(day=1)
    last = dt.datetime.fromtimestamp(row[1] / 1000, z).date()
    out = []
    while first <= last:
        out.append(parse_period(first.strftime("%Y-%m"), z))
        first = _next_month(first)
    return out


# -- passes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One positioned sensor sample, reduced to what the map needs."""

    device: str
    t_ms: int
    lat: float
    lon: float
    values: dict[str, float]  # quantity -> value (only usable values)


@dataclass(slots=True)
class Pass:
    """One van's continuous stay in one unit, with its per-quantity means."""

    device: str
    unit: str
    start_ms: int
    end_ms: int
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def means(self) -> dict[str, tuple[float, int]]:
        """quantity -> (pass mean, number of samples)."""
        return {k: (mean_of(QUANTITIES[k], v), len(v)) for k, v in self.values.items() if v}


def split_passes(samples: Iterable[Sample], snapper: Snapper, max_gap_s: float = DEFAULT_MAX_GAP_S) -> Iterator[Pass]:
    """Cut each van's track into passes; samples must come in time order per van.

    A pass ends when the van's next sample is in another unit, in no unit (farther
    than the snap distance from any road), or more than ``max_gap_s`` later.
    """
    gap_ms = max_gap_s * 1000
    open_: dict[str, Pass] = {}
    for s in samples:
        unit = snapper.snap(s.lat, s.lon)
        cur = open_.get(s.device)
        if cur is not None and (unit != cur.unit or s.t_ms - cur.end_ms > gap_ms):
            yield open_.pop(s.device)
            cur = None
        if unit is None:
            continue
        if cur is None:
            cur = open_[s.device] = Pass(s.device, unit, s.t_ms, s.t_ms)
        cur.end_ms = s.t_ms
        for k, v in s.values.items():
            cur.values[k].append(v)
    yield from open_.values()


# -- across passes -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnitValue:
    unit: str
    quantity: str
    n_passes: int
    n_days: int
    n_samples: int
    value: float
    published: bool


def combine(passes: Iterable[Pass], rule: Rule = Rule(), tz: str = DEFAULT_TZ) -> list[UnitValue]:
    """The median of pass means per (unit, quantity), with passes, days and the publication flag.

    A pass counts for a quantity only if it holds at least one usable value of it;
    its day is the local date it started on.
    """
    z = ZoneInfo(tz)
    means: dict[tuple[str, str], list[float]] = defaultdict(list)
    days: dict[tuple[str, str], set[dt.date]] = defaultdict(set)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for p in passes:
        day = dt.datetime.fromtimestamp(p.start_ms / 1000, z).date()
        for k, (m, n) in p.means().items():
            key = (p.unit, k)
            means[key].append(m)
            days[key].add(day)
            counts[key] += n
    out = []
    for (unit, k), xs in sorted(means.items()):
        nd = len(days[(unit, k)])
        out.append(UnitValue(unit, k, len(xs), nd, counts[(unit, k)], median_of(QUANTITIES[k], xs),
                             rule.allows(len(xs), nd)))
    return out


# -- reading the store -------------------------------------------------------------------


def usable_values(sensor: str, vals: dict[str, Any], flags: str | None) -> dict[str, float]:
    """The map quantities in one sample's values, without flagged, sentinel or non-finite ones."""
    if flags and EXCLUDED_FLAGS.intersection(flags.split(",")):
        return {}
    out = {}
    for k, q in QUANTITIES.items():
        if q.sensor != sensor:
            continue
        v = vals.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > SENTINEL_BELOW:
            out[k] = float(v)
    return out


def read_samples(conn: Any, period: Period) -> Iterator[Sample]:
    """Positioned sensor samples in ``period``, per van in time order (streamed, not loaded)."""
    sensors = sorted({q.sensor for q in QUANTITIES.values()})
    where = [f"s.sensor IN ({','.join('?' * len(sensors))})", "p.state IN (?, ?)"]
    params: list[Any] = [*sensors, *TRUSTED_POSITIONS]
    if period.start_ms is not None:
        where.append("s.t_utc_ms >= ?")
        params.append(period.start_ms)
    if period.end_ms is not None:
        where.append("s.t_utc_ms < ?")
        params.append(period.end_ms)
    cur = dbapi.execute(
        conn,
        "SELECT s.device, s.t_utc_ms, s.sensor, s.vals, s.flags, p.lat, p.lon"
        " FROM samples s JOIN positions p"
        " ON p.device = s.device AND p.epoch = s.epoch AND p.seq = s.seq"
        f" WHERE {' AND '.join(where)} ORDER BY s.device, s.t_utc_ms",
        params,
    )
    while rows := cur.fetchmany(5000):
        for device, t, sensor, vals, flags, lat, lon in rows:
            if t is None or lat is None or lon is None:
                continue
            yield Sample(device, int(t), float(lat), float(lon),
                         usable_values(sensor, dbapi.decode_json(vals) or {}, flags))


# -- the aggregates table ----------------------------------------------------------------

AGGREGATES_DDL = [
    """CREATE TABLE IF NOT EXISTS aggregates (
        scheme TEXT NOT NULL,
        cell TEXT NOT NULL,
        period TEXT NOT NULL,
        quantity TEXT NOT NULL,
        unit TEXT,
        n_passes INTEGER NOT NULL,
        n_days INTEGER NOT NULL,
        n_samples INTEGER NOT NULL,
        value DOUBLE PRECISION,
        published INTEGER NOT NULL,
        period_start_utc_ms BIGINT,
        period_end_utc_ms BIGINT,
        properties TEXT,
        geometry TEXT,
        built_utc_ms BIGINT,
        PRIMARY KEY (scheme, cell, period, quantity)
    )""",
    "CREATE INDEX IF NOT EXISTS aggregates_public ON aggregates (published, period, quantity)",
    """CREATE TABLE IF NOT EXISTS aggregate_builds (
        scheme TEXT NOT NULL,
        period TEXT NOT NULL,
        built_utc_ms BIGINT,
        period_start_utc_ms BIGINT,
        period_end_utc_ms BIGINT,
        min_passes INTEGER,
        min_days INTEGER,
        params TEXT,
        n_rows INTEGER,
        n_published INTEGER,
        elapsed_s DOUBLE PRECISION,
        PRIMARY KEY (scheme, period)
    )""",
]
AGGREGATE_COLUMNS = (
    "scheme", "cell", "period", "quantity", "unit", "n_passes", "n_days", "n_samples", "value", "published",
    "period_start_utc_ms", "period_end_utc_ms", "properties", "geometry", "built_utc_ms",
)


def create_tables(conn: Any) -> None:
    for ddl in AGGREGATES_DDL:
        dbapi.execute(conn, ddl)


@dataclass
class BuildReport:
    scheme: str
    period: str
    samples: int = 0
    passes: int = 0
    rows: int = 0
    published: int = 0
    elapsed_s: float = 0.0


def build(
    conn: Any,
    snapper: Snapper,
    periods: list[Period],
    *,
    rule: Rule = Rule(),
    tz: str = DEFAULT_TZ,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
) -> list[BuildReport]:
    """Rebuild the ``aggregates`` rows of ``snapper.scheme`` for each period (replacing old ones)."""
    create_tables(conn)
    reports = []
    for period in periods:
        t0 = time.perf_counter()
        rep = BuildReport(snapper.scheme, period.label)
        span = [math.inf, -math.inf]

        def counted(it: Iterator[Sample]) -> Iterator[Sample]:
            for s in it:
                rep.samples += 1
                span[0], span[1] = min(span[0], s.t_ms), max(span[1], s.t_ms)
                yield s

        passes = []
        for p in split_passes(counted(read_samples(conn, period)), snapper, max_gap_s):
            passes.append(p)
        rep.passes = len(passes)
        values = combine(passes, rule, tz)
        start = period.start_ms if period.start_ms is not None else (int(span[0]) if rep.samples else None)
        end = period.end_ms if period.end_ms is not None else (int(span[1]) + 1 if rep.samples else None)
        now = int(time.time() * 1000)
        geometry: dict[str, str] = {}
        props: dict[str, str] = {}
        rows = []
        for v in values:
            if v.unit not in geometry:
                geometry[v.unit] = json.dumps(snapper.geometry(v.unit), separators=(",", ":"))
                props[v.unit] = json.dumps(snapper.properties(v.unit), separators=(",", ":"), ensure_ascii=False)
            rows.append((snapper.scheme, v.unit, period.label, v.quantity, QUANTITIES[v.quantity].unit,
                         v.n_passes, v.n_days, v.n_samples, round(v.value, 3), int(v.published),
                         start, end, props[v.unit], geometry[v.unit], now))
        rep.rows = len(rows)
        rep.published = sum(1 for v in values if v.published)
        with dbapi.transaction(conn):
            dbapi.execute(conn, "DELETE FROM aggregates WHERE scheme = ? AND period = ?",
                          (snapper.scheme, period.label))
            marks = ",".join("?" * len(AGGREGATE_COLUMNS))
            dbapi.executemany(conn, f"INSERT INTO aggregates ({','.join(AGGREGATE_COLUMNS)}) VALUES ({marks})", rows)
            rep.elapsed_s = time.perf_counter() - t0
            dbapi.execute(conn, "DELETE FROM aggregate_builds WHERE scheme = ? AND period = ?",
                          (snapper.scheme, period.label))
            dbapi.execute(
                conn,
                "INSERT INTO aggregate_builds (scheme, period, built_utc_ms, period_start_utc_ms,"
                " period_end_utc_ms, min_passes, min_days, params, n_rows, n_published, elapsed_s)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (snapper.scheme, period.label, now, start, end, rule.min_passes, rule.min_days,
                 json.dumps({"tz": tz, "max_gap_s": max_gap_s, "samples": rep.samples, "passes": rep.passes}),
                 rep.rows, rep.published, round(rep.elapsed_s, 3)),
            )
        log.info("aggregated %s %s: %d samples, %d passes, %d rows (%d published) in %.2f s",
                 rep.scheme, rep.period, rep.samples, rep.passes, rep.rows, rep.published, rep.elapsed_s)
        reports.append(rep)
    return reports
