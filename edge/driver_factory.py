"""Build the configured sensor drivers.

Each ``[sensors.NAME]`` table names a ``driver`` and its options. Each driver
declares its options next to its code (``OPTIONS``, see ``driver_options``);
edge/config_schema.py checks them before anything is built, the same way for
``edge config check``, ``edge run``, a reload and a remote change.
Transports come from the options: a serial ``port`` (device path or pyserial
URL), an I2C ``bus`` number, an ALSA ``device``. In a simulated van the value
``"sim"`` (or ``"sim:NAME"`` for ports) takes the simulated hardware's
pseudo-terminal or fake bus instead, so the same drivers run.

| driver | options (default) |
|---|---|
| ``pms5003`` ``pms7003`` ``pmsa003`` | port, baudrate (9600), mode ("passive") |
| ``sds011`` | port, baudrate (9600), mode ("query") |
| ``sps30`` | port, baudrate (115200) |
| ``nmea-gps`` | port, baudrate (9600), single_sentence (false: the receiver sends RMC, GGA ...; true: one position sentence per epoch), collect_s (0.4), gap_s (0.05): upper bounds for the timing probe, which derives both from the baud and epoch rates |
| ``gpsd`` | host ("127.0.0.1"), port (2947) |
| ``no2-b43f`` | bus (1), address (0x49), serial, calibration_file or calibration table, algorithm (1), we_channel ("AIN0"), ae_channel ("AIN1"), temp_channel ("AIN2"), temp_mv_at_0c, temp_mv_per_c, temp_every_s (10), fsr_v (4.096), data_rate (128) |
| ``dgs-no2`` | port, baudrate (9600) |
| ``sound-module`` | bus (1), address (0x48), weighting ("A"), averaging_ms (1000) |
| ``microphone`` | device ("default"), sensitivity_dbfs (-26), calibration_offset_db (0), noise_floor_db (29), serial ("": calibration records under ``<device id>/<name>``) |
| ``sim-pm`` ``sim-no2`` ``sim-noise`` ``sim-gps`` | value-level simulated sensors (seed) |
| ``sim-oracle`` | checkable values for the delivery tests |
"""

from __future__ import annotations

from typing import Any, Callable

from drivers.base import SensorDriver
from edge import simulation
from edge.config import SensorConfig
from drivers.options import DriverOptions, Option, check_table
from core.errors import ConfigError, ConfigInvalid
from core.timekeeping import MIN_PLAUSIBLE_UTC_MS

DriverFactory = Callable[[SensorConfig, dict[str, Any]], SensorDriver]


# Where each driver declares its options (``DriverOptions`` next to its code): the schema
# (edge/config_schema.py) checks a [sensors.NAME] table against them for `edge config check`,
# `edge run`, a reload and a remote change alike, and the factories below take the result.
_OPTION_SPECS: dict[str, tuple[str, str]] = {
    **{d: ("drivers.pms", "OPTIONS") for d in ("pms5003", "pms7003", "pmsa003")},
    "sds011": ("drivers.sds011", "OPTIONS"), "sps30": ("drivers.sps30", "OPTIONS"),
    "nmea-gps": ("drivers.gps", "NMEA_OPTIONS"), "gpsd": ("drivers.gps", "GPSD_OPTIONS"),
    "no2-b43f": ("drivers.no2", "OPTIONS"), "dgs-no2": ("drivers.dgs_no2", "OPTIONS"),
    "sound-module": ("drivers.sound_module", "OPTIONS"), "microphone": ("drivers.noise.capture", "OPTIONS"),
}  # fmt: skip
# The value-level simulated sensors take only a seed (declared here: checking a file must not
# import the simulator).
SIM_OPTIONS = DriverOptions({"seed": Option(0)})


def driver_options(driver: str) -> DriverOptions | None:
    """The options a driver declares; None for a driver we do not know."""
    if driver in _OPTION_SPECS:
        import importlib

        module, attr = _OPTION_SPECS[driver]
        spec: DriverOptions = getattr(importlib.import_module(module), attr)
        return spec
    return SIM_OPTIONS if driver in FACTORIES else None


def _opts(sc: SensorConfig) -> dict[str, Any]:
    """The table's options merged over the driver's defaults. Checked by the schema before any
    build; checked again here (without the file rules) for callers that build directly."""
    spec = driver_options(sc.driver)
    assert spec is not None, sc.driver
    checked = check_table(spec.options, sc.options, what=f"option for driver {sc.driver!r}")
    if checked.problems:
        raise ConfigInvalid([ConfigError(f"sensors.{sc.name}.{k}", p) for k, p in checked.problems])
    return checked.values


def _monotonic(ctx: dict[str, Any]) -> Callable[[], float]:
    return ctx["clock"].monotonic


