"""``edge pm humidity``: a humidity correction for optical PM without a co-location.

Low-cost optical PM reads high in humid air (particles swell). Where no reference
station is near, a published correction is better than none: the US EPA's
PM2.5 = 0.524·PM2.5(cf1) − 0.0862·RH + 5.75 (fitted on one sensor family: prefer
``edge colocate pm --rh`` when a station is available).
"""

from __future__ import annotations

import click

from core.calibration import EPA_PM25_HUMIDITY, PM_HOUSING, CalibrationError, housing_warming_problem
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
      edge pm housing --warming 1.6
      edge pm housing --housing-temp 13.1 --ambient-temp 11.5 --yes
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


def housing_warming(warming: float | None, housing_temp: float | None, ambient_temp: float | None) -> float:
    """The warming to record: given, or the housing's air temperature minus ambient (one probe,
    read in the housing's inlet air stream and then outside it, the van parked and the fan on)."""
    measured = housing_temp is not None or ambient_temp is not None
    if (warming is None) == (not measured) or (measured and None in (housing_temp, ambient_temp)):
        raise CalibrationError("give either --warming or both --housing-temp and --ambient-temp")
    w = warming if warming is not None else round(housing_temp - ambient_temp, 2)  # type: ignore[operator]
    if problem := housing_warming_problem({"warming_c": w}):
        raise CalibrationError(problem)
    return float(w)


@pm.command("housing")
@click.option("--warming", type=float, help="How much the PM housing warms the air it samples, degC above ambient.")
@click.option("--housing-temp", type=float, help="Measured instead: the air temperature inside the housing, degC.")
@click.option("--ambient-temp", type=float, help="... and outside it (same probe, minutes apart), degC.")
@click.option("--serial", help="The housing's id in the records (default <device id>/<sensor name>).")
@click.option("--sensor", help="The PM sensor's name in the configuration (if several).")
@confirm_options
@van_options
@handle_errors
def housing(warming: float | None, housing_temp: float | None, ambient_temp: float | None, serial: str | None,
            sensor: str | None, technician: str, yes: bool, pending: bool, config_path: str | None,
            simulate: bool, data_dir: str | None) -> None:
    """Record the PM housing's warming: the receiver's humidity correction uses it.

    The PM sensor's enclosure warms the air it draws (~1.5 degC), so its particles grow at a
    lower RH than the ambient RH the van measures (DGS-NO2). The receiver takes ambient RH to
    the housing's temperature with this record; without one it uses ambient RH and PM2.5 reads
    ~1.4 ug/m3 low (docs/fidelity.md). Measure once per enclosure, again after changing it.
    Accepted: 0 to 10 degC.

    \b
    Examples:
      edge pm housing --warming 1.6
      edge pm housing --housing-temp 13.1 --ambient-temp 11.5 --yes
    """
    w = housing_warming(warming, housing_temp, ambient_temp)
    cfg = load_van_config(config_path, simulate, data_dir)
    sc = find_sensor(cfg, PM_DRIVERS, sensor)
    store = open_store(cfg)
    sid = serial or f"{cfg.device.id}/{sc.name}"
    prev = store.active(PM_HOUSING, sid)
    values = {"warming_c": w}
    note = "" if warming is not None else f"measured: housing {housing_temp:g} degC, ambient {ambient_temp:g} degC"
    p = Proposal(PM_HOUSING, sid, "warming", values, prev, None if prev else {"warming_c": "none (ambient RH)"},
                 note=note)
    declined_exit(propose_and_confirm(store, p, technician=technician, device=cfg.device.id, yes=yes,
                                      pending=pending, out=console()))
