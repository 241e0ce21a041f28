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
would read), stamped as the agent stamps them, and become the agent's own ``Sample``
and ``Batch`` objects, stored by ``SQLiteStore.ingest_many``: the code the receiver
runs on every upload, deriving fixes, positions and flags. Left out are the serial
bytes and drivers, the van's buffer and MQTT: lossless for values and times (the
decoder, delivery and fleet-oracle tests show it) and far too slow for 10 vans x 5
days on 2 cores.

The corrections (issue 15, built by others in parallel) are switched here, one
function each, so the next session wires them to the final implementations:
``time_alignment`` (which stamps the store holds: :func:`simulator.sensor_errors.stamp_errors`),
:func:`flag_filter`, :func:`calibrate`, :func:`dehumidify`.

Run: ``python -m bench --only bench_fidelity`` or ``python -m bench.bench_fidelity``;
BENCH_FIDELITY_VANS / _DAYS / _HOURS size the fleet (default 10 x 5 x 3 h).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.model import Sample, TimeSource
from receiver import dbapi
from receiver.aggregate import QUANTITY_KEYS, Rule, Track, UnitValue
from receiver.mapunits import ArraySnapper, make_snapper
from receiver.store import SQLiteStore
from simulator import sensor_errors as se
from simulator.environment import Environment
from simulator.route import Route
from simulator.truth import MAP_KEYS, VanDay, make_track, truth_track, unit_map

try:  # issue 15 part 2's flag policy (h5): the receiver's own, where this tree has it
    from receiver.flag_policy import FlagPolicy, sentinel_mask
except ImportError:  # pragma: no cover - the tree before h5
    FlagPolicy = None  # type: ignore[assignment,misc]
    sentinel_mask = None  # type: ignore[assignment]
from uplink.wire import Batch

START = dt.datetime(2026, 11, 2, 7, 0, tzinfo=dt.UTC)  # a Monday, 08:00 in Alphen
SENSORS = ("gps", "pm", "no2", "noise")  # one sample each per second, in this seq order
BATCH_S = 60
#: What receiver/aggregate.py left out before issue 15's flag policy ("no flags" in the table).
OLD_EXCLUDED = frozenset({"warming_up", "time_implausible", "clock_step"})
OLD_SENTINEL_AT_OR_BELOW = -900.0
#: The flag policy of issue 15 part 2 where the tree has no receiver/flag_policy.py yet:
#: every error flag keeps a value out; ``humid`` for PM.
ERROR_FLAGS = frozenset(
    {
        "out_of_range",
        "negative",
        "stuck",
        "outlier",
        "warming_up",
        "time_implausible",
        "clock_step",
        "clock_untrusted",
        "no_fix",
        "no_time",
    }
)
PM_KEYS = ("pm25", "pm10")
COARSE_KAPPA = 0.09  # middle of Huang et al.'s PM2.5-10 range


@dataclass(frozen=True)
class Fleet:
    vans: int = 10
    days: int = 5
    hours: float = 3.0
    seed: int = 1
    start: dt.datetime = START


@dataclass(frozen=True)
class Corrections:
    """The corrections of issue 15 the table switches off one at a time."""

    time_alignment: bool = True
    flags: bool = True
    calibration: bool = True
    humidity: bool = True
    exclude_humid: bool = True  # the flag policy's ``humid`` for PM (with flags on)


CONFIGS: tuple[tuple[str, Corrections], ...] = (
    ("all corrections", Corrections()),
    ("no time alignment", Corrections(time_alignment=False)),
    ("no flags", Corrections(flags=False)),
    ("no calibration", Corrections(calibration=False)),
    ("no humidity handling", Corrections(humidity=False)),
    ("humid PM kept, corrected", Corrections(exclude_humid=False)),
    ("none (today's main)", Corrections(False, False, False, False)),
)


# -- the fleet into stores --------------------------------------------------------------


@dataclass
class Simulated:
    """Stores (by time alignment) and what the bench knows that the store does not."""

    stores: dict[bool, Path]
    truth: dict[tuple[str, str], VanDay] = field(default_factory=dict)  # (device, epoch)
    fits: dict[str, se.CalibrationFit] = field(default_factory=dict)
    truth_tracks: list[Track] = field(default_factory=list)
    samples: int = 0


