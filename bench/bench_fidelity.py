"""The fidelity bench: how right is the published map? (issue 15)

A fleet of simulated vans drives the shipped route for several days with sensor,
position and clock errors of realistic size (:mod:`simulator.sensor_errors`). Their
samples go through the receiver's real ingest into a SQLite store (fixes, the
position join, quality flags), the published maps are built with the receiver's pass
and median code (:mod:`receiver.aggregate`), and every published unit is compared
with the true field's mean over the same place and passes (:mod:`simulator.truth`).
Reported per quantity: bias and RMSE; placed positions' error (m, p50/p95);
timestamps' error (ms, p99); and the same with each correction switched off in turn.

The path the samples take, and why it is faithful (docs/fidelity.md): the values are
those the simulated devices report (the error models run on the truth the devices
would read; NO2 as raw electrode mV plus the sheet's ppb, as drivers/no2.py sends),
stamped by the agent's real ``TimeKeeper`` from the drivers' measurement times, and
become the agent's own ``Sample`` and ``Batch`` objects, stored by
``SQLiteStore.ingest_many``: the code the receiver runs on every upload, deriving fixes,
positions and quality flags. Each van's NO2 co-location record reaches the receiver as a
``calibration`` sample, and the receiver recomputes the NO2 it covers. Maps are read with
``receiver.aggregate.read_tracks`` (best value, flag policy, sentinel rule). Left out are
the serial bytes and drivers, the van's buffer and MQTT: lossless for values and times
(the decoder, delivery and fleet-oracle tests show it) and far too slow for 10 vans x 5
days on 2 cores.

What the bench switches is only what is not the shipped pipeline's content: which
stamps the store holds (``time_alignment``: the shipped TimeKeeper or the old agent's
measured errors), which ``FlagPolicy`` the maps are read with, whether the NO2 records
have reached the receiver (``calibration``), and what the receiver's PM best value is
(``correct_growth``, and the van's PM gain with ``calibration``): the stored PM values are
derived again by the receiver's own code (receiver/pm_derive.py) with the switch applied,
inside a transaction that is rolled back (:func:`served_pm`). ``ALT_GROWTH`` runs the fleet
again with a true growth the correction does not share.

Run: ``python -m bench --only bench_fidelity`` or ``python -m bench.bench_fidelity``;
BENCH_FIDELITY_VANS / _DAYS / _HOURS size the fleet (default 10 x 5 x 3 h);
BENCH_FIDELITY_ALT=0 leaves out the ``ALT_GROWTH`` fleets.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.no2_sheet import no2_ppb
from core.calibration import CALIBRATION_SENSOR, PM_HOUSING, CalibrationRecord, pm_corrected, record_id
from core.sample import Sample, TimeSource
from receiver import dbapi
from receiver.aggregate import QUANTITY_KEYS, Period, Rule, Track, UnitValue, read_tracks
from receiver.flag_policy import DEFAULT_EXCLUDE, DEFAULT_EXCLUDE_PM, FlagPolicy
from receiver.calibration import Records
from receiver.pm_derive import PM_DERIVED, Housing, PmSample, write_pm
from receiver.pm_humidity import DEFAULT_KAPPA
from receiver.mapunits import ArraySnapper, make_snapper
from receiver.store import SQLiteStore
from simulator import sensor_errors as se
from simulator.environment import Environment
from simulator.hardware import SIM_NO2_CAL
from simulator.route import Route
from simulator.truth import MAP_KEYS, VanDay, truth_track, unit_map
from core.wire import Batch

START = dt.datetime(2026, 11, 2, 7, 0, tzinfo=dt.UTC)  # a Monday, 08:00 in Alphen
SENSORS = ("gps", "pm", "no2", "noise")  # one sample each per second, in this seq order
BATCH_S = 60
#: What receiver/aggregate.py left out before issue 15's flag policy ("no flags" in the table):
#: the agent's own flags; its sentinel rule is the shipped one (read_tracks always applies it).
OLD_EXCLUDED = frozenset({"warming_up", "time_implausible", "clock_step"})
#: The van's PM sensor section (its PM record is kept under "<device>/pm", edge/calibration.py).
PM_SENSOR = "pm"
#: The co-location that made each van's NO2 record was done a week before the fleet's first day.
RECORD_VALID_BEFORE = dt.timedelta(days=7)


@dataclass(frozen=True)
class Fleet:
    vans: int = 10
    days: int = 5
    hours: float = 3.0
    seed: int = 1
    start: dt.datetime = START


@dataclass(frozen=True)
class Corrections:
    """The corrections of issue 15 the table switches off one at a time.

    ``calibration``: the vans' NO2 records at the receiver, the microphone records and the
    van's PM gain record (``pm25_cal``); ``correct_growth``: the receiver's PM growth
    correction (receiver/pm_humidity.py, default kappa); ``exclude_humid``: the flag
    policy's ``humid`` (above 95 % RH) and ``rh_missing`` (no RH within 30 s) for PM.
    """

    time_alignment: bool = True
    flags: bool = True
    calibration: bool = True
    exclude_humid: bool = True
    correct_growth: bool = True
    #: The RH growth is undone at (docs/fidelity.md "Why PM2.5 reads low"). "record" (shipped):
    #: the DGS-NO2's ambient RH taken to the PM housing's temperature by the van's ``pm_housing``
    #: record (the enclosure's warming as the technician measured it, sent with the van's other
    #: records); "ambient": that RH as measured, a van without the record (uncharacterised);
    #: "housing" (not shipped): an RH sensor in the PM housing (as a PMS5003T-type sensor reports it).
    rh_source: str = "record"

    def policy(self) -> FlagPolicy:
        """The receiver's flag policy this row builds maps with (receiver/flag_policy.py)."""
        if not self.flags:
            return FlagPolicy(OLD_EXCLUDED, frozenset())
        pm = set(DEFAULT_EXCLUDE_PM) - (set() if self.exclude_humid else {"humid", "rh_missing"})
        return FlagPolicy.of(DEFAULT_EXCLUDE, pm)


