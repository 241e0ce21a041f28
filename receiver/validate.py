"""The receiver's admission schema: what a decoded upload may hold before it touches the store.

The wire decoders (uplink/wire.py, uplink/codec_v2.py) check structure: the
bytes form a batch. This module checks the *domain*: every number, text and
time is one both stores can hold, read back and compute with. Anything else is
a ``PayloadError`` with the reason, so the upload is dead-lettered, never
half-stored and never mistaken for a store failure.

Why each bound (docs/wire-format.md, "What the receiver accepts", lists them):

* integers (seq, times, integer values) within signed 64 bits: the columns are
  ``bigint``/SQLite integers, and ``orjson`` (which reads the values back for
  every later batch's moving windows) reads 64-bit integers only. A stored
  10^309 read back as an infinite double and made the van's *next* batch fail;
  nothing outside these bounds is stored, so nothing stored can do that.
* floats finite and |x| <= 1e15: JSON has no NaN or infinity, and no sensor
  measures beyond 1e15 in any unit; derived arithmetic (means, slopes,
  interpolation) on such values stays finite.
* text without NUL (PostgreSQL text and jsonb refuse it) and valid Unicode (a
  lone surrogate cannot be encoded as UTF-8), of bounded length; names
  (device, epoch, sensor, keys, flags, boot id) printable and short.
* JSON carried inside a value (a calibration record) or as a status nests at
  most ``MAX_JSON_DEPTH`` deep: parsers recurse.
* a calibration record (sensor ``calibration``, value ``record``) has the fields
  and types derivation needs (receiver/calibration_check.py): a stored record
  with ``"algorithm": null`` made every later NO2 batch of its van fail.
* GPS fix fields in their physical range: they become ``fixes`` and
  ``positions`` rows (``double precision``, ``integer`` for the quality).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from edge.calibration import CALIBRATION_SENSOR
from edge.errors import PayloadError
from receiver.calibration_check import check_record
from uplink.codec_v2 import INT64_MAX, INT64_MIN
# The bounds a van's values must keep live with the wire format, so the device's buffer can
# refuse at commit what the receiver would refuse here (one such value costs its whole batch).
from uplink.wire import MAX_ABS_FLOAT, MAX_KEYS_PER_SAMPLE, MAX_NAME_CHARS, MAX_TEXT_CHARS, Batch

MAX_FLAGS_PER_SAMPLE = 64
MAX_GAPS_PER_BATCH = 10_000
MAX_JSON_DEPTH = 32  # JSON text inside a value, and status messages
MAX_STATUS_ITEMS = 4_000  # scalars and containers in one status message
MAX_SHOWN = 40  # characters of a hostile name quoted back in a reason

GPS_SENSOR = "gps"
# Fix fields: (lowest, highest, must be a whole number). None is always allowed (no fix).
FIX_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "lat": (-90.0, 90.0, False),
    "lon": (-180.0, 180.0, False),
    "speed": (0.0, 1000.0, False),  # m/s; anything above is a glitch, but one a float holds
    "course": (0.0, 360.0, False),
    "alt": (-1000.0, 100_000.0, False),  # m
    "hdop": (0.0, 100.0, False),  # NMEA caps it at 99.99
    "fix_quality": (0, 9, True),  # GGA quality indicator; an ``integer`` column
    "fix_mode": (0, 3, True),
    "sats_used": (0, 255, True),
    "sats_in_view": (0, 255, True),
}


def show(text: object) -> str:
    """A hostile name quoted in a reason: short, and with NUL and control characters escaped."""
    r = repr(text)
    return r if len(r) <= MAX_SHOWN else r[: MAX_SHOWN - 3] + "..."


def check_int(v: object, what: str, lo: int = INT64_MIN, hi: int = INT64_MAX) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise PayloadError(f"{what} must be an integer")
    if not lo <= v <= hi:
        # The bounds, not the value: a 4,000-digit number must not come back in the reason.
        raise PayloadError(f"{what} outside {lo}..{hi}")


def check_float(v: float, what: str) -> None:
    if not math.isfinite(v):
        raise PayloadError(f"{what} is not a finite number")
    if abs(v) > MAX_ABS_FLOAT:
        raise PayloadError(f"{what} beyond +-{MAX_ABS_FLOAT:g}")


def check_name(s: object, what: str, *, forbid: str = "") -> None:
    """A short printable identifier (printable excludes NUL, controls and lone surrogates)."""
    if not isinstance(s, str):
        raise PayloadError(f"{what} must be a string")
    if not s or len(s) > MAX_NAME_CHARS:
        raise PayloadError(f"{what} must have 1 to {MAX_NAME_CHARS} characters")
    if not s.isprintable() or any(c in s for c in forbid):
        raise PayloadError(f"{what} {show(s)} has a character that is not allowed")


def check_text(s: str, what: str, limit: int = MAX_TEXT_CHARS) -> None:
    """Free text: any printable or whitespace characters, no NUL, valid Unicode, bounded."""
    if len(s) > limit:
        raise PayloadError(f"{what} longer than {limit} characters")
    if "\x00" in s:
        raise PayloadError(f"{what} contains a NUL character")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadError(f"{what} is not valid Unicode (a lone surrogate)") from exc
    if (s[:1] in ("{", "[") and s.count("[") + s.count("{") > MAX_JSON_DEPTH  # (cheap, in C)
            and json_depth(s, MAX_JSON_DEPTH) > MAX_JSON_DEPTH):
        raise PayloadError(f"{what} is JSON nested more than {MAX_JSON_DEPTH} deep")


def json_depth(text: str, limit: int | None = None) -> int:
    """How deep JSON text nests (brackets outside strings, closed or not: a parser recurses on
    the way in), without parsing it. Stops as soon as it passes ``limit``."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if limit is not None and depth > limit:
                    break
        elif ch in "]}":
            depth -= 1
    return deepest


