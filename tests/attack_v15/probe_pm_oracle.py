"""v15 attack: the receiver's PM growth correction against an independent oracle.

Oracle (written here, not the project's helpers):
* saturation vapour pressure over liquid water: Wagner & Pruss 2002 (IAPWS-95 auxiliary
  equation) at T >= 0 degC, Murphy & Koop 2005 (QJRMS 131, 1539, eq. 10, liquid) below;
* kappa-Koehler mass growth derived from volumes: V_wet/V_dry = 1 + kappa a_w/(1-a_w)
  (Petters & Kreidenweis 2007, no Kelvin term), mass ratio = 1 + (rho_w/rho_d)(V_wet/V_dry - 1).

Run: .venv/bin/python -m pytest tests/attack_v15/probe_pm_oracle.py -q -p no:cacheprovider
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from receiver import pm_humidity as H
from receiver import pm_derive as D
from receiver import quality as Q

RHO_W, RHO_D = 1.0, 1.65


def es_pa(t_c: float) -> float:
    T = t_c + 273.15
    if t_c >= 0.0:
        tc, pc = 647.096, 22.064e6
        tau = 1.0 - T / tc
        a = (-7.85951783, 1.84408259, -11.7866497, 22.6807411, -15.9618719, 1.80122502)
        e = (1.0, 1.5, 3.0, 3.5, 4.0, 7.5)
        return pc * math.exp(tc / T * sum(ai * tau ** ei for ai, ei in zip(a, e)))
    ln = (54.842763 - 6763.22 / T - 4.210 * math.log(T) + 0.000367 * T
          + math.tanh(0.0415 * (T - 218.8)) * (53.878 - 1331.22 / T - 9.44523 * math.log(T) + 0.014025 * T))
    return math.exp(ln)


def oracle_housing_rh(rh: float, t: float, warming: float) -> float:
    return rh * es_pa(t) / es_pa(t + warming)


def oracle_mass_ratio(rh: float, kappa: float) -> float:
    aw = rh / 100.0
    vol = 1.0 + kappa * aw / (1.0 - aw)
    return 1.0 + (RHO_W / RHO_D) * (vol - 1.0)


def test_oracle_sanity():
    # textbook anchors: e_s(0 C) = 611.2 Pa, e_s(20 C) = 2339 Pa, e_s(-40 C, liquid) = 18.9 Pa
    assert es_pa(0.0) == pytest.approx(611.2, rel=2e-3)
    assert es_pa(20.0) == pytest.approx(2339.0, rel=2e-3)
    assert es_pa(-40.0) == pytest.approx(18.9, rel=2e-2)


@pytest.mark.parametrize("t", [-40.0, -20.0, -0.1, 0.0, 10.0, 25.0, 40.0, 50.0])
@pytest.mark.parametrize("warming", [0.0, 0.5, 3.0, 10.0])
@pytest.mark.parametrize("rh", [0.0, 50.0, 94.9, 95.0, 99.9, 100.0])
def test_housing_rh_against_iapws(rh, t, warming):
    got = H.housing_rh(rh, t, warming)
    want = oracle_housing_rh(rh, t, warming)
    # Magnus is claimed within 0.4 % of the reference from -40 to 50 C: the ratio within ~0.8 %
    assert got == pytest.approx(want, rel=8e-3, abs=1e-9), (rh, t, warming, got, want)


@pytest.mark.parametrize("t", [55.0, 60.0])
def test_housing_rh_hot_end(t):
    """Up to 60 C the docstring allows; warming pushes the housing past 60: what happens?"""
    assert H.housing_rh(80.0, t, 0.0) == pytest.approx(80.0)
    assert H.housing_rh(80.0, 55.0, 5.0) == pytest.approx(oracle_housing_rh(80.0, 55.0, 5.0), rel=8e-3)
    with pytest.raises(ValueError):
        H.housing_rh(80.0, t, 6.0)  # past 60 C: out of Magnus' stated range -> refused


@pytest.mark.parametrize("kappa", [0.0, 0.09, 0.22, 1.3])
@pytest.mark.parametrize("rh", [0.0, 1e-9, 30.0, 80.0, 94.9, 95.0])
def test_dry_pm_against_oracle(rh, kappa):
    got = H.dry_pm(25.0, rh, kappa)
    assert got == pytest.approx(25.0 / oracle_mass_ratio(rh, kappa), rel=1e-12)


@pytest.mark.parametrize("rh", [95.0000001, 99.9, 100.0, 100.5, 150.0, -0.1, float("nan"), float("inf"),
                                float("-inf"), None])
def test_dry_pm_refuses_edges(rh):
    assert H.dry_pm(25.0, rh, 0.22) is None


@pytest.mark.parametrize("pm", [float("nan"), float("inf")])
def test_dry_pm_nonfinite_pm(pm):
    assert H.dry_pm(pm, 50.0, 0.22) is None


def test_flag_and_correction_threshold_agree():
    """95.0 is corrected and not humid; just above is humid and not corrected: no gap, no overlap."""
    for rh in (94.9, 95.0, 95.0000001, 99.9, 100.0):
        humid = bool(Q.pm_rh_mask(np.array([rh]))[0] & Q.BIT["humid"])
        corrected = H.dry_pm(10.0, rh, 0.22) is not None
        assert humid != corrected, (rh, humid, corrected)


def test_pm10_split_against_oracle():
    rh = 85.0
    got = H.dry_pm10(40.0, 15.0, rh, 0.22, 0.09)
    want = 15.0 / oracle_mass_ratio(rh, 0.22) + 25.0 / oracle_mass_ratio(rh, 0.09)
    assert got == pytest.approx(want, rel=1e-12)
    # pm25 > pm10 (sensor glitch): the fine part is capped at pm10
    assert H.dry_pm10(10.0, 15.0, rh, 0.22, 0.09) == pytest.approx(10.0 / oracle_mass_ratio(rh, 0.22))


# ---- the RH series the derivation chooses from: ambient converted with the housing warming ----

def _sample(t, **v):
    return D.PmSample("e", int(t), t, v)


@pytest.mark.parametrize("t_amb,warming", [(-40.0, 0.0), (-40.0, 10.0), (10.0, 1.5), (30.0, 3.0), (50.0, 10.0)])
@pytest.mark.parametrize("rh_amb", [0.0, 60.0, 94.9, 99.9, 100.0])
def test_ambient_rh_converted_in_series(t_amb, warming, rh_amb):
    s = [_sample(1000.0, no2_rh_pct=rh_amb, no2_temp_c=t_amb), _sample(1500.0, pm25=20.0)]
    rh_t, rh_v = D.housing_rh_series(s, warming)
    assert list(rh_t) == [1000.0]
    assert rh_v[0] == pytest.approx(oracle_housing_rh(rh_amb, t_amb, warming), rel=8e-3, abs=1e-9)
    chosen = Q.pm_rh(np.array([math.nan]), np.array([1500.0]), rh_t, rh_v)[0]
    best = D.best_pm({"pm25": 20.0}, float(chosen), H.DEFAULT_KAPPA)
    want_rh = oracle_housing_rh(rh_amb, t_amb, warming)
    if want_rh <= 95.0 - 0.5:
        assert best["pm25"][0] == pytest.approx(20.0 / oracle_mass_ratio(want_rh, 0.22), rel=1e-2)
    elif want_rh > 95.0 + 0.5:
        assert "pm25" not in best  # raw value served, flagged humid


def test_pm_sample_own_rh_is_not_converted():
    """A PM sample's own RH is the housing's: warming must not lower it again."""
    s = [_sample(1000.0, pm25=20.0, rh_pct=80.0, temp_c=20.0)]
    rh_t, rh_v = D.housing_rh_series(s, 3.0)
    assert list(rh_v) == [80.0]


def test_impossible_ambient_rh_is_not_laundered():
    """An ambient RH above 100 % is a broken reading (out_of_range). Warming it to the housing's
    temperature must not turn it into a plausible RH that the PM is then 'corrected' with."""
    s = [_sample(1000.0, no2_rh_pct=130.0, no2_temp_c=20.0), _sample(1500.0, pm25=20.0)]
    rh_t, rh_v = D.housing_rh_series(s, 6.0)
    chosen = Q.pm_rh(np.array([math.nan]), np.array([1500.0]), rh_t, rh_v)[0]
    best = D.best_pm({"pm25": 20.0}, float(chosen), H.DEFAULT_KAPPA)
    assert "pm25" not in best, f"RH 130 % ambient became {chosen:.1f} % in the housing and PM was corrected to {best}"


def test_broken_temperature_keeps_ambient_rh():
    """Ambient T of 70 C (broken) cannot be converted: the RH counts as measured (documented)."""
    s = [_sample(1000.0, no2_rh_pct=60.0, no2_temp_c=70.0)]
    _, rh_v = D.housing_rh_series(s, 2.0)
    assert list(rh_v) == [60.0]


def test_nan_and_bool_rh_ignored():
    s = [_sample(1000.0, no2_rh_pct=float("nan"), no2_temp_c=20.0), _sample(1100.0, rh_pct=True)]
    rh_t, _ = D.housing_rh_series(s, 2.0)
    assert len(rh_t) == 0