NO_GROWTH = "no growth correction (humid > 95 % left out)"
AMBIENT = "no PM housing record (ambient RH: an uncharacterised van)"
HOUSING = "not shipped: RH measured in the PM housing"
#: A technician's once-per-enclosure measurement of the PM housing's warming (reference probe
#: at the inlet against one outside, both class A Pt100, +-0.15 degC each): its error, 1 sigma.
WARMING_MEASUREMENT_SD_C = 0.3
CONFIGS: tuple[tuple[str, Corrections], ...] = (
    ("all corrections (shipped)", Corrections()),
    (AMBIENT, Corrections(rh_source="ambient")),
    (HOUSING, Corrections(rh_source="housing")),
    ("no time alignment", Corrections(time_alignment=False)),
    ("no flags", Corrections(flags=False)),
    ("no calibration", Corrections(calibration=False)),
    (NO_GROWTH, Corrections(correct_growth=False)),
    ("no humidity handling", Corrections(exclude_humid=False, correct_growth=False)),
    ("none (before issue 15)", Corrections(False, False, False, False, False)),
)


@dataclass(frozen=True)
class Growth:
    """A true hygroscopic growth other than the correction's own kappa-Koehler with the day's
    kappa: ``hanel`` the power law f = (1 - a_w)^-gamma (Kasten 1969, Tellus 21, 631; Haenel
    1976), or ``kappa`` with a fixed (fine, coarse) kappa pair (outside the fleet's range)."""

    label: str
    form: str  # "hanel" or "kappa"
    fine: float
    coarse: float

    def factor(self, fine: bool, rh_pct: np.ndarray) -> np.ndarray:
        p = self.fine if fine else self.coarse
        if self.form == "kappa":
            return se.growth_factor(p, rh_pct)
        aw = np.clip(np.asarray(rh_pct, dtype=float), 0.0, 98.0) / 100.0
        return (1.0 - aw) ** -p


#: Fleets whose true growth the correction does not share (docs/fidelity.md): each its own store.
ALT_GROWTH: tuple[Growth, ...] = (
    Growth("true growth (1 - a_w)^-0.3 (Haenel power law)", "hanel", 0.3, 0.15),
    Growth("true kappa 0.40 / 0.20 (outside the fleet's range)", "kappa", 0.40, 0.20),
)
ALT_CONFIGS: tuple[tuple[str, Corrections], ...] = (
    ("all corrections (shipped)", Corrections()),
    (AMBIENT, Corrections(rh_source="ambient")),
    (NO_GROWTH, Corrections(correct_growth=False)),
)


# -- the fleet into stores --------------------------------------------------------------


