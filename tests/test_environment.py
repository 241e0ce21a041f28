"""Tests for the simulated pollution, noise and weather fields."""

from __future__ import annotations

import calendar

import pytest

from simulator.environment import (
    Conditions,
    Environment,
    amsterdam_utc_offset_h,
    local_time,
    rush_hour_weight,
    traffic_flow,
)

# Residential street in the north-west of town, and a point on the N11.
QUIET = (52.1372, 4.6480)
MAIN = (52.1120, 4.6600)
STATION = (52.1250, 4.6575)


def utc(y: int, mo: int, d: int, local_hour: float) -> float:
    """UTC seconds for a local Dutch wall-clock time (inverted with the module's own offset)."""
    guess = calendar.timegm((y, mo, d, 0, 0, 0)) + local_hour * 3600
    return guess - 3600 * amsterdam_utc_offset_h(guess - 3600)


TUESDAY_WINTER = (2024, 11, 12)
TUESDAY_SUMMER = (2024, 6, 11)
SATURDAY = (2024, 11, 16)


@pytest.fixture(scope="module")
def env() -> Environment:
    return Environment(seed=11)


def test_local_time_handles_dst() -> None:
    assert amsterdam_utc_offset_h(calendar.timegm((2024, 1, 15, 12, 0, 0))) == 1
    assert amsterdam_utc_offset_h(calendar.timegm((2024, 7, 15, 12, 0, 0))) == 2
    # Spring forward 2024-03-31 01:00 UTC; fall back 2024-10-27 01:00 UTC.
    assert amsterdam_utc_offset_h(calendar.timegm((2024, 3, 31, 0, 59, 59))) == 1
    assert amsterdam_utc_offset_h(calendar.timegm((2024, 3, 31, 1, 0, 0))) == 2
    assert amsterdam_utc_offset_h(calendar.timegm((2024, 10, 27, 0, 59, 59))) == 2
    assert amsterdam_utc_offset_h(calendar.timegm((2024, 10, 27, 1, 0, 0))) == 1
    lt = local_time(utc(*TUESDAY_SUMMER, 8.5))
    assert lt.hour == pytest.approx(8.5) and lt.weekday == 1


def test_deterministic_and_seed_dependent(env: Environment) -> None:
    t = utc(*TUESDAY_WINTER, 8.0)
    assert env.at(*MAIN, "primary", t) == Environment(seed=11).at(*MAIN, "primary", t)
    assert env.at(*MAIN, "primary", t) != Environment(seed=12).at(*MAIN, "primary", t)
    assert isinstance(env.at(*MAIN, "primary", t), Conditions)


def test_levels_in_plausible_ranges_over_a_year() -> None:
    for seed in range(4):
        env = Environment(seed)
        for day in range(0, 365, 9):
            base = calendar.timegm((2024, 1, 1, 0, 0, 0)) + day * 86400
            for hour in range(0, 24, 2):
                for (lat, lon), rc in ((QUIET, "residential"), (MAIN, "primary"), (STATION, "tertiary")):
                    c = env.at(lat, lon, rc, base + hour * 3600)
                    assert 3.0 <= c.pm25 <= 40.0
                    assert 0.55 * c.pm25 <= c.pm1 <= c.pm25
                    assert 1.4 * c.pm25 <= c.pm10 <= 3.5 * c.pm25
                    assert 5.0 <= c.no2_ppb <= 75.0
                    assert 35.0 <= c.noise_laeq_db <= 80.0
                    assert -10.0 <= c.temp_c <= 35.0
                    assert 30.0 <= c.rh_pct <= 99.0


def test_background_pm25_typical_urban(env: Environment) -> None:
    values = [env.at(*QUIET, "residential", utc(2024, 11, d, h)).pm25 for d in range(1, 29) for h in (3, 11, 15, 21)]
    mean = sum(values) / len(values)
    assert 8.0 <= mean <= 15.0
    assert max(values) - min(values) > 2.0  # day-to-day and diurnal variation exist


