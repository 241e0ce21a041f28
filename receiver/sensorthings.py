"""A read-only, SensorThings-style (OGC STA 1.1) view of the *published* aggregates.

Analysts know STA from RIVM's Samen Meten portal, so the street map is offered in
its shapes. The mapping (one map unit behaves like a fixed virtual station):

* **Thing** / **Location** / **FeatureOfInterest**: one published map unit (a
  ~30 m road segment or an H3 cell); id = the unit id (``s012-0-004``,
  ``8a19694ab877fff``); the Location is its geometry;
* **Datastream**: a unit × quantity (id ``<unit>:<quantity>``);
* **Observation**: one period's value, the median of per-pass means (id
  ``<unit>:<quantity>:<period>``), with ``phenomenonTime`` the period and
  ``parameters`` the passes and days behind it;
* **ObservedProperty**: pm25, pm10, no2_ppb, laeq (lceq, lzeq); **Sensor**: one, the method.

Vans are not Things here on purpose: per-van data is never public.

Supported query options: ``$top`` (default 100, at most 10000; at most 100 with
``$expand``, whose every entity brings up to 100 more), ``$skip`` (at most 15 digits),
``$count`` (true or false), ``$expand`` (one level, by navigation property name) and
``$select``. Any other value is a 400, never a way around a cap.
``$filter`` and ``$orderby`` answer 400 rather than being silently ignored.
Ids are strings, in quotes as OData wants: ``Things('s012-0-004')``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from collections.abc import Iterable, Iterator
from typing import Any, Callable
from urllib.parse import quote, urlencode

from receiver import dbapi
from receiver.aggregate import QUANTITIES
from receiver.export import iso_ms
from receiver.jsonstream import OMIT, Later

DEFAULT_TOP = 100
MAX_TOP = 10_000
MAX_TOP_EXPANDED = 100  # with $expand each entity carries up to DEFAULT_TOP more
_NUMBER = re.compile(r"[0-9]{1,15}")  # $top/$skip: far beyond any table, well inside a 64-bit OFFSET
SENSOR_ID = "datalab-mobile-median"

UOM = {
    "µg/m³": {"name": "microgram per cubic metre", "symbol": "µg/m³",
              "definition": "http://unitsofmeasure.org/ucum.html#ug/m3"},
    "ppb": {"name": "parts per billion", "symbol": "ppb", "definition": "http://unitsofmeasure.org/ucum.html#[ppb]"},
    "dB(A)": {"name": "decibel, A-weighted", "symbol": "dB(A)", "definition": "http://unitsofmeasure.org/ucum.html#dB"},
    "dB(C)": {"name": "decibel, C-weighted", "symbol": "dB(C)", "definition": "http://unitsofmeasure.org/ucum.html#dB"},
    "dB(Z)": {"name": "decibel, unweighted (Z)", "symbol": "dB(Z)", "definition": "http://unitsofmeasure.org/ucum.html#dB"},
}
DESCRIPTIONS = {
    "pm25": "Mass concentration of particulate matter up to 2.5 µm (optical sensor, raw)",
    "pm10": "Mass concentration of particulate matter up to 10 µm (optical sensor, raw)",
    "no2_ppb": "Nitrogen dioxide mixing ratio (electrochemical sensor)",
    "laeq": "A-weighted equivalent continuous sound level (per-pass energy mean)",
    "lceq": "C-weighted equivalent continuous sound level (per-pass energy mean)",
    "lzeq": "Unweighted (Z) equivalent continuous sound level (per-pass energy mean)",
}
OM_MEASUREMENT = "http://www.opengis.net/def/observationType/OGC-OM/2.0/OM_Measurement"


class StaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Key:
    """A parsed entity id: the unit, and for Datastreams/Observations the quantity and period."""

    cell: str | None = None
    quantity: str | None = None
    period: str | None = None


# -- rows -> entities ----------------------------------------------------------------------


def _link(base: str, entity_set: str, id_: str) -> str:
    return f"{base}/{entity_set}('{quote(id_, safe='')}')"


def _thing(base: str, r: tuple[Any, ...]) -> dict[str, Any]:
    scheme, cell, props = r[0], r[1], dbapi.decode_json(r[2]) or {}
    self_ = _link(base, "Things", cell)
    name = f"{props['street']} ({cell})" if props.get("street") else f"{scheme} cell {cell}"
    return {
        "@iot.id": cell, "@iot.selfLink": self_, "name": name,
        "description": f"Map unit {cell} of the DataLab {scheme} street map (aggregate of mobile passes)",
        "properties": {"scheme": scheme, **props},
        "Locations@iot.navigationLink": f"{self_}/Locations",
        "Datastreams@iot.navigationLink": f"{self_}/Datastreams",
    }


def _location(base: str, r: tuple[Any, ...], entity_set: str = "Locations") -> dict[str, Any]:
    scheme, cell, props, geometry = r[0], r[1], dbapi.decode_json(r[2]) or {}, dbapi.decode_json(r[3])
    self_ = _link(base, entity_set, cell)
    out = {
        "@iot.id": cell, "@iot.selfLink": self_, "name": props.get("street") or cell,
        "description": f"Geometry of map unit {cell} ({scheme})",
        "encodingType": "application/geo+json",
        ("location" if entity_set == "Locations" else "feature"): geometry,
    }
    if entity_set == "Locations":
        out["Things@iot.navigationLink"] = f"{self_}/Things"
    else:
        out["Observations@iot.navigationLink"] = f"{self_}/Observations"
    return out


def _datastream(base: str, r: tuple[Any, ...]) -> dict[str, Any]:
    scheme, cell, quantity, unit, start, end, geometry = r
    q = QUANTITIES[quantity]
    id_ = f"{cell}:{quantity}"
    self_ = _link(base, "Datastreams", id_)
    return {
        "@iot.id": id_, "@iot.selfLink": self_,
        "name": f"{q.label} at {cell}",
        "description": f"{q.label}, median of per-pass means, map unit {cell} ({scheme})",
        "observationType": OM_MEASUREMENT,
        "unitOfMeasurement": UOM.get(unit, {"name": unit, "symbol": unit, "definition": ""}),
        "observedArea": dbapi.decode_json(geometry),
        "phenomenonTime": _interval(start, end),
        "properties": {"scheme": scheme, "quantity": quantity},
        "Thing@iot.navigationLink": f"{self_}/Thing",
        "Sensor@iot.navigationLink": f"{self_}/Sensor",
        "ObservedProperty@iot.navigationLink": f"{self_}/ObservedProperty",
        "Observations@iot.navigationLink": f"{self_}/Observations",
    }


def _observation(base: str, r: tuple[Any, ...]) -> dict[str, Any]:
    scheme, cell, quantity, period, value, n_passes, n_days, n_samples, start, end, built = r
    id_ = f"{cell}:{quantity}:{period}"
    self_ = _link(base, "Observations", id_)
    return {
        "@iot.id": id_, "@iot.selfLink": self_,
        "phenomenonTime": _interval(start, end),
        "resultTime": iso_ms(built),
        "result": value,
        "parameters": {"period": period, "n_passes": n_passes, "n_days": n_days, "n_samples": n_samples,
                       "statistic": "median of per-pass means" + (" (energy means)" if QUANTITIES[quantity].energy else ""),
                       "scheme": scheme},
        "Datastream@iot.navigationLink": f"{self_}/Datastream",
        "FeatureOfInterest@iot.navigationLink": f"{self_}/FeatureOfInterest",
    }


def _observed_property(base: str, key: str) -> dict[str, Any]:
    q = QUANTITIES[key]
    self_ = _link(base, "ObservedProperties", key)
    return {"@iot.id": key, "@iot.selfLink": self_, "name": q.label, "definition": f"urn:datalab:quantity:{key}",
            "description": DESCRIPTIONS[key], "Datastreams@iot.navigationLink": f"{self_}/Datastreams"}


def _sensor(base: str) -> dict[str, Any]:
    self_ = _link(base, "Sensors", SENSOR_ID)
    return {"@iot.id": SENSOR_ID, "@iot.selfLink": self_, "name": "DataLab mobile street-map method",
            "description": "Low-cost sensors on postal vans; samples snapped to map units, split into passes, "
                           "median of per-pass means; published with enough passes on enough days",
            "encodingType": "text/html", "metadata": "docs/datalab.md",
            "Datastreams@iot.navigationLink": f"{self_}/Datastreams"}


def _interval(start: int | None, end: int | None) -> str | None:
    return f"{iso_ms(start)}/{iso_ms(end)}" if start is not None and end is not None else None


# -- queries (all over published rows only) -------------------------------------------------

_PUB = "FROM aggregates WHERE published = 1"


def _where(key: Key) -> tuple[str, list[Any]]:
    sql, params = "", []
    for col, val in (("cell", key.cell), ("quantity", key.quantity), ("period", key.period)):
        if val is not None:
            sql += f" AND {col} = ?"
            params.append(val)
    return sql, params


def _page(conn: Any, select: str, group: str, order: str, key: Key, top: int,
          skip: int) -> Iterator[tuple[Any, ...]]:
    """Rows as the cursor hands them out (on SQLite straight from the file; psycopg's client
    cursor holds the page, at most MAX_TOP + 1 rows, and leaves the connection free for $expand)."""
    w, p = _where(key)
    sql = f"SELECT {select} {_PUB}{w}{group} ORDER BY {order} LIMIT ? OFFSET ?"
    cur = dbapi.execute(conn, sql, [*p, top, skip])
    while rows := cur.fetchmany(500):
        yield from rows


def _count(conn: Any, distinct: str, key: Key) -> int:
    w, p = _where(key)
    return int(dbapi.fetchall(conn, f"SELECT count(*) FROM (SELECT DISTINCT {distinct} {_PUB}{w}) t", p)[0][0])


# Unit-level sets share one query: (scheme, cell, any properties, any geometry) per unit.
_UNIT_SELECT = "scheme, cell, max(properties), max(geometry)"
_UNIT_GROUP = " GROUP BY scheme, cell"
_DS_SELECT = ("scheme, cell, quantity, max(unit), min(period_start_utc_ms), max(period_end_utc_ms), "
              "max(geometry)")
_OBS_SELECT = ("scheme, cell, quantity, period, value, n_passes, n_days, n_samples, period_start_utc_ms, "
               "period_end_utc_ms, built_utc_ms")


@dataclass(frozen=True)
class EntitySet:
    rows: Callable[[Any, str, Key, int, int], Iterable[dict[str, Any]]]
    count: Callable[[Any, Key], int]
    parse: Callable[[str], Key]
    # navigation property -> (target set, single entity?, key for the target from this key)
    nav: dict[str, tuple[str, bool, Callable[[Key], Key]]]


def _cell_key(id_: str) -> Key:
    return Key(cell=id_)


def _ds_key(id_: str) -> Key:
    cell, _, quantity = id_.partition(":")
    if not quantity:
        raise StaError(404, f"no Datastream {id_!r}")
    return Key(cell=cell, quantity=quantity)


def _obs_key(id_: str) -> Key:
    parts = id_.split(":", 2)
    if len(parts) != 3:
        raise StaError(404, f"no Observation {id_!r}")
    return Key(*parts)


def _published_quantities(conn: Any) -> list[str]:
    got = {r[0] for r in dbapi.fetchall(conn, f"SELECT DISTINCT quantity {_PUB}")}
    return [k for k in QUANTITIES if k in got]


SETS: dict[str, EntitySet] = {
    "Things": EntitySet(
        rows=lambda c, b, k, t, s: (_thing(b, r) for r in _page(c, _UNIT_SELECT, _UNIT_GROUP, "scheme, cell", k, t, s)),
        count=lambda c, k: _count(c, "scheme, cell", k),
        parse=_cell_key,
        nav={"Locations": ("Locations", False, lambda k: Key(cell=k.cell)),
             "Datastreams": ("Datastreams", False, lambda k: Key(cell=k.cell))},
    ),
    "Locations": EntitySet(
        rows=lambda c, b, k, t, s: (_location(b, r)
                                    for r in _page(c, _UNIT_SELECT, _UNIT_GROUP, "scheme, cell", k, t, s)),
        count=lambda c, k: _count(c, "scheme, cell", k),
        parse=_cell_key,
        nav={"Things": ("Things", False, lambda k: Key(cell=k.cell))},
    ),
    "FeaturesOfInterest": EntitySet(
        rows=lambda c, b, k, t, s: (_location(b, r, "FeaturesOfInterest")
                                    for r in _page(c, _UNIT_SELECT, _UNIT_GROUP, "scheme, cell", k, t, s)),
        count=lambda c, k: _count(c, "scheme, cell", k),
        parse=_cell_key,
        nav={"Observations": ("Observations", False, lambda k: Key(cell=k.cell))},
    ),
    "Datastreams": EntitySet(
        rows=lambda c, b, k, t, s: (_datastream(b, r) for r in _page(
            c, _DS_SELECT, " GROUP BY scheme, cell, quantity", "scheme, cell, quantity", k, t, s)),
        count=lambda c, k: _count(c, "scheme, cell, quantity", k),
        parse=_ds_key,
        nav={"Thing": ("Things", True, lambda k: Key(cell=k.cell)),
             "Observations": ("Observations", False, lambda k: Key(cell=k.cell, quantity=k.quantity)),
             "ObservedProperty": ("ObservedProperties", True, lambda k: Key(quantity=k.quantity)),
             "Sensor": ("Sensors", True, lambda k: Key())},
    ),
    "Observations": EntitySet(
        rows=lambda c, b, k, t, s: (_observation(b, r) for r in _page(
            c, _OBS_SELECT, "", "scheme, cell, quantity, period", k, t, s)),
        count=lambda c, k: _count(c, "scheme, cell, quantity, period", k),
        parse=_obs_key,
        nav={"Datastream": ("Datastreams", True, lambda k: Key(cell=k.cell, quantity=k.quantity)),
             "FeatureOfInterest": ("FeaturesOfInterest", True, lambda k: Key(cell=k.cell))},
    ),
    "ObservedProperties": EntitySet(
        rows=lambda c, b, k, t, s: [_observed_property(b, q) for q in _published_quantities(c)
                                    if k.quantity in (None, q)][s:s + t],
        count=lambda c, k: len([q for q in _published_quantities(c) if k.quantity in (None, q)]),
        parse=lambda id_: Key(quantity=id_) if id_ in QUANTITIES else _missing("ObservedProperty", id_),
        nav={"Datastreams": ("Datastreams", False, lambda k: Key(quantity=k.quantity))},
    ),
    "Sensors": EntitySet(
        rows=lambda c, b, k, t, s: [_sensor(b)][s:s + t],
        count=lambda c, k: 1,
        parse=lambda id_: Key() if id_ == SENSOR_ID else _missing("Sensor", id_),
        nav={"Datastreams": ("Datastreams", False, lambda k: Key())},
    ),
}


def _missing(kind: str, id_: str) -> Key:
    raise StaError(404, f"no {kind} {id_!r}")


# -- request handling ----------------------------------------------------------------------

_PATH = re.compile(r"^/(\w+)(?:\((?:'((?:[^']|'')*)'|(\d+))\))?(?:/(\w+))?/?$", re.ASCII)
_SUPPORTED = {"$top", "$skip", "$count", "$expand", "$select"}


def handle(conn: Any, path: str, qs: dict[str, str], base: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for a path below ``/sta/v1.1``."""
    try:
        return 200, _handle(conn, path, qs, base)
    except StaError as exc:
        return exc.status, {"code": exc.status, "type": "error", "message": str(exc)}


