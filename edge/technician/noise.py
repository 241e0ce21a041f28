"""``edge noise calibrate``: the microphone against a 94 dB / 1 kHz acoustic calibrator.

The calibrator's tone is checked before it is trusted: its dominant frequency must be
within ±2 % of 1 kHz (a 250 Hz calibrator, or wind and traffic, would give a wrong
offset, since A-weighting is 0 dB only at 1 kHz) and the level must be steady (a
calibrator not seated on the capsule flickers). Audio stays in memory, as always.
"""

from __future__ import annotations

import math
from typing import Any

import click
import numpy as np
from numpy.typing import NDArray

from drivers.noise.levels import LevelMeter, MeterConfig, SecondLevels, measure_calibrator
from core.calibration import CalibrationError
from edge.calibration import Proposal, noise_serial
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

CALIBRATOR_HZ = 1000.0
CALIBRATOR_DB = 94.0
FREQ_TOLERANCE = 0.02
DEFAULT_MAX_RANGE_DB = 0.5  # max - min of the 1 s levels


def dominant_frequency(x: NDArray[np.float64], sample_rate: int) -> float:
    """The strongest frequency (Hz), refined between FFT bins by a parabola on log magnitude."""
    n = len(x)
    if n < 256:
        raise CalibrationError("too little audio to find the tone's frequency")
    spec = np.abs(np.fft.rfft(x * np.hanning(n)))
    spec[0] = 0.0
    k = int(np.argmax(spec))
    if 0 < k < len(spec) - 1:
        a, b, c = (math.log(max(v, 1e-30)) for v in spec[k - 1 : k + 2])
        denom = a - 2 * b + c
        k_f = k + (0.5 * (a - c) / denom if denom else 0.0)
    else:
        k_f = float(k)
    return k_f * sample_rate / n


def analyse_tone(x: NDArray[np.float64], meter_cfg: MeterConfig, *, reference_db: float = CALIBRATOR_DB,
                 freq_hz: float = CALIBRATOR_HZ, max_range_db: float = DEFAULT_MAX_RANGE_DB) -> dict[str, float]:
    """Check a calibrator recording and compute the new offset; CalibrationError if unfit."""
    f = dominant_frequency(x, meter_cfg.sample_rate)
    if abs(f - freq_hz) > FREQ_TOLERANCE * freq_hz:
        raise CalibrationError(f"the tone is at {f:.0f} Hz, not {freq_hz:.0f} Hz ±{FREQ_TOLERANCE:.0%}: "
                               "is this a 1 kHz calibrator, seated on the microphone?")
    secs = [r for r in LevelMeter(meter_cfg).process(x) if isinstance(r, SecondLevels) and not r.settling]
    if len(secs) < 2:
        raise CalibrationError("measure at least 3 s of the calibrator tone")
    levels = [s.laeq for s in secs]
    spread = max(levels) - min(levels)
    if spread > max_range_db:
        raise CalibrationError(f"the level is not steady: 1 s levels span {spread:.2f} dB (limit {max_range_db}); "
                               "seat the calibrator firmly and keep the van quiet")
    if any(s.overload for s in secs):
        raise CalibrationError("the microphone clipped: wrong sensitivity setting or a louder calibrator")
    offset = measure_calibrator(x, meter_cfg, reference_db)
    if not -20.0 <= offset <= 20.0:
        raise CalibrationError(f"the offset would be {offset:+.2f} dB: that is a faulty microphone, not a calibration")
    measured = 10.0 * math.log10(float(np.mean([10.0 ** (v / 10.0) for v in levels])))
    return {"offset_db": offset, "measured_db": measured, "reference_db": reference_db, "frequency_hz": f,
            "range_db": spread, "seconds": float(len(secs))}


def record_audio(source: Any, seconds: float, sample_rate: int) -> NDArray[np.float64]:
    need = int(seconds * sample_rate)
    blocks, have, empty = [], 0, 0
    while have < need:
        b = source.read_block()
        if b is None or len(b) == 0:
            empty += 1
            if empty > 1000:
                raise CalibrationError("the microphone delivers no audio")
            continue
        blocks.append(np.asarray(b, dtype=np.float64))
        have += len(b)
    return np.concatenate(blocks)[:need]


@click.group("noise")
def noise() -> None:
    """The sound level meter's microphone.

    \b
    Examples:
      edge noise calibrate --seconds 10
      edge noise calibrate --simulate --data-dir /tmp/van --yes
    """


@noise.command("calibrate")
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(3.0, 120.0),
              help="How long to measure the calibrator tone.")
@click.option("--reference-db", default=CALIBRATOR_DB, show_default=True, help="The calibrator's level, dB SPL.")
@click.option("--max-range", default=DEFAULT_MAX_RANGE_DB, show_default=True,
              help="Refuse if the 1 s levels spread more than this, dB.")
