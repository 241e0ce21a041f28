"""``edge no2``: sheet import, zero, span and AAN 803 algorithm for the Alphasense NO2-B43F.

Every command proposes a new record (the full parameter set, see edge/calibration.py),
shows old -> new and asks before anything changes. Zero and span adjust only the
linear finish ``ppb = intercept + slope * AAN803(...)``; the sheet stays the sheet.
"""

from __future__ import annotations

import math
from typing import Any

import click
import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from core.no2_sheet import N_T, interpolate_factor
from core.calibration import (
    CalibrationError,
    CalibrationRecord,
    no2_raw_ppb,
    no2_sheet,
    no2_values_from_sheet,
)
from edge.calibration import CalibrationStore, Proposal, configured_no2_sheet, import_sheet
from edge.config import AgentConfig, SensorConfig
from edge.technician.cli_support import (
    Van,
    confirm_options,
    console,
    declined_exit,
    find_sensor,
    handle_errors,
    load_van_config,
    open_store,
    propose_and_confirm,
    van_options,
)

NO2_DRIVERS = ("no2-b43f",)
# Zero and span refuse a signal that is still moving: a sensor needs minutes to settle
# after the zero-air or gas hood goes on, and a drifting mean is not a zero.
DEFAULT_MAX_SLOPE = 0.2  # ppb per minute
DEFAULT_MAX_SD = 5.0  # ppb, scatter around the trend line
SPAN_SLOPE_LIMITS = (0.5, 2.0)  # a span that changes the gain more than this is a fault


def current_no2(store: CalibrationStore, sc: SensorConfig) -> tuple[CalibrationRecord | None, dict[str, Any]]:
    """The active record and its values, or the configured sheet's values if there is none."""
    serial = str(sc.options.get("serial", ""))
    rec = store.active("no2", serial)
    if rec is not None:
        return rec, dict(rec.values)
    cal = configured_no2_sheet(sc)
    if cal is None:
        raise CalibrationError(f"NO2 sensor {serial} has neither a calibration record nor a configured sheet: "
                               "import its sheet first ('edge no2 sheet import FILE')")
    return None, no2_values_from_sheet(cal, int(sc.options.get("algorithm", 1)))


