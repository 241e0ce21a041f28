"""Alphasense NO2-B43F: AAN 803 worked examples, calibration records, and the
driver over the fake ADC.

The expected values are written out by hand from the formulas and the factor
tables in sensors.md (the interpolation done in the comment next to each),
not computed with the module's own table code.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.ads1115 import ADS1115
from drivers.i2c import FakeI2CBus
from core.no2_sheet import (
    K1_T,
    K2_T,
    K_T,
    N_T,
    No2Calibration,
    interpolate_factor,
    load_calibrations,
    load_calibrations_toml,
    no2_ppb,
)
from drivers.no2 import LinearTemperature, No2B43F
from core.clock import SimClock
from core.errors import BusError, ConfigError
from simulator.i2c_devices import FakeADS1115

# The example of sensors.md: -0.3547 nA/ppb x -0.73 mV/nA.
SENS = 0.3547 * 0.73  # = 0.258931 mV/ppb

CAL = No2Calibration(
    serial="202931852",
    we_e_mv=295.0,
    ae_e_mv=300.0,
    we_o_mv=10.0,
    ae_o_mv=5.0,
    sensitivity_na_per_ppb=-0.3547,
    gain_mv_per_na=-0.73,
)
# Raw inputs for every example: WEu - WEe = 320 - 295 = 25 mV, AEu - AEe = 310 - 300 = 10 mV.
WE_MV, AE_MV = 320.0, 310.0


def test_sensitivity_is_the_product_of_two_negatives():
    assert CAL.sensitivity_mv_per_ppb == pytest.approx(0.258931, abs=1e-6)


# (algorithm, temperature °C, WEc mV worked by hand)
WORKED = [
    # Algorithm 1: WEc = 25 - n_T * 10
    (1, 20.0, 25 - 0.6 * 10),  # table point: n = 0.6
    (1, 25.0, 25 - 0.5 * 10),  # halfway 0.6 -> 0.4
    (1, 5.0, 25 - 1.15 * 10),  # halfway 1.3 -> 1.0
    (1, 45.0, 25 - (-0.65) * 10),  # halfway 0.2 -> -1.5
    (1, 12.5, 25 - 0.9 * 10),  # a quarter of 1.0 -> 0.6: 1.0 - 0.1
    (1, -30.0, 25 - 1.3 * 10),  # first table point
    (1, -40.0, 25 - 1.3 * 10),  # clamped below
    (1, 60.0, 25 - (-1.5) * 10),  # clamped above
    (1, 50.0, 25 - (-1.5) * 10),  # last table point
    # Algorithm 2: WEc = 25 - k_T * (WEo/AEo = 10/5 = 2) * 10
    (2, 20.0, 25 - 1.0 * 2 * 10),
    (2, 35.0, 25 - 0.5 * 2 * 10),  # halfway 0.7 -> 0.3
    (2, 15.0, 25 - 1.35 * 2 * 10),  # halfway 1.7 -> 1.0
    (2, -35.0, 25 - 2.2 * 2 * 10),  # clamped below
    (2, 70.0, 25 - (-2.5) * 2 * 10),  # clamped above
    # Algorithm 3: WEc = 25 - (WEo - AEo = 5) - k'_T * 10
    (3, 20.0, 25 - 5 - 1.0 * 10),
    (3, 32.0, 25 - 5 - 0.3 * 10),  # a fifth of 0.4 -> -0.1: 0.4 - 0.1
    (3, 47.5, 25 - 5 - (-3.025) * 10),  # three quarters of -0.1 -> -4.0
    (3, 55.0, 25 - 5 - (-4.0) * 10),  # clamped above
    (3, -50.0, 25 - 5 - 1.0 * 10),  # clamped below
    # Algorithm 4: WEc = 25 - (WEo = 10) - k''_T
    (4, 20.0, 25 - 10 - 0.0),
    (4, 15.0, 25 - 10 - 2.0),  # halfway 4 -> 0
    (4, 45.0, 25 - 10 - 36.0),  # halfway 5 -> 67
    (4, 25.0, 25 - 10 - 0.25),  # halfway 0 -> 0.5
    (4, -50.0, 25 - 10 - 7.0),  # clamped below
    (4, 80.0, 25 - 10 - 67.0),  # clamped above
]


@pytest.mark.parametrize("algorithm, temp_c, wec_mv", WORKED)
def test_worked_examples(algorithm, temp_c, wec_mv):
    assert no2_ppb(WE_MV, AE_MV, temp_c, CAL, algorithm) == pytest.approx(wec_mv / SENS, rel=1e-12)


def test_algorithm_1_is_the_default():
    assert no2_ppb(WE_MV, AE_MV, 20.0, CAL) == pytest.approx((25 - 6) / SENS)
    # 19 mV / 0.258931 mV/ppb
    assert no2_ppb(WE_MV, AE_MV, 20.0, CAL) == pytest.approx(73.3786, abs=1e-4)


def test_zero_gas_gives_zero_ppb_under_algorithm_4():
    # A sensor sitting at its own zeros reads 0 ppb where k''_T is 0 (20 °C).
    assert no2_ppb(CAL.we_e_mv + CAL.we_o_mv, 0.0, 20.0, CAL, 4) == 0.0


def test_unknown_algorithm_and_nan_temperature():
    with pytest.raises(ValueError):
        no2_ppb(WE_MV, AE_MV, 20.0, CAL, 5)
    with pytest.raises(ValueError):
        no2_ppb(WE_MV, AE_MV, math.nan, CAL, 1)


def test_tables_are_the_published_ones():
    assert N_T == (1.3, 1.3, 1.3, 1.3, 1.0, 0.6, 0.4, 0.2, -1.5)
    assert K1_T == (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.4, -0.1, -4.0)
    assert K_T == (2.2, 2.2, 2.2, 2.2, 1.7, 1.0, 0.7, 0.3, -2.5)
    assert K2_T == (7, 7, 7, 7, 4, 0, 0.5, 5, 67)


@given(st.floats(min_value=-100, max_value=100, allow_nan=False))
def test_interpolation_stays_between_neighbours(temp_c):
    temps = [-30, -20, -10, 0, 10, 20, 30, 40, 50]
    for table in (N_T, K_T, K1_T, K2_T):
        f = interpolate_factor(temp_c, table)
        clamped = min(max(temp_c, -30), 50)
        i = max(1, next((k for k, t in enumerate(temps) if t >= clamped), 8))
        lo, hi = sorted((table[i - 1], table[i]))
        assert lo - 1e-9 <= f <= hi + 1e-9


# ------------------------------------------------------------------ calibration records


def test_calibration_from_dict_by_serial():
    cals = load_calibrations(
        {
            "202931852": {
                "we_e_mv": 295,
                "ae_e_mv": 300,
                "we_o_mv": 10,
                "ae_o_mv": 5,
                "sensitivity_na_per_ppb": -0.3547,
                "gain_mv_per_na": -0.73,
            }
        }
    )
    assert cals["202931852"] == CAL


def test_calibration_from_total_zeros():
    cal = No2Calibration.from_mapping(
        "1",
        {
            "we_e_mv": 295,
            "ae_e_mv": 300,
            "we_t_mv": 305,  # total zero = electronic + sensor zero
            "ae_t_mv": 305,
            "sensitivity_na_per_ppb": -0.3547,
            "gain_mv_per_na": -0.73,
        },
    )
    assert (cal.we_o_mv, cal.ae_o_mv) == (10.0, 5.0)


def test_calibration_from_toml(tmp_path):
    path = tmp_path / "cal.toml"
    path.write_text(
        '[no2.calibration."202931852"]\n'
        "we_e_mv = 295.0\nae_e_mv = 300.0\nwe_o_mv = 10.0\nae_o_mv = 5.0\n"
        "sensitivity_na_per_ppb = -0.3547\ngain_mv_per_na = -0.73\n"
    )
    assert load_calibrations_toml(path)["202931852"] == CAL
    with pytest.raises(ConfigError):
        load_calibrations_toml(path, table="no2.missing")


GOOD = {
    "we_e_mv": 1,
    "ae_e_mv": 1,
    "we_o_mv": 1,
    "ae_o_mv": 1,
    "sensitivity_na_per_ppb": -0.3,
    "gain_mv_per_na": -0.7,
}


def without(*keys: str, **changes: object) -> dict:
    table = {k: v for k, v in GOOD.items() if k not in keys}
    table.update(changes)
    return table


@pytest.mark.parametrize(
    "table, key",
    [
        (without("we_e_mv"), "we_e_mv"),
        (without(we_e_mv="x"), "we_e_mv"),
        (without(we_e_mv=True), "we_e_mv"),
        (without(ae_e_mv=math.inf), "ae_e_mv"),
        (without("we_o_mv", "ae_o_mv"), "we_o_mv"),
        (without(sensitivity_na_per_ppb=0.0), "S1"),
    ],
)
def test_bad_calibration_is_a_config_error_naming_the_key(table, key):
    with pytest.raises(ConfigError) as exc:
        No2Calibration.from_mapping("S1", table)
    assert key in exc.value.key


# ------------------------------------------------------------------ the driver


def rig(**driver_kw):
    clock = SimClock(0.0)
    fake = FakeADS1115(clock=clock)
    bus = FakeI2CBus({0x49: fake})
    adc = ADS1115(bus, fsr_v=4.096, clock=clock)  # LSB 0.125 mV: the test voltages are exact
    fake.set_voltage(0, 0.320)  # WE
    fake.set_voltage(1, 0.310)  # AE
    fake.set_voltage(2, 0.250)  # board temperature: 250 mV
    kw = {"temp_channel": "AIN2", "temp_from_mv": LinearTemperature(mv_at_0c=0.0, mv_per_c=10.0)}
    kw.update(driver_kw)
    return No2B43F(adc, CAL, **kw), fake, bus


def test_driver_reading_from_the_board():
    drv, _, _ = rig()
    r = drv.read()
    assert r.sensor == drv.name == "no2_b43f"  # labelled by its section name
    assert r.values["no2_we_mv"] == pytest.approx(320.0)
    assert r.values["no2_ae_mv"] == pytest.approx(310.0)
    assert r.values["no2_temp_c"] == pytest.approx(25.0)
    # The driver rounds ppb to 0.01 (the wire carries the sensor's resolution, not float noise).
    assert r.values["no2_ppb"] == pytest.approx((25 - 0.5 * 10) / SENS, abs=0.005)  # n_T(25 °C) = 0.5
    assert r.meta["serial"] == "202931852" and r.meta["algorithm"] == 1
    assert r.flags == ()


def test_driver_with_temperature_source_and_algorithm_4():
    drv, _, _ = rig(temp_channel=None, temp_from_mv=None, temp_source=lambda: 45.0, algorithm=4)
    r = drv.read()
    assert r.values["no2_ppb"] == pytest.approx((25 - 10 - 36) / SENS, abs=0.005)
    assert r.meta["algorithm"] == 4


def test_driver_channels_are_configurable():
    drv, fake, _ = rig(we_channel="AIN3", ae_channel="AIN0", temp_channel=None, temp_from_mv=None,
                       temp_source=lambda: 20.0)
    fake.set_voltage(3, 0.320)
    fake.set_voltage(0, 0.310)
    r = drv.read()
    assert r.values["no2_we_mv"] == pytest.approx(320.0)
    assert r.values["no2_ae_mv"] == pytest.approx(310.0)


def test_driver_flags_clamped_temperature_and_nan():
    drv, fake, _ = rig()
    fake.set_voltage(2, 0.600)  # 60 °C: outside the table, factors clamped
    r = drv.read()
    assert r.flags == ("temp_outside_correction_table",)
    assert r.values["no2_ppb"] == pytest.approx((25 + 15) / SENS, abs=0.005)
    drv2, _, _ = rig(temp_channel=None, temp_from_mv=None, temp_source=lambda: math.nan)
    r2 = drv2.read()
    assert r2.values["no2_ppb"] is None and r2.flags == ("no_temperature",)


def test_driver_bus_errors_retried_then_raised():
    drv, _, bus = rig()
    bus.fail_next(2)
    drv.read()
    assert drv.read().meta["bus_retries"] == 2
    bus.fail_next(100)
    with pytest.raises(BusError):
        drv.read()


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"algorithm": 5}, "no2.algorithm"),
        ({"temp_source": lambda: 20.0}, "no2.temperature"),  # both sources
        ({"temp_channel": None, "temp_from_mv": None}, "no2.temperature"),  # neither
        ({"temp_from_mv": None}, "no2.temp_mv_to_c"),
        ({"ae_channel": "AIN0"}, "no2.channels"),
    ],
)
def test_driver_config_errors(kw, key):
    with pytest.raises(ConfigError) as exc:
        rig(**kw)
    assert exc.value.key == key


def test_algorithm_2_needs_a_non_zero_aeo():
    cal = No2Calibration("X", 295, 300, 10, 0.0, -0.3547, -0.73)
    adc = ADS1115(FakeI2CBus(), clock=SimClock(0.0))
    with pytest.raises(ConfigError):
        No2B43F(adc, cal, temp_source=lambda: 20.0, algorithm=2)
    with pytest.raises(ValueError):
        no2_ppb(WE_MV, AE_MV, 20.0, cal, 2)


def test_board_temperature_is_read_every_few_seconds_not_every_second():
    from drivers.ads1115 import ADS1115
    from drivers.i2c import FakeI2CBus
    from drivers.no2 import LinearTemperature, No2B43F
    from core.no2_sheet import No2Calibration
    from simulator.i2c_devices import FakeADS1115

    volts = {0: 0.320, 1: 0.306, 2: 0.650}
    fake = FakeADS1115(source=lambda ch: volts[ch])
    bus = FakeI2CBus()
    bus.attach(0x49, fake)
    now = [0.0]
    cal = No2Calibration("s1", 295.0, 300.0, 12.0, 6.0, -0.3547, -0.73)
    drv = No2B43F(ADS1115(bus, 0x49), cal, temp_channel="AIN2", temp_from_mv=LinearTemperature(500.0, 10.0),
                  temp_every_s=10.0, clock=lambda: now[0])
    temps = []
    for i in range(25):
        now[0] = float(i)
        volts[2] = 0.650 + 0.001 * i  # warming by 0.1 °C a second
        temps.append(drv.read().values["no2_temp_c"])
    # 25 readings, WE and AE each time, temperature at 0, 10 and 20 s only
    assert fake.conversions == 25 * 2 + 3
    assert temps[9] == temps[0] and temps[10] > temps[9] and abs(temps[20] - 17.0) < 0.01