def _serial(sc: SensorConfig, ctx: dict[str, Any], url: str, baudrate: int) -> Any:
    from drivers.serialport import ReconnectingPort, port_opener

    if url.startswith("sim"):
        hw = ctx.get("hardware")
        key = url.partition(":")[2] or sc.name
        if hw is None or key not in hw.ports:
            raise ConfigError(f"sensors.{sc.name}.port", f"{url!r} needs simulated hardware with port {key!r}")
        url = hw.ports[key]
    # The port may be a USB adapter that is not there yet: the driver waits for it.
    return ReconnectingPort(port_opener(url, baudrate), require_at_start=False, label=f"{sc.name} ({url})")


def _bus(sc: SensorConfig, ctx: dict[str, Any], bus: Any) -> Any:
    if bus == "sim":
        hw = ctx.get("hardware")
        if hw is None:
            raise ConfigError(f"sensors.{sc.name}.bus", "'sim' needs simulated hardware")
        return hw.bus
    if not isinstance(bus, int) or isinstance(bus, bool):
        raise ConfigError(f"sensors.{sc.name}.bus", f"an I2C bus number such as 1, or 'sim', not {bus!r}")
    from drivers.i2c import SMBusAdapter

    return SMBusAdapter(bus)


def _pms(sc: SensorConfig, ctx: dict[str, Any]) -> SensorDriver:
    from drivers.pms import PMSx003Driver

    o = _opts(sc)
    return PMSx003Driver(_serial(sc, ctx, o["port"], o["baudrate"]), _monotonic(ctx), sc.name, mode=o["mode"])


def _sds011(sc: SensorConfig, ctx: dict[str, Any]) -> SensorDriver:
    from drivers.sds011 import SDS011Driver

    o = _opts(sc)
    return SDS011Driver(_serial(sc, ctx, o["port"], o["baudrate"]), _monotonic(ctx), sc.name, mode=o["mode"])


def _sps30(sc: SensorConfig, ctx: dict[str, Any]) -> SensorDriver:
    from drivers.sps30 import SPS30Driver

    o = _opts(sc)
    return SPS30Driver(_serial(sc, ctx, o["port"], o["baudrate"]), _monotonic(ctx), sc.name)


def _nmea(sc: SensorConfig, ctx: dict[str, Any]) -> SensorDriver:
    from drivers.gps import NmeaGpsDriver

    o = _opts(sc)  # collect_s, gap_s: upper bounds for the timing probe (drivers/gps.py NMEA_OPTIONS)
    # No van measures before the plausible window: an earlier GPS date is a week-number rollover.
    # A real port is timed by a reader thread (drivers/gps.py); a simulated one emits in
    # lock-step with the virtual clock the sampling loop moves, so it is timed at the read.
    return NmeaGpsDriver(_serial(sc, ctx, o["port"], o["baudrate"]), sc.name, _monotonic(ctx),
                         rollover_pivot_utc=MIN_PLAUSIBLE_UTC_MS / 1000, single_sentence=o["single_sentence"],
                         reader_thread=not str(o["port"]).startswith("sim"), baudrate=o["baudrate"],
                         collect_s=o["collect_s"], gap_s=o["gap_s"])


def explain(sc: SensorConfig) -> list[str]:
    """What a technician should know about a sensor's settings (``edge config check`` prints it)."""
    if sc.driver == "nmea-gps" and sc.options.get("single_sentence") is True:
        return [
            f"sensors.{sc.name}.single_sentence = true: fixes from a receiver that sends one position "
            "sentence per epoch (RMC, GGA or GNS only). Positions are not cross-checked by a second "
            "sentence (flag single_sentence); fields the sentence lacks are unknown (RMC: altitude, "
            "satellites, HDOP; GGA: date, so no GPS time, flag no_gps_time); the time of day is "
            "trusted when each epoch follows the previous one."
        ]
    return []


def _gpsd(sc: SensorConfig, ctx: dict[str, Any]) -> SensorDriver:
    from drivers.gps import GpsdSource

    o = _opts(sc)
    return GpsdSource(host=o["host"], port=o["port"], name=sc.name, clock=_monotonic(ctx))


def _no2_b43f(sc: SensorConfig, ctx: dict[str, Any]) -> SensorDriver:
    from drivers.ads1115 import ADS1115
    from drivers.no2 import LinearTemperature, No2B43F
    from edge.calibration import configured_no2_sheet

    o = _opts(sc)
    cal = configured_no2_sheet(sc)  # the schema has checked it: file there, serial in it
    if cal is None:
        raise ConfigError(f"sensors.{sc.name}.calibration_file", "required: the sensor's calibration sheet")
    adc = ADS1115(_bus(sc, ctx, o["bus"]), o["address"], fsr_v=o["fsr_v"], data_rate=o["data_rate"],
                  clock=ctx["clock"])
    return No2B43F(
        adc, cal, we_channel=o["we_channel"], ae_channel=o["ae_channel"], temp_channel=o["temp_channel"],
        temp_from_mv=LinearTemperature(o["temp_mv_at_0c"], o["temp_mv_per_c"]),
        algorithm=o["algorithm"], name=sc.name, temp_every_s=o["temp_every_s"], clock=_monotonic(ctx),
    )


