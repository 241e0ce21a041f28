"""Undo hygroscopic growth of optical PM: dry mass from the wet mass the sensor saw.

Pure functions, no I/O (receiver/pm_derive.py applies them to stored samples).

An optical PM sensor (PMS5003, SPS30 ...) counts particles in the air it draws, and at
high relative humidity those particles carry water: the reported mass grows with RH.
kappa-Koehler theory gives the wet/dry mass ratio of particles with hygroscopicity
``kappa`` at water activity a_w = RH/100 (Petters & Kreidenweis 2007, ACP 7, 1961),
as used for low-cost optical sensors by Crilley et al. 2018 (AMT 11, 709) and
Di Antonio et al. 2018 (Sensors 18, 2790):

    wet / dry = 1 + (kappa / rho) * a_w / (1 - a_w)

``rho`` = 1.65 is the dry particles' density relative to water (Crilley et al.'s value).
The RH is the one the particles grew at: the RH the PM sample carries (its housing's BME280,
warmed a little above ambient), else the van's RH measured closest in time, within 30 s
(the same reading the ``humid`` flag uses, receiver/quality.py). That RH is in a shipped van
the DGS-NO2's ambient one, higher than the warmed housing's: :func:`housing_rh` takes it to the
housing's temperature (Magnus) given the housing's measured warming, which the receiver applies
from the van's ``pm_housing`` calibration record (receiver/pm_derive.py ``Housing``; docs/fidelity.md
"Shipped (sixth version)"). An impossible RH (outside 0..100 %) is never converted.

Defaults for kappa (docs/fidelity.md, docs/datalab.md): 0.22 for the fine fraction (PM1,
PM2.5), the middle of 0.15-0.29 for urban PM2.5, and 0.09 for the coarse fraction (PM10 -
PM2.5), the middle of 0.05-0.13; both ranges from Huang et al. 2024, AMT 17, 6073
(doi 10.5194/amt-17-6073-2024). The receiver config overrides them (``pm_kappa``).

Above ``MAX_RH`` (95 %) the inversion is not to be trusted: the growth term diverges as a_w
approaches 1 (a 1 %RH error of the BME280 moves the result by tens of percent), and in fog
the sensor counts droplets that no kappa describes. There :func:`dry_pm` gives None: the value
served stays uncorrected and the ``humid`` flag (same threshold) keeps it out of the maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

#: Dry particle density relative to water in the kappa-Koehler mass ratio (Crilley et al. 2018).
DRY_DENSITY = 1.65
#: Above this RH (%) growth is not corrected and PM is flagged ``humid`` (receiver/quality.py HUMID_RH).
MAX_RH = 95.0
#: kappa per PM quantity: PM1/PM2.5 fine, PM10's coarse part (PM10 - PM2.5); Huang et al. 2024's mid-range.
DEFAULT_KAPPA: dict[str, float] = {"pm1": 0.22, "pm25": 0.22, "pm10": 0.09}
#: The fine quantity PM10's fine part is taken from (PM10 = PM2.5 + coarse).
FINE_OF_PM10 = "pm25"
#: Prefix of the correction's id in a served value's ``calibration`` (e.g. ``kappa-koehler:0.22``).
CORRECTION = "kappa-koehler"


def growth_factor(rh_pct: float, kappa: float) -> float:
    """Wet/dry mass ratio at ``rh_pct`` (0 <= rh < 100) for hygroscopicity ``kappa`` (>= 0)."""
    if not (0.0 <= rh_pct < 100.0) or not (kappa >= 0.0 and math.isfinite(kappa)):
        raise ValueError(f"growth needs 0 <= RH < 100 and kappa >= 0, got RH {rh_pct!r}, kappa {kappa!r}")
    aw = rh_pct / 100.0
    return 1.0 + (kappa / DRY_DENSITY) * aw / (1.0 - aw)


#: Magnus saturation vapour pressure over water, e_s(T) = A exp(B T / (T + C)), T in degC, hPa:
#: Alduchov & Eskridge 1996 (J. Appl. Meteor. 35, 601-609, "AERK"), within 0.4 % of the
#: Wexler/Hyland-Wexler reference from -40 to 50 degC.
MAGNUS_A_HPA = 6.1094
MAGNUS_B = 17.625
MAGNUS_C_DEGC = 243.04


def saturation_vapour_pressure_hpa(t_c: float) -> float:
    """Saturation vapour pressure over liquid water at ``t_c`` degC (Magnus, Alduchov & Eskridge 1996)."""
    if not (math.isfinite(t_c) and -45.0 <= t_c <= 60.0):
        raise ValueError(f"Magnus formula needs -45 <= T <= 60 degC, got {t_c!r}")
    return MAGNUS_A_HPA * math.exp(MAGNUS_B * t_c / (t_c + MAGNUS_C_DEGC))


def rh_at(rh_pct: float, t_c: float, to_t_c: float) -> float:
    """The RH of air measured at ``rh_pct`` and ``t_c`` once it is warmed (or cooled) to ``to_t_c``.

    Why this holds: warming air in the sensor's housing adds no water, so its vapour pressure
    e = RH e_s(T) stays; only e_s grows with the temperature. RH' = RH e_s(T) / e_s(T'). At 10 degC
    1.5 degC of warming takes 75 %RH to ~68 %RH. This is how an ambient RH (the DGS-NO2's, outside
    the PM housing) becomes the RH the particles grew at, given the housing's temperature."""
    if not math.isfinite(rh_pct):
        raise ValueError(f"RH must be a finite number, got {rh_pct!r}")
    return rh_pct * saturation_vapour_pressure_hpa(t_c) / saturation_vapour_pressure_hpa(to_t_c)


