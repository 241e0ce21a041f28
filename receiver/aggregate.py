"""Street maps from mobile measurements: passes, pass means, the median across passes.

The pipeline (docs/datalab.md, after Apte et al. 2017 and Messier et al. 2018):

1. every sensor sample with a trusted position (``positions.state`` exact or
   interpolated) is assigned to a map unit: a ~30 m road segment or an H3 cell
   (:mod:`receiver.mapunits`). Values the flag policy excludes, and sentinels, are
   left out and counted per unit (receiver/flag_policy.py);
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

Two implementations of steps 2-4 live here. :func:`split_passes` and :func:`combine`
work on one :class:`Sample` at a time: they are the readable definition, and the
tests' reference. :func:`build` uses the columnar path (:func:`read_tracks`,
:func:`track_passes`, :class:`Accumulator`): one van's period at a time as numpy
columns, values pulled out of the JSON by the database, each distinct position
snapped once. It gives the same rows as the reference (tests/test_aggregate_fast.py)
at about 2.3x its speed: a month of a 50-van fleet (95 M samples, SQLite) took 327 s
for segments and 352 s for H3 cells (bench/bench_aggregate.py). Most of what is left
is the database handing over one row per sample (reading alone: 80 s). Those figures predate
the flag policy (receiver/flag_policy.py): its probe of each value's ``quality`` row made a
segment build of 162,000 synthetic samples 1.7 -> 2.3 s on SQLite.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from zoneinfo import ZoneInfo

import numpy as np

from receiver import dbapi
from receiver.calibration import DERIVED_QUANTITIES, best_join, value_source
from receiver.flag_policy import FlagPolicy, is_sentinel, sentinel_mask
from receiver.mapunits import ArraySnapper, Snapper, run_starts

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Quantity:
    """A map quantity, selected by its value key, which fixes quantity and unit (never a sensor name).

    The key is the wire's vocabulary (docs/wire-format.md, "Quantities"): any sample whose
    ``vals`` hold ``pm25`` is PM2.5 in µg/m³, whatever the van called its ``[sensors.X]``
    section; a driver measuring in another unit converts or uses another key.
    """

    key: str  # the key in samples.vals
    unit: str
    label: str
    energy: bool = False  # averaged on the energy scale (sound levels)


QUANTITIES: dict[str, Quantity] = {
    "pm25": Quantity("pm25", "µg/m³", "PM2.5"),
    "pm10": Quantity("pm10", "µg/m³", "PM10"),
    "no2_ppb": Quantity("no2_ppb", "ppb", "NO2"),
    "laeq": Quantity("laeq", "dB(A)", "Noise LAeq", energy=True),
    # The sound module set to C or Z weighting: a level of another weighting is another quantity.
    "lceq": Quantity("lceq", "dB(C)", "Noise LCeq", energy=True),
    "lzeq": Quantity("lzeq", "dB(Z)", "Noise LZeq", energy=True),
}
# Which flagged values are left out (sample flags and the value's quality flags), and what a
# sentinel is: receiver/flag_policy.py, one policy for every product.
#: Samples of these sensors are no measurement of the air, whatever keys they hold (the agent's
#: config check refuses these names for any other driver: edge/config_schema.py _sensor_name).
NOT_MEASUREMENTS = ("gps", "calibration")
#: Column order of the quantities in the columnar path.
QUANTITY_KEYS: tuple[str, ...] = tuple(QUANTITIES)
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
    excluded: tuple[str, ...] = ()  # quantities whose value the flag policy (or the sentinel rule) left out


@dataclass(slots=True)
class Pass:
    """One van's continuous stay in one unit, with its per-quantity means."""

    device: str
    unit: str
    start_ms: int
    end_ms: int
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    excluded: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # quantity -> values left out

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
        for k in s.excluded:
            cur.excluded[k] += 1
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
    n_excluded: int = 0  # values in the unit the flag policy left out


