"""Is a calibration record one the receiver can keep and derive with? One check, both sides.

Here (not in receiver/) so the van runs the very same rules: ``CalibrationStore.add``
refuses a record that fails them, and the buffer's commit check (``core.sample_rules``)
sets aside a calibration sample carrying one, instead of a whole batch being refused at
the receiver and the record re-announced at every start (issue 14 re-test).
receiver/calibration_check.py re-exports it under its old name.

``CalibrationRecord.from_dict`` coerces (``str()``, ``int()``, ``dict()``) and leaves the
``values`` unchecked, so a record with ``"algorithm": null`` or ``"slope": [1]`` used to be
stored, and every later NO2 batch of that van then failed deriving with a TypeError
(issue 13 point 2). This is the one check of a record's fields and types: the admission
schema (receiver/validate.py) rejects an upload carrying a record that fails it, and
derivation (receiver/calibration.py) skips a *stored* record that fails it (one stored
before this check existed), so nothing stored can poison a later batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from core.calibration import PM_HOUSING, CalibrationRecord, housing_warming_problem, no2_ppb_from_record
from core.errors import PayloadError
from core.no2_sheet import ALGORITHMS, TABLE_TEMPS_C
from core.codec_v2 import INT64_MAX
# The admission schema's float bound (receiver/validate.py), kept with the wire format.
from core.wire import MAX_ABS_FLOAT as MAX_ABS_NUMBER

MAX_ABS_TIME_S = 1e11  # UTC seconds (year ~5100): x1000 must fit a bigint millisecond column
_TEXT_FIELDS = ("id", "kind", "serial", "method", "status")
# Numeric parameters per kind (absent = the default in edge/calibration.py).
_NUMBERS = {
    "no2": ("we_e_mv", "ae_e_mv", "we_o_mv", "ae_o_mv", "we_t_mv", "ae_t_mv", "sensitivity_na_per_ppb",
            "gain_mv_per_na", "intercept_ppb", "slope", "temp_coef_ppb_per_c"),
    "pm": ("intercept", "slope", "rh_coef", "temp_coef"),
    "noise": ("offset_db",),
    PM_HOUSING: ("warming_c",),
}
_PM_TEXTS = ("quantity", "input")
# Trial conversions: at ordinary electrode readings (a sheet that cannot convert these, a zero
# sensitivity or gain, algorithm 2 with AEo = 0, cannot convert anything) and at the ends of
# the ADC's range (ADS1115, +-6.144 V) and of the operating temperatures: a sheet whose ppb
# there is not a number the store can hold (a sensitivity of 1e-300 gives ~1e303 ppb) would
# leave NO2 uncalibrated, or poison the van's derived rows, at the first real reading.
# ppb is linear in WE and AE at a given temperature and piecewise linear in the temperature
# (the factor tables' breakpoints, clamped beyond), so its extremes over the range lie at
# the corners: every (WE, AE) corner at every breakpoint, -40 C and 85 C. Two corners only let a
# sheet giving -1.21e15 ppb at WE = AE = -6144 mV through (issue 13 re-test, v1).
_ADC_MV = 6144.0
# The raw inputs' physical ranges: receiver/calibration.py derives nothing beyond them.
ADC_FULL_SCALE_MV = _ADC_MV
TEMP_RANGE_C = (-40.0, 85.0)  # the board's operating temperatures (the trials' ends, below)
# 85 C: the top of the board's operating range; the temperature term keeps growing past the
# tables' last breakpoint (outside-test v1 found a sheet in bound at 50 C and beyond at 53 C).
_TRIALS = ((300.0, 300.0, 20.0), *((we, ae, t) for t in (TEMP_RANGE_C[0], *TABLE_TEMPS_C,
                                                            TEMP_RANGE_C[1])
                                   for we in (-_ADC_MV, _ADC_MV) for ae in (-_ADC_MV, _ADC_MV)))
# The smallest sensitivity (nA/ppb) or gain (mV/nA) taken: real ones are ~0.2-0.8; a subnormal
# or 1e-300 is a broken sheet (issue 13 re-test), not a sensor.
MIN_ABS_SCALE = 1e-6
_SCALES = ("sensitivity_na_per_ppb", "gain_mv_per_na")


def _number(v: Any, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PayloadError(f"calibration record {what} must be a number, not {type(v).__name__}")
    if not math.isfinite(v) or abs(v) > MAX_ABS_NUMBER:
        raise PayloadError(f"calibration record {what} is not a finite number within +-{MAX_ABS_NUMBER:g}")


def _time(d: Mapping[str, Any], key: str) -> None:
    v = d.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > MAX_ABS_TIME_S:
        raise PayloadError(f"calibration record {key} must be null or UTC seconds within +-{MAX_ABS_TIME_S:g}")


def _values(kind: str, values: Mapping[str, Any]) -> None:
    for key in _NUMBERS[kind]:
        if key in values:
            _number(values[key], f"value {key}")
    if kind == "pm":
        for key in _PM_TEXTS:
            if key in values and not isinstance(values[key], str):
                raise PayloadError(f"calibration record value {key} must be text")
    if kind == PM_HOUSING and (problem := housing_warming_problem(values)):
        raise PayloadError(f"calibration record {problem}")
    if kind != "no2":
        return
    if "algorithm" in values:
        alg = values["algorithm"]
        if isinstance(alg, bool) or not isinstance(alg, int) or alg not in ALGORITHMS:
            raise PayloadError(f"calibration record algorithm must be one of {ALGORITHMS}")
    for key in _SCALES:
        v = values.get(key)
        if isinstance(v, (int, float)) and abs(v) < MIN_ABS_SCALE:
            raise PayloadError(f"calibration record value {key} {v:g} is below {MIN_ABS_SCALE:g} in magnitude")
    for trial in _TRIALS:
        try:
            ppb = no2_ppb_from_record(values, *trial)
        except Exception as exc:  # noqa: BLE001 - whatever the sheet does wrong, it is this record's fault
            raise PayloadError(f"calibration record cannot convert NO2: {type(exc).__name__}: {exc}"[:200]) from exc
        if not math.isfinite(ppb) or abs(ppb) > MAX_ABS_NUMBER:
            raise PayloadError(f"calibration record converts NO2 to {ppb:g} ppb, not a finite number"
                               f" within +-{MAX_ABS_NUMBER:g}")


def check_record(text: str | bytes) -> CalibrationRecord:
    """The record if it has the fields and types ``CalibrationRecord`` and derivation need; else PayloadError."""
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise PayloadError(f"calibration record is not JSON: {exc}"[:200]) from exc
    if not isinstance(d, dict):
        raise PayloadError("calibration record is not a JSON object")
    for key in _TEXT_FIELDS:
        if key in d and not isinstance(d[key], str):
            raise PayloadError(f"calibration record {key} must be text")
    version = d.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= INT64_MAX:
        raise PayloadError(f"calibration record version must be an integer 1..{INT64_MAX}")
    for key in ("valid_from", "valid_to", "created"):
        _time(d, key)
    if d.get("valid_from") is not None and d.get("valid_to") is not None and d["valid_to"] < d["valid_from"]:
        # An interval that ends before it starts is a broken record. An empty one (valid_to ==
        # valid_from) is not: it is how a record is retracted whole, when a correction takes over
        # from its very start (the van closes the old record where the new one begins).
        raise PayloadError("calibration record valid_to is before its valid_from")
    if d.get("values") is not None and not isinstance(d["values"], dict):
        raise PayloadError("calibration record values must be a JSON object")
    try:
        rec = CalibrationRecord.from_dict(d)
    except ValueError as exc:
        raise PayloadError(str(exc)[:200]) from exc
    _values(rec.kind, rec.values)
    return rec