@dataclass
class Simulated:
    """Stores (by time alignment) and what the bench knows that the store does not."""

    stores: dict[bool, Path]
    truth: dict[tuple[str, str], VanDay] = field(default_factory=dict)  # (device, epoch)
    #: (device, epoch) -> true measurement time (UTC ms) per tick and SENSORS stream
    true_ms: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    fits: dict[str, se.CalibrationFit] = field(default_factory=dict)
    truth_tracks: list[Track] = field(default_factory=list)
    samples: int = 0
    #: device -> UTC s after its last shift (when its NO2 record is sent)
    record_time: dict[str, float] = field(default_factory=dict)
    announced: set[bool] = field(default_factory=set)  # stores that hold the NO2 records
    #: device -> the PM housing's warming as a technician measured it (degC; its ``pm_housing`` record)
    warming: dict[str, float] = field(default_factory=dict)
    #: (device, epoch) -> the RH an RH sensor in the PM housing would report, per tick (not shipped)
    housing_rh: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def measured_warming(seed: int, device: str) -> float:
    """The PM housing's warming as a technician measures it once (the simulator's warming plus
    the measurement's error): the van's ``pm_housing`` record (``edge pm housing --warming``)."""
    r = np.random.default_rng([seed, int(hashlib.sha256(device.encode()).hexdigest()[:12], 16), 40])
    return se.HOUSING_WARMING_C + float(r.normal(0.0, WARMING_MEASUREMENT_SD_C))


def van_day_samples(
    vd: VanDay,
    day: int,
    dev: se.DeviceErrors,
    fit: se.CalibrationFit,
    sw: se.ErrorSwitches,
    seed: int,
    van: int,
    aligned_variants: tuple[bool, ...],
    growth: Growth | None = None,
    pm_record: str = "",
) -> tuple[dict[bool, list[Sample]], np.ndarray, np.ndarray]:
    """The samples one van's agent would commit in a day, per time alignment, the true
    measurement times (ms, ticks x SENSORS) and the RH a sensor in the PM housing would report
    (per tick; no shipped van has one). ``growth``: a true growth other than the simulator's
    (the day's kappa); ``pm_record``: the id of the van's PM gain record, applied on the van as
    ``CalibratedDriver`` does (``pm25_cal``, ``cal``)."""
    n = vd.n
    rng = np.random.default_rng([seed, van, day, 10])
    shift_s = np.arange(n, dtype=float)
    # The van's RH is the DGS-NO2's ambient one (no shipped PM driver sends RH; issue 15, tester
    # v15): the particles grew at the warmed housing's RH, which the receiver never sees.
    housing_rh_m, temp_m = se.measure_rh_temp(vd.rh, vd.temp, dev, sw, rng)
    rh_m = se.measure_ambient_rh(vd.rh, dev, sw, rng)
    if growth is not None and sw.pm_growth:
        rh_in = se.inlet_rh(vd.rh)
        fine = vd.pm25 * growth.factor(True, rh_in)
        wet10 = fine + (vd.pm10 - vd.pm25) * growth.factor(False, rh_in)
        pm25, pm10 = se.measure_pm(fine, wet10, vd.rh, (0.0, 0.0), dev, replace(sw, pm_growth=False), rng)
    else:
        pm25, pm10 = se.measure_pm(vd.pm25, vd.pm10, vd.rh, se.day_kappa(seed, day), dev, sw, rng)
    sheet_ppb = se.measure_no2(vd.no2, vd.o3, vd.temp, day + shift_s / 86400.0, dev, sw, rng)
    t_true = vd.t0_utc + shift_s
    geo_rng = np.random.default_rng([seed, van, day, 30])
    geo = se.Geometry.draw(vd.t0_utc, n, geo_rng, exact=not sw.stamp_errors)
    # The second of audio ended before the tick: it heard the street there and then. The van's
    # noise record (a calibrator's offset) is applied on the van (CalibratedDriver).
    heard = np.interp(geo.sound, t_true, vd.laeq)
    laeq = se.measure_laeq(heard, dev, sw, rng) - fit.mic_offset
    warming = se.add_faults(pm25, pm10, sheet_ppb, sw, rng, shift_s)
    # What the ISB's electrodes put out for that; the van's no2_ppb is the sheet's (drivers/no2.py).
    we, ae = se.no2_electrodes(sheet_ppb, temp_m, SIM_NO2_CAL, rng, round_uv=sw.read_noise)
    fix = se.gps_has_fix(vd.blocked, shift_s, sw)
    true_ms = np.round(np.stack([geo.gps, geo.reads, geo.reads, geo.sound], axis=1) * 1000)
    # The receiver reports where the van was at its epoch (before the tick by the phase).
    dlat, dlon = se.gps_noise(n, sw, rng, float(vd.lat[0]))
    glat = np.interp(geo.gps, t_true, vd.lat) + dlat
    glon = np.interp(geo.gps, t_true, vd.lon) + dlon
    if sw.read_noise:
        glat, glon = np.round(glat, 7), np.round(glon, 7)
    lists = (
        glat.tolist(),
        glon.tolist(),
        vd.speed.tolist(),
        vd.course.tolist(),
        pm25.tolist(),
        pm10.tolist(),
        rh_m.tolist(),
        we.tolist(),
        ae.tolist(),
        temp_m.tolist(),
        laeq.tolist(),
        fix.tolist(),
        warming.tolist(),
    )
    pm_values = pm_record_values(fit)
    pm_cal = [pm_corrected(pm_values, {"pm25": p}) for p in lists[4]] if pm_record else [None] * n
    out = {}
    for aligned in aligned_variants:
        st = _stamps(geo, fix, aligned, sw, np.random.default_rng([seed, van, day, 20 + aligned]))
        samples = []
        seq = 0
        for k, (la, lo, sp, co, p25, p10, rh, w, a, tc, lq, fx, warm) in enumerate(zip(*lists)):
            pm = {"pm25": p25, "pm10": p10}
            if pm_record:
                pm.update(pm25_cal=pm_cal[k], cal=pm_record)
            src, mono = st.source[k], st.mono[k]
            wf = ("warming_up",) if warm else ()
            gps = (
                {
                    "lat": la,
                    "lon": lo,
                    "speed": round(sp, 2),
                    "course": round(co, 1),
                    "fix_quality": 1,
                    "sats_used": 8,
                    "hdop": 0.9,
                }
                if fx
                else {"fix_quality": 0, "sats_used": 0}
            )
            no2 = {
                "no2_ppb": no2_ppb(w, a, tc, SIM_NO2_CAL),
                "no2_we_mv": w,
                "no2_ae_mv": a,
                "no2_temp_c": tc,
                "no2_rh_pct": rh,
            }
            samples += [
                Sample("gps", st.gps[k], mono, src, gps, () if fx else ("no_fix",), seq + 1, "boot"),
                Sample(PM_SENSOR, st.reads[k], mono, src, pm, wf, seq + 2, "boot"),
                Sample("no2", st.reads[k], mono, src, no2, wf, seq + 3, "boot"),
                Sample("noise", st.sound[k], mono, src, {"laeq": lq}, (), seq + 4, "boot"),
            ]
            seq += 4
        out[aligned] = samples
    return out, true_ms.astype(np.int64), housing_rh_m