def combine(passes: Iterable[Pass], rule: Rule = Rule(), tz: str = DEFAULT_TZ) -> list[UnitValue]:
    """The median of pass means per (unit, quantity), with passes, days and the publication flag.

    A pass counts for a quantity only if it holds at least one usable value of it;
    its day is the local date it started on. Values the flag policy left out are counted
    per unit, from every pass.
    """
    z = ZoneInfo(tz)
    means: dict[tuple[str, str], list[float]] = defaultdict(list)
    days: dict[tuple[str, str], set[dt.date]] = defaultdict(set)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    excluded: dict[tuple[str, str], int] = defaultdict(int)
    for p in passes:
        day = dt.datetime.fromtimestamp(p.start_ms / 1000, z).date()
        for k, n in p.excluded.items():
            excluded[(p.unit, k)] += n
        for k, (m, n) in p.means().items():
            key = (p.unit, k)
            means[key].append(m)
            days[key].add(day)
            counts[key] += n
    out = []
    for (unit, k), xs in sorted(means.items()):
        nd = len(days[(unit, k)])
        out.append(UnitValue(unit, k, len(xs), nd, counts[(unit, k)], median_of(QUANTITIES[k], xs),
                             rule.allows(len(xs), nd), excluded[(unit, k)]))
    return out


# -- reading the store -------------------------------------------------------------------


def split_values(sensor: str, vals: dict[str, Any], flags: str | None, value_flags: dict[str, str | None],
                 policy: FlagPolicy = FlagPolicy()) -> tuple[dict[str, float], tuple[str, ...]]:
    """(usable values, quantities left out) of the map quantities in one sample.

    Selected by value key (quantity and unit), never by the sensor's (section) name. A number
    is left out when it is a sentinel or not finite, or when the sample's flags or its own
    quality flags (``value_flags``: quantity -> flags text) hold a flag the policy excludes for
    it. Booleans, strings and nulls are not measurements: neither kept nor counted.
    """
    out: dict[str, float] = {}
    excluded: list[str] = []
    if sensor in NOT_MEASUREMENTS:
        return out, ()
    for k in QUANTITIES:
        v = vals.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if not math.isfinite(v) or is_sentinel(float(v)) or policy.excludes(k, flags, value_flags.get(k)):
            excluded.append(k)
        else:
            out[k] = float(v)
    return out, tuple(excluded)


def usable_values(sensor: str, vals: dict[str, Any], flags: str | None,
                  value_flags: dict[str, str | None] | None = None,
                  policy: FlagPolicy = FlagPolicy()) -> dict[str, float]:
    """The map quantities in one sample's values, without flagged, sentinel or non-finite ones."""
    return split_values(sensor, vals, flags, value_flags or {}, policy)[0]


def _measurement_sql(conn: Any) -> tuple[str, list[Any]]:
    """SQL condition (and parameters) for samples that carry a map quantity: any sensor name
    whose ``vals`` hold one of the QUANTITIES keys (even as null or flagged), GPS and calibration
    records apart. Both build paths select with it, so they see the same samples."""
    if dbapi.is_sqlite(conn):
        has = " OR ".join(f"json_type(s.vals, '$.{k}') IS NOT NULL" for k in QUANTITY_KEYS)
    else:
        has = f"jsonb_exists_any(s.vals, ARRAY[{', '.join(repr(k) for k in QUANTITY_KEYS)}])"
    return (f"s.sensor NOT IN ({','.join('?' * len(NOT_MEASUREMENTS))}) AND ({has})", list(NOT_MEASUREMENTS))


def _period_where(period: Period, table: str) -> list[str]:
    """SQL conditions on ``table``'s ``t_utc_ms`` for ``period`` (parameters: ``_period_params``)."""
    return ([f"{table}.t_utc_ms >= ?"] if period.start_ms is not None else []) + (
        [f"{table}.t_utc_ms < ?"] if period.end_ms is not None else [])


def _period_params(period: Period) -> list[int]:
    return [t for t in (period.start_ms, period.end_ms) if t is not None]


def _quality_flags_sql(quantity: str) -> str:
    """SQL for the quality flags of sample ``s``'s value of ``quantity`` (NULL: none)."""
    return ("(SELECT q.flags FROM quality q WHERE q.device = s.device AND q.epoch = s.epoch AND q.seq = s.seq"
            f" AND q.quantity = '{quantity}')")


