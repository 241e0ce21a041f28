"""Co-location arithmetic: reference station hours, device hours, and the regression.

Pure functions (no click, no I/O beyond reading the files named), so the fit can be
tested against synthetic data with a known answer.

Reference: a Luchtmeetnet export, CSV or JSON, with ``station_number``, ``formula``,
``value`` and ``timestamp_measured``. Luchtmeetnet revises values after validation, so
an export may hold the same hour twice: the later row wins (like an upsert).
Luchtmeetnet stamps hourly values by the *end* of the hour (``--ref-stamp end``); the
device's hour 09:00-10:00 is compared with the reference's 10:00 value.
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from core.calibration import CalibrationError

HOUR = 3600.0
# NO2 µg/m³ per ppb at 20 °C and 1013 hPa (the EU reference conditions Luchtmeetnet reports in).
NO2_UGM3_PER_PPB = 1.9125


@dataclass(frozen=True, slots=True)
class Point:
    t: float  # UTC seconds
    value: float
    temp_c: float | None = None
    rh_pct: float | None = None


@dataclass
class Reference:
    hours: dict[float, float]  # hour start (UTC s) -> value
    station: str
    formula: str
    revised: int = 0  # hours that appeared more than once (later row kept)


@dataclass
class FitResult:
    n: int
    r2: float
    intercept: float
    slope: float
    rmse: float
    coefs: dict[str, float] = field(default_factory=dict)  # temp_c, rh_pct terms when fitted
    start: float = 0.0
    end: float = 0.0

    def accepted(self, min_r2: float, min_hours: int) -> tuple[bool, str]:
        if self.n < min_hours:
            return False, f"only {self.n} matched hours (need {min_hours})"
        if self.r2 < min_r2:
            return False, f"R² {self.r2:.3f} below {min_r2}"
        if not 0.2 <= self.slope <= 5.0:
            return False, f"slope {self.slope:.3f} outside 0.2..5: the sensor or the data is wrong"
        return True, "accepted"


def parse_time(v: Any) -> float:
    """ISO 8601 (a naive time is UTC) or epoch seconds/milliseconds -> UTC seconds."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        x = float(v)
    else:
        s = str(v).strip()
        try:
            x = float(s)
        except ValueError:
            try:
                dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
            except ValueError as exc:
                raise CalibrationError(f"not a time: {s!r}") from exc
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            return dt.timestamp()
    return x / 1000.0 if x > 1e11 else x  # epoch milliseconds


def _rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        doc = json.loads(text)
        rows = doc.get("data", doc) if isinstance(doc, dict) else doc
        if not isinstance(rows, list):
            raise CalibrationError(f"{path}: expected a list of rows (or {{'data': [...]}})")
        return [r for r in rows if isinstance(r, dict)]
    sample = text[:2048]
    delim = ";" if sample.count(";") > sample.count(",") else ","
    return list(csv.DictReader(text.splitlines(), delimiter=delim))


def load_reference(path: str | Path, *, formula: str | None = None, station: str | None = None,
                   stamp: str = "end") -> Reference:
    """Hourly reference values by hour start; later duplicates of an hour win."""
    p = Path(path)
    try:
        rows = _rows(p)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read the reference {p}: {exc}") from exc
    need = {"station_number", "formula", "value", "timestamp_measured"}
    if not rows or not need <= set(rows[0]):
        raise CalibrationError(f"{p} is not a Luchtmeetnet export: needs columns {', '.join(sorted(need))}")
    if formula:
        rows = [r for r in rows if str(r["formula"]).upper().replace(".", "") == formula.upper().replace(".", "")]
    stations = sorted({str(r["station_number"]) for r in rows})
    if station:
        rows = [r for r in rows if str(r["station_number"]) == station]
    elif len(stations) > 1:
        raise CalibrationError(f"{p} holds several stations ({', '.join(stations)}): choose one with --station")
    formulas = sorted({str(r["formula"]) for r in rows})
    if len(formulas) > 1:
        raise CalibrationError(f"{p} holds several components ({', '.join(formulas)}): choose one with --formula")
    if not rows:
        raise CalibrationError(f"{p} has no rows for station {station or '?'} / formula {formula or '?'}")
    hours: dict[float, float] = {}
    revised = 0
    shift = HOUR if stamp == "end" else 0.0
    for r in rows:  # file order: a later row for the same hour is the revised value
        v = r["value"]
        if v is None or str(v).strip() == "":
            continue
        try:
            val = float(str(v).replace(",", "."))
        except ValueError:
            continue
        if not math.isfinite(val):
            continue
        h = math.floor((parse_time(r["timestamp_measured"]) - shift) / HOUR) * HOUR
        revised += h in hours
        hours[h] = val
    return Reference(hours, str(rows[0]["station_number"]), formulas[0], revised)


