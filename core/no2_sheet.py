"""Alphasense NO2-B43F calibration sheets and the AAN 803 arithmetic on them.

Pure (no I/O but reading a sheet file): the van's NO2 driver (drivers/no2.py) and the
receiver's re-derivation (receiver/calibration.py) must compute the same ppb from the same
sheet, so the arithmetic lives below both.

AAN 803 temperature corrections, with WEu/AEu the raw electrode outputs (mV),
WEe/AEe the board's electronic zeros, WEo/AEo the sensor zeros (calibration
sheet of that serial number):

1. WEc = (WEu - WEe) - n_T (AEu - AEe)                 (Alphasense's choice for NO2)
2. WEc = (WEu - WEe) - k_T (WEo / AEo) (AEu - AEe)
3. WEc = (WEu - WEe) - (WEo - AEo) - k'_T (AEu - AEe)
4. WEc = (WEu - WEe) - WEo - k''_T

ppb = WEc / (sensitivity nA/ppb x board gain mV/nA). Both factors are negative
for NO2, so the product is positive.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError

# B4 NO2 factors from AAN 803 at these temperatures (°C).
TABLE_TEMPS_C: tuple[float, ...] = (-30, -20, -10, 0, 10, 20, 30, 40, 50)
N_T: tuple[float, ...] = (1.3, 1.3, 1.3, 1.3, 1.0, 0.6, 0.4, 0.2, -1.5)
K_T: tuple[float, ...] = (2.2, 2.2, 2.2, 2.2, 1.7, 1.0, 0.7, 0.3, -2.5)
K1_T: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.4, -0.1, -4.0)  # k'_T
K2_T: tuple[float, ...] = (7, 7, 7, 7, 4, 0, 0.5, 5, 67)  # k''_T, in mV

ALGORITHMS = (1, 2, 3, 4)
_TABLE_FOR_ALGORITHM = {1: N_T, 2: K_T, 3: K1_T, 4: K2_T}


def interpolate_factor(
    temp_c: float, table: Sequence[float], temps: Sequence[float] = TABLE_TEMPS_C
) -> float:
    """Linear interpolation in ``table`` at ``temp_c``; clamped to the end values outside.

    Clamping rather than extrapolating: AAN 803 gives no factors outside
    -30..50 °C and the 40->50 °C slope (e.g. k''_T 5 -> 67) would explode.
    """
    if math.isnan(temp_c):
        raise ValueError("temperature is NaN")
    if temp_c <= temps[0]:
        return float(table[0])
    if temp_c >= temps[-1]:
        return float(table[-1])
    for i in range(1, len(temps)):
        if temp_c <= temps[i]:
            t0, t1 = temps[i - 1], temps[i]
            f0, f1 = table[i - 1], table[i]
            return f0 + (f1 - f0) * (temp_c - t0) / (t1 - t0)
    raise AssertionError("unreachable: temps must be increasing")


@dataclass(frozen=True, slots=True)
class No2Calibration:
    """One sensor's calibration-sheet record (Alphasense ISB), keyed by serial number."""

    serial: str
    we_e_mv: float  # WEe: working-electrode electronic zero of the board
    ae_e_mv: float  # AEe: auxiliary-electrode electronic zero
    we_o_mv: float  # WEo: working-electrode sensor zero
    ae_o_mv: float  # AEo: auxiliary-electrode sensor zero
    sensitivity_na_per_ppb: float  # WE sensitivity (negative for NO2)
    gain_mv_per_na: float  # ISB board gain (negative for NO2)

    def __post_init__(self) -> None:
        if self.sensitivity_mv_per_ppb == 0 or not math.isfinite(self.sensitivity_mv_per_ppb):
            raise ConfigError(
                f"no2.calibration.{self.serial}", "sensitivity x gain must be finite and non-zero"
            )

    @property
    def sensitivity_mv_per_ppb(self) -> float:
        return self.sensitivity_na_per_ppb * self.gain_mv_per_na

    @classmethod
    def from_mapping(cls, serial: str, table: Mapping[str, Any]) -> No2Calibration:
        """Build from a dict / TOML table.

        Keys: ``we_e_mv``, ``ae_e_mv``, ``sensitivity_na_per_ppb``, ``gain_mv_per_na``
        and either the sensor zeros ``we_o_mv``/``ae_o_mv`` or the sheet's total
        zeros ``we_t_mv``/``ae_t_mv`` (sensor zero = total zero - electronic zero).
        """
        key = f"no2.calibration.{serial}"

        def num(name: str) -> float:
            if name not in table:
                raise ConfigError(f"{key}.{name}", "missing")
            value = table[name]
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or not math.isfinite(value):
                raise ConfigError(f"{key}.{name}", f"must be a finite number, not {value!r}")
            return float(value)

        we_e, ae_e = num("we_e_mv"), num("ae_e_mv")
        if "we_o_mv" in table or "ae_o_mv" in table:
            we_o, ae_o = num("we_o_mv"), num("ae_o_mv")
        elif "we_t_mv" in table or "ae_t_mv" in table:
            we_o, ae_o = num("we_t_mv") - we_e, num("ae_t_mv") - ae_e
        else:
            raise ConfigError(f"{key}.we_o_mv", "missing (give we_o_mv/ae_o_mv or we_t_mv/ae_t_mv)")
        return cls(
            serial=str(table.get("serial", serial)),
            we_e_mv=we_e,
            ae_e_mv=ae_e,
            we_o_mv=we_o,
            ae_o_mv=ae_o,
            sensitivity_na_per_ppb=num("sensitivity_na_per_ppb"),
            gain_mv_per_na=num("gain_mv_per_na"),
        )