#: Map quantities with a derived best value (receiver/calibration.py DERIVED_QUANTITIES).
_BEST_KEYS = tuple(k for k in QUANTITY_KEYS if k in DERIVED_QUANTITIES)


def read_samples(conn: Any, period: Period, policy: FlagPolicy = FlagPolicy()) -> Iterator[Sample]:
    """Positioned sensor samples in ``period``, per van in time order (streamed, not loaded)."""
    measured, mparams = _measurement_sql(conn)
    where = [measured, "p.state IN (?, ?)", *_period_where(period, "s")]
    params: list[Any] = [*mparams, *TRUSTED_POSITIONS, *_period_params(period)]
    cur = dbapi.execute(
        conn,
        "SELECT s.device, s.t_utc_ms, s.sensor, s.vals, s.flags, p.lat, p.lon,"
        # the receiver's derived values, if any (recomputed NO2, PM gain and growth undone)
        + "".join(f" {value_source(k, 'NULL')}," for k in _BEST_KEYS)
        + ", ".join(_quality_flags_sql(k) for k in QUANTITY_KEYS)
        + " FROM samples s JOIN positions p"
        " ON p.device = s.device AND p.epoch = s.epoch AND p.seq = s.seq"
        f" {best_join(keys=_BEST_KEYS)}"
        f" WHERE {' AND '.join(where)} ORDER BY s.device, s.t_utc_ms",
        params,
    )
    while rows := cur.fetchmany(5000):
        for device, t, sensor, vals, flags, lat, lon, *rest in rows:
            if t is None or lat is None or lon is None:
                continue
            best, qflags = rest[:len(_BEST_KEYS)], rest[len(_BEST_KEYS):]
            values = dbapi.decode_json(vals) or {}
            values = {**values, **{k: b for k, b in zip(_BEST_KEYS, best) if b is not None}}
            usable, excluded = split_values(sensor, values, flags, dict(zip(QUANTITY_KEYS, qflags)), policy)
            yield Sample(device, int(t), float(lat), float(lon), usable, excluded)


# -- the columnar path: one van at a time ------------------------------------------------


@dataclass(slots=True)
class Track:
    """One van's positioned samples in a period, in time order, as columns."""

    device: str
    t_ms: np.ndarray  # int64
    lat: np.ndarray  # float64
    lon: np.ndarray  # float64
    values: np.ndarray  # float64 (samples x QUANTITY_KEYS); NaN where the sample has no usable value
    excluded: np.ndarray  # bool (samples x QUANTITY_KEYS): a number the flag policy or sentinel rule left out


def _number_sql(conn: Any, key: str) -> str:
    """SQL for ``vals[key]`` when it is a JSON number, else NULL (booleans and strings are not
    measurements; usable_values says the same in Python)."""
    if dbapi.is_sqlite(conn):
        path = f"'$.{key}'"
        return f"CASE WHEN json_type(s.vals, {path}) IN ('integer', 'real') THEN json_extract(s.vals, {path}) END"
    return f"CASE WHEN jsonb_typeof(s.vals -> '{key}') = 'number' THEN (s.vals ->> '{key}')::float8 END"


def _hits_sql(conn: Any, text: str, flags: frozenset[str]) -> str:
    """SQL true when the comma-separated flags ``text`` hold one of ``flags`` (whole items)."""
    find = "instr" if dbapi.is_sqlite(conn) else "strpos"
    return "(" + " OR ".join(f"{find}(',' || {text} || ',', ',{f},') > 0" for f in sorted(flags)) + ")" \
        if flags else "(1 = 0)"


def _excluded_sql(conn: Any, quantity: str, policy: FlagPolicy) -> str:
    """SQL that is 1 when the policy leaves sample ``s``'s value of ``quantity`` out: its sample
    flags or its quality flags hold an excluded flag. The quality row is probed once (EXISTS on
    its primary key) and its flags tested there."""
    flags = policy.excluded_for(quantity)
    return (f"CASE WHEN s.flags <> '' AND {_hits_sql(conn, 's.flags', flags)} THEN 1"
            " WHEN EXISTS (SELECT 1 FROM quality q WHERE q.device = s.device AND q.epoch = s.epoch"
            f" AND q.seq = s.seq AND q.quantity = '{quantity}' AND {_hits_sql(conn, 'q.flags', flags)})"
            " THEN 1 ELSE 0 END")


