"""What one sample may hold to be stored: the one rule set the van and the receiver share.

The receiver's admission schema (receiver/validate.py) refuses a whole batch
for one sample outside these rules; the van's buffer checks the same rules at
commit (buffer/store.py ``_admit``) and sets such a sample aside alone, with
its bytes and a gap record, so the good samples around it still travel. One
function on both sides means they can never disagree (a property test holds
them to it: tests/test_sample_rules.py).

Why each bound (docs/wire-format.md, "What the receiver accepts", lists them):

* integers (seq, times, integer values) within signed 64 bits: the store's
  columns are ``bigint``/SQLite integers, and the receiver reads values back
  with ``orjson``, which reads 64-bit integers only;
* floats finite and |x| <= 1e15: JSON has no NaN or infinity, no sensor
  measures beyond 1e15 in any unit, derived arithmetic stays finite;
* text without NUL (PostgreSQL refuses it), valid Unicode, bounded; names
  (sensor, keys, flags, boot id, time source) printable and at most 128
  characters; a flag without a comma (the van stores flags comma-joined, so
  "a,b" would come back as two flags and an empty one would vanish);
* JSON carried inside a text value nests at most ``MAX_JSON_DEPTH`` deep
  (parsers recurse);
* GPS fix fields in their physical range (they become ``double``/``integer``
  columns of ``fixes`` and ``positions``).

Imports only what the wire format already uses (core.errors, core.sample) and
the van's own calibration rules: the van does not carry the receiver's code.
A calibration record's fields are checked by ``sample_problem`` (the van's
commit and sealing) with core/calibration_rules.py, the module the receiver's
admission schema calls too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from core.calibration import CALIBRATION_SENSOR
from core.calibration_rules import check_record
from core.errors import PayloadError
from core.sample import Sample, TimeSource
from core.codec_v2 import INT64_MAX, INT64_MIN
from core.wire import MAX_ABS_FLOAT, MAX_KEYS_PER_SAMPLE, MAX_NAME_CHARS, MAX_TEXT_CHARS

MAX_FLAGS_PER_SAMPLE = 64
MAX_JSON_DEPTH = 32  # JSON text inside a value, and status messages
MAX_SHOWN = 40  # characters of a hostile name quoted back in a reason
TIME_SOURCES = frozenset(t.value for t in TimeSource)  # the receiver decodes no other

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


# The receiver's bound on a gap reason (receiver/validate.py: ``check_text(g.reason, "gap
# reason", MAX_NAME_CHARS * 8)``): one over it refuses the whole batch carrying the gap.
MAX_GAP_REASON_CHARS = MAX_NAME_CHARS * 8


def gap_reason(reason: str) -> str:
    """``reason`` made to pass the receiver's gap check, keeping what it says.

    Lone surrogates and NUL escaped, a leading bracket (read as JSON, depth-checked) guarded,
    cut to the bound with "...". A gap record whose reason the receiver refuses would take every
    gap of its batch down with it (and of the replacement, which carries them again).
    """
    text = str(reason).encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    if text[:1] in ("{", "["):
        text = "reason: " + text  # plain text, not nested JSON the receiver would depth-check
    if len(text) > MAX_GAP_REASON_CHARS:
        text = text[: MAX_GAP_REASON_CHARS - 3] + "..."
    check_text(text, "gap reason", MAX_GAP_REASON_CHARS)  # the receiver's rule, exactly
    return text


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


@dataclass
class Seen:
    """Names and texts already checked in one batch: a batch repeats them in every sample."""

    names: set[str] = field(default_factory=set)
    texts: set[str] = field(default_factory=set)
    flags: set[str] = field(default_factory=set)  # apart from names: a flag has a rule of its own (no comma)


def check_sample(s: Sample, seen: Seen | None = None) -> None:
    """Raise ``PayloadError`` naming the first rule ``s`` breaks; None if it may be stored.

    On the receiver's path for every sample of every upload, so the common case
    is cheap: a name is checked once per ``seen`` (one per batch), a plain int
    or float in range costs one chained comparison (NaN and infinity fail it
    too); anything else takes the slow path, which names the problem.
    ``s.seq`` is checked when set (the van checks before numbering).
    """
    if seen is None:
        seen = Seen()
    names = seen.names
    lo_i, hi_i, big = INT64_MIN, INT64_MAX, MAX_ABS_FLOAT
    if s.seq is not None and not (type(s.seq) is int and 1 <= s.seq <= hi_i):
        check_int(s.seq, "seq", 1)
    if s.sensor not in names:
        check_name(s.sensor, "sensor")
        names.add(s.sensor)
    t = s.t_utc_ms
    # Plausibility (year, future) is the store's screen: such a time becomes
    # unknown and flagged, the sample is kept. Only what no column holds is refused.
    if t is not None and not (type(t) is int and lo_i <= t <= hi_i):
        check_int(t, "t_utc_ms")
    if not (type(s.t_mono_ms) is int and 0 <= s.t_mono_ms <= hi_i):
        check_int(s.t_mono_ms, "t_mono_ms", 0)
    src = str(s.time_src)
    if src not in TIME_SOURCES:  # the receiver decodes no other: refused at commit, not at sealing
        check_name(src, "time_src")
        raise PayloadError(f"unknown time source {show(src)}")
    if s.boot_id and s.boot_id not in names:
        check_name(s.boot_id, "boot id")
        names.add(s.boot_id)
    if len(s.flags) > MAX_FLAGS_PER_SAMPLE:
        raise PayloadError(f"more than {MAX_FLAGS_PER_SAMPLE} flags on one sample")
    for f in s.flags:
        if f not in seen.flags:
            check_name(f, "flag", forbid=",")  # stored comma-joined
            seen.flags.add(f)
    values = s.values
    if not isinstance(values, dict):
        raise PayloadError("values must be an object")
    if len(values) > MAX_KEYS_PER_SAMPLE:
        raise PayloadError(f"more than {MAX_KEYS_PER_SAMPLE} values in one sample")
    gps = s.sensor == GPS_SENSOR
    texts = seen.texts
    for key, v in values.items():
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


def sample_problem(s: Sample) -> str | None:
    """Why ``s`` could not be stored (the reason ``check_sample`` gives), or None if it can."""
    try:
        check_sample(s)
        if s.sensor == CALIBRATION_SENSOR and type(s.values.get("record")) is str:
            check_record(s.values["record"])  # as receiver/validate.py does: else the batch goes
    except PayloadError as exc:
        return str(exc)
    except TypeError as exc:  # a name that is not even hashable (a driver's bug): no sample either
        return f"malformed sample: {exc}"[:200]
    return None