def stability(t_min: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(mean, slope per minute, sd of the residuals around the trend line)."""
    if len(y) < 3:
        raise CalibrationError("too few readings to judge stability")
    slope, icpt = np.polyfit(t_min, y, 1)
    resid = y - (icpt + slope * t_min)
    return float(np.mean(y)), float(slope), float(np.std(resid, ddof=2))


def check_stable(t_min: np.ndarray, y: np.ndarray, max_slope: float, max_sd: float, what: str) -> tuple[float, float, float]:
    mean, slope, sd = stability(t_min, y)
    if abs(slope) > max_slope:
        raise CalibrationError(f"{what} is not stable: drifting {slope:+.2f} ppb/min (limit ±{max_slope}); "
                               "let the sensor settle longer")
    if sd > max_sd:
        raise CalibrationError(f"{what} is not stable: scatter {sd:.2f} ppb (limit {max_sd}); check the hood and flow")
    return mean, slope, sd


def simulate_gas(van: Van, ppb: float, *, offset_ppb: float, gain: float, drift_ppb_per_min: float,
                 noise_ppb: float, seed: int = 7) -> None:
    """Put the simulated NO2 sensor under a hood: the ADC sees ``gain * ppb + offset + drift``.

    The inverse of AAN 803 algorithm 1 on the simulator's sheet, like SimulatedHardware does
    for street air, so the real driver and the real arithmetic are exercised.
    """
    from edge import simulation

    backend = simulation.backend()
    hw, clock = van.hardware, van.clock
    rng = np.random.default_rng(seed)
    cal = backend.no2_sheet
    t0 = clock.elapsed

    def volts(channel: int) -> float:
        temp_c = van.world.truth().air.temp_c
        if channel == 2:
            return (backend.temp_mv_at_0c + backend.temp_mv_per_c * temp_c) / 1000.0
        ae_mv = cal.ae_e_mv + cal.ae_o_mv
        if channel == 1:
            return ae_mv / 1000.0
        if channel == 0:
            minutes = (clock.elapsed - t0) / 60.0
            seen = gain * ppb + offset_ppb + drift_ppb_per_min * minutes + rng.normal(0.0, noise_ppb)
            n_t = interpolate_factor(temp_c, N_T)
            return (cal.we_e_mv + n_t * (ae_mv - cal.ae_e_mv) + seen * cal.sensitivity_mv_per_ppb) / 1000.0
        return 0.0

    hw.adc.source = volts


def measure(van: Van, name: str, values: dict[str, Any], minutes: float, label: str) -> dict[str, np.ndarray]:
    """Read the sensor once a second for ``minutes``, with a progress bar; raw AAN 803 ppb."""
    from core.errors import RecoverableError

    drv = van.driver(name)
    n = max(1, int(round(minutes * 60)))
    t, raw, temp, we, ae = [], [], [], [], []
    errors = 0
    t0 = van.clock.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} s"),
                  TimeRemainingColumn(), console=console(), transient=True) as bar:
        task = bar.add_task(label, total=n)
        for _ in range(n):
            try:
                r = drv.read()
            except RecoverableError:
                errors += 1
                r = None
            if r is not None:
                v = r.values
                if all(isinstance(v.get(k), (int, float)) and math.isfinite(v[k])
                       for k in ("no2_we_mv", "no2_ae_mv", "no2_temp_c")):
                    t.append((van.clock.monotonic() - t0) / 60.0)
                    we.append(v["no2_we_mv"]); ae.append(v["no2_ae_mv"]); temp.append(v["no2_temp_c"])
                    raw.append(no2_raw_ppb(values, v["no2_we_mv"], v["no2_ae_mv"], v["no2_temp_c"]))
            bar.advance(task)
            van.wait(1.0)
    if len(raw) < max(3, n // 2):
        raise CalibrationError(f"the NO2 sensor answered {len(raw)} of {n} reads ({errors} errors): check the wiring")
    return {k: np.asarray(x, dtype=float) for k, x in
            (("t_min", t), ("raw", raw), ("temp", temp), ("we", we), ("ae", ae))}


def _setup(config_path: str | None, simulate: bool, data_dir: str | None, sensor: str | None
           ) -> tuple[AgentConfig, SensorConfig, CalibrationStore]:
    cfg = load_van_config(config_path, simulate, data_dir)
    sc = find_sensor(cfg, NO2_DRIVERS, sensor)
    if not sc.options.get("serial"):
        raise CalibrationError(f"sensors.{sc.name}.serial is not set: the record must name the sensor")
    return cfg, sc, open_store(cfg)


sensor_option = click.option("--sensor", help="The NO2 sensor's name in the configuration (if several).")


def sim_options(default_offset: float = 4.0) -> Any:
    def deco(f: Any) -> Any:
        f = click.option("--sim-drift", default=0.0, show_default=True, help="--simulate: drift, ppb/min.")(f)
        f = click.option("--sim-gain", default=0.9, show_default=True, help="--simulate: the sensor's true gain.")(f)
        f = click.option("--sim-offset", default=default_offset, show_default=True,
                         help="--simulate: the sensor's true zero offset, ppb.")(f)
        return f
    return deco


@click.group("no2")
def no2() -> None:
    """Calibrate the Alphasense NO2-B43F: sheet, zero, span, AAN 803 algorithm.

    \b
    Examples:
      edge no2 sheet import /media/usb/202123456.csv
      edge no2 zero --minutes 15
      edge no2 span --ppb 200 --minutes 10
      edge no2 algorithm 1
      edge no2 zero --minutes 10 --simulate --data-dir /tmp/van --yes
    """


@no2.group("sheet")
def sheet() -> None:
    """The sensor's Alphasense calibration sheet."""


@sheet.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--serial", help="Which sheet in a file that holds several (default: the configured serial).")
@sensor_option
@confirm_options
@van_options
@handle_errors
def sheet_import(file: str, serial: str | None, sensor: str | None, technician: str, yes: bool, pending: bool,
                 config_path: str | None, simulate: bool, data_dir: str | None) -> None:
    """Import an Alphasense sheet (CSV, JSON or TOML) as a new 'sheet' record.

    The file gives WEe, AEe, WEo/AEo (or the total zeros WEt/AEt), the WE sensitivity
    in nA/ppb and the board gain in mV/nA. Its serial must be the configured sensor's.
    The zero/span finish starts afresh with a new sheet.

    \b
    Examples:
      edge no2 sheet import 202123456.csv
      edge no2 sheet import sheets.toml --serial 202123456 --yes
    """
    cfg, sc, store = _setup(config_path, simulate, data_dir, sensor)
    configured = str(sc.options["serial"])
    sn, cal = import_sheet(file, serial or configured)
    if sn != configured:
        raise CalibrationError(f"the sheet is for sensor {sn} but the van's NO2 sensor is {configured}: "
                               f"fit the right sheet or correct sensors.{sc.name}.serial")
    prev, old = current_no2(store, sc)
    values = no2_values_from_sheet(cal, int(old.get("algorithm", 1)))
    p = Proposal("no2", sn, "sheet", values, prev, old if prev is None else None,
                 note=f"Sheet {file}. A new sheet resets zero and span: do a zero afterwards.")
    declined_exit(propose_and_confirm(store, p, technician=technician, device=cfg.device.id, yes=yes,
                                      pending=pending, out=console()))


@no2.command("zero")
@click.option("--minutes", default=10.0, show_default=True, type=click.FloatRange(1.0, 240.0),
              help="How long to average in zero air.")
@click.option("--max-slope", default=DEFAULT_MAX_SLOPE, show_default=True, help="Refuse a drift above this, ppb/min.")
@click.option("--max-sd", default=DEFAULT_MAX_SD, show_default=True, help="Refuse a scatter above this, ppb.")
@sim_options()
@sensor_option
@confirm_options
@van_options
@handle_errors
def zero(minutes: float, max_slope: float, max_sd: float, sim_drift: float, sim_gain: float, sim_offset: float,
         sensor: str | None, technician: str, yes: bool, pending: bool, config_path: str | None,
         simulate: bool, data_dir: str | None) -> None:
    """Zero in zero air: average, check stability, set the intercept so zero air reads 0.

    Put the zero-air hood on (or a scrubber cartridge) and let the sensor settle for
    a few minutes first. An unstable signal is refused: nothing changes.

    \b
    Examples:
      edge no2 zero --minutes 15
      edge no2 zero --minutes 10 --max-slope 0.1 --yes
      edge no2 zero --simulate --data-dir /tmp/van --sim-drift 1.0   # see a refusal
    """
    cfg, sc, store = _setup(config_path, simulate, data_dir, sensor)
    prev, values = current_no2(store, sc)
    with Van(cfg, only=[sc.name]) as van:
        if van.hardware is not None:
            simulate_gas(van, 0.0, offset_ppb=sim_offset, gain=sim_gain, drift_ppb_per_min=sim_drift, noise_ppb=2.0)
        m = measure(van, sc.name, values, minutes, f"Zero air, {minutes:g} min")
    mean, slope, sd = check_stable(m["t_min"], m["raw"], max_slope, max_sd, "the zero")
    t_mean = float(np.mean(m["temp"]))
    new = dict(values)
    s, tc = float(values.get("slope", 1.0)), float(values.get("temp_coef_ppb_per_c", 0.0))
    new["intercept_ppb"] = -s * mean - tc * t_mean
    new.update(zero_raw_ppb=mean, zero_temp_c=t_mean, zero_we_mv=float(np.mean(m["we"])),
               zero_ae_mv=float(np.mean(m["ae"])), zero_sd_ppb=sd, zero_drift_ppb_per_min=slope)
    out = console()
    out.print(f"Zero air: raw {mean:.2f} ppb, drift {slope:+.3f} ppb/min, scatter {sd:.2f} ppb, "
              f"{len(m['raw'])} readings at {t_mean:.1f} °C: [green]stable[/]")
    p = Proposal("no2", str(sc.options["serial"]), "zero", new, prev, values if prev is None else None)
    declined_exit(propose_and_confirm(store, p, technician=technician, device=cfg.device.id, yes=yes,
                                      pending=pending, out=out))


@no2.command("span")
@click.option("--ppb", type=click.FloatRange(min=10.0), required=True, help="The span gas concentration, ppb.")
@click.option("--minutes", default=5.0, show_default=True, type=click.FloatRange(1.0, 240.0))
@click.option("--max-slope", default=DEFAULT_MAX_SLOPE * 5, show_default=True, help="Refuse a drift above this, ppb/min.")
@click.option("--max-sd", default=DEFAULT_MAX_SD * 2, show_default=True, help="Refuse a scatter above this, ppb.")
@sim_options()
@sensor_option
@confirm_options
@van_options
@handle_errors
def span(ppb: float, minutes: float, max_slope: float, max_sd: float, sim_drift: float, sim_gain: float,
         sim_offset: float, sensor: str | None, technician: str, yes: bool, pending: bool,
         config_path: str | None, simulate: bool, data_dir: str | None) -> None:
    """Span with a known NO2 concentration: set the slope, keeping the zero point.

    Do a zero first; the span then scales the reading so the gas reads --ppb while
    zero air still reads 0. A change of the gain beyond x0.5..x2 is refused (wrong gas,
    no flow, or a dying sensor).

    \b
    Examples:
      edge no2 span --ppb 200
      edge no2 span --ppb 150 --minutes 10 --yes
    """
    cfg, sc, store = _setup(config_path, simulate, data_dir, sensor)
    prev, values = current_no2(store, sc)
    with Van(cfg, only=[sc.name]) as van:
        if van.hardware is not None:
            simulate_gas(van, ppb, offset_ppb=sim_offset, gain=sim_gain, drift_ppb_per_min=sim_drift, noise_ppb=2.0)
        m = measure(van, sc.name, values, minutes, f"Span gas {ppb:g} ppb, {minutes:g} min")
    mean, slope, sd = check_stable(m["t_min"], m["raw"], max_slope, max_sd, "the span")
    t_mean = float(np.mean(m["temp"]))
    a, b = float(values.get("intercept_ppb", 0.0)), float(values.get("slope", 1.0))
    tc = float(values.get("temp_coef_ppb_per_c", 0.0))
    z = -(a + tc * t_mean) / b  # the raw reading that finishes to 0 ppb now
    if mean - z <= 0:
        raise CalibrationError(f"the span gas reads {mean:.1f} ppb raw, not above the zero point {z:.1f}: no gas?")
    b_new = ppb / (mean - z)
    if not SPAN_SLOPE_LIMITS[0] <= b_new / b <= SPAN_SLOPE_LIMITS[1]:
        raise CalibrationError(f"the span would change the gain x{b_new / b:.2f} (limits x{SPAN_SLOPE_LIMITS[0]}"
                               f"..x{SPAN_SLOPE_LIMITS[1]}): check the gas concentration and the flow")
    new = dict(values)
    new.update(slope=b_new, intercept_ppb=-b_new * z - tc * t_mean, span_ppb=ppb, span_raw_ppb=mean,
               span_temp_c=t_mean, span_sd_ppb=sd)
    out = console()
    out.print(f"Span gas {ppb:g} ppb: raw {mean:.2f} ppb (zero point {z:.2f}), scatter {sd:.2f} ppb: "
              f"slope {b:.4g} → {b_new:.4g}")
    p = Proposal("no2", str(sc.options["serial"]), "span", new, prev, values if prev is None else None)
    declined_exit(propose_and_confirm(store, p, technician=technician, device=cfg.device.id, yes=yes,
                                      pending=pending, out=out))


@no2.command("algorithm")
@click.argument("number", type=click.IntRange(1, 4))
@sensor_option
@confirm_options
@van_options
@handle_errors
def algorithm(number: int, sensor: str | None, technician: str, yes: bool, pending: bool,
              config_path: str | None, simulate: bool, data_dir: str | None) -> None:
    """Choose the AAN 803 temperature correction (1-4; Alphasense advises 1 for NO2).

    \b
    Examples:
      edge no2 algorithm 1
      edge no2 algorithm 3 --yes
    """
    cfg, sc, store = _setup(config_path, simulate, data_dir, sensor)
    prev, values = current_no2(store, sc)
    if int(values.get("algorithm", 1)) == number:
        raise CalibrationError(f"algorithm {number} is already in use")
    if number == 2 and float(values["ae_o_mv"]) == 0:
        raise CalibrationError("algorithm 2 divides by AEo, which is 0 on this sheet")
    no2_sheet(values)
    new = dict(values, algorithm=number)
    p = Proposal("no2", str(sc.options["serial"]), "sheet", new, prev, values if prev is None else None,
                 note="The zero and span were made with the previous algorithm: redo the zero.")
    declined_exit(propose_and_confirm(store, p, technician=technician, device=cfg.device.id, yes=yes,
                                      pending=pending, out=console()))
