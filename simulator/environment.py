"""Plausible air-quality, noise and weather fields for Alphen aan den Rijn.

This module is the **truth** of the simulated world. :meth:`Environment.at` returns the
concentration, noise level and weather that actually exist at a place and time, with no
sensor error. Simulated sensors (the fake SDS011/SPS30, NO2 cell, microphone, BME280 in
``simulator``) must add their own measurement noise, bias, RH artefacts and quantisation
when they read these values. Keeping the two apart lets tests compare measurements
against ground truth.

The fields are pure functions of (lat, lon, road class, local Dutch time, day seed). They
are cheap (tens of float operations) and deterministic. The same seed, place and instant
always give the same numbers.

The numbers are chosen to look like a small Dutch town, not to be exact:

* PM2.5 urban background 8–15 µg/m³, with a diurnal cycle (night and morning
  inversions) and a day-to-day factor (synoptic weather, e.g. easterly winds bring
  dirtier air);
* PM10 at 1.5–2× PM2.5, plus resuspended road dust next to busy roads;
* NO2 background 10–20 ppb, rising to 30–60 ppb next to busy roads at rush hour
  (07–09, 16–18 local) and higher on cold, still days;
* noise LAeq about 50–55 dB(A) in quiet streets and 65–75 dB(A) on main roads,
  following traffic flow through the day;
* a few deterministic Gaussian hotspots (the bus station at the railway station, the
  N11 aquaduct portals, the Rijnhaven industrial estate), plus smooth sinusoidal
  variation of a few percent.
"""

from __future__ import annotations

import calendar
import math
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import NamedTuple

# ---------------------------------------------------------------------------------------
# Local time (Europe/Amsterdam) without a tz database
# ---------------------------------------------------------------------------------------


def _last_sunday_utc(year: int, month: int) -> float:
    """UTC epoch seconds of 01:00 UTC on the last Sunday of ``month``: the EU DST switch."""
    last_day = calendar.monthrange(year, month)[1]
    weekday = calendar.weekday(year, month, last_day)  # Monday=0 ... Sunday=6
    day = last_day - (weekday + 1) % 7
    return calendar.timegm((year, month, day, 1, 0, 0))


def amsterdam_utc_offset_h(utc_seconds: float) -> int:
    """UTC offset of Dutch civil time: +2 in summer (CEST), +1 otherwise (CET).

    This is the EU rule, worked out directly. That keeps the module free of a tzdata
    dependency on minimal Pi images.
    """
    year = datetime.fromtimestamp(utc_seconds, tz=timezone.utc).year
    return 2 if _last_sunday_utc(year, 3) <= utc_seconds < _last_sunday_utc(year, 10) else 1


@dataclass(frozen=True)
class LocalTime:
    """Dutch local time, split into what the fields depend on."""

    hour: float  # 0 <= hour < 24, fractional
    weekday: int  # Monday=0 ... Sunday=6
    day_of_year: int  # 1..366
    date_ordinal: int  # proleptic Gregorian ordinal of the local date: the "day" in day seed


def local_time(utc_seconds: float) -> LocalTime:
    """Convert UTC epoch seconds to Dutch local time."""
    local = datetime.fromtimestamp(utc_seconds + 3600 * amsterdam_utc_offset_h(utc_seconds), tz=timezone.utc)
    hour = local.hour + local.minute / 60.0 + (local.second + local.microsecond * 1e-6) / 3600.0
    return LocalTime(hour, local.weekday(), local.timetuple().tm_yday, local.toordinal())


# ---------------------------------------------------------------------------------------
# Day-level weather (one draw per local date and seed)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DayWeather:
    """Factors drawn once per day. They make Tuesday differ from Wednesday."""

    pm_factor: float  # multiplies background PM (0.65–1.6)
    pm10_ratio: float  # PM10/PM2.5 of the background aerosol (1.5–1.9)
    no2_factor: float  # multiplies background NO2 (0.75–1.35)
    temp_anomaly_c: float  # departure from the seasonal mean temperature
    temp_amplitude_c: float  # half the diurnal temperature range
    rh_offset_pct: float  # wetter or drier day
    wind_factor: float  # 0.6 (still) .. 1.4 (windy): windy days dilute road plumes