def pm_record_values(fit: se.CalibrationFit) -> dict[str, float | str]:
    """The van's PM record from its co-location gain (edge/calibration.py ``pm_corrected``)."""
    return {"quantity": "pm25", "slope": 1.0 / fit.pm_gain, "intercept": 0.0}


def _stamps(
    geo: se.Geometry, fix: np.ndarray, aligned: bool, sw: se.ErrorSwitches, rng: np.random.Generator
) -> se.AgentStamps:
    """Aligned: the shipped agent's TimeKeeper (se.agent_stamps). Not aligned: the stamps issue 15
    measured on main before part 1 (se.stamp_errors), whose code is gone and cannot be run."""
    if aligned and sw.stamp_errors:
        return se.agent_stamps(geo, fix, rng)
    n = len(geo.reads)
    err = se.stamp_errors(n, fix, sw, rng)
    ms = lambda t: np.round(t * 1000).astype(np.int64).tolist()  # noqa: E731
    first = int(np.argmax(fix)) if fix.any() else n
    src = [TimeSource.CORRECTED] * first + [TimeSource.GPS] * (n - first)
    return se.AgentStamps(
        ms(geo.gps + err.gps), ms(geo.reads + err.reads), ms(geo.sound + err.sound),
        ms(geo.reads - geo.reads[0] + 1000.0), src,
    )


