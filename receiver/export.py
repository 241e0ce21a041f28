"""CSV and GeoJSON exports: measurements (observations with positions) and published aggregates.

Two kinds of output, with different audiences:

* **aggregates** are public: only rows that meet the publication rule
  (``published = 1``) are ever written, whatever the options;
* **measurements** are raw per-van data (who drove where, when). They are for the
  team inside, never for publication; the export says so in its name and the docs.

Both are streamed row by row, so a month of a city's fleet does not need to fit in
memory. The query helpers here are also what the HTTP API serves from.

Every measurement carries its unit, its flags (the van's ``flags`` and the receiver's
``quality``), whether the flag policy keeps it out of the maps (``excluded``,
receiver/flag_policy.py) and the calibration record its value came from. ``value`` is
the best value, ``raw_value`` the van's as it sent it; for PM, ``calibration`` also names
the growth correction (``kappa-koehler:<kappa>``, receiver/pm_derive.py) and
``humidity_corrected`` is 1 where it was applied (0 for PM where it was not). Aggregates
carry their unit and ``n_excluded``, the values the policy left out of the unit.
GeoJSON stays RFC 7946: a FeatureCollection has no ``properties`` member (section 7.1),
so what describes the whole export goes in the foreign member ``metadata``.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterator
from typing import IO, Any

from receiver import dbapi
from receiver.aggregate import QUANTITIES, TRUSTED_POSITIONS, Period
from receiver.flag_policy import FlagPolicy, is_sentinel
from receiver.pm_derive import PM_DERIVED
from receiver.pm_humidity import CORRECTION

AGG_FIELDS = ("scheme", "cell", "period", "quantity", "unit", "value", "n_passes", "n_days", "n_samples",
              "n_excluded", "period_start_utc", "period_end_utc", "street", "road_class")
MEASUREMENT_FIELDS = ("device", "time_utc", "t_utc_ms", "sensor", "quantity", "value", "unit", "flags", "quality",
                      "excluded", "calibration", "lat", "lon", "speed_mps", "position", "raw_value",
                      "humidity_corrected")
# What the query gives; time_utc, excluded and humidity_corrected are added per row in Python
# (time_utc is text in SQLite's view and a timestamptz in PostgreSQL's: an export writes one form).
_QUERIED = tuple(f for f in MEASUREMENT_FIELDS if f not in ("time_utc", "excluded", "humidity_corrected"))
#: Units of the measured values that are not map quantities (those have theirs in QUANTITIES).
OTHER_UNITS = {"pm1": "µg/m³", "pm1_cf1": "µg/m³", "pm25_cf1": "µg/m³", "pm10_cf1": "µg/m³", "lamax": "dB(A)",
               "lamin": "dB(A)", "no2_we_mv": "mV", "no2_ae_mv": "mV", "no2_temp_c": "°C", "rh": "%",
               "temp_c": "°C",
               # the microphone's minute statistics, and the sound module's C/Z extremes
               "la10": "dB(A)", "la50": "dB(A)", "la90": "dB(A)", "laeq_1min": "dB(A)",
               "lcmax": "dB(C)", "lcmin": "dB(C)", "lzmax": "dB(Z)", "lzmin": "dB(Z)"}


def unit_of(quantity: str) -> str | None:
    q = QUANTITIES.get(quantity)
    return q.unit if q is not None else OTHER_UNITS.get(quantity)


def iso_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


# -- aggregates (public) -----------------------------------------------------------------


def published_aggregates(
    conn: Any,
    *,
    scheme: str | None = None,
    period: str | None = None,
    quantity: str | None = None,
    cell: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> Iterator[dict[str, Any]]:
    """Published aggregate rows as dicts (geometry decoded). Unpublished rows cannot come out of here."""
    if not dbapi.table_exists(conn, "aggregates"):
        return
    where, params = ["published = 1"], []
    for col, val in (("scheme", scheme), ("period", period), ("quantity", quantity), ("cell", cell)):
        if val is not None:
            where.append(f"{col} = ?")
            params.append(val)
    sql = (
        "SELECT scheme, cell, period, quantity, unit, value, n_passes, n_days, n_samples,"
        " period_start_utc_ms, period_end_utc_ms, properties, geometry, built_utc_ms, n_excluded FROM aggregates"
        f" WHERE {' AND '.join(where)} ORDER BY scheme, period, quantity, cell"
    )
    if limit is not None:
        sql += " LIMIT ? OFFSET ?"
        params += [limit, offset]
    cur = dbapi.execute(conn, sql, params)
    while rows := cur.fetchmany(2000):
        for r in rows:
            props = dbapi.decode_json(r[11]) or {}
            yield {
                "scheme": r[0], "cell": r[1], "period": r[2], "quantity": r[3], "unit": r[4], "value": r[5],
                "n_passes": r[6], "n_days": r[7], "n_samples": r[8], "n_excluded": r[14],
                "period_start_utc": iso_ms(r[9]), "period_end_utc": iso_ms(r[10]),
                "street": props.get("street"), "road_class": props.get("road_class"),
                "h3_resolution": props.get("h3_resolution"),
                "geometry": dbapi.decode_json(r[12]), "built_utc": iso_ms(r[13]),
            }


def aggregate_feature(row: dict[str, Any]) -> dict[str, Any]:
    props = {k: v for k, v in row.items() if k != "geometry" and v is not None}
    return {"type": "Feature", "id": f"{row['scheme']}/{row['cell']}/{row['period']}/{row['quantity']}",
            "geometry": row["geometry"], "properties": props}


def catalog(conn: Any) -> list[dict[str, Any]]:
    """What is published: per scheme, period and quantity, how many units and the value range."""
    if not dbapi.table_exists(conn, "aggregates"):
        return []
    rows = dbapi.fetchall(
        conn,
        "SELECT scheme, period, quantity, unit, count(*), min(value), max(value),"
        " min(period_start_utc_ms), max(period_end_utc_ms)"
        " FROM aggregates WHERE published = 1 GROUP BY scheme, period, quantity, unit"
        " ORDER BY scheme, period, quantity",
    )
    return [
        {"scheme": r[0], "period": r[1], "quantity": r[2], "unit": r[3], "units_published": r[4],
         "min": r[5], "max": r[6], "period_start_utc": iso_ms(r[7]), "period_end_utc": iso_ms(r[8]),
         "label": QUANTITIES[r[2]].label if r[2] in QUANTITIES else r[2]}
        for r in rows
    ]


# -- measurements (internal) ---------------------------------------------------------------


def measurements(
    conn: Any,
    *,
    period: Period = Period("all"),
    device: str | None = None,
    quantities: tuple[str, ...] = tuple(QUANTITIES),
    positioned_only: bool = True,
    policy: FlagPolicy = FlagPolicy(),
) -> Iterator[dict[str, Any]]:
    """Rows of the ``observations`` view: one measured value with where it was taken, its unit,
    flags, calibration record and whether ``policy`` keeps it out of the maps (``excluded``)."""
    where, params = [], []
    if quantities:
        where.append(f"o.quantity IN ({','.join('?' * len(quantities))})")
        params += list(quantities)
    if positioned_only:
        where.append("o.position IN (?, ?)")
        params += list(TRUSTED_POSITIONS)
    if device:
        where.append("o.device = ?")
        params.append(device)
    if period.start_ms is not None:
        where.append("o.t_utc_ms >= ?")
        params.append(period.start_ms)
    if period.end_ms is not None:
        where.append("o.t_utc_ms < ?")
        params.append(period.end_ms)
    # value is the best one and calibration the record it used (the observations view,
    # receiver/calibration.py value_source): an export never restates how that is chosen.
    cur = dbapi.execute(
        conn,
        f"SELECT {', '.join(f'o.{f}' for f in _QUERIED)} FROM observations o"
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + " ORDER BY o.device, o.t_utc_ms, o.quantity",
        params,
    )
    while rows := cur.fetchmany(5000):
        for r in rows:
            row = dict(zip(_QUERIED, r))
            v, q = row["value"], row["quantity"]
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            row["time_utc"] = iso_ms(row["t_utc_ms"])
            row = {f: row.get(f) for f in MEASUREMENT_FIELDS}  # in the documented column order
            row["excluded"] = int(number and (is_sentinel(float(v)) or policy.excludes(q, row["flags"],
                                                                                      row["quality"])))
            row["humidity_corrected"] = (int(CORRECTION in (row["calibration"] or "")) if q in PM_DERIVED
                                         else None)
            yield row


def measurement_feature(row: dict[str, Any]) -> dict[str, Any] | None:
    if row["lat"] is None or row["lon"] is None:
        return None
    props = {k: v for k, v in row.items() if k not in ("lat", "lon")}
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [row["lon"], row["lat"]]},
            "properties": props}


# -- writers -------------------------------------------------------------------------------


def write_csv(rows: Iterator[dict[str, Any]], fields: tuple[str, ...], out: IO[str]) -> int:
    w = csv.DictWriter(out, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    n = 0
    for r in rows:
        w.writerow(r)
        n += 1
    return n


def write_geojson(features: Iterator[dict[str, Any] | None], out: IO[str],
                  metadata: dict[str, Any] | None = None) -> int:
    """A FeatureCollection written feature by feature (never built whole in memory).

    ``metadata`` goes in a foreign member of that name: RFC 7946 (7.1) forbids a
    ``properties`` member on a FeatureCollection.
    """
    head: dict[str, Any] = {"type": "FeatureCollection"}
    if metadata:
        head["metadata"] = metadata
    out.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "features": [\n')
    n = 0
    for f in features:
        if f is None:
            continue
        out.write((",\n" if n else "") + json.dumps(f, ensure_ascii=False, separators=(",", ":")))
        n += 1
    out.write("\n]}\n")
    return n


def build_policies(conn: Any, *, scheme: str | None = None, period: str | None = None) -> dict[str, Any]:
    """The flag policy each map build used, by "scheme/period" (``aggregate_builds.params``).

    An aggregate export serves what was built: its ``n_excluded`` and values follow the
    policy of the build, not one given at export time. None: built before the policy.
    """
    if not dbapi.table_exists(conn, "aggregate_builds"):
        return {}
    where, params = [], []
    for col, val in (("scheme", scheme), ("period", period)):
        if val is not None:
            where.append(f"{col} = ?")
            params.append(val)
    rows = dbapi.fetchall(conn, "SELECT scheme, period, params FROM aggregate_builds"
                                + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY scheme, period",
                          tuple(params))
    out: dict[str, Any] = {}
    for sch, per, text in rows:
        try:
            built = json.loads(text) if text else {}
        except ValueError:
            built = {}
        out[f"{sch}/{per}"] = built.get("flag_policy") if isinstance(built, dict) else None
    return out


def export_aggregates(conn: Any, out: IO[str], fmt: str, *, scheme: str | None = None,
                      period: str | None = None, quantity: str | None = None) -> int:
    rows = published_aggregates(conn, scheme=scheme, period=period, quantity=quantity)
    if fmt == "csv":
        return write_csv(rows, AGG_FIELDS, out)
    meta = {"published_only": True, "statistic": "median of per-pass means (noise: energy means)",
            "n_excluded": "values the flag policy left out of the unit (docs/datalab.md, Flag policy)",
            "flag_policy": build_policies(conn, scheme=scheme, period=period)}
    return write_geojson((aggregate_feature(r) for r in rows), out, meta)


def export_measurements(conn: Any, out: IO[str], fmt: str, **kw: Any) -> int:
    rows = measurements(conn, **kw)
    if fmt == "csv":
        return write_csv(rows, MEASUREMENT_FIELDS, out)
    policy: FlagPolicy = kw.get("policy", FlagPolicy())
    return write_geojson((measurement_feature(r) for r in rows), out,
                         {"internal": "raw per-van measurements: not for publication",
                          "flag_policy": policy.describe()})