@lru_cache(maxsize=4096)
def day_weather(seed: int, date_ordinal: int) -> DayWeather:
    """Deterministic per-day factors for ``seed`` and one local date."""
    # A string seed goes through SHA-512, so the result does not depend on PYTHONHASHSEED.
    rng = random.Random(f"env-day:{seed}:{date_ordinal}")
    # PM day-to-day variation is roughly lognormal. Clip it so a "bad day" stays plausible.
    return DayWeather(
        pm_factor=min(1.6, max(0.65, rng.lognormvariate(0.0, 0.25))),
        pm10_ratio=rng.uniform(1.5, 1.9),
        no2_factor=rng.uniform(0.75, 1.35),
        temp_anomaly_c=rng.gauss(0.0, 2.5),
        temp_amplitude_c=rng.uniform(2.5, 5.0),
        rh_offset_pct=rng.uniform(-8.0, 8.0),
        wind_factor=rng.uniform(0.6, 1.4),
    )


# ---------------------------------------------------------------------------------------
# Temporal profiles (pure functions of the local hour)
# ---------------------------------------------------------------------------------------


def _gauss(x: float, mu: float, sigma: float) -> float:
    return math.exp(-0.5 * ((x - mu) / sigma) ** 2)


def rush_hour_weight(hour: float, weekday: int = 0) -> float:
    """0..1: how far into a rush-hour peak (07–09, 16–18) we are. Weekends have almost none."""
    w = max(_gauss(hour, 8.0, 0.8), _gauss(hour, 17.0, 0.9))
    return w * (0.25 if weekday >= 5 else 1.0)


def traffic_flow(hour: float, weekday: int = 0) -> float:
    """Relative traffic flow, 1.0 at the weekday rush peak and about 0.05 at 03:00."""
    # A daytime plateau, switched on and off smoothly with logistic steps, plus the peaks.
    day = 1.0 / (1.0 + math.exp(-(hour - 6.5) * 1.8)) * 1.0 / (1.0 + math.exp((hour - 21.0) * 1.2))
    base = 0.04 + 0.56 * day
    return min(1.0, base + 0.45 * rush_hour_weight(hour, weekday))


def pm_diurnal(hour: float) -> float:
    """Background PM multiplier: high in the night and morning inversions, low in the mixed afternoon."""
    return 1.0 + 0.15 * math.cos(2 * math.pi * (hour - 4.0) / 24.0) + 0.05 * _gauss(hour, 8.5, 1.5)


def no2_background_diurnal(hour: float, weekday: int = 0) -> float:
    """Background NO2 multiplier: commuter peaks, and a midday dip as NO2 is photolysed."""
    return 0.9 + 0.35 * rush_hour_weight(hour, weekday) - 0.15 * _gauss(hour, 13.5, 2.5)


def seasonal_mean_temp_c(day_of_year: int) -> float:
    """Mean daily temperature in the western Netherlands: about 3 °C in January, 18 °C in late July."""
    return 10.5 - 7.5 * math.cos(2 * math.pi * (day_of_year - 20) / 365.25)


def temperature_c(hour: float, day_of_year: int, wx: DayWeather) -> float:
    """Air temperature. The diurnal minimum is around 05:00 and the maximum around 15:00."""
    return (seasonal_mean_temp_c(day_of_year) + wx.temp_anomaly_c
            + wx.temp_amplitude_c * math.cos(2 * math.pi * (hour - 15.0) / 24.0))


def relative_humidity_pct(hour: float, temp_c: float, day_of_year: int, wx: DayWeather) -> float:
    """RH, high at night and lower in the afternoon (it moves against temperature).

    The level depends on the season: damp Dutch winters, drier spring afternoons. It is
    clipped to 30–99 %. Humid mornings matter because optical PM sensors over-read above
    about 85 %, and the agent flags those readings.
    """
    seasonal = 80.0 + 7.0 * math.cos(2 * math.pi * (day_of_year - 15) / 365.25)
    diurnal = -14.0 * math.cos(2 * math.pi * (hour - 15.0) / 24.0)
    return min(99.0, max(30.0, seasonal + diurnal + wx.rh_offset_pct))


# ---------------------------------------------------------------------------------------
# Road-class effects
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoadEffect:
    """What standing next to a road of one class adds, at full (rush-hour) flow."""

    pm25_ug: float  # exhaust and brake/tyre fine fraction
    pm10_dust_ug: float  # resuspended road dust (coarse)
    no2_ppb: float  # roadside NO2 increment at rush hour
    noise_db: float  # LAeq at the kerb at full flow