def _check_value(sensor: str, key: str, v: Any) -> None:
    what = f"value {show(key)} of {show(sensor)}"
    if v is None or isinstance(v, bool):
        pass
    elif isinstance(v, int):
        check_int(v, what)
    elif isinstance(v, float):
        check_float(v, what)
    elif isinstance(v, str):
        check_text(v, what)
    else:
        raise PayloadError(f"{what} must be a number, a string, a boolean or null")
    if sensor == GPS_SENSOR and key in FIX_BOUNDS and v is not None:
        lo, hi, whole = FIX_BOUNDS[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PayloadError(f"fix field {key!r} must be a number")
        if not lo <= v <= hi or whole and v != int(v):
            tail = " or not whole" if whole else ""
            raise PayloadError(f"fix field {key!r} outside {lo:g}..{hi:g}{tail}")


def check_batch(batch: Batch) -> Batch:
    """The batch itself if every field is within the domain bounds; else ``PayloadError``.

    On the path of every upload, so the common case is cheap: a name (sensor, key,
    flag ...) is checked once per batch, and a plain int or float in range costs
    one chained comparison (NaN and infinity fail it too); anything else takes
    the slow path, which names the problem.
    """
    check_name(batch.device, "device", forbid="/+#")
    check_name(batch.epoch, "epoch", forbid="/")
    check_int(batch.first_seq, "first_seq", 1)
    check_int(batch.last_seq, "last_seq", 1)
    names: set[str] = set()  # checked already in this batch
    texts: set[str] = set()
    flags: set[str] = set()  # apart from names: a flag has a rule of its own (no comma)

    def name(s: str, what: str, forbid: str = "") -> None:
        if s not in names:
            check_name(s, what, forbid=forbid)
            names.add(s)

    lo_i, hi_i, big = INT64_MIN, INT64_MAX, MAX_ABS_FLOAT
    for s in batch.samples:
        if not (type(s.seq) is int and 1 <= s.seq <= hi_i):
            check_int(s.seq, "seq", 1)
        if s.sensor not in names:
            name(s.sensor, "sensor")
        t = s.t_utc_ms
        # Plausibility (year, future) is the store's screen: such a time becomes
        # unknown and flagged, the sample is kept. Only what no column holds is refused.
        if t is not None and not (type(t) is int and lo_i <= t <= hi_i):
            check_int(t, "t_utc_ms")
        if not (type(s.t_mono_ms) is int and 0 <= s.t_mono_ms <= hi_i):
            check_int(s.t_mono_ms, "t_mono_ms", 0)
        if s.time_src not in names:
            name(str(s.time_src), "time_src")
        if s.boot_id and s.boot_id not in names:
            name(s.boot_id, "boot id")
        if len(s.flags) > MAX_FLAGS_PER_SAMPLE:
            raise PayloadError(f"more than {MAX_FLAGS_PER_SAMPLE} flags on one sample")
        for f in s.flags:
            if f not in flags:
                check_name(f, "flag", forbid=",")  # stored comma-joined
                flags.add(f)
        if len(s.values) > MAX_KEYS_PER_SAMPLE:
            raise PayloadError(f"more than {MAX_KEYS_PER_SAMPLE} values in one sample")
        gps = s.sensor == GPS_SENSOR
        for key, v in s.values.items():
            if key not in names:
                check_name(key, "value key")
                names.add(key)
            tv = type(v)
            if gps and key in FIX_BOUNDS:
                lo, hi, whole = FIX_BOUNDS[key]
                number = tv is float or tv is int
                if not (v is None or number and lo <= v <= hi and (not whole or v == int(v))):
                    _check_value(s.sensor, key, v)
            elif tv is str:
                if v not in texts:  # version 2 shares one string among samples: check it once
                    _check_value(s.sensor, key, v)
                    texts.add(v)
            elif not (v is None or tv is float and -big <= v <= big or tv is int and lo_i <= v <= hi_i):
                _check_value(s.sensor, key, v)
        if s.sensor == CALIBRATION_SENSOR and type(s.values.get("record")) is str:
            check_record(s.values["record"])  # a record derivation cannot use is refused here
    if len(batch.gaps) > MAX_GAPS_PER_BATCH:
        raise PayloadError(f"more than {MAX_GAPS_PER_BATCH} gaps in one batch")
    for g in batch.gaps:
        check_int(g.first_seq, "gap first_seq", 1)
        check_int(g.last_seq, "gap last_seq", 1)
        check_text(g.reason, "gap reason", MAX_NAME_CHARS * 8)
    return batch


def check_status(status: dict[str, Any]) -> dict[str, Any]:
    """A heartbeat as decoded JSON: bounded depth and size, store-safe scalars; else ``PayloadError``."""
    items = 0
    todo: list[tuple[Any, int]] = [(status, 1)]
    while todo:
        node, depth = todo.pop()
        items += 1
        if items > MAX_STATUS_ITEMS:
            raise PayloadError(f"status has more than {MAX_STATUS_ITEMS} items")
        if isinstance(node, dict):
            if depth > MAX_JSON_DEPTH:
                raise PayloadError(f"status nested more than {MAX_JSON_DEPTH} deep")
            for k in node:
                check_text(k, "status key", MAX_NAME_CHARS)
            todo += ((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            if depth > MAX_JSON_DEPTH:
                raise PayloadError(f"status nested more than {MAX_JSON_DEPTH} deep")
            todo += ((v, depth + 1) for v in node)
        elif isinstance(node, str):
            check_text(node, "status text", 1024)
        elif isinstance(node, float):
            check_float(node, "status number")
        elif isinstance(node, int) and not isinstance(node, bool):
            check_int(node, "status number")
    return status


def clean_ids(ids: Iterable[object], limit: int = 4 * MAX_NAME_CHARS) -> list[str]:
    """The batch ids of a sync request any store can look up; others cannot be ours and are dropped."""
    return [i for i in ids if isinstance(i, str) and 0 < len(i) <= limit and i.isprintable()]