def _handle(conn: Any, path: str, qs: dict[str, str], base: str) -> dict[str, Any]:
    if path in ("", "/"):
        return {
            "value": [{"name": n, "url": f"{base}/{n}"} for n in SETS],
            "serverSettings": {"conformance": ["http://www.opengis.net/spec/iot_sensing/1.1/req/datamodel"]},
        }
    if not dbapi.table_exists(conn, "aggregates"):
        raise StaError(404, "no aggregates have been built yet")
    bad = [k for k in qs if k.startswith("$") and k not in _SUPPORTED]
    if bad:
        raise StaError(400, f"not supported by this read-only view: {', '.join(bad)}; use $top, $skip, $count, "
                            "$expand, $select")
    m = _PATH.match(path)
    if not m or m.group(1) not in SETS:
        raise StaError(404, f"no such resource: {path}")
    set_name, sid, nid, nav = m.group(1), m.group(2), m.group(3), m.group(4)
    id_ = sid.replace("''", "'") if sid is not None else nid
    es = SETS[set_name]
    expand = list(dict.fromkeys(e for e in qs.get("$expand", "").split(",") if e))  # each once
    select = [s for s in qs.get("$select", "").split(",") if s]
    top = min(_int_option(qs, "$top", DEFAULT_TOP), MAX_TOP_EXPANDED if expand else MAX_TOP)
    skip = _int_option(qs, "$skip", 0)
    if qs.get("$count", "false").lower() not in ("true", "false"):
        raise StaError(400, "$count must be true or false")
    if id_ is None:
        if nav:
            raise StaError(404, f"no such resource: {path}")
        return _collection(conn, base, set_name, Key(), top, skip, qs, expand, select)
    key = es.parse(id_)
    if nav:
        if nav not in es.nav:
            raise StaError(404, f"{set_name} has no navigation property {nav}")
        _one(conn, base, set_name, key)  # the parent must exist (and be published)
        target, single, keyfn = es.nav[nav]
        if single:
            return _shape(conn, base, target, _one(conn, base, target, keyfn(key)), expand, select)
        return _collection(conn, base, target, keyfn(key), top, skip, qs, expand, select)
    return _shape(conn, base, set_name, _one(conn, base, set_name, key), expand, select)