def track_sql(conn: Any, period: Period, policy: FlagPolicy = FlagPolicy()) -> tuple[str, list[Any]]:
    """One van's positioned samples in ``period`` (device is the first parameter), in time order.

    Columns: time, lat, lon, then one column per quantity in QUANTITY_KEYS order, then one per
    quantity that is 1 where the flag policy leaves that value out (:func:`_excluded_sql`, only
    probed where the value is a number). The database pulls the numbers out of ``vals``
    (json_extract / jsonb), so Python never parses JSON. Quantities are chosen by value key,
    whatever sensor (section) name carries them.
    """
    # The best value: the receiver's recomputed one where it has one (receiver/calibration.py).
    values = [value_source(k, _number_sql(conn, k)) for k in QUANTITY_KEYS]
    flagged = [f"CASE WHEN {v} IS NULL THEN 0 ELSE {_excluded_sql(conn, k, policy)} END"
               for k, v in zip(QUANTITY_KEYS, values)]
    measured, mparams = _measurement_sql(conn)
    # Filtered and ordered on the positions' copy of the time: positions(device, t_utc_ms) is
    # indexed (samples has no time index: it would slow the ingest path, see receiver/store.py).
    where = ["p.device = ?", measured, "p.state IN (?, ?)",
             "p.t_utc_ms IS NOT NULL", "p.lat IS NOT NULL", "p.lon IS NOT NULL", *_period_where(period, "p")]
    params: list[Any] = [*mparams, *TRUSTED_POSITIONS, *_period_params(period)]
    sql = (f"SELECT s.t_utc_ms, p.lat, p.lon, {', '.join(values + flagged)}"
           " FROM samples s JOIN positions p ON p.device = s.device AND p.epoch = s.epoch AND p.seq = s.seq"
           f" {best_join(keys=QUANTITY_KEYS)} WHERE {' AND '.join(where)} ORDER BY p.t_utc_ms")
    return sql, params


def devices(conn: Any) -> list[str]:
    """Every device in ``samples``, one index probe each (no scan of the table)."""
    out: list[str] = []
    last = ""
    while row := dbapi.fetchall(conn, "SELECT device FROM samples WHERE device > ? ORDER BY device LIMIT 1",
                                (last,)):
        last = row[0][0]
        out.append(last)
    return out


def _track(device: str, rows: np.ndarray) -> Track:
    """A :class:`Track` from the rows of :func:`track_sql` (float64, NULL as NaN)."""
    n = len(QUANTITY_KEYS)
    values = rows[:, 3:3 + n].copy()
    flagged = rows[:, 3 + n:3 + 2 * n] == 1
    number = ~np.isnan(values)  # NULL (not a JSON number) is no value: neither kept nor counted
    excluded = number & (flagged | ~np.isfinite(values) | sentinel_mask(values))
    values[excluded] = np.nan
    # ms times are below 2**53: exact in float64.
    return Track(device, rows[:, 0].astype(np.int64), rows[:, 1].copy(), rows[:, 2].copy(), values, excluded)


def read_tracks(conn: Any, period: Period, chunk: int = 100_000,
                policy: FlagPolicy = FlagPolicy()) -> Iterator[Track]:
    """Each van's positioned samples in ``period`` as a :class:`Track` (one van in memory at a time)."""
    sql, params = track_sql(conn, period, policy)
    n_cols = 3 + 2 * len(QUANTITY_KEYS)
    for device in devices(conn):
        cur = dbapi.execute(conn, sql, [device, *params])
        parts = []
        while rows := cur.fetchmany(chunk):
            parts.append(np.array(rows, dtype=np.float64).reshape(-1, n_cols))  # None -> NaN
        if parts:
            yield _track(device, np.concatenate(parts) if len(parts) > 1 else parts[0])