ROAD_EFFECTS: dict[str, RoadEffect] = {
    "motorway": RoadEffect(3.5, 9.0, 34.0, 76.0),
    "trunk": RoadEffect(3.0, 8.0, 30.0, 74.0),
    "primary": RoadEffect(2.8, 7.0, 28.0, 73.0),
    "secondary": RoadEffect(1.8, 4.0, 18.0, 68.0),
    "tertiary": RoadEffect(1.0, 2.0, 10.0, 62.0),
    "service": RoadEffect(0.6, 2.5, 5.0, 58.0),
    "residential": RoadEffect(0.3, 0.6, 3.0, 54.0),
    "living_street": RoadEffect(0.2, 0.4, 2.0, 52.0),
}
#: Any class not listed is treated as residential.
DEFAULT_ROAD = ROAD_EFFECTS["residential"]
#: Night-time ambient sound floor in town (wind, distant traffic), in dB(A).
AMBIENT_FLOOR_DB = 38.0


def road_effect(road_class: str) -> RoadEffect:
    return ROAD_EFFECTS.get(road_class, DEFAULT_ROAD)


def road_noise_db(road_class: str, flow: float) -> float:
    """Kerbside LAeq. It scales as 10·log10(flow), since sound energy is proportional to vehicle count."""
    level = road_effect(road_class).noise_db + 10.0 * math.log10(max(flow, 1e-3))
    # Add the ambient floor as energy, not as a maximum, so the result is smooth.
    return 10.0 * math.log10(10 ** (level / 10.0) + 10 ** (AMBIENT_FLOOR_DB / 10.0))


# ---------------------------------------------------------------------------------------
# Spatial structure: hotspots and smooth variation
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hotspot:
    """A Gaussian bump around a point, e.g. idling buses at the bus station."""

    name: str
    lat: float
    lon: float
    sigma_m: float
    pm25_ug: float = 0.0
    pm10_ug: float = 0.0
    no2_ppb: float = 0.0
    noise_db: float = 0.0
    traffic_driven: bool = True  # scales with traffic flow; industry and dust sources do not

    def weight(self, lat: float, lon: float) -> float:
        # An equirectangular distance is fine over a few kilometres, and cheaper than haversine.
        dy = (lat - self.lat) * 111_195.0
        dx = (lon - self.lon) * 111_195.0 * math.cos(math.radians(self.lat))
        return math.exp(-0.5 * (dx * dx + dy * dy) / (self.sigma_m * self.sigma_m))


#: Hotspots at the same approximate positions as ``data/alphen-route.geojson``.
HOTSPOTS: tuple[Hotspot, ...] = (
    Hotspot("busstation Alphen a/d Rijn (station)", 52.1250, 4.6575, 120.0,
            pm25_ug=2.5, pm10_ug=3.0, no2_ppb=12.0, noise_db=4.0),
    Hotspot("N11 Alphen-aquaduct west portal", 52.1132, 4.6775, 100.0,
            pm25_ug=3.0, pm10_ug=5.0, no2_ppb=15.0, noise_db=3.0),
    Hotspot("N11 Alphen-aquaduct east portal", 52.1135, 4.6815, 100.0,
            pm25_ug=3.0, pm10_ug=5.0, no2_ppb=15.0, noise_db=3.0),
    Hotspot("Rijnhaven industrial estate", 52.1215, 4.6320, 250.0,
            pm25_ug=1.0, pm10_ug=6.0, no2_ppb=3.0, noise_db=2.0, traffic_driven=False),
)


def hotspot_contributions(lat: float, lon: float, flow: float) -> tuple[float, float, float, float]:
    """Sum of all hotspots at a point: (pm25, pm10, no2, noise energy factor)."""
    pm25 = pm10 = no2 = 0.0
    noise_gain_db = 0.0
    for h in HOTSPOTS:
        w = h.weight(lat, lon)
        if w < 1e-4:
            continue
        scale = w * (flow if h.traffic_driven else 1.0)
        pm25 += h.pm25_ug * scale
        pm10 += h.pm10_ug * scale
        no2 += h.no2_ppb * scale
        noise_gain_db += h.noise_db * w
    return pm25, pm10, no2, noise_gain_db


def smooth_variation(lat: float, lon: float, seed: int) -> float:
    """Smooth spatial field, roughly in [-1, 1], with wavelengths of 1–3 km.

    It is a few seeded sinusoids. That is enough for neighbouring streets to differ by
    a few percent, and it costs nothing to evaluate.
    """
    rng = _phases(seed)
    y = (lat - 52.13) * 111_195.0
    x = (lon - 4.66) * 68_300.0
    total = 0.0
    for kx, ky, ph in rng:
        total += math.sin(kx * x + ky * y + ph)
    return total / len(rng)


@lru_cache(maxsize=64)
def _phases(seed: int) -> tuple[tuple[float, float, float], ...]:
    rng = random.Random(f"env-space:{seed}")
    out = []
    for _ in range(3):
        wavelength = rng.uniform(1000.0, 3000.0)
        theta = rng.uniform(0, math.pi)
        k = 2 * math.pi / wavelength
        out.append((k * math.cos(theta), k * math.sin(theta), rng.uniform(0, 2 * math.pi)))
    return tuple(out)


