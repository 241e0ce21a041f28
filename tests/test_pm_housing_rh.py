"""Ambient RH to the PM housing's RH (receiver/pm_humidity.py rh_at/housing_rh, pm_derive.rh_readings).

The physics is checked against an independent computation: the saturation vapour pressure of
the IAPWS (Wagner & Pruss 1993, J. Phys. Chem. Ref. Data 22, 783; IAPWS "Revised Supplementary
Release on Saturation Properties of Ordinary Water Substance", 1992), a different formula from
the Magnus form the receiver uses, and reference values of saturation pressure from the WMO
guide's table (WMO-No. 8, Annex 4.B). Warming air adds no water, so the vapour pressure is
conserved and RH' = RH e_s(T) / e_s(T').
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from receiver.pm_derive import PmSample, housing_rh_series, pm_rows, rh_readings
from receiver.pm_humidity import DEFAULT_KAPPA, growth_factor, housing_rh, rh_at, saturation_vapour_pressure_hpa

#: IAPWS 1992 saturation pressure of water: critical point and the six coefficients.
TC_K, PC_HPA = 647.096, 220_640.0
A = (-7.85951783, 1.84408259, -11.7866497, 22.6807411, -15.9618719, 1.80122502)
EXP = (1.0, 1.5, 3.0, 3.5, 4.0, 7.5)


def iapws_es_hpa(t_c: float) -> float:
    t = t_c + 273.15
    th = 1.0 - t / TC_K
    return PC_HPA * math.exp(TC_K / t * sum(a * th**e for a, e in zip(A, EXP)))


@pytest.mark.parametrize("t_c, hpa", [(0.0, 6.112), (10.0, 12.28), (20.0, 23.39), (30.0, 42.47)])
def test_saturation_pressure_matches_reference_values(t_c: float, hpa: float) -> None:
    # Both the independent formula and the receiver's Magnus form agree with the table.
    assert iapws_es_hpa(t_c) == pytest.approx(hpa, rel=2e-3)
    assert saturation_vapour_pressure_hpa(t_c) == pytest.approx(hpa, rel=4e-3)


@pytest.mark.parametrize("rh", [40.0, 70.0, 90.0])
@pytest.mark.parametrize("t_c", [-10.0, 0.0, 8.0, 20.0, 35.0])
@pytest.mark.parametrize("warming", [0.5, 1.5, 4.0])
def test_housing_rh_conserves_vapour_pressure(rh: float, t_c: float, warming: float) -> None:
    expect = rh * iapws_es_hpa(t_c) / iapws_es_hpa(t_c + warming)  # independent: IAPWS, not Magnus
    got = housing_rh(rh, t_c, warming)
    assert got == pytest.approx(expect, abs=0.05)  # %RH: Magnus' ratio is far better than its absolute
    assert got < rh  # warming dries


def test_the_figure_docs_quote_and_no_warming_is_identity() -> None:
    # docs/fidelity.md: 75 %RH at 10 degC, housing 1.5 degC warmer -> ~68 %RH, growth x1.40 -> x1.29.
    assert housing_rh(75.0, 10.0, 1.5) == pytest.approx(67.9, abs=0.1)
    assert growth_factor(75.0, 0.22) == pytest.approx(1.40, abs=0.005)
    assert growth_factor(housing_rh(75.0, 10.0, 1.5), 0.22) == pytest.approx(1.28, abs=0.01)
    assert rh_at(63.0, 12.0, 12.0) == 63.0
    with pytest.raises(ValueError):
        saturation_vapour_pressure_hpa(float("nan"))
    with pytest.raises(ValueError):
        rh_at(70.0, 120.0, 121.5)  # a broken thermometer's value: a clear error, not a number


def test_only_outside_rh_with_its_temperature_is_converted() -> None:
    dgs = {"no2_ppb": 20.0, "no2_temp_c": 10.0, "no2_rh_pct": 75.0}
    assert rh_readings(dgs) == [75.0]  # no warming known: as measured (what a shipped van does)
    assert rh_readings(dgs, 1.5) == [pytest.approx(housing_rh(75.0, 10.0, 1.5))]
    # The PM sensor's own RH is the housing's already; an RH without a temperature beside it can't be.
    assert rh_readings({"pm25": 10.0, "rh": 70.0, "temp_c": 12.0}, 1.5) == [70.0]
    assert rh_readings({"rh_pct": 80.0}, 1.5) == [80.0]
    assert rh_readings({"rh_pct": 80.0, "temp_c": 5.0}, 1.5) == [pytest.approx(housing_rh(80.0, 5.0, 1.5))]
    # A broken temperature does not stop the receiver: the RH counts as measured.
    assert rh_readings({"no2_rh_pct": 75.0, "no2_temp_c": 150.0}, 1.5) == [75.0]


def test_pm_is_dried_at_the_housing_rh() -> None:
    samples = [PmSample("e", 1, 1_000, {"pm25": 30.0}),
               PmSample("e", 2, 1_500, {"no2_ppb": 20.0, "no2_temp_c": 10.0, "no2_rh_pct": 75.0})]
    rh = housing_rh_series(samples, 1.5)
    assert list(rh[0]) == [1_500.0] and rh[1][0] == pytest.approx(67.88, abs=0.02)
    (row,), _ = pm_rows("van", samples, DEFAULT_KAPPA, rh=rh)
    wet_over_dry = 1 + 0.22 / 1.65 * (rh[1][0] / 100) / (1 - rh[1][0] / 100)
    assert row[4] == pytest.approx(30.0 / wet_over_dry)
    (ambient,), _ = pm_rows("van", samples, DEFAULT_KAPPA)  # default: the ambient RH
    assert ambient[4] == pytest.approx(30.0 / 1.4, abs=0.01) and ambient[4] < row[4]
    assert np.isfinite(row[4])