class CodedSnapper:
    """Gives a plain :class:`Snapper` (only ``snap``) the columnar interface: unit ids become codes."""

    def __init__(self, snapper: Snapper) -> None:
        self.snapper = snapper
        self.scheme = snapper.scheme
        self._ids: list[str] = []
        self._codes: dict[str | None, int] = {None: -1}

    def snap(self, lat: float, lon: float) -> str | None:
        return self.snapper.snap(lat, lon)

    def snap_array(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        starts = run_starts(lat, lon)
        codes = np.empty(len(starts), dtype=np.int64)
        for i, (a, b) in enumerate(zip(lat[starts].tolist(), lon[starts].tolist())):
            unit = self.snapper.snap(a, b)
            code = self._codes.get(unit)
            if code is None:
                code = self._codes[unit] = len(self._ids)
                self._ids.append(unit)  # type: ignore[arg-type]
            codes[i] = code
        return np.repeat(codes, np.diff(np.append(starts, len(lat))))

    def unit_of(self, code: int) -> str:
        return self._ids[int(code)]

    def geometry(self, unit: str) -> dict[str, Any]:
        return self.snapper.geometry(unit)

    def properties(self, unit: str) -> dict[str, Any]:
        return self.snapper.properties(unit)


@dataclass(slots=True)
class TrackPasses:
    """The passes of one track. Per pass: unit code and start; per (pass, quantity) with
    at least one usable value: the pass mean and its number of samples."""

    unit: np.ndarray  # int64 code per pass
    start_ms: np.ndarray  # int64 per pass
    pass_index: np.ndarray  # int64 per entry
    quantity: np.ndarray  # int64 column of QUANTITY_KEYS per entry
    mean: np.ndarray  # float64 per entry
    n: np.ndarray  # int64 per entry
    # Values the flag policy left out, per (unit code, quantity) with any: unit, quantity, count.
    excluded: tuple[np.ndarray, np.ndarray, np.ndarray] = (
        np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64))


def _pass_means(pid: np.ndarray, x: np.ndarray, n_passes: int, energy: bool) -> tuple[np.ndarray, ...]:
    """(passes, means, counts) of the values ``x`` of passes ``pid`` (non-decreasing).

    Sums go through bincount, which adds in array order like Python's sum does, so the
    means are those of :func:`mean_of` to the last bit (up to the libm's pow/log10).
    """
    counts = np.bincount(pid, minlength=n_passes)
    has = np.flatnonzero(counts)
    cnt = counts[has]
    if not energy:
        return has, np.bincount(pid, weights=x, minlength=n_passes)[has] / cnt, cnt
    first = np.flatnonzero(np.r_[True, pid[1:] != pid[:-1]])
    top = np.maximum.reduceat(x, first)  # factor out the loudest level, as energy_mean does
    e = np.power(10.0, (x - np.repeat(top, cnt)) / 10.0)
    return has, top + 10.0 * np.log10(np.bincount(pid, weights=e, minlength=n_passes)[has] / cnt), cnt


def track_passes(track: Track, codes: np.ndarray, max_gap_s: float = DEFAULT_MAX_GAP_S) -> TrackPasses:
    """:func:`split_passes` and the pass means for one van, on columns.

    A pass starts at every sample in a unit whose unit differs from the previous
    sample's (also: the previous one was in none) or that comes more than
    ``max_gap_s`` after it.
    """
    t = track.t_ms
    in_unit = codes >= 0
    new = np.ones(len(t), dtype=bool)
    new[1:] = (codes[1:] != codes[:-1]) | ((t[1:] - t[:-1]) > max_gap_s * 1000)
    starts = np.flatnonzero(in_unit & new)
    pass_of = np.cumsum(in_unit & new) - 1
    none = np.empty(0, np.int64)
    index, quantity, mean, n = [none], [none], [np.empty(0)], [none]
    for j, key in enumerate(QUANTITY_KEYS):
        v = track.values[:, j]
        ok = in_unit & ~np.isnan(v)
        if ok.any():
            has, means, cnt = _pass_means(pass_of[ok], v[ok], len(starts), QUANTITIES[key].energy)
            index.append(has)
            quantity.append(np.full(len(has), j, dtype=np.int64))
            mean.append(means)
            n.append(cnt)
    return TrackPasses(codes[starts], t[starts], np.concatenate(index), np.concatenate(quantity),
                       np.concatenate(mean), np.concatenate(n), _excluded_counts(track, codes))