def ingest(store: SQLiteStore, device: str, epoch: str, samples: list[Sample]) -> None:
    """Samples as the agent uploads them: 60-second batches, stored by the receiver."""
    per = BATCH_S * len(SENSORS)
    items = []
    for a in range(0, len(samples), per):
        chunk = samples[a : a + per]
        b = Batch(device, epoch, chunk[0].seq or 0, chunk[-1].seq or 0, chunk)
        received = max(s.t_utc_ms or 0 for s in chunk) + 2000
        items.append((b, hashlib.sha256(b.batch_id.encode()).hexdigest(), received))
    for a in range(0, len(items), 20):  # what a busy receiver groups in one commit
        store.ingest_many(items[a : a + 20])


def no2_record(
    device: str, fit: se.CalibrationFit, valid_from: float, created: float
) -> CalibrationRecord:
    """The van's NO2 record from its co-location, active, as edge/calibration.py keeps it."""
    serial = SIM_NO2_CAL.serial
    return CalibrationRecord(
        id=record_id("no2", serial, 1), kind="no2", serial=serial, version=1, technician="bench",
        method="colocation", values=fit.no2_record_values(SIM_NO2_CAL), valid_from=valid_from,
        created=created, status="active", device=device,
    )


def housing_record(device: str, warming_c: float, valid_from: float, created: float) -> CalibrationRecord:
    """The van's PM housing record (``edge pm housing --warming``), active, as edge/calibration.py keeps it."""
    serial = f"{device}/{PM_SENSOR}"
    return CalibrationRecord(
        id=record_id(PM_HOUSING, serial, 1), kind=PM_HOUSING, serial=serial, version=1, technician="bench",
        method="warming", values={"warming_c": round(warming_c, 2)}, valid_from=valid_from,
        created=created, status="active", device=device,
    )


def announce_records(sim: Simulated, aligned: bool) -> None:
    """Each van's NO2 and PM housing records reach the receiver as the agent sends them:
    ``calibration`` samples (CalibrationAnnouncer) in their own boot's batch after the fleet's
    days. The receiver stores them and recomputes what they cover: NO2 from the raw electrode mV
    (receiver/calibration.py), PM at the housing's RH (receiver/pm_derive.py)."""
    if aligned in sim.announced:
        return
    store = SQLiteStore(sim.stores[aligned])
    try:
        for device, fit in sorted(sim.fits.items()):
            t = sim.record_time[device]
            first = min(vd.t0_utc for (d, _), vd in sim.truth.items() if d == device)
            since = first - RECORD_VALID_BEFORE.total_seconds()
            samples = []
            for seq, rec in enumerate((no2_record(device, fit, since, t),
                                       housing_record(device, sim.warming[device], since, t)), 1):
                vals = {"id": rec.id, "kind": rec.kind, "serial": rec.serial, "version": rec.version,
                        "status": rec.status, "record": rec.to_json()}
                samples.append(Sample(CALIBRATION_SENSOR, int(t * 1000), 1000 * seq, TimeSource.GPS, vals, (), seq,
                                      "cal"))
            ingest(store, device, "cal", samples)
    finally:
        store.close()
    sim.announced.add(aligned)


def simulate(
    fleet: Fleet,
    sw: se.ErrorSwitches,
    workdir: Path,
    aligned_variants: tuple[bool, ...] = (True, False),
    growth: Growth | None = None,
) -> Simulated:
    route, env = Route.load(), Environment(seed=fleet.seed)
    stores = {
        a: workdir / f"store-{'aligned' if a else 'unaligned'}.sqlite" for a in aligned_variants
    }
    opened = {a: SQLiteStore(p) for a, p in stores.items()}
    sim = Simulated(stores)
    seconds = int(fleet.hours * 3600)
    try:
        for v in range(fleet.vans):
            device = f"van-{v + 1:03d}"
            dev = se.DeviceErrors.draw(fleet.seed, device)
            fit = sim.fits[device] = se.CalibrationFit.fit(dev, fleet.seed, device, sw)
            sim.warming[device] = measured_warming(fleet.seed, device)
            days = []
            for d in range(fleet.days):
                t0 = (fleet.start + dt.timedelta(days=d, minutes=3 * v)).timestamp()
                # Every van and day starts elsewhere on the loop, so the units see many vans.
                offset = (1900.0 * v + 7816.0 * d) % route.length_m
                vd = VanDay.drive(
                    route,
                    env,
                    device,
                    t0_utc=t0,
                    seconds=seconds,
                    seed=fleet.seed * 1000 + v * 50 + d,
                    offset_m=offset,
                )
                epoch = f"e{d}"
                sim.truth[(device, epoch)] = vd
                days.append(vd)
                per_alignment, sim.true_ms[(device, epoch)], sim.housing_rh[(device, epoch)] = van_day_samples(
                    vd, d, dev, fit, sw, fleet.seed, v, aligned_variants, growth,
                    record_id("pm", f"{device}/{PM_SENSOR}", 1),
                )
                for aligned, samples in per_alignment.items():
                    ingest(opened[aligned], device, epoch, samples)
                    sim.samples += len(samples) if aligned == aligned_variants[0] else 0
                sim.record_time[device] = t0 + seconds + 3600.0
            sim.truth_tracks.append(truth_track(days))
    finally:
        for s in opened.values():
            s.close()
    return sim