def ozone_ppb(no2_ppb: float, hour: float) -> float:
    """O3, for the NO2 cells' cross-sensitivity: a photochemical afternoon maximum,
    titrated by fresh NO next to roads (where NO2 is high, O3 is low: Ox stays ~constant)."""
    return max(2.0, 28.0 + 10.0 * math.cos(2 * math.pi * (hour - 15.0) / 24.0) - 0.6 * (no2_ppb - 14.0))


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


class Conditions(NamedTuple):
    """True environmental state at one place and instant. Sensors add their own error."""

    pm1: float  # µg/m³
    pm25: float  # µg/m³
    pm10: float  # µg/m³
    no2_ppb: float
    noise_laeq_db: float  # dB(A), 1-minute LAeq at the kerb
    temp_c: float
    rh_pct: float


def conditions_at(lat: float, lon: float, road_class: str, hour: float, weekday: int,
                  day_of_year: int, wx: DayWeather, seed: int) -> Conditions:
    """The whole field as a pure function of place, local time and the day's weather.

    :meth:`Environment.at` is a thin wrapper that turns a UTC timestamp into
    ``hour``/``weekday``/``day_of_year``/``wx``.
    """
    flow = traffic_flow(hour, weekday)
    road = road_effect(road_class)
    spatial = smooth_variation(lat, lon, seed)
    hs_pm25, hs_pm10, hs_no2, hs_noise_db = hotspot_contributions(lat, lon, flow)
    temp = temperature_c(hour, day_of_year, wx)
    rh = relative_humidity_pct(hour, temp, day_of_year, wx)
    # Cold, still air traps emissions (winter inversions), so road plumes grow as
    # temperature and wind fall. This is why the NO2 and PM models need temperature.
    # The overall range is kept narrow so that a cold, still rush hour stays within
    # the observed roadside range (NO2 about 60 ppb at most).
    stagnation = min(1.35, max(0.7, (1.0 + 0.02 * (10.0 - temp)) / wx.wind_factor))

    # --- particulate matter ---
    pm25_bg = 10.5 * wx.pm_factor * pm_diurnal(hour) * (1.0 + 0.06 * spatial)
    pm25_road = road.pm25_ug * flow * stagnation
    pm25 = pm25_bg + pm25_road + hs_pm25
    # Road dust is coarse and is kicked up by passing vehicles, so it scales with flow
    # but hardly with stagnation. Dry air lifts more of it.
    dust_dryness = 1.3 if rh < 60.0 else 1.0
    pm10 = pm25_bg * wx.pm10_ratio + pm25_road * 1.2 + road.pm10_dust_ug * flow * dust_dryness + hs_pm10
    pm1 = 0.68 * pm25_bg + 0.85 * pm25_road + 0.8 * hs_pm25  # traffic particles are finer

    # --- nitrogen dioxide ---
    no2_bg = 14.0 * wx.no2_factor * no2_background_diurnal(hour, weekday) * (1.0 + 0.08 * spatial)
    # Most of the roadside increment comes with the commuter peaks, not the midday plateau.
    road_no2 = road.no2_ppb * (0.35 * flow + 0.65 * rush_hour_weight(hour, weekday)) * stagnation
    no2 = no2_bg + road_no2 + hs_no2 * stagnation

    # --- noise ---
    noise = road_noise_db(road_class, flow) + hs_noise_db + 1.0 * spatial

    return Conditions(pm1=pm1, pm25=pm25, pm10=pm10, no2_ppb=no2, noise_laeq_db=noise,
                      temp_c=temp, rh_pct=rh)


class Environment:
    """The simulated world's air, noise and weather. It is deterministic for ``seed``.

    ``at()`` gives the *truth*. Callers (the simulated sensors) add measurement noise,
    drift, RH-induced over-reading of optical PM sensors, and so on.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def weather(self, utc_seconds: float) -> DayWeather:
        """The day-level factors for the local date containing ``utc_seconds``."""
        return day_weather(self.seed, local_time(utc_seconds).date_ordinal)

    def at(self, lat: float, lon: float, road_class: str, utc_seconds: float) -> Conditions:
        """True conditions at a place and time. ``utc_seconds`` is Unix epoch seconds."""
        lt = local_time(utc_seconds)
        wx = day_weather(self.seed, lt.date_ordinal)
        return conditions_at(lat, lon, road_class, lt.hour, lt.weekday, lt.day_of_year, wx, self.seed)