def _opt(v: Any) -> float | None:
    if v is None or str(v).strip() == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def load_device_csv(path: str | Path) -> list[Point]:
    """A CSV with columns time,value[,temp,rh] (``temp_c``/``rh_pct`` also accepted)."""
    p = Path(path)
    try:
        rows = _rows(p)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read the device data {p}: {exc}") from exc
    if not rows or not {"time", "value"} <= {k.strip().lower() for k in rows[0]}:
        raise CalibrationError(f"{p}: the device data needs the columns time,value[,temp,rh]")
    out = []
    for r in rows:
        r = {k.strip().lower(): v for k, v in r.items() if k}
        val = _opt(r.get("value"))
        if val is None:
            continue
        out.append(Point(parse_time(r["time"]), val, _opt(r.get("temp", r.get("temp_c"))),
                         _opt(r.get("rh", r.get("rh_pct")))))
    return out


def load_device_store(path: str | Path, *, device: str, sensor: str, quantity: str,
                      temp_key: str | None = None, rh_key: str | None = None) -> list[Point]:
    """Samples of one device and sensor from a receiver SQLite store (samples.vals JSON)."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"no receiver store at {p}")
    conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT t_utc_ms, json_extract(vals, '$.' || ?), json_extract(vals, '$.' || ?),"
            " json_extract(vals, '$.' || ?) FROM samples WHERE device=? AND sensor=? AND t_utc_ms IS NOT NULL"
            " ORDER BY t_utc_ms",
            (quantity, temp_key or "__none__", rh_key or "__none__", device, sensor),
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise CalibrationError(f"{p} is not a receiver store: {exc}") from exc
    finally:
        conn.close()
    return [Point(t / 1000.0, float(v), _opt(tc), _opt(rh)) for t, v, tc, rh in rows if _opt(v) is not None]


def hourly(points: Iterable[Point], min_fraction: float = 0.5) -> dict[float, Point]:
    """Hour means; hours with fewer than ``min_fraction`` of the median count are dropped.

    A partial hour (the van arrived at 09:50) is not the hour the reference averaged.
    """
    groups: dict[float, list[Point]] = defaultdict(list)
    for pt in points:
        groups[math.floor(pt.t / HOUR) * HOUR].append(pt)
    if not groups:
        return {}
    median = float(np.median([len(g) for g in groups.values()]))
    out = {}
    for h, g in groups.items():
        if len(g) < min_fraction * median:
            continue
        temps = [x.temp_c for x in g if x.temp_c is not None]
        rhs = [x.rh_pct for x in g if x.rh_pct is not None]
        out[h] = Point(h, float(np.mean([x.value for x in g])),
                       float(np.mean(temps)) if temps else None, float(np.mean(rhs)) if rhs else None)
    return out


def fit(device_hours: dict[float, Point], ref: dict[float, float], *, temp: bool = False, rh: bool = False) -> FitResult:
    """Least squares y_ref = a + b·x (+ c·T) (+ d·RH) over the hours both sides have."""
    hours = sorted(h for h in device_hours if h in ref
                   and (not temp or device_hours[h].temp_c is not None)
                   and (not rh or device_hours[h].rh_pct is not None))
    if len(hours) < 3 + temp + rh:
        raise CalibrationError(f"only {len(hours)} hours where device and reference overlap: "
                               "check the time zone, the station and the period")
    x = np.array([device_hours[h].value for h in hours])
    y = np.array([ref[h] for h in hours])
    cols = [np.ones_like(x), x]
    names = ["intercept", "slope"]
    if temp:
        cols.append(np.array([device_hours[h].temp_c for h in hours], dtype=float))
        names.append("temp_c")
    if rh:
        cols.append(np.array([device_hours[h].rh_pct for h in hours], dtype=float))
        names.append("rh_pct")
    A = np.column_stack(cols)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    pred = A @ coef
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    c = dict(zip(names, (float(v) for v in coef)))
    return FitResult(n=len(hours), r2=r2, intercept=c.pop("intercept"), slope=c.pop("slope"),
                     rmse=math.sqrt(ss_res / len(hours)), coefs=c, start=hours[0], end=hours[-1] + HOUR)