def van_day_samples(
    vd: VanDay,
    day: int,
    dev: se.DeviceErrors,
    sw: se.ErrorSwitches,
    seed: int,
    van: int,
    aligned_variants: tuple[bool, ...],
) -> dict[bool, list[Sample]]:
    """The samples one van's agent would commit in a day, per time alignment."""
    n = vd.n
    rng = np.random.default_rng([seed, van, day, 10])
    shift_s = np.arange(n, dtype=float)
    rh_m, temp_m = se.measure_rh_temp(vd.rh, vd.temp, dev, sw, rng)
    pm25, pm10 = se.measure_pm(vd.pm25, vd.pm10, vd.rh, se.day_kappa(seed, day), dev, sw, rng)
    no2 = se.measure_no2(vd.no2, vd.o3, vd.temp, day + shift_s / 86400.0, dev, sw, rng)
    laeq = se.measure_laeq(vd.laeq, dev, sw, rng)
    warming = se.add_faults(pm25, pm10, no2, sw, rng, shift_s)
    fix = se.gps_has_fix(vd.blocked, shift_s, sw)
    dlat, dlon = se.gps_noise(n, sw, rng, float(vd.lat[0]))
    glat, glon = vd.lat + dlat, vd.lon + dlon
    if sw.read_noise:
        glat, glon = np.round(glat, 7), np.round(glon, 7)
    t_true = vd.t0_utc + shift_s
    first_fix = int(np.argmax(fix)) if fix.any() else n
    lists = (
        glat.tolist(),
        glon.tolist(),
        vd.speed.tolist(),
        vd.course.tolist(),
        pm25.tolist(),
        pm10.tolist(),
        rh_m.tolist(),
        no2.tolist(),
        temp_m.tolist(),
        laeq.tolist(),
        fix.tolist(),
        warming.tolist(),
    )
    out = {}
    for aligned in aligned_variants:
        st = se.stamp_errors(
            n, fix, aligned, sw, np.random.default_rng([seed, van, day, 20 + aligned])
        )
        ms = lambda err: np.round((t_true + err) * 1000).astype(np.int64).tolist()
        t_gps, t_read, t_sound = ms(st.gps), ms(st.reads), ms(st.sound)
        mono0 = day * 86_400_000
        samples = []
        seq = 0
        for k, (la, lo, sp, co, p25, p10, rh, n2, tc, lq, fx, warm) in enumerate(zip(*lists)):
            src = TimeSource.GPS if k >= first_fix else TimeSource.CORRECTED
            mono = mono0 + k * 1000
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
            samples += [
                Sample("gps", t_gps[k], mono, src, gps, () if fx else ("no_fix",), seq + 1, "boot"),
                Sample(
                    "pm",
                    t_read[k],
                    mono,
                    src,
                    {"pm25": p25, "pm10": p10, "rh": rh},
                    wf,
                    seq + 2,
                    "boot",
                ),
                Sample(
                    "no2", t_read[k], mono, src, {"no2_ppb": n2, "temp_c": tc}, wf, seq + 3, "boot"
                ),
                Sample("noise", t_sound[k], mono, src, {"laeq": lq}, (), seq + 4, "boot"),
            ]
            seq += 4
        out[aligned] = samples
    return out


def ingest(store: SQLiteStore, device: str, epoch: str, samples: list[Sample]) -> None:
    """The day's samples as the agent uploads them: 60-second batches, stored by the receiver."""
    per = BATCH_S * len(SENSORS)
    items = []
    for a in range(0, len(samples), per):
        chunk = samples[a : a + per]
        b = Batch(device, epoch, chunk[0].seq or 0, chunk[-1].seq or 0, chunk)
        received = max(s.t_utc_ms or 0 for s in chunk) + 2000
        items.append((b, hashlib.sha256(b.batch_id.encode()).hexdigest(), received))
    for a in range(0, len(items), 20):  # what a busy receiver groups in one commit
        store.ingest_many(items[a : a + 20])