def _dgs(sc: SensorConfig, ctx: dict[str, Any]) -> SensorDriver:
    from drivers.dgs_no2 import DgsNo2

    o = _opts(sc)
    return DgsNo2(_serial(sc, ctx, o["port"], o["baudrate"]), clock=ctx["clock"], name=sc.name)


def _sound_module(sc: SensorConfig, ctx: dict[str, Any]) -> SensorDriver:
    from drivers.sound_module import SoundLevelModule

    o = _opts(sc)
    # Reset min/max at every read: each sample's lamin/lamax then cover its own second.
    return SoundLevelModule(_bus(sc, ctx, o["bus"]), o["address"], weighting=o["weighting"],
                            averaging_ms=o["averaging_ms"], reset_each_read=True, name=sc.name)


def _microphone(sc: SensorConfig, ctx: dict[str, Any]) -> SensorDriver:
    from drivers.noise.capture import AlsaSource, MicrophoneDriver
    from drivers.noise.levels import LevelMeter, MeterConfig

    o = _opts(sc)
    meter = LevelMeter(MeterConfig(sensitivity_dbfs=o["sensitivity_dbfs"],
                                   calibration_offset_db=o["calibration_offset_db"],
                                   noise_floor_db=o["noise_floor_db"]))
    if o["device"] == "sim":
        hw = ctx.get("hardware")
        if hw is None or hw.microphone is None:
            raise ConfigError(f"sensors.{sc.name}.device", "'sim' needs simulated hardware with a microphone")
        source: Any = hw.microphone
    else:
        source = AlsaSource(device=o["device"])
    return MicrophoneDriver(source, meter, name=sc.name, clock=_monotonic(ctx))


def _sim_factory(kind: str) -> DriverFactory:
    def make(sc: SensorConfig, ctx: dict[str, Any]) -> SensorDriver:
        world = ctx.get("world")
        if world is None:
            raise ConfigError(f"sensors.{sc.name}.driver", f"{kind!r} needs [simulation] enabled = true")
        o = _opts(sc)
        return simulation.backend(f"sensors.{sc.name}.driver").value_driver(kind, world, name=sc.name, seed=o["seed"])

    return make


FACTORIES: dict[str, DriverFactory] = {
    "pms5003": _pms, "pms7003": _pms, "pmsa003": _pms, "sds011": _sds011, "sps30": _sps30,
    "nmea-gps": _nmea, "gpsd": _gpsd, "no2-b43f": _no2_b43f, "dgs-no2": _dgs,
    "sound-module": _sound_module, "microphone": _microphone,
    **{k: _sim_factory(k) for k in ("sim-pm", "sim-no2", "sim-noise", "sim-gps", "sim-oracle")},
}


# What each driver measures, for the message about an unknown one: the [sensors.NAME] name
# is the owner's choice (products select by the values' keys), the driver names the hardware.
MEASURES = {
    "PM2.5, PM10 in µg/m³ (pm25, pm10)": ("pms5003", "pms7003", "pmsa003", "sds011", "sps30"),
    "NO2 in ppb (no2_ppb)": ("no2-b43f", "dgs-no2"),
    "noise in dB (laeq, or lceq/lzeq when weighted C/Z)": ("microphone", "sound-module"),
    "position and time": ("nmea-gps", "gpsd"),
    "simulation": ("sim-pm", "sim-no2", "sim-noise", "sim-gps", "sim-oracle"),
}


def unknown_driver(sc: SensorConfig) -> ConfigError:
    """The error for a driver we do not know, with a near miss and what each known one measures."""
    import difflib

    # Driver names are lower case; people write the part number as printed (SPS30, PMS5003).
    near = difflib.get_close_matches(str(sc.driver).strip().lower(), list(FACTORIES), n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    kinds = "; ".join(f"{', '.join(ds)}: {what}" for what, ds in MEASURES.items())
    return ConfigError(
        f"sensors.{sc.name}.driver",
        f"unknown driver {sc.driver!r}: {hint}the section name is free, `driver` names the hardware, "
        f"one of: {kinds}",
    )


def build_drivers(sensors: list[SensorConfig], ctx: dict[str, Any]) -> list[SensorDriver]:
    out: list[SensorDriver] = []
    try:
        for sc in sensors:
            factory = FACTORIES.get(sc.driver)
            if factory is None:
                raise unknown_driver(sc)
            out.append(factory(sc, ctx))
    except BaseException:
        for d in out:
            d.close()
        raise
    return out