# -- reading the store back: the receiver's own reads -----------------------------------


def _rh_for(c: Corrections, sim: Simulated, device: str, samples: list[PmSample]
            ) -> tuple[np.ndarray, np.ndarray] | None:
    """The RH series growth is undone at for ``c.rh_source`` (None: the samples' own, taken to the
    housing's by the van's ``pm_housing`` record when the row has it)."""
    if c.rh_source == "housing":
        # What an RH sensor in the PM housing reports, at each PM sample's time (tick by seq layout).
        pm = [s for s in samples if s.t_utc_ms is not None and (s.seq - 1) % len(SENSORS) == 1
              and (device, s.epoch) in sim.housing_rh]  # not the records' own "cal" boot
        t = np.array([s.t_utc_ms for s in pm], dtype=float)
        v = np.array([sim.housing_rh[(device, s.epoch)][(s.seq - 1) // len(SENSORS)] for s in pm], dtype=float)
        order = np.argsort(t, kind="stable")
        return t[order], v[order]
    return None


@contextmanager
def served_pm(conn: Any, c: Corrections, sim: Simulated | None = None) -> Iterator[None]:
    """The store's PM best values as the receiver derives them with ``c``'s switches, inside a
    transaction rolled back on exit: growth uncorrected (kappa none) and/or the van without its
    PM record (no ``pm25_cal``, no ``cal``) and/or another RH (``rh_source``: without the
    housing record, or an RH sensor in the housing from ``sim``).
    The receiver's own derivation (pm_derive.write_pm) on the stored samples; nothing to do when
    all are as shipped (the store holds exactly that)."""
    if c.rh_source == "housing" and sim is None:
        raise ValueError(f"rh_source {c.rh_source!r} needs the simulation (the housing's RH)")
    if c.correct_growth and c.calibration and c.rh_source == "record":
        yield
        return
    kappa = DEFAULT_KAPPA if c.correct_growth else {}
    conn.execute("BEGIN")
    try:
        conn.execute(f"DELETE FROM derived WHERE quantity IN ({', '.join('?' * len(PM_DERIVED))})", PM_DERIVED)
        for (device,) in dbapi.fetchall(conn, "SELECT DISTINCT device FROM positions"):
            # Every sensor's samples: the van's RH comes with its NO2 (no2_rh_pct), as in a shipped van.
            rows = dbapi.fetchall(conn, "SELECT epoch, seq, t_utc_ms, vals, sensor FROM samples WHERE device = ?"
                                        " AND sensor <> 'gps' ORDER BY epoch, seq", (device,))
            samples = []
            for epoch, seq, t, vals, sensor in rows:
                v = json.loads(vals)
                if not c.calibration and sensor == PM_SENSOR:  # the van without its PM record sends neither
                    v = {k: x for k, x in v.items() if k not in ("pm25_cal", "cal")}
                samples.append(PmSample(epoch, seq, t, v))
            # "record": the store's own pm_housing records (none before they are announced).
            housing = None if c.rh_source == "record" else Housing(Records())
            write_pm(conn, device, samples, kappa, rh=None if sim is None else _rh_for(c, sim, device, samples),
                     housing=housing)
        yield
    finally:
        conn.execute("ROLLBACK")


def measured_tracks(conn: Any, sim: Simulated, c: Corrections) -> list[Track]:
    """The tracks the receiver's map build reads (``read_tracks``: best value, flag policy,
    sentinel rule), with the correction switches that are not a store's content applied."""
    with served_pm(conn, c, sim):
        tracks = list(read_tracks(conn, Period("all"), policy=c.policy()))
    tracks = [tr for tr in tracks if tr.device in sim.fits]
    if not c.calibration:
        # The van without its noise record: it would have sent the level its microphone gave.
        j = QUANTITY_KEYS.index("laeq")
        for tr in tracks:
            tr.values[:, j] += sim.fits[tr.device].mic_offset
    return tracks


# -- comparing --------------------------------------------------------------------------


@dataclass
class Figures:
    config: str
    per_quantity: dict[str, dict[str, float]]  # quantity -> bias, rmse, units
    pos_p50_m: float = math.nan
    pos_p95_m: float = math.nan
    time_p99_ms: float = math.nan


def compare(
    measured: dict[tuple[str, str], UnitValue], truth: dict[tuple[str, str], UnitValue]
) -> dict[str, dict[str, float]]:
    """Bias and RMSE of published units against the truth over the same unit's true passes."""
    err: dict[str, list[float]] = {k: [] for k in MAP_KEYS}
    for key, mv in measured.items():
        tv = truth.get(key)
        if mv.published and tv is not None and key[1] in err:
            err[key[1]].append(mv.value - tv.value)
    out = {}
    for k, e in err.items():
        a = np.array(e)
        out[k] = {
            "units": float(len(a)),
            "bias": float(a.mean()) if len(a) else math.nan,
            "rmse": float(np.sqrt((a * a).mean())) if len(a) else math.nan,
        }
    return out


def place_and_time_errors(conn: Any, sim: Simulated) -> tuple[float, float, float]:
    """(p50, p95) metres between placed and true positions; p99 |stamp - true time| in ms.

    Over the positioned PM, NO2 and sound samples: the position the receiver's join gave each
    against where the van really was when it was measured (the truth interpolated to that time).
    """
    dists, terr = [], []
    for device in sorted(sim.fits):
        rows = dbapi.fetchall(
            conn,
            "SELECT s.epoch, s.seq, s.t_utc_ms, p.lat, p.lon FROM samples s JOIN positions p"
            " ON p.device = s.device AND p.epoch = s.epoch AND p.seq = s.seq"
            " WHERE p.device = ? AND s.sensor IN ('pm', 'no2', 'noise')"
            " AND p.state IN ('exact', 'interpolated') AND p.t_utc_ms IS NOT NULL",
            (device,),
        )
        if not rows:
            continue
        epoch = np.array([r[0] for r in rows], dtype=object)
        seq, t, lat, lon = (np.array([r[i] for r in rows], dtype=float) for i in range(1, 5))
        for e in np.unique(epoch):
            vd, true_ms = sim.truth[(device, e)], sim.true_ms[(device, e)]
            m = epoch == e
            # tick and stream by the seq layout of van_day_samples
            k = ((seq[m] - 1) // len(SENSORS)).astype(np.int64)
            stream = ((seq[m] - 1) % len(SENSORS)).astype(np.int64)
            when = true_ms[k, stream]
            grid = vd.t_ms().astype(float)
            tlat, tlon = np.interp(when, grid, vd.lat), np.interp(when, grid, vd.lon)
            dy = (lat[m] - tlat) * se.EARTH_M_PER_DEG
            dx = (lon[m] - tlon) * se.EARTH_M_PER_DEG * np.cos(np.radians(tlat))
            dists.append(np.hypot(dx, dy))
            terr.append(np.abs(t[m] - when))
    d, te = np.concatenate(dists), np.concatenate(terr)
    return float(np.percentile(d, 50)), float(np.percentile(d, 95)), float(np.percentile(te, 99))


def evaluate(
    sim: Simulated,
    snapper: ArraySnapper,
    rule: Rule | None = None,
    configs: tuple[tuple[str, Corrections], ...] = CONFIGS,
) -> list[Figures]:
    """Figures per configuration; ``rule`` is the publishing rule (default: the receiver's).

    Per store, the rows without calibration are read first (no record has reached the receiver:
    it serves the van's own NO2); then the NO2 records are announced, the receiver recomputes,
    and the calibrated rows are read.
    """
    rule = rule or Rule()
    truth = unit_map(sim.truth_tracks, snapper, rule)
    out: list[Figures] = []
    for aligned, path in sim.stores.items():
        mine = [(n, c) for n, c in configs if c.time_alignment == aligned]
        if not mine:
            continue
        conn = dbapi.connect(path)
        p50, p95, p99 = place_and_time_errors(conn, sim)
        for calibrated in (False, True):
            todo = [(n, c) for n, c in mine if c.calibration == calibrated]
            if not todo:
                continue
            if calibrated:
                conn.close()
                announce_records(sim, aligned)
                conn = dbapi.connect(path)
            elif aligned in sim.announced:
                raise ValueError("rows without calibration need a store no record has reached")
            for name, c in todo:
                measured = unit_map(measured_tracks(conn, sim, c), snapper, rule)
                out.append(Figures(name, compare(measured, truth), p50, p95, p99))
        conn.close()
    order = [n for n, _ in configs]
    return sorted(out, key=lambda f: order.index(f.config))


TARGETS = {
    "pm25": ("RMSE <= 2, |bias| <= 1", lambda b, r: r <= 2 and abs(b) <= 1),
    "no2_ppb": ("RMSE <= 5", lambda b, r: r <= 5),
    "laeq": ("RMSE <= 1", lambda b, r: r <= 1),
    "pm10": ("(none)", None),
}
UNITS = {"pm25": "µg/m³", "pm10": "µg/m³", "no2_ppb": "ppb", "laeq": "dB"}


def table_rows(figs: list[Figures], note: str) -> list[dict]:
    """Bench table rows; each figure's baseline: the same with no correction (today's main)."""
    base = next((f for f in figs if f.config == CONFIGS[-1][0]), None)
    rows = []
    for f in figs:
        for k, q in f.per_quantity.items():
            tgt, ok = TARGETS[k]
            b = base.per_quantity[k] if base else None
            rows.append(
                {
                    "name": f"{f.config}: {k} bias / RMSE ({UNITS[k]})",
                    "value": f"{q['bias']:+.2f} / {q['rmse']:.2f}",
                    "unit": "",
                    "baseline": f"{b['bias']:+.2f} / {b['rmse']:.2f}" if b else None,
                    "target": tgt,
                    "ok": None if ok is None or math.isnan(q["rmse"]) else ok(q["bias"], q["rmse"]),
                    "note": f"{int(q['units'])} published units",
                }
            )
        rows.append(
            {
                "name": f"{f.config}: placed position p50 / p95",
                "value": f"{f.pos_p50_m:.1f} / {f.pos_p95_m:.1f}",
                "unit": "m",
                "baseline": f"{base.pos_p50_m:.1f} / {base.pos_p95_m:.1f}" if base else None,
                "target": "p95 <= 10",
                "ok": f.pos_p95_m <= 10,
                "note": "5 m GPS noise",
            }
        )
        rows.append(
            {
                "name": f"{f.config}: timestamp error p99",
                "value": round(f.time_p99_ms, 1),
                "unit": "ms",
                "baseline": round(base.time_p99_ms, 1) if base else None,
                "target": "<= 100",
                "ok": f.time_p99_ms <= 100,
                "note": note,
            }
        )
    return rows


def measure(
    fleet: Fleet, sw: se.ErrorSwitches | None = None, scheme: str = "segment", alt: bool = True
) -> list[dict]:
    """The table; ``alt``: also the fleets of ``ALT_GROWTH`` (one aligned store each)."""
    sw = sw or se.ErrorSwitches()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fidelity-"))
    try:
        t0 = time.perf_counter()
        sim = simulate(fleet, sw, tmp)
        t_sim = time.perf_counter() - t0
        snapper = make_snapper(scheme)
        figs = evaluate(sim, snapper)
        for k, growth in enumerate(ALT_GROWTH if alt else ()):
            other = simulate(fleet, sw, tmp / f"alt{k}", aligned_variants=(True,), growth=growth)
            for f in evaluate(other, snapper, configs=ALT_CONFIGS):
                figs.append(replace(f, config=f"{growth.label}: {f.config}"))
        note = (
            f"{fleet.vans} vans x {fleet.days} days x {fleet.hours:g} h, "
            f"{sim.samples:,} samples per store; "
            f"simulate+ingest {t_sim:.0f} s, the rest {time.perf_counter() - t0 - t_sim:.0f} s"
        )
        return table_rows(figs, note)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run() -> list[dict]:
    return measure(
        Fleet(
            int(os.environ.get("BENCH_FIDELITY_VANS", "10")),
            int(os.environ.get("BENCH_FIDELITY_DAYS", "5")),
            float(os.environ.get("BENCH_FIDELITY_HOURS", "3")),
        ),
        alt=os.environ.get("BENCH_FIDELITY_ALT", "1") != "0",
    )


if __name__ == "__main__":
    from bench import print_table

    print_table(run())