def test_busy_roads_dirtier_and_noisier_than_residential(env: Environment) -> None:
    for hour in (8.0, 12.0, 17.0):
        t = utc(*TUESDAY_WINTER, hour)
        # Same place, so only the road class differs.
        quiet = env.at(*QUIET, "residential", t)
        busy = env.at(*QUIET, "primary", t)
        assert busy.pm25 > quiet.pm25
        assert busy.pm10 > quiet.pm10
        assert busy.no2_ppb > quiet.no2_ppb
        assert busy.noise_laeq_db > quiet.noise_laeq_db + 10.0


def test_noise_levels_by_road_class_daytime(env: Environment) -> None:
    t = utc(*TUESDAY_SUMMER, 11.0)
    assert 48.0 <= env.at(*QUIET, "residential", t).noise_laeq_db <= 57.0
    assert 65.0 <= env.at(*MAIN, "primary", t).noise_laeq_db <= 76.0


def test_no2_rush_hour_higher_than_night(env: Environment) -> None:
    for day in (TUESDAY_WINTER, TUESDAY_SUMMER):
        rush = env.at(*MAIN, "primary", utc(*day, 8.0)).no2_ppb
        night = env.at(*MAIN, "primary", utc(*day, 3.0)).no2_ppb
        assert rush > night + 10.0
        assert 25.0 <= rush <= 65.0
        assert 8.0 <= env.at(*QUIET, "residential", utc(*day, 3.0)).no2_ppb <= 22.0


def test_weekend_rush_weaker() -> None:
    assert rush_hour_weight(8.0, weekday=5) < rush_hour_weight(8.0, weekday=1)
    env = Environment(3)
    sat = env.at(*MAIN, "primary", utc(*SATURDAY, 8.0)).no2_ppb
    tue = env.at(*MAIN, "primary", utc(2024, 11, 19, 8.0)).no2_ppb  # same week, a weekday
    assert sat < tue


def test_traffic_flow_profile() -> None:
    assert traffic_flow(3.0) < 0.15
    assert traffic_flow(8.0) > 0.9 and traffic_flow(17.0) > 0.9
    assert traffic_flow(8.0) > traffic_flow(12.0) > traffic_flow(3.0)


def test_noise_near_main_road_higher_at_rush_than_night(env: Environment) -> None:
    day = env.at(*MAIN, "primary", utc(*TUESDAY_WINTER, 8.0)).noise_laeq_db
    night = env.at(*MAIN, "primary", utc(*TUESDAY_WINTER, 3.0)).noise_laeq_db
    assert day > night + 6.0


def test_bus_station_hotspot(env: Environment) -> None:
    t = utc(*TUESDAY_WINTER, 12.0)
    at_station = env.at(*STATION, "tertiary", t)
    away = env.at(52.1300, 4.6460, "tertiary", t)
    assert at_station.no2_ppb > away.no2_ppb + 3.0
    assert at_station.noise_laeq_db > away.noise_laeq_db


def test_spatial_field_is_smooth(env: Environment) -> None:
    t = utc(*TUESDAY_WINTER, 12.0)
    a = env.at(52.1340, 4.6900, "residential", t)
    b = env.at(52.1341, 4.6901, "residential", t)  # about 13 m away
    assert abs(a.pm25 - b.pm25) < 0.1
    assert abs(a.noise_laeq_db - b.noise_laeq_db) < 0.1


def test_temperature_and_humidity_cycle(env: Environment) -> None:
    afternoon = env.at(*QUIET, "residential", utc(*TUESDAY_SUMMER, 15.0))
    dawn = env.at(*QUIET, "residential", utc(*TUESDAY_SUMMER, 5.0))
    assert afternoon.temp_c > dawn.temp_c
    assert afternoon.rh_pct < dawn.rh_pct
    summer = env.at(*QUIET, "residential", utc(*TUESDAY_SUMMER, 12.0))
    winter = env.at(*QUIET, "residential", utc(*TUESDAY_WINTER, 12.0))
    assert summer.temp_c > winter.temp_c