def _one(conn: Any, base: str, set_name: str, key: Key) -> dict[str, Any]:
    entity = next(iter(SETS[set_name].rows(conn, base, key, 1, 0)), None)
    if entity is None:
        raise StaError(404, f"no such {set_name} entity")
    return entity


def _collection(conn: Any, base: str, set_name: str, key: Key, top: int, skip: int, qs: dict[str, str],
                expand: list[str], select: list[str]) -> dict[str, Any]:
    """A page whose ``value`` is written entity by entity as the rows come (receiver/jsonstream.py);
    ``@iot.nextLink`` follows it, once it is known whether a row beyond ``$top`` came."""
    es = SETS[set_name]
    for nav in expand:  # checked before the first byte: a streamed answer cannot turn into a 400
        if nav not in es.nav:
            raise StaError(400, f"cannot $expand {nav} on {set_name}")
    out: dict[str, Any] = {}
    if qs.get("$count", "").lower() == "true":
        out["@iot.count"] = es.count(conn, key)
    rows = iter(es.rows(conn, base, key, top + 1, skip))  # one more tells whether there is a next page
    head = list(itertools.islice(rows, 1))  # runs the query now, so a failing store is a status, not a cut
    more = False

    def values() -> Iterator[dict[str, Any]]:
        nonlocal more
        for i, r in enumerate(itertools.chain(head, rows)):
            if i == top:
                more = True
                return
            yield _shape(conn, base, set_name, r, expand, select)

    def next_link() -> Any:
        if not more:
            return OMIT
        nxt = {k: v for k, v in qs.items()}
        nxt["$skip"] = str(skip + top)
        nxt["$top"] = str(top)
        return f"{base}/{set_name}?{urlencode(nxt)}"

    out["value"] = values()
    out["@iot.nextLink"] = Later(next_link)
    return out


def _shape(conn: Any, base: str, set_name: str, entity: dict[str, Any], expand: list[str],
           select: list[str]) -> dict[str, Any]:
    es = SETS[set_name]
    for nav in expand:
        if nav not in es.nav:
            raise StaError(400, f"cannot $expand {nav} on {set_name}")
        target, single, keyfn = es.nav[nav]
        key = es.parse(entity["@iot.id"])
        if single:  # None rather than a 404 in the middle of a streamed page
            entity[nav] = next(iter(SETS[target].rows(conn, base, keyfn(key), 1, 0)), None)
        else:
            entity[nav] = list(SETS[target].rows(conn, base, keyfn(key), DEFAULT_TOP, 0))
    if select:
        entity = {k: v for k, v in entity.items() if k in select or k.split("@")[0] in select}
    return entity


def _int_option(qs: dict[str, str], name: str, default: int) -> int:
    # A fixed pattern, not int(): that takes "-1", " 7", "1_0", other scripts' digits and 4,000 digits.
    if name not in qs:
        return default
    if not _NUMBER.fullmatch(qs[name]):
        raise StaError(400, f"{name} must be a non-negative whole number (at most 15 digits)")
    return int(qs[name])
