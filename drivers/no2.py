"""Alphasense NO2-B43F on an ISB board, read through an ADS1115.

The chemistry is in core/no2_sheet.py (``no2_ppb`` and the AAN 803 factor tables, shared with
the receiver); the driver only reads millivolts and a temperature and hands them over.
"""

from __future__ import annotations

import math
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError
from core.no2_sheet import ALGORITHMS, TABLE_TEMPS_C, No2Calibration, load_calibrations_toml, no2_ppb
from drivers.ads1115 import ADS1115, DATA_RATE_CODES, PGA_CODES, Mux, parse_mux
from drivers.options import REQUIRED, DriverOptions, Option, Problem, i2c_address, i2c_bus
from drivers.base import Reading


@dataclass(frozen=True, slots=True)
class LinearTemperature:
    """mV -> °C for the board's temperature output: °C = (mV - mv_at_0c) / mv_per_c.

    The ISB temperature circuit differs between board revisions, so both
    numbers come from configuration, not from this module.
    """

    mv_at_0c: float
    mv_per_c: float

    def __post_init__(self) -> None:
        if self.mv_per_c == 0:
            raise ConfigError("no2.temp_mv_per_c", "must be non-zero")

    def __call__(self, mv: float) -> float:
        return (mv - self.mv_at_0c) / self.mv_per_c


