"""``edge colocate pm|no2``: fit the van's sensor against a reference station.

Park the van next to a Luchtmeetnet station for a few days (at least 48 good hours),
export the station's hourly values and the van's data, and fit
``reference = a + b·device (+ c·T) (+ d·RH)``. A fit that passes the thresholds is
proposed as a 'colocation' record (PM with an RH term: a 'humidity' record).
"""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from core.calibration import CalibrationError
from edge.calibration import Proposal
from edge.technician.cli_support import (
    confirm_options,
    console,
    declined_exit,
    find_sensor,
    fmt_time,
    handle_errors,
    load_van_config,
    open_store,
    propose_and_confirm,
    van_options,
)
from edge.technician.fitting import (
    NO2_UGM3_PER_PPB,
    FitResult,
    Reference,
    hourly,
    fit,
    load_device_csv,
    load_device_store,
    load_reference,
)
from edge.technician.no2 import NO2_DRIVERS, current_no2

PM_DRIVERS = ("pms5003", "pms7003", "pmsa003", "sds011", "sps30", "sim-pm")


def colocation_options(f: Any) -> Any:
    opts = [
        click.option("--reference", "reference", required=True, type=click.Path(exists=True, dir_okay=False),
                     help="Luchtmeetnet export (CSV or JSON: station_number, formula, value, timestamp_measured)."),
        click.option("--device-data", type=click.Path(exists=True, dir_okay=False),
                     help="The van's data as CSV: time,value[,temp,rh] (time ISO 8601 or epoch)."),
        click.option("--store", "store_path", type=click.Path(dir_okay=False),
                     help="Read the van's samples from a receiver SQLite store instead."),
        click.option("--device", help="Device id in the store (default: this van's device.id)."),
        click.option("--station", help="Station number, if the export holds several."),
        click.option("--ref-stamp", type=click.Choice(["end", "start"]), default="end", show_default=True,
                     help="Whether the reference stamps an hour by its end (Luchtmeetnet) or start."),
        click.option("--temp", "use_temp", is_flag=True, help="Fit a temperature term too."),
        click.option("--min-r2", default=0.7, show_default=True, help="Reject a fit below this R²."),
        click.option("--min-hours", default=48, show_default=True, help="Reject a fit on fewer matched hours."),
        click.option("--from-start", is_flag=True,
                     help="Apply the record from the start of the co-location period (the receiver recomputes).")
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def report(fr: FitResult, ref: Reference, unit: str, ok: bool, why: str) -> Table:
    t = Table(title=f"Co-location against station {ref.station} ({ref.formula})", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    rows = [
        ("period", f"{fmt_time(fr.start)} – {fmt_time(fr.end)}"),
        ("matched hours n", str(fr.n)),
        ("R²", f"{fr.r2:.3f}"),
        ("slope b", f"{fr.slope:.4f}"),
        (f"intercept a ({unit})", f"{fr.intercept:.3f}"),
        *[(f"{k} coefficient", f"{v:.4f}") for k, v in fr.coefs.items()],
        (f"RMSE ({unit})", f"{fr.rmse:.3f}"),
        ("revised reference hours", str(ref.revised)),
        ("verdict", f"[green]{why}[/]" if ok else f"[red]rejected: {why}[/]"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _fit_values(fr: FitResult, ref: Reference) -> dict[str, Any]:
    """The fit's evidence, kept in the record (flat: one value per row in 'calibration show')."""
    return {"fit_station": ref.station, "fit_formula": ref.formula, "fit_n": fr.n, "fit_r2": fr.r2,
            "fit_slope": fr.slope, "fit_intercept": fr.intercept, "fit_rmse": fr.rmse,
            **{f"fit_{k}_coef": v for k, v in fr.coefs.items()}, "fit_start": fr.start, "fit_end": fr.end}


def _device_points(device_data: str | None, store_path: str | None, *, device: str, sensor: str, quantity: str,
                   temp_key: str | None, rh_key: str | None) -> list[Any]:
    if bool(device_data) == bool(store_path):
        raise CalibrationError("give the van's data with exactly one of --device-data CSV or --store DB")
    if device_data:
        return load_device_csv(device_data)
    return load_device_store(store_path, device=device, sensor=sensor, quantity=quantity,  # type: ignore[arg-type]
                             temp_key=temp_key, rh_key=rh_key)


@click.group("colocate")
def colocate() -> None:
    """Fit a sensor against a reference station (yearly check, after repairs).

    \b
    Examples:
      edge colocate no2 --reference luchtmeetnet-NL10636.csv --device-data van-017-no2.csv
      edge colocate pm --reference NL10636-pm25.json --store /var/lib/datalab/datalab.sqlite --rh
    """


@colocate.command("no2")
@colocation_options
@click.option("--ref-unit", type=click.Choice(["ugm3", "ppb"]), default="ugm3", show_default=True,
              help="Unit of the reference values (Luchtmeetnet reports NO2 in µg/m³).")
@click.option("--sensor", help="The NO2 sensor's name in the configuration (if several).")
@confirm_options
@van_options
@handle_errors
def colocate_no2(reference: str, device_data: str | None, store_path: str | None, device: str | None,
                 station: str | None, ref_stamp: str, use_temp: bool, min_r2: float, min_hours: int,
                 from_start: bool, ref_unit: str, sensor: str | None, technician: str, yes: bool, pending: bool,
                 config_path: str | None, simulate: bool, data_dir: str | None) -> None:
    """NO2 against a reference station; the fit is folded into the active record's finish.

    The device values are the van's reported no2_ppb (made with the record active
    during the co-location); the reference is converted from µg/m³ at 20 °C.

    \b
    Examples:
      edge colocate no2 --reference NL10636-no2.csv --device-data van-017.csv
      edge colocate no2 --reference NL10636-no2.json --store datalab.sqlite --device van-017 --temp --yes
    """
    cfg = load_van_config(config_path, simulate, data_dir)
    sc = find_sensor(cfg, NO2_DRIVERS, sensor)
    store = open_store(cfg)
    prev, values = current_no2(store, sc)
    ref = load_reference(reference, formula="NO2", station=station, stamp=ref_stamp)
    if ref_unit == "ugm3":
        ref.hours = {h: v / NO2_UGM3_PER_PPB for h, v in ref.hours.items()}
    pts = _device_points(device_data, store_path, device=device or cfg.device.id, sensor=sc.name,
                         quantity="no2_ppb", temp_key="no2_temp_c", rh_key=None)
    fr = fit(hourly(pts), ref.hours, temp=use_temp)
    ok, why = fr.accepted(min_r2, min_hours)
    out = console()
    out.print(report(fr, ref, "ppb", ok, why))
    if not ok:
        raise CalibrationError(f"co-location rejected: {why}")
    a, b, c = fr.intercept, fr.slope, fr.coefs.get("temp_c", 0.0)
    i, s, tc = (float(values.get(k, d)) for k, d in (("intercept_ppb", 0.0), ("slope", 1.0), ("temp_coef_ppb_per_c", 0.0)))
    new = dict(values)
    # reference = a + b·(i + s·raw + tc·T) + c·T: fold the fit into the record's finish.
    new.update(intercept_ppb=a + b * i, slope=b * s, temp_coef_ppb_per_c=b * tc + c,
               **_fit_values(fr, ref))
    p = Proposal("no2", str(sc.options.get("serial", "")), "colocation", new, prev, values if prev is None else None,
                 valid_from=fr.start if from_start else None)
    declined_exit(propose_and_confirm(store, p, technician=technician, device=cfg.device.id, yes=yes,
                                      pending=pending, out=out))


@colocate.command("pm")
@colocation_options
@click.option("--rh", "use_rh", is_flag=True, help="Fit a relative-humidity term (a 'humidity' record).")
@click.option("--formula", default="PM25", show_default=True, help="Reference component (PM25 or PM10).")
@click.option("--input", "input_key", default=None,
              help="The van's quantity the correction applies to (default pm25 or pm10; e.g. pm25_cf1).")
@click.option("--serial", help="The PM sensor's id in the records (default <device id>/<sensor name>).")
@click.option("--sensor", help="The PM sensor's name in the configuration (if several).")
@confirm_options
@van_options
@handle_errors
def colocate_pm(reference: str, device_data: str | None, store_path: str | None, device: str | None,
                station: str | None, ref_stamp: str, use_temp: bool, min_r2: float, min_hours: int,
                from_start: bool, use_rh: bool, formula: str, input_key: str | None, serial: str | None,
                sensor: str | None, technician: str, yes: bool, pending: bool,
                config_path: str | None, simulate: bool, data_dir: str | None) -> None:
    """PM against a reference station: a new correction on the van's measured PM.

    \b
    Examples:
      edge colocate pm --reference NL10636-pm25.csv --device-data van-017-pm25.csv
      edge colocate pm --reference NL10636-pm25.csv --device-data van-017-pm25.csv --rh --yes
    """
    cfg = load_van_config(config_path, simulate, data_dir)
    sc = find_sensor(cfg, PM_DRIVERS, sensor)
    store = open_store(cfg)
    sid = serial or f"{cfg.device.id}/{sc.name}"
    prev = store.active("pm", sid)
    quantity = "pm10" if formula.upper() == "PM10" else "pm25"
    inp = input_key or quantity
    ref = load_reference(reference, formula=formula, station=station, stamp=ref_stamp)
    pts = _device_points(device_data, store_path, device=device or cfg.device.id, sensor=sc.name, quantity=inp,
                         temp_key="temp_c", rh_key="rh")
    fr = fit(hourly(pts), ref.hours, temp=use_temp, rh=use_rh)
    ok, why = fr.accepted(min_r2, min_hours)
    out = console()
    out.print(report(fr, ref, "µg/m³", ok, why))
    if not ok:
        raise CalibrationError(f"co-location rejected: {why}")
    values = {"quantity": quantity, "input": inp, "intercept": fr.intercept, "slope": fr.slope,
              "temp_coef": fr.coefs.get("temp_c", 0.0), "rh_coef": fr.coefs.get("rh_pct", 0.0),
              **_fit_values(fr, ref)}
    p = Proposal("pm", sid, "humidity" if use_rh else "colocation", values, prev,
                 None if prev else {"quantity": quantity, "intercept": 0.0, "slope": 1.0},
                 valid_from=fr.start if from_start else None,
                 note="The van needs an RH sensor (values 'rh') for this record to apply on board." if use_rh else "")
    declined_exit(propose_and_confirm(store, p, technician=technician, device=cfg.device.id, yes=yes,
                                      pending=pending, out=out))
