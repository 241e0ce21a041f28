"""Calibration records with provenance, and the arithmetic a record defines.

Pure: the van (edge/calibration.py keeps the store, the sheet import and the calibrated
drivers) and the receiver (receiver/calibration.py) compute the same values from the same
record, so both build on this module.

A sensor's calibration is a chain of versioned records per (kind, serial):

* ``kind``   ``no2`` | ``pm`` | ``noise`` | ``pm_housing``
* ``method`` ``sheet`` | ``zero`` | ``span`` | ``colocation`` | ``acoustic`` | ``humidity`` | ``warming``
* ``status`` ``pending`` (proposed, has no effect) -> ``active`` (confirmed) ->
  ``superseded`` (a newer record of the same serial was confirmed; ``valid_to`` set).

The record id is also the provenance tag a derived value carries: ``no2:202-SIM-0001:v3``.
Every record holds the *complete* parameter set for its sensor (not a delta), so one id
is enough to recompute a value from its raw inputs, on the van or at the receiver.

NO2 values: the Alphasense sheet (``we_e_mv`` ``ae_e_mv`` ``we_o_mv`` ``ae_o_mv``
``sensitivity_na_per_ppb`` ``gain_mv_per_na``), the AAN 803 ``algorithm`` and a linear
finish ``ppb = intercept_ppb + slope * aan803 + temp_coef * T`` (zero, span and co-location
adjust the finish, never the sheet). PM values: ``quantity`` (default ``pm25``) and
``intercept``, ``slope``, ``rh_coef``, ``temp_coef`` on the input ``input`` (default the
quantity itself). Noise values: ``offset_db`` (the absolute meter calibration offset).
PM housing values (kind ``pm_housing``, method ``warming``): ``warming_c``, how much the PM
sensor's enclosure warms the air it samples above ambient, measured once per enclosure by a
technician (``edge pm housing``); the receiver takes the van's ambient RH to the housing's
temperature with it before undoing hygroscopic growth (receiver/pm_derive.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from core.errors import ConfigError
from core.no2_sheet import No2Calibration, no2_ppb

KINDS = ("no2", "pm", "noise", "pm_housing")
METHODS = ("sheet", "zero", "span", "colocation", "acoustic", "humidity", "warming")
PM_HOUSING = "pm_housing"
#: A PM housing's plausible warming above ambient, degC: a fan-ventilated enclosure beside
#: the electronics warms its air by ~0.5-3 degC; below 0 or above 10 is a wrong probe or a typo.
HOUSING_WARMING_RANGE_C = (0.0, 10.0)
PENDING, ACTIVE, SUPERSEDED = "pending", "active", "superseded"
STATUSES = (PENDING, ACTIVE, SUPERSEDED)
SHEET_KEYS = ("we_e_mv", "ae_e_mv", "we_o_mv", "ae_o_mv", "sensitivity_na_per_ppb", "gain_mv_per_na")
CALIBRATION_SENSOR = "calibration"  # the sample "sensor" records travel under


class CalibrationError(Exception):
    """A calibration step that cannot go ahead; nothing was changed."""


class CalibrationUnavailable(Exception):
    """The record a sensor needs cannot be read (damaged file or row): its values go out
    uncalibrated, flagged ``cal_unavailable``; the van keeps measuring."""


class DamagedRecord(CalibrationUnavailable):
    """A stored record row that is no record (damaged JSON): warned about and counted."""


def record_id(kind: str, serial: str, version: int) -> str:
    """The id a record has, and the provenance tag its derived values carry."""
    return f"{kind}:{serial}:v{version}"


@dataclass(frozen=True, slots=True)
class CalibrationRecord:
    """One version of one sensor's calibration (see the module docstring)."""

    id: str
    kind: str
    serial: str
    version: int
    technician: str
    method: str
    values: dict[str, Any]
    valid_from: float | None  # UTC seconds; None = from confirmation
    valid_to: float | None = None
    created: float = 0.0
    supersedes: str | None = None
    status: str = PENDING
    device: str = ""
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> CalibrationRecord:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("a calibration record is a JSON object")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibrationRecord:
        try:
            rec = cls(
                id=str(d["id"]), kind=str(d["kind"]), serial=str(d["serial"]), version=int(d["version"]),
                technician=str(d.get("technician", "")), method=str(d["method"]),
                values=dict(d.get("values") or {}),
                valid_from=_opt_float(d.get("valid_from")), valid_to=_opt_float(d.get("valid_to")),
                created=float(d.get("created") or 0.0), supersedes=d.get("supersedes") or None,
                status=str(d.get("status", PENDING)), device=str(d.get("device", "")),
                note=str(d.get("note", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a calibration record: {exc}") from exc
        if rec.kind not in KINDS or rec.method not in METHODS or rec.status not in STATUSES:
            raise ValueError(f"not a calibration record: kind/method/status {rec.kind}/{rec.method}/{rec.status}")
        return rec

    def in_effect_at(self, t: float) -> bool:
        """Was this record the one in effect at UTC ``t``? Pending records never are."""
        if self.status == PENDING or self.valid_from is None:
            return False
        return self.valid_from <= t and (self.valid_to is None or t < self.valid_to)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def provenance(record: CalibrationRecord | None) -> str | None:
    """The tag a derived value carries (the record id), or None when uncalibrated."""
    return None if record is None else record.id


def housing_warming_problem(values: Mapping[str, Any]) -> str | None:
    """Why a ``pm_housing`` record's values are refused (None: they are fine). One rule, both sides."""
    w = values.get("warming_c")
    lo, hi = HOUSING_WARMING_RANGE_C
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not (lo <= float(w) <= hi):
        return (f"a PM housing's warming must be a number of degC in [{lo:g}, {hi:g}], got {w!r}"
                " (measure the housing's air against ambient with one probe)")
    return None


# -- NO2: sheets and the conversion a record defines --------------------------------------

def no2_sheet(values: Mapping[str, Any], serial: str = "") -> No2Calibration:
    try:
        return No2Calibration.from_mapping(serial or str(values.get("serial", "?")), values)
    except ConfigError as exc:
        raise CalibrationError(str(exc)) from exc


def no2_values_from_sheet(cal: No2Calibration, algorithm: int = 1) -> dict[str, Any]:
    """A full NO2 value set from a sheet, with a neutral finish (no zero/span applied)."""
    return {
        "we_e_mv": cal.we_e_mv, "ae_e_mv": cal.ae_e_mv, "we_o_mv": cal.we_o_mv, "ae_o_mv": cal.ae_o_mv,
        "sensitivity_na_per_ppb": cal.sensitivity_na_per_ppb, "gain_mv_per_na": cal.gain_mv_per_na,
        "algorithm": algorithm, "intercept_ppb": 0.0, "slope": 1.0, "temp_coef_ppb_per_c": 0.0,
    }


def no2_raw_ppb(values: Mapping[str, Any], we_mv: float, ae_mv: float, temp_c: float) -> float:
    """AAN 803 ppb by the record's sheet and algorithm, before the zero/span finish."""
    return no2_ppb(we_mv, ae_mv, temp_c, no2_sheet(values), int(values.get("algorithm", 1)))


def no2_finish(values: Mapping[str, Any], raw_ppb: float, temp_c: float) -> float:
    return (
        float(values.get("intercept_ppb", 0.0))
        + float(values.get("slope", 1.0)) * raw_ppb
        + float(values.get("temp_coef_ppb_per_c", 0.0)) * temp_c
    )


def no2_ppb_from_record(values: Mapping[str, Any], we_mv: float, ae_mv: float, temp_c: float) -> float:
    """NO2 in ppb from raw electrode mV and temperature by one record: pure, used on both sides."""
    return no2_finish(values, no2_raw_ppb(values, we_mv, ae_mv, temp_c), temp_c)


# -- PM and noise: what a record does to a reading ----------------------------------------

EPA_PM25_HUMIDITY = {"quantity": "pm25", "input": "pm25_cf1", "intercept": 5.75, "slope": 0.524,
                     "rh_coef": -0.0862, "temp_coef": 0.0, "form": "US EPA 0.524·PM2.5(cf1) − 0.0862·RH + 5.75"}


def pm_corrected(values: Mapping[str, Any], reading: Mapping[str, Any]) -> float | None:
    """The corrected PM quantity by a pm record, or None if an input is missing."""
    x = reading.get(values.get("input") or values.get("quantity", "pm25"))
    if not isinstance(x, (int, float)):
        return None
    y = float(values.get("intercept", 0.0)) + float(values.get("slope", 1.0)) * float(x)
    for coef, keys in (("rh_coef", ("rh", "rh_pct")), ("temp_coef", ("temp_c", "t_c"))):
        c = float(values.get(coef, 0.0) or 0.0)
        if c:
            v = next((reading[k] for k in keys if isinstance(reading.get(k), (int, float))), None)
            if v is None:
                return None
            y += c * float(v)
    return max(0.0, y)


NOISE_LEVEL_KEYS = ("laeq", "lamax", "lamin", "la10", "la50", "la90", "laeq_1min",
                    # the sound module set to C or Z weighting (drivers/sound_module.level_keys)
                    "lceq", "lcmax", "lcmin", "lzeq", "lzmax", "lzmin")
