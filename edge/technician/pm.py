"""``edge pm humidity``: a humidity correction for optical PM without a co-location.

Low-cost optical PM reads high in humid air (particles swell). Where no reference
station is near, a published correction is better than none: the US EPA's
PM2.5 = 0.524·PM2.5(cf1) − 0.0862·RH + 5.75 (fitted on one sensor family: prefer
``edge colocate pm --rh`` when a station is available).
"""

from __future__ import annotations

import click

from core.calibration import EPA_PM25_HUMIDITY, CalibrationError
from edge.calibration import Proposal
from edge.technician.colocate import PM_DRIVERS
from edge.technician.cli_support import (
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


@click.group("pm")
def pm() -> None:
    """Particulate matter sensor corrections.

    \b
    Examples:
      edge pm humidity --epa
      edge pm humidity --slope 0.6 --rh-coef -0.1 --intercept 4 --yes
    """


@pm.command("humidity")
@click.option("--epa", is_flag=True, help="The US EPA formula on pm25_cf1 (0.524·x − 0.0862·RH + 5.75).")
@click.option("--intercept", type=float, help="Own formula: constant, µg/m³.")
@click.option("--slope", type=float, help="Own formula: factor on the PM value.")
@click.option("--rh-coef", type=float, help="Own formula: µg/m³ per % RH.")
@click.option("--input", "input_key", default="pm25", show_default=True, help="Own formula: the van's quantity.")
@click.option("--serial", help="The PM sensor's id in the records (default <device id>/<sensor name>).")
@click.option("--sensor", help="The PM sensor's name in the configuration (if several).")
@confirm_options
@van_options
@handle_errors
def humidity(epa: bool, intercept: float | None, slope: float | None, rh_coef: float | None, input_key: str,
             serial: str | None, sensor: str | None, technician: str, yes: bool, pending: bool,
             config_path: str | None, simulate: bool, data_dir: str | None) -> None:
    """Propose a 'humidity' record: PM2.5 corrected by relative humidity.

    Applies on board only when the van reports RH (a value 'rh'); otherwise the
    receiver applies it with RH from elsewhere.

    \b
    Examples:
      edge pm humidity --epa
      edge pm humidity --intercept 4.1 --slope 0.61 --rh-coef -0.07 --yes
    """
    own = (intercept, slope, rh_coef)
    if epa == any(v is not None for v in own) or (not epa and None in own):
        raise CalibrationError("give either --epa or all of --intercept, --slope and --rh-coef")
    cfg = load_van_config(config_path, simulate, data_dir)
    sc = find_sensor(cfg, PM_DRIVERS, sensor)
    store = open_store(cfg)
    sid = serial or f"{cfg.device.id}/{sc.name}"
    prev = store.active("pm", sid)
    values = dict(EPA_PM25_HUMIDITY) if epa else {
        "quantity": "pm25", "input": input_key, "intercept": intercept, "slope": slope, "rh_coef": rh_coef,
        "temp_coef": 0.0, "form": "own"}
    p = Proposal("pm", sid, "humidity", values, prev, None if prev else {"quantity": "pm25", "intercept": 0.0, "slope": 1.0})
    declined_exit(propose_and_confirm(store, p, technician=technician, device=cfg.device.id, yes=yes,
                                      pending=pending, out=console()))