def simulate(
    fleet: Fleet,
    sw: se.ErrorSwitches,
    workdir: Path,
    aligned_variants: tuple[bool, ...] = (True, False),
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
            sim.fits[device] = se.CalibrationFit.fit(dev, fleet.seed, device, sw)
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
                for aligned, samples in van_day_samples(
                    vd, d, dev, sw, fleet.seed, v, aligned_variants
                ).items():
                    ingest(opened[aligned], device, epoch, samples)
                    sim.samples += len(samples) if aligned == aligned_variants[0] else 0
            sim.truth_tracks.append(truth_track(days))
    finally:
        for s in opened.values():
            s.close()
    return sim


# -- reading the store back, with the corrections as seams ----------------------------


@dataclass
class Rows:
    """One van's positioned sensor samples from the store, as columns (one row per sample)."""

    device: str
    epoch: np.ndarray
    seq: np.ndarray
    sensor: np.ndarray  # index into SENSORS
    t_ms: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    vals: dict[str, np.ndarray]  # pm25 pm10 rh no2_ppb temp_c laeq (NaN where absent)
    agent_flags: list[str]
    quality: dict[str, list[str]]  # quantity -> its receiver flags per row ('' none)


VAL_KEYS = ("pm25", "pm10", "rh", "no2_ppb", "temp_c", "laeq")


def read_rows(conn: Any, device: str) -> Rows:
    ex = ", ".join(f"json_extract(s.vals, '$.{k}')" for k in VAL_KEYS)
    rows = dbapi.fetchall(
        conn,
        f"SELECT s.epoch, s.seq, s.sensor, s.t_utc_ms, p.lat, p.lon, s.flags, {ex}"
        " FROM samples s JOIN positions p"
        " ON p.device = s.device AND p.epoch = s.epoch AND p.seq = s.seq"
        " WHERE p.device = ? AND s.sensor != 'gps' AND p.state IN ('exact', 'interpolated')"
        " AND p.t_utc_ms IS NOT NULL ORDER BY p.t_utc_ms",
        (device,),
    )
    q: dict[tuple[str, int, str], str] = {
        (e, s, k): f
        for e, s, k, f in dbapi.fetchall(
            conn, "SELECT epoch, seq, quantity, flags FROM quality WHERE device = ?", (device,)
        )
    }
    cols = list(zip(*rows)) if rows else [[] for _ in range(7 + len(VAL_KEYS))]
    epoch, seq = np.array(cols[0], dtype=object), np.array(cols[1], dtype=np.int64)
    vals = {
        k: np.array([np.nan if x is None else x for x in cols[7 + i]], dtype=float)
        for i, k in enumerate(VAL_KEYS)
    }
    quality = {
        k: [q.get((e, s, k), "") for e, s in zip(cols[0], cols[1])]
        for k in ("pm25", "pm10", "no2_ppb", "laeq")
    }
    return Rows(
        device,
        epoch,
        seq,
        np.array([SENSORS.index(x) for x in cols[2]], dtype=np.int64),
        np.array(cols[3], dtype=np.int64),
        np.array(cols[4], dtype=float),
        np.array(cols[5], dtype=float),
        vals,
        list(cols[6]),
        quality,
    )


def policy_flags(quantity: str, c: Corrections) -> frozenset[str]:
    """The flags that keep a value of ``quantity`` out of the map with the policy on."""
    if FlagPolicy is not None:
        out = FlagPolicy().excluded_for(quantity)
    else:
        out = ERROR_FLAGS | ({"humid"} if quantity in PM_KEYS else frozenset())
    return out if c.exclude_humid else out - {"humid"}


def _hits(texts: list[str], flags: frozenset[str]) -> np.ndarray:
    return np.array([bool(t) and not flags.isdisjoint(t.split(",")) for t in texts], dtype=bool)


def flag_filter(r: Rows, vals: dict[str, np.ndarray], c: Corrections) -> None:
    """Keep flagged values out of the map, in place.

    Off: what receiver/aggregate.py did before issue 15 (the agent's warming_up,
    time_implausible, clock_step; sentinels at or below -900). On: the flag policy of
    issue 15 part 2 (receiver/flag_policy.py's default where it exists) on the sample's
    flags and the value's quality flags, and its sentinel rule.
    """
    old_out = _hits(r.agent_flags, OLD_EXCLUDED)
    for k in MAP_KEYS:
        v = vals[k]
        with np.errstate(invalid="ignore"):
            bad = old_out | ~np.isfinite(v) | (v <= OLD_SENTINEL_AT_OR_BELOW)
        if c.flags:
            flags = policy_flags(k, c)
            bad |= _hits(r.agent_flags, flags) | _hits(r.quality[k], flags)
            if sentinel_mask is not None:
                bad |= sentinel_mask(v)
        v[bad] = np.nan


def calibrate(vals: dict[str, np.ndarray], fit: se.CalibrationFit) -> None:
    """The best value with the van's calibration record (h6 will serve it from the store).

    NO2: zero, temperature coefficient and gain of the co-location fit, with the
    temperature the van measured; PM: the co-location gain; noise: the calibrator offset.
    """
    vals["no2_ppb"] = (
        vals["no2_ppb"] - fit.no2_zero - fit.no2_temp_coef * (vals["temp_c"] - 20.0)
    ) / fit.no2_gain
    vals["pm25"] = vals["pm25"] / fit.pm_gain
    vals["pm10"] = vals["pm10"] / fit.pm_gain
    vals["laeq"] = vals["laeq"] - fit.mic_offset


def dehumidify(vals: dict[str, np.ndarray]) -> None:
    """Dry PM from wet: invert kappa-Koehler growth at the RH the van measured, with the
    fleet kappa (the receiver applies no PM humidity correction today; see docs/fidelity.md)."""
    rh = vals["rh"]
    fine = vals["pm25"] / se.growth_factor(se.FLEET_KAPPA, rh)
    vals["pm10"] = fine + (vals["pm10"] - vals["pm25"]) / se.growth_factor(COARSE_KAPPA, rh)
    vals["pm25"] = fine


def measured_track(r: Rows, c: Corrections, fit: se.CalibrationFit) -> Track:
    vals = {k: v.copy() for k, v in r.vals.items()}
    flag_filter(r, vals, c)
    if c.calibration:
        calibrate(vals, fit)
    if c.humidity:
        dehumidify(vals)
    out = np.full((len(r.t_ms), len(QUANTITY_KEYS)), np.nan)
    for k in MAP_KEYS:
        out[:, QUANTITY_KEYS.index(k)] = vals[k]
    return make_track(r.device, r.t_ms, r.lat, r.lon, out)


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


def place_and_time_errors(rows: list[Rows], sim: Simulated) -> tuple[float, float, float]:
    """(p50, p95) metres between placed and true positions; p99 |stamp - true time| in ms."""
    dists, terr = [], []
    for r in rows:
        for epoch in np.unique(r.epoch):
            vd = sim.truth[(r.device, epoch)]
            m = r.epoch == epoch
            k = (r.seq[m] - 1) // len(
                SENSORS
            )  # the tick of each sample (seq layout of van_day_samples)
            dy = (r.lat[m] - vd.lat[k]) * se.EARTH_M_PER_DEG
            dx = (r.lon[m] - vd.lon[k]) * se.EARTH_M_PER_DEG * np.cos(np.radians(vd.lat[k]))
            dists.append(np.hypot(dx, dy))
            terr.append(np.abs(r.t_ms[m] - vd.t_ms()[k]))
    d, t = np.concatenate(dists), np.concatenate(terr)
    return float(np.percentile(d, 50)), float(np.percentile(d, 95)), float(np.percentile(t, 99))