def _excluded_counts(track: Track, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit code, quantity column, count) of the values left out in each unit."""
    row, col = np.nonzero(track.excluded & (codes >= 0)[:, None])
    if not len(row):
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    pairs, n = np.unique(np.stack([codes[row], col.astype(np.int64)], axis=1), axis=0, return_counts=True)
    return pairs[:, 0], pairs[:, 1], n.astype(np.int64)


class LocalDays:
    """Local calendar days (date ordinals) of UTC millisecond times, cached per minute.

    Time zone changes fall on whole minutes, so one zoneinfo lookup per distinct minute
    gives every sample's local date.
    """

    def __init__(self, tz: str) -> None:
        self.zone = ZoneInfo(tz)
        self._by_minute: dict[int, int] = {}

    def __call__(self, t_ms: np.ndarray) -> np.ndarray:
        minutes, inverse = np.unique(t_ms // 60_000, return_inverse=True)
        get, z = self._by_minute.get, self.zone
        days = []
        for m in minutes.tolist():
            d = get(m)
            if d is None:
                d = self._by_minute[m] = dt.datetime.fromtimestamp(m * 60, z).date().toordinal()
            days.append(d)
        return np.asarray(days, dtype=np.int64)[inverse.reshape(-1)]


class Accumulator:
    """Collects every van's pass means, then :func:`combine`'s medians, days and counts.

    Pass means are kept (12 bytes each: the median needs them all); samples and days are
    reduced per van as they come.
    """

    def __init__(self, tz: str = DEFAULT_TZ) -> None:
        self.days = LocalDays(tz)
        self.nq = len(QUANTITY_KEYS)
        self.dense: dict[int, int] = {}  # unit code -> dense unit index
        self.codes: list[int] = []  # dense unit index -> unit code
        self._groups: list[np.ndarray] = []  # dense unit x quantity, per pass mean
        self._means: list[np.ndarray] = []
        self._counts: list[tuple[np.ndarray, np.ndarray]] = []  # (group, samples) per van
        self._group_days: list[np.ndarray] = []  # distinct (group, day) per van
        self._excluded: dict[tuple[int, int], int] = defaultdict(int)  # (unit code, quantity) -> left out
        self.samples = 0
        self.passes = 0
        self.first_ms: int | None = None
        self.last_ms: int | None = None

    def _dense_units(self, codes: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(codes, return_inverse=True)
        idx = []
        for c in uniq.tolist():
            d = self.dense.get(c)
            if d is None:
                d = self.dense[c] = len(self.codes)
                self.codes.append(c)
            idx.append(d)
        return np.asarray(idx, dtype=np.int64)[inverse.reshape(-1)]

    def add(self, track: Track, passes: TrackPasses) -> None:
        self.samples += len(track.t_ms)
        self.passes += len(passes.unit)
        if len(track.t_ms):
            lo, hi = int(track.t_ms.min()), int(track.t_ms.max())
            self.first_ms = lo if self.first_ms is None else min(self.first_ms, lo)
            self.last_ms = hi if self.last_ms is None else max(self.last_ms, hi)
        for c, j, n in zip(*(a.tolist() for a in passes.excluded)):
            self._excluded[(c, j)] += n
        if not len(passes.pass_index):
            return
        unit = self._dense_units(passes.unit)[passes.pass_index]
        group = unit * self.nq + passes.quantity
        day = self.days(passes.start_ms)[passes.pass_index]
        self._groups.append(group.astype(np.int32) if len(self.codes) * self.nq < 2**31 else group)
        self._means.append(passes.mean)
        g, inverse = np.unique(group, return_inverse=True)
        self._counts.append((g, np.bincount(inverse.reshape(-1), weights=passes.n).astype(np.int64)))
        # Date ordinals are below 10**6: pack (group, day) into one int64 to find the distinct pairs.
        self._group_days.append(np.unique(group * 1_000_000 + day))

    def unit_values(self, unit_of: Callable[[int], str], rule: Rule) -> list[UnitValue]:
        """One :class:`UnitValue` per (unit, quantity) with passes, sorted like :func:`combine`'s."""
        if not self._groups:
            return []
        size = len(self.codes) * self.nq
        groups = np.concatenate(self._groups).astype(np.int64)
        means = np.concatenate(self._means)
        order = np.lexsort((means, groups))  # by group, then value
        means = means[order]
        n_passes = np.bincount(groups, minlength=size)
        n_samples = np.zeros(size, dtype=np.int64)
        for g, n in self._counts:
            n_samples[g] += n  # g is distinct within one van
        n_days = np.bincount(np.unique(np.concatenate(self._group_days)) // 1_000_000, minlength=size)
        present = np.flatnonzero(n_passes)
        medians = _medians(means, np.cumsum(n_passes)[present] - n_passes[present], n_passes[present],
                           present % self.nq)
        out = []
        for g, med in zip(present.tolist(), medians.tolist()):
            unit, k = unit_of(self.codes[g // self.nq]), QUANTITY_KEYS[g % self.nq]
            npas, nd = int(n_passes[g]), int(n_days[g])
            left_out = self._excluded.get((self.codes[g // self.nq], g % self.nq), 0)
            out.append(UnitValue(unit, k, npas, nd, int(n_samples[g]), med, rule.allows(npas, nd), left_out))
        out.sort(key=lambda v: (v.unit, v.quantity))
        return out


def _medians(sorted_means: np.ndarray, offset: np.ndarray, count: np.ndarray, qcol: np.ndarray) -> np.ndarray:
    """:func:`median_of` per group of sorted values (``offset``, ``count``); noise quantities
    average the two middle values of an even count on the energy scale."""
    hi = sorted_means[offset + count // 2]
    lo = sorted_means[offset + np.maximum(count // 2 - 1, 0)]
    energy = np.array([QUANTITIES[k].energy for k in QUANTITY_KEYS])[qcol]
    even = count % 2 == 0
    out = hi.copy()
    arith = even & ~energy
    out[arith] = (lo[arith] + hi[arith]) / 2
    loud = even & energy
    # energy_mean([lo, hi]): hi is the top; its own term is 10**0 = 1.
    top = hi[loud]
    out[loud] = top + 10.0 * np.log10((np.power(10.0, (lo[loud] - top) / 10.0) + 1.0) / 2)
    return out


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
        n_excluded INTEGER,
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
    "scheme", "cell", "period", "quantity", "unit", "n_passes", "n_days", "n_samples", "n_excluded", "value",
    "published",
    "period_start_utc_ms", "period_end_utc_ms", "properties", "geometry", "built_utc_ms",
)


def create_tables(conn: Any) -> None:
    for ddl in AGGREGATES_DDL:
        dbapi.execute(conn, ddl)
    # Tables made before the flag policy lack n_excluded (NULL in old rows: not counted then).
    if dbapi.is_sqlite(conn):
        have = {r[0] for r in dbapi.fetchall(conn, "SELECT name FROM pragma_table_info('aggregates')")}
        if "n_excluded" not in have:
            dbapi.execute(conn, "ALTER TABLE aggregates ADD COLUMN n_excluded INTEGER")
    else:
        dbapi.execute(conn, "ALTER TABLE aggregates ADD COLUMN IF NOT EXISTS n_excluded INTEGER")


@dataclass
class BuildReport:
    scheme: str
    period: str
    samples: int = 0
    passes: int = 0
    rows: int = 0
    published: int = 0
    elapsed_s: float = 0.0
    best_passes: int = 0  # the unit nearest to the publication rule (for why_nothing)
    best_days: int = 0


def nearest_to_rule(values: list[UnitValue], rule: Rule) -> tuple[int, int]:
    """(passes, days) of the unit that comes closest to ``rule``: the one whose weaker side
    (passes or days, as a share of what the rule asks) is strongest."""
    def score(v: UnitValue) -> tuple[float, int, int]:
        return (min(v.n_passes / max(rule.min_passes, 1), v.n_days / max(rule.min_days, 1)), v.n_days, v.n_passes)

    best = max(values, key=score, default=None)
    return (best.n_passes, best.n_days) if best else (0, 0)


def why_nothing(rep: BuildReport, rule: Rule) -> str | None:
    """One line saying why a build published no unit, with the options that would change it; None
    when something was published. Built with the defaults on a short demo, a map used to come
    out empty with no hint at all (issue 17.6)."""
    if rep.published:
        return None
    head = f"0 units met the publishing rule ({rule.min_passes} passes on {rule.min_days} days)"
    if rep.samples == 0:
        return f"{head}: no positioned samples in period {rep.period} (check --period and the derive backlog in stats)"
    if rep.passes == 0:
        return (f"{head}: {rep.samples:,} samples but none within --snap-m of a {rep.scheme} unit "
                f"(try --roads with your streets, a larger --snap-m, or --scheme h3:10)")
    unit_s = "day" if rep.best_days == 1 else "days"
    hint = []
    if rep.best_passes < rule.min_passes:
        hint.append(f"--min-passes {rep.best_passes}")
    if rep.best_days < rule.min_days:
        hint.append(f"--min-days {rep.best_days}")
    return (f"{head}: best unit had {rep.best_passes} passes on {rep.best_days} {unit_s}; "
            f"try {' '.join(hint)} (for a look inside the team only) or collect more days")


def build(
    conn: Any,
    snapper: Snapper,
    periods: list[Period],
    *,
    rule: Rule = Rule(),
    tz: str = DEFAULT_TZ,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
    policy: FlagPolicy = FlagPolicy(),
) -> list[BuildReport]:
    """Rebuild the ``aggregates`` rows of ``snapper.scheme`` for each period (replacing old ones).

    ``policy``: which flagged values are left out (receiver/flag_policy.py); each row counts them.
    """
    create_tables(conn)
    # Snappers with a columnar interface (segments, H3) snap whole tracks; others one run at a time.
    coder: ArraySnapper = (cast(ArraySnapper, snapper) if hasattr(snapper, "snap_array")
                           else CodedSnapper(snapper))
    reports = []
    for period in periods:
        t0 = time.perf_counter()
        rep = BuildReport(snapper.scheme, period.label)
        acc = Accumulator(tz)
        for track in read_tracks(conn, period, policy=policy):
            acc.add(track, track_passes(track, coder.snap_array(track.lat, track.lon), max_gap_s))
        rep.samples, rep.passes = acc.samples, acc.passes
        values = acc.unit_values(coder.unit_of, rule)
        start = period.start_ms if period.start_ms is not None else acc.first_ms
        end = period.end_ms if period.end_ms is not None else (None if acc.last_ms is None else acc.last_ms + 1)
        now = int(time.time() * 1000)
        geometry: dict[str, str] = {}
        props: dict[str, str] = {}
        rows = []
        for v in values:
            if v.unit not in geometry:
                geometry[v.unit] = json.dumps(snapper.geometry(v.unit), separators=(",", ":"))
                props[v.unit] = json.dumps(snapper.properties(v.unit), separators=(",", ":"), ensure_ascii=False)
            rows.append((snapper.scheme, v.unit, period.label, v.quantity, QUANTITIES[v.quantity].unit,
                         v.n_passes, v.n_days, v.n_samples, v.n_excluded, round(v.value, 3), int(v.published),
                         start, end, props[v.unit], geometry[v.unit], now))
        rep.rows = len(rows)
        rep.published = sum(1 for v in values if v.published)
        rep.best_passes, rep.best_days = nearest_to_rule(values, rule)
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
                 json.dumps({"tz": tz, "max_gap_s": max_gap_s, "samples": rep.samples, "passes": rep.passes,
                             "flag_policy": policy.describe()}),
                 rep.rows, rep.published, round(rep.elapsed_s, 3)),
            )
        log.info("aggregated %s %s: %d samples, %d passes, %d rows (%d published) in %.2f s",
                 rep.scheme, rep.period, rep.samples, rep.passes, rep.rows, rep.published, rep.elapsed_s)
        reports.append(rep)
    return reports