@click.option("--serial", help="The microphone's serial, as a check: it must be the one the sensor's table "
              "configures (serial = ...; without one the id is <device id>/<sensor name>).")
@click.option("--sensor", help="The noise sensor's name in the configuration (if several).")
@click.option("--sim-freq", default=CALIBRATOR_HZ, show_default=True, help="--simulate: the calibrator's frequency.")
@click.option("--sim-error-db", default=-1.3, show_default=True,
              help="--simulate: how far the simulated microphone reads off, dB.")
@confirm_options
@van_options
@handle_errors
def calibrate(seconds: float, reference_db: float, max_range: float, serial: str | None, sensor: str | None,
              sim_freq: float, sim_error_db: float, technician: str, yes: bool, pending: bool,
              config_path: str | None, simulate: bool, data_dir: str | None) -> None:
    """Calibrate with a 94 dB / 1 kHz acoustic calibrator seated on the microphone.

    Stop the agent first (it holds the microphone). Measures --seconds of the tone,
    checks it is 1 kHz ±2 % and steady, computes the offset that makes it read
    --reference-db, proposes an 'acoustic' record and asks before it takes effect.

    \b
    Examples:
      sudo systemctl stop datalab-edge && edge noise calibrate --seconds 10
      edge noise calibrate --simulate --data-dir /tmp/van --yes
      edge noise calibrate --simulate --data-dir /tmp/van --sim-freq 500   # refused
    """
    cfg = load_van_config(config_path, simulate, data_dir)
    if simulate and not any(s.driver == "microphone" for s in cfg.sensors):
        from edge.config import SensorConfig

        cfg.sensors = [s for s in cfg.sensors if s.name != "noise"] + [SensorConfig("noise", "microphone", {"device": "sim"})]
    if sensor is None and serial is not None:
        # Two microphones: the serial alone names one (it is what is printed on the capsule).
        by_serial = [s.name for s in cfg.sensors if s.driver == "microphone" and noise_serial(cfg, s) == serial]
        sensor = by_serial[0] if len(by_serial) == 1 else None
    sc = find_sensor(cfg, ("microphone", "sound-module"), sensor)
    if sc.driver != "microphone":
        raise CalibrationError("acoustic calibration needs the I2S microphone; the sound module is calibrated by its maker")
    meter_cfg = MeterConfig.from_mapping({k: v for k, v in sc.options.items() if k != "device"})
    # The record must go under the serial the agent looks this microphone up by, or it would
    # be "active" and never applied (issue 15: the van kept reading 92.7 dB on 94 dB).
    sid = noise_serial(cfg, sc)
    if serial is not None and serial != sid:
        raise CalibrationError(
            f"the agent knows this microphone as {sid!r}, not {serial!r}: a record under {serial!r} would "
            f"never be applied. Set serial = \"{serial}\" in [sensors.{sc.name}] (then reload the agent) "
            f"and calibrate again, or leave out --serial")
    store = open_store(cfg)
    prev = store.active("noise", sid)
    # The offset is computed on top of the configured one; the record holds the absolute offset.
    meter_cfg = MeterConfig(sample_rate=meter_cfg.sample_rate, sensitivity_dbfs=meter_cfg.sensitivity_dbfs,
                            calibration_offset_db=float(sc.options.get("calibration_offset_db", 0.0)),
                            noise_floor_db=meter_cfg.noise_floor_db)
    source: Any
    if simulate or str(sc.options.get("device", "")) == "sim":
        from edge import simulation

        source = simulation.backend(f"sensors.{sc.name}.device").calibrator_tone(
            sim_freq, reference_db, meter_cfg.sensitivity_dbfs,
            sensitivity_error_db=sim_error_db, sample_rate=meter_cfg.sample_rate)
    else:
        from drivers.noise.capture import AlsaSource

        source = AlsaSource(device=str(sc.options.get("device", "default")))
    out = console()
    with out.status(f"Measuring the calibrator for {seconds:g} s ..."):
        try:
            x = record_audio(source, seconds + 1.0, meter_cfg.sample_rate)  # +1 s: the meter's settling second
        finally:
            getattr(source, "close", lambda: None)()
    res = analyse_tone(x, meter_cfg, reference_db=reference_db, max_range_db=max_range)
    out.print(f"Tone {res['frequency_hz']:.1f} Hz, {res['measured_db']:.2f} dB (1 s levels within "
              f"{res['range_db']:.2f} dB): offset {meter_cfg.calibration_offset_db:+.2f} → {res['offset_db']:+.2f} dB")
    values = {**res, "sensitivity_dbfs": meter_cfg.sensitivity_dbfs}
    old = None if prev else {"offset_db": meter_cfg.calibration_offset_db, "sensitivity_dbfs": meter_cfg.sensitivity_dbfs}
    p = Proposal("noise", sid, "acoustic", values, prev, old)
    declined_exit(propose_and_confirm(store, p, technician=technician, device=cfg.device.id, yes=yes,
                                      pending=pending, out=out))