def load_calibrations(tables: Mapping[str, Mapping[str, Any]]) -> dict[str, No2Calibration]:
    """``{serial: {...}}`` (e.g. a TOML ``[no2.calibration]`` table) -> records by serial."""
    return {str(s): No2Calibration.from_mapping(str(s), t) for s, t in tables.items()}


def load_calibrations_toml(
    path: str | Path, table: str = "no2.calibration"
) -> dict[str, No2Calibration]:
    """Read the records from a TOML file, under the dotted ``table`` path."""
    with open(path, "rb") as fh:
        doc: Any = tomllib.load(fh)
    for part in table.split("."):
        if not isinstance(doc, Mapping) or part not in doc:
            raise ConfigError(table, f"no such table in {path}")
        doc = doc[part]
    return load_calibrations(doc)


def corrected_we_mv(
    we_mv: float, ae_mv: float, temp_c: float, cal: No2Calibration, algorithm: int = 1
) -> float:
    """WEc in mV by AAN 803 algorithm 1..4 (see the module docstring)."""
    we = we_mv - cal.we_e_mv
    ae = ae_mv - cal.ae_e_mv
    if algorithm == 1:
        return we - interpolate_factor(temp_c, N_T) * ae
    if algorithm == 2:
        if cal.ae_o_mv == 0:
            raise ValueError("algorithm 2 needs a non-zero AEo")
        return we - interpolate_factor(temp_c, K_T) * (cal.we_o_mv / cal.ae_o_mv) * ae
    if algorithm == 3:
        return we - (cal.we_o_mv - cal.ae_o_mv) - interpolate_factor(temp_c, K1_T) * ae
    if algorithm == 4:
        return we - cal.we_o_mv - interpolate_factor(temp_c, K2_T)
    raise ValueError(f"AAN 803 algorithm must be 1..4, not {algorithm!r}")


def no2_ppb(
    we_mv: float, ae_mv: float, temp_c: float, cal: No2Calibration, algorithm: int = 1
) -> float:
    """NO2 in ppb from raw WE/AE millivolts at ``temp_c``. Pure: no I/O, no state."""
    return corrected_we_mv(we_mv, ae_mv, temp_c, cal, algorithm) / cal.sensitivity_mv_per_ppb