def evaluate(
    sim: Simulated,
    snapper: ArraySnapper,
    rule: Rule | None = None,
    configs: tuple[tuple[str, Corrections], ...] = CONFIGS,
) -> list[Figures]:
    """Figures per configuration; ``rule`` is the publishing rule (default: the receiver's)."""
    rule = rule or Rule()
    truth = unit_map(sim.truth_tracks, snapper, rule)
    out: list[Figures] = []
    for aligned, path in sim.stores.items():
        conn = dbapi.connect(path)
        rows = [read_rows(conn, dev) for dev in sorted(sim.fits)]
        conn.close()
        p50, p95, p99 = place_and_time_errors(rows, sim)
        for name, c in configs:
            if c.time_alignment != aligned:
                continue
            tracks = [measured_track(r, c, sim.fits[r.device]) for r in rows]
            f = Figures(name, compare(unit_map(tracks, snapper, rule), truth), p50, p95, p99)
            out.append(f)
        del rows
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
    fleet: Fleet, sw: se.ErrorSwitches | None = None, scheme: str = "segment"
) -> list[dict]:
    sw = sw or se.ErrorSwitches()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fidelity-"))
    try:
        t0 = time.perf_counter()
        sim = simulate(fleet, sw, tmp)
        t_sim = time.perf_counter() - t0
        figs = evaluate(sim, make_snapper(scheme))
        note = (
            f"{fleet.vans} vans x {fleet.days} days x {fleet.hours:g} h, "
            f"{sim.samples:,} samples per store; "
            f"simulate+ingest {t_sim:.0f} s, maps {time.perf_counter() - t0 - t_sim:.0f} s"
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
        )
    )


if __name__ == "__main__":
    from bench import print_table

    print_table(run())