def housing_rh(rh_pct: float, ambient_t_c: float, warming_c: float) -> float:
    """The RH inside a PM housing that warms the ambient air (``rh_pct`` at ``ambient_t_c``) by
    ``warming_c`` degC: the enclosure's warming measured once (docs/fidelity.md), not a fitted constant."""
    return rh_at(rh_pct, ambient_t_c, ambient_t_c + warming_c)


def correctable(rh_pct: float | None) -> bool:
    """Whether growth at this RH is corrected: a finite RH in [0, MAX_RH]."""
    return rh_pct is not None and math.isfinite(rh_pct) and 0.0 <= rh_pct <= MAX_RH


def dry_pm(pm: float, rh_pct: float | None, kappa: float) -> float | None:
    """Dry PM from ``pm`` measured at ``rh_pct``; None where growth is not corrected (no RH,
    RH above MAX_RH or below 0, or no finite ``pm``)."""
    if not correctable(rh_pct) or not math.isfinite(pm):
        return None
    return pm / growth_factor(rh_pct, kappa)  # type: ignore[arg-type]


def dry_pm10(pm10: float, pm25: float | None, rh_pct: float | None, kappa_fine: float,
             kappa_coarse: float) -> float | None:
    """Dry PM10: its fine part (``pm25``, at most ``pm10``) grows with the fine kappa, the rest
    with the coarse one. Without a PM2.5 value the whole of PM10 takes the coarse kappa."""
    if pm25 is None or not math.isfinite(pm25):
        return dry_pm(pm10, rh_pct, kappa_coarse)
    fine = min(max(pm25, 0.0), pm10)
    dry_fine, dry_coarse = dry_pm(fine, rh_pct, kappa_fine), dry_pm(pm10 - fine, rh_pct, kappa_coarse)
    return None if dry_fine is None or dry_coarse is None else dry_fine + dry_coarse


def correction_id(quantity: str, kappa: Mapping[str, float]) -> str:
    """What a corrected value says it used: ``kappa-koehler:<kappa>`` (PM10: ``<fine>/<coarse>``)."""
    if quantity == "pm10" and FINE_OF_PM10 in kappa:
        return f"{CORRECTION}:{kappa[FINE_OF_PM10]:g}/{kappa['pm10']:g}"
    return f"{CORRECTION}:{kappa[quantity]:g}"


def check_kappa(kappa: Mapping[str, object]) -> dict[str, float]:
    """A config's ``pm_kappa`` table, checked: known PM quantities, numbers in [0, 1.5]
    (inorganic salts reach ~1.3; beyond that is a typo). Raises ValueError with the reason."""
    out: dict[str, float] = {}
    for q, k in kappa.items():
        if q not in DEFAULT_KAPPA:
            raise ValueError(f"unknown PM quantity {q!r} (one of {', '.join(DEFAULT_KAPPA)})")
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 <= float(k) <= 1.5:
            raise ValueError(f"kappa of {q} must be a number in [0, 1.5], got {k!r}")
        out[q] = float(k)
    return out