class No2B43F:
    """``SensorDriver`` for one NO2-B43F: Reading(sensor=<section name>, values={no2_ppb, no2_we_mv, ...}).

    Temperature comes either from the ISB's own sensor on ``temp_channel``
    (converted by ``temp_from_mv``) or from ``temp_source`` (e.g. the van's
    T/RH sensor); exactly one of the two must be configured.
    """

    def __init__(
        self,
        adc: ADS1115,
        cal: No2Calibration,
        *,
        we_channel: str | int | Mux = "AIN0",
        ae_channel: str | int | Mux = "AIN1",
        temp_channel: str | int | Mux | None = None,
        temp_from_mv: Callable[[float], float] | None = None,
        temp_source: Callable[[], float] | None = None,
        algorithm: int = 1,
        name: str = "no2_b43f",
        temp_every_s: float = 0.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ConfigError("no2.algorithm", f"must be one of 1, 2, 3, 4, not {algorithm!r}")
        if algorithm == 2 and cal.ae_o_mv == 0:
            raise ConfigError(
                "no2.algorithm", f"algorithm 2 divides by AEo, which is 0 for {cal.serial}"
            )
        if (temp_channel is None) == (temp_source is None):
            raise ConfigError(
                "no2.temperature", "configure exactly one of temp_channel or temp_source"
            )
        if temp_channel is not None and temp_from_mv is None:
            raise ConfigError("no2.temp_mv_to_c", "temp_channel needs a mV -> °C conversion")
        self.adc = adc
        self.cal = cal
        self.we_channel = parse_mux(we_channel)
        self.ae_channel = parse_mux(ae_channel)
        self.temp_channel = parse_mux(temp_channel) if temp_channel is not None else None
        channels = [self.we_channel, self.ae_channel]
        if self.temp_channel is not None:
            channels.append(self.temp_channel)
        if len(set(channels)) != len(channels):
            raise ConfigError("no2.channels", "WE, AE and temperature channels must differ")
        self.temp_from_mv = temp_from_mv
        self.temp_source = temp_source
        # The board's temperature moves by tenths of a degree a minute, and the AAN 803
        # factors change per 10 °C: reading it every few seconds instead of every
        # second saves one ADC conversion in three on a small Pi.
        self.temp_every_s = temp_every_s
        self._clock = clock or time.monotonic
        self._temp: tuple[float, float] | None = None  # (monotonic time read, °C)
        self.algorithm = algorithm
        self.name = name

    def _temperature_c(self) -> float:
        if self.temp_every_s > 0:
            now = self._clock()
            if self._temp is not None and now - self._temp[0] < self.temp_every_s:
                return self._temp[1]
            t = self._read_temperature_c()
            self._temp = (now, t)
            return t
        return self._read_temperature_c()

    def _read_temperature_c(self) -> float:
        if self.temp_channel is not None:
            assert self.temp_from_mv is not None
            return float(self.temp_from_mv(self.adc.read_mv(self.temp_channel)))
        assert self.temp_source is not None
        return float(self.temp_source())

    def read(self) -> Reading:
        we_mv = self.adc.read_mv(self.we_channel)
        ae_mv = self.adc.read_mv(self.ae_channel)
        temp_c = self._temperature_c()
        flags: tuple[str, ...] = ()
        if math.isnan(temp_c):
            # Without a temperature there is no correction: report the volts, not a guess.
            ppb: float | None = None
            flags = ("no_temperature",)
        else:
            ppb = no2_ppb(we_mv, ae_mv, temp_c, self.cal, self.algorithm)
            if not TABLE_TEMPS_C[0] <= temp_c <= TABLE_TEMPS_C[-1]:
                flags = ("temp_outside_correction_table",)
        return Reading(
            sensor=self.name,  # the section name: products select NO2 by its keys
            # Rounded far below the ADC's step (7.8 µV at the finest gain) and the sensor's noise
            # (issue #18): float residue such as 317.75000000000006 costs ~7 bytes a value on the wire.
            values={"no2_ppb": None if ppb is None else round(ppb, 2), "no2_we_mv": round(we_mv, 4),
                    "no2_ae_mv": round(ae_mv, 4), "no2_temp_c": temp_c if math.isnan(temp_c) else round(temp_c, 3)},
            flags=flags,
            meta={
                "serial": self.cal.serial,
                "algorithm": self.algorithm,
                "bus_retries": self.adc.stats.retries,
            },
        )

    def close(self) -> None:
        """The ADC powers down by itself after each single shot; nothing to release."""


# -- [sensors.NAME] options of driver = "no2-b43f" (edge/driver_factory.py builds it) -------------------


def _channel_problem(v: Any) -> str | None:
    try:
        parse_mux(v)
    except ConfigError as exc:
        return exc.problem
    return None


def _channels_differ(o: Mapping[str, Any]) -> list[Problem]:
    try:
        chans = [parse_mux(o[k]) for k in ("we_channel", "ae_channel", "temp_channel")]
    except ConfigError:
        return []  # named by the option's own check
    if len(set(chans)) != len(chans):
        return [("temp_channel" if chans[2] in chans[:2] else "ae_channel",
                 "WE, AE and temperature channels must differ")]
    return []


def configured_sheet(o: Mapping[str, Any]) -> No2Calibration | None:
    """The sheet a table's options give (inline ``calibration`` first, then ``calibration_file``);
    None when neither is set. Raises ConfigError (keyed by the option) when it cannot be read."""
    serial = str(o.get("serial", ""))
    if o.get("calibration"):
        try:
            return No2Calibration.from_mapping(serial, o["calibration"])
        except ConfigError as exc:
            raise ConfigError("calibration", f"{exc.key.removeprefix(f'no2.calibration.{serial}.')}: "
                                             f"{exc.problem}") from exc  # fmt: skip
    path = o.get("calibration_file")
    if not path:
        return None
    try:
        found = Path(path).is_file()
    except OSError as exc:  # a name too long, no permission: a config error on the key, never a crash
        raise ConfigError("calibration_file", f"cannot use this path: {exc.strerror or exc}") from exc
    if not found:
        raise ConfigError("calibration_file", f"no such file: {path}")
    try:
        cals = load_calibrations_toml(path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("calibration_file", f"cannot read {path}: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError("calibration_file", f"{path}: {exc.key}: {exc.problem}") from exc
    if serial not in cals:
        raise ConfigError("serial", f"no calibration for {serial} in {path} (it has: {', '.join(cals) or 'none'})")
    return cals[serial]


_NO_SHEET: Problem = ("calibration_file", "required: the sensor's calibration sheet, calibration_file = "
                                           "\"/etc/datalab-edge/no2-calibration.toml\" (or a calibration table)")


def _sheet(o: Mapping[str, Any]) -> list[Problem]:
    """Required-if: a real sensor needs its sheet (the simulated bus has its own); the file must
    exist, parse and hold this serial, so `edge config check` finds what `edge run` would."""
    if o["serial"] is REQUIRED or not isinstance(o["serial"], str):
        # The serial is named on its own; a sheet is still needed (which one, the serial says).
        if o["calibration"] or o["calibration_file"] or o["bus"] == "sim":
            return []
        return [_NO_SHEET]
    try:
        cal = configured_sheet(o)
    except ConfigError as exc:
        return [(exc.key, exc.problem)]
    if cal is None:
        if o["bus"] == "sim":
            return []
        return [_NO_SHEET]
    if o["algorithm"] == 2 and cal.ae_o_mv == 0:
        return [("algorithm", f"algorithm 2 divides by AEo, which is 0 for {cal.serial}")]
    return []


OPTIONS = DriverOptions(
    {
        "bus": i2c_bus(),
        "address": i2c_address(0x49, 0x48, 0x4B),  # the ADDR pin: 0x48..0x4B
        "serial": Option(REQUIRED, kind=str, doc="the sensor's serial, as on its sheet: serial = \"202123456\""),
        "calibration_file": Option(""),
        "calibration": Option({}),
        "algorithm": Option(1, choices=ALGORITHMS),
        "we_channel": Option("AIN0", kind=(str, int), check=_channel_problem),
        "ae_channel": Option("AIN1", kind=(str, int), check=_channel_problem),
        "temp_channel": Option("AIN2", kind=(str, int), check=_channel_problem),
        "temp_mv_at_0c": Option(500.0),
        "temp_mv_per_c": Option(10.0, check=lambda v: None if v else "must be non-zero"),
        "temp_every_s": Option(10.0, lo=0.0, hi=3600.0, unit="seconds"),
        "fsr_v": Option(4.096, choices=tuple(sorted(PGA_CODES))),
        "data_rate": Option(128, choices=tuple(sorted(DATA_RATE_CODES))),
    },
    rules=(_channels_differ, _sheet),
)
