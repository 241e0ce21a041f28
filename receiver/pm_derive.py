"""The receiver's best PM value: the van's PM gain, then hygroscopic growth undone.

What is derived goes to ``derived`` (receiver/calibration.py's table) as PM's best value,
which every reader serves through ``value_source``/``best_join`` and the ``observations``
view; the van's raw value stays in ``samples`` untouched. Per PM value (``pm1``, ``pm25``,
``pm10``, any sensor section):

1. **Gain.** The van's PM record valid at the sample's time (of its serial: the ``cal`` tag's,
   else the van's only PM serial; the newest version, as for NO2: ``calibration.record_at``)
   applied to the raw value here (``core.calibration.pm_corrected``, the function the van ran),
   so a corrected record (v2 superseding v1) recomputes what it covers (``derive_batch_pm``:
   ``changed_spans`` then ``recompute_pm`` per span). Without a record here yet, the van's
   ``<quantity>_cal`` and tag; else the raw value.
2. **Growth.** Divided by the kappa-Koehler growth at the RH ``quality.pm_rh`` chooses, the one
   rule the ``humid``/``rh_missing`` flags read too: the sample's own RH, else the van's RH
   closest in time within 30 s, any sensor's, any upload's. A batch is derived with its own
   RH; where a neighbouring upload brings a closer RH (within 30 s of a batch's time edges)
   requality.humid_edges judges the flags and derives the values again together
   (``write_pm`` with its RH series); ``recompute_pm`` reads RH by time around each chunk.
   So the served value does not depend on where the van cut its batches.

Why gain first: the two act in that order in the world. The particles take up water in
the air, then the sensor, with its unit-to-unit gain, reports the wet mass it saw; the gain
record was fitted against a reference on the sensor's own output. Undoing them goes in
reverse: the record turns the sensor's output back into the wet mass, then growth turns wet
into dry. (For a pure gain the order is immaterial; for a record with an intercept it is not:
the intercept is in the sensor's units, which are wet.) A PM record with its own RH term
(``rh_coef``) is already a humidity correction fitted by co-location: growth is then not
undone again, and the value is served as the record made it.

3. **Housing.** The RH the particles grew at is the PM housing's, warmer than the ambient RH
   the van measures (the DGS-NO2's ``no2_rh_pct``): the van's ``pm_housing`` record valid at
   an RH reading's time (the enclosure's warming, measured once by a technician, ``edge pm
   housing``) takes that ambient RH to the housing's temperature (:func:`rh_readings`) before
   step 2 chooses. Without a record the RH is used as measured (an uncharacterised van: PM2.5
   ~1.4 ug/m3 low, docs/fidelity.md). A new or corrected housing record recomputes the PM it
   covers (``derive_batch_pm``), as a corrected gain record does, and its ``humid``/``rh_missing``
   flags are judged again with the housing's RH (requality.humid_edges). An impossible RH
   (outside 0..100 %) is never converted: its PM values count as without RH.

The ``calibration`` of a derived value says what was applied: the van's record id, the
correction id (``kappa-koehler:0.22``), and the housing record whose warming converted its
RH (``pm_housing:<serial>:v<N>``), joined by ``+``. A growth-corrected value without a
``pm_housing:`` part was corrected with ambient RH as measured (no record for that van). Where growth cannot be
corrected (no RH within 30 s, RH above 95 %) a gain-corrected value is still served; a raw
value with nothing to correct gets no derived row (the van's value is the best one).
Functions take a DB-API connection and run inside the caller's transaction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from receiver import quality
from core.calibration import PM_HOUSING, CalibrationRecord, pm_corrected
from receiver.calibration import (Records, Span, _exec, _ident, device_records, changed_spans, record_at,
                                  records_in_batch, timed_chunks, write_derived)
from receiver.flag_policy import is_sentinel
from receiver.pm_humidity import FINE_OF_PM10, correction_id, dry_pm, dry_pm10, housing_rh

#: The PM quantities whose best value is derived here.
PM_DERIVED = ("pm1", "pm25", "pm10")
CAL_SUFFIX = "_cal"
PM_KIND = "pm"  # a PM calibration record's kind (edge/calibration.py KINDS)
#: The housing's warming at a time (ms), or None: ambient RH is used as measured.
WarmingAt = Callable[[float], "float | None"]


@dataclass(frozen=True, slots=True)
class PmSample:
    """What the derivation needs of one stored sample."""

    epoch: str
    seq: int
    t_utc_ms: int | None
    values: Mapping[str, Any]


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _temperature_key(rh_key: str) -> str:
    """The key of the temperature measured beside an RH (``no2_rh_pct`` -> ``no2_temp_c``)."""
    return rh_key[: -len(quality.RH_SUFFIX)] + "_temp_c" if rh_key.endswith(quality.RH_SUFFIX) else "temp_c"


def rh_readings(values: Mapping[str, Any], warming_c: float | None = None) -> list[float]:
    """The RH readings one sample carries, as the PM housing sees them.

    ``warming_c``: how much the PM housing warms the air it draws (measured once for the
    enclosure). Then an RH measured outside the housing (a sample without PM values, e.g. the
    DGS-NO2's ``no2_rh_pct``) with its temperature beside it (``no2_temp_c``) is taken to the
    housing's temperature by Magnus (pm_humidity.housing_rh): same water vapour, warmer air,
    lower RH. A PM sample's own RH is the housing's already; an RH without a temperature beside
    it cannot be converted and counts as measured. None: every RH as measured (the default).
    An impossible RH (outside 0..100 %, a sentinel) comes out as NaN, never converted: the
    reading is there, but its PM values have no usable RH (``rh_missing``)."""
    out: list[float] = []
    outside = warming_c is not None and not any(_number(values.get(q)) is not None for q in PM_DERIVED)
    for k, v in values.items():
        if not quality.is_rh_key(k) or (x := _number(v)) is None:
            continue
        if math.isnan(x := quality.usable_rh(x)):
            out.append(x)
            continue
        t = _number(values.get(_temperature_key(k))) if outside else None
        if t is not None and warming_c is not None:
            try:
                x = housing_rh(x, t, warming_c)
            except ValueError:
                pass  # a temperature outside Magnus' range is a broken reading: the RH counts as measured
        out.append(x)
    return out


def _rh_series(samples: Iterable[PmSample], warming_c: float | WarmingAt | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(times, values) of every RH among ``samples``, by time (any sensor's: it is the van's air);
    ``warming_c``: outside RH taken to the PM housing's temperature (:func:`rh_readings`), a
    fixed warming or the one in effect at each reading's time (:class:`Housing`)."""
    at = sorted((s.t_utc_ms, x) for s in samples if s.t_utc_ms is not None
                for x in rh_readings(s.values, warming_c(s.t_utc_ms) if callable(warming_c) else warming_c))
    return np.array([a[0] for a in at], dtype=float), np.array([a[1] for a in at], dtype=float)


def housing_rh_series(samples: Iterable[PmSample], warming_c: float) -> tuple[np.ndarray, np.ndarray]:
    """The van's RH series as the PM housing sees it (``write_pm``'s ``rh``), for a housing that
    warms the air by ``warming_c`` degC."""
    return _rh_series(samples, warming_c)


def van_samples(conn: Any, device: str, lo_ms: float, hi_ms: float) -> list[PmSample]:
    """The van's sensor samples timed in [lo_ms, hi_ms], any upload's, through ``positions``."""
    rows = _exec(conn, "SELECT s.epoch, s.seq, p.t_utc_ms, s.vals FROM positions p JOIN samples s"
                       " ON s.device=p.device AND s.epoch=p.epoch AND s.seq=p.seq"
                       " WHERE p.device=? AND p.t_utc_ms >= ? AND p.t_utc_ms <= ? AND s.sensor <> 'gps'",
                 (device, int(lo_ms), int(hi_ms))).fetchall()
    out = [PmSample(e, q, t, json.loads(v) if isinstance(v, str) else dict(v or {})) for e, q, t, v in rows]
    return [x for x in out if isinstance(x.values, dict)]


def van_rh(conn: Any, device: str, lo_ms: float, hi_ms: float, housing: Housing | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Every RH the van sent timed in [lo_ms, hi_ms] (any sensor, any upload), by time, as the
    PM housing sees it (``housing``: the van's housing records; default: read them)."""
    return _rh_series(van_samples(conn, device, lo_ms, hi_ms), housing or housing_records(conn, device))


@dataclass(frozen=True, slots=True)
class Housing:
    """A van's ``pm_housing`` records: the enclosure's warming in effect at a time.

    The van's, whatever the serial: a van has one PM housing at a time, and an enclosure
    replaced gets a new serial whose record starts later while the old one's stays open. So of
    the records in effect at a time, the newest by valid-from, then by version (a correction of
    the same enclosure, valid from the same time, wins). Called with a time it gives the
    warming (``WarmingAt``)."""

    recs: Records

    def record(self, t_ms: float | None) -> CalibrationRecord | None:
        if t_ms is None or math.isnan(t_ms):
            return None
        live = [(lo, r.version, r) for r, lo, hi in self.recs.items if lo <= t_ms and (hi is None or t_ms < hi)]
        return max(live, key=lambda x: x[:2])[2] if live else None

    def __call__(self, t_ms: float) -> float | None:
        rec = self.record(t_ms)
        return None if rec is None else _number(rec.values.get("warming_c"))


def housing_spans(before: Records, after: Records) -> list[Span]:
    """The spans ([lo, hi) ms, None open) where the housing record in effect (:meth:`Housing.record`,
    whatever the serial) differs between two sets of a van's ``pm_housing`` records."""
    bounds = sorted({b for recs in (before, after) for _, lo, hi in recs.items for b in (lo, hi) if b is not None})
    if not bounds:
        return []
    old, new = Housing(before), Housing(after)
    out: list[Span] = []
    for lo, hi in zip([None, *bounds], [*bounds, None]):
        t = bounds[0] - 1 if lo is None else lo  # every time in [lo, hi) has the same records in effect
        if _ident(old.record(t)) != _ident(new.record(t)):
            out[-1:] = [(out[-1][0], hi)] if out and out[-1][1] == lo else [*out[-1:], (lo, hi)]
    return out


def housing_records(conn: Any, device: str) -> Housing:
    """``device``'s usable ``pm_housing`` records (refused ones are skipped, as for NO2)."""
    return Housing(device_records(conn, device, PM_HOUSING))


def _has_rh_term(rec: CalibrationRecord) -> bool:
    return _number(rec.values.get("rh_coef")) not in (None, 0.0)


def best_pm(values: Mapping[str, Any], rh: float | None, kappa: Mapping[str, float],
            rh_fitted: frozenset[str] = frozenset(), record: CalibrationRecord | None = None,
            housing: str | None = None) -> dict[str, tuple[float, str]]:
    """quantity -> (best value, what was applied) for the PM values of one sample at ``rh``.

    ``record``: the van's PM record valid at the sample's time (applied here to the raw value,
    to its quantity); without one the van's ``<quantity>_cal`` and ``cal`` tag count.
    ``rh_fitted``: ids of PM records with their own RH term. Only values something was
    applied to come out: a raw value at an RH that cannot be corrected is left out (the
    van's own value is then served as it is). ``housing``: the id of the ``pm_housing`` record
    whose warming converted ``rh``, named in what a growth-corrected value applied.
    """
    out: dict[str, tuple[float, str]] = {}
    cal = values.get("cal") if isinstance(values.get("cal"), str) else None
    if record is not None:
        cal = record.id
        rh_fitted = rh_fitted | {record.id} if _has_rh_term(record) else rh_fitted - {record.id}
    rec_q = None if record is None else str(record.values.get("quantity", "pm25"))
    inputs: dict[str, tuple[float, bool]] = {}
    for q in PM_DERIVED:
        raw = _number(values.get(q))
        if raw is not None and is_sentinel(raw):
            continue  # a "no value" code stays what it is (the sentinel rule drops it), never scaled into a number
        if record is not None:
            calibrated = _number(pm_corrected(record.values, values)) if q == rec_q else None
        else:
            calibrated = _number(values.get(q + CAL_SUFFIX))
        if calibrated is not None and raw is not None:
            inputs[q] = (calibrated, True)
        elif raw is not None:
            inputs[q] = (raw, False)
    for q, (x, gained) in inputs.items():
        dry = None
        # A record with its own RH term is a humidity correction fitted by co-location: not undone twice.
        if q in kappa and not (gained and cal in rh_fitted):
            if q == "pm10":
                fine = inputs.get(FINE_OF_PM10, (None, False))[0]
                dry = dry_pm10(x, fine, rh, kappa.get(FINE_OF_PM10, kappa["pm10"]), kappa["pm10"])
            else:
                dry = dry_pm(x, rh, kappa[q])
        applied = [cal] if gained and cal else []
        if dry is not None:
            applied.append(correction_id(q, kappa))
            if housing:
                applied.append(housing)
        if applied:
            out[q] = (x if dry is None else dry, "+".join(applied))
    return out


def rh_fitted_records(conn: Any, device: str) -> frozenset[str]:
    """Ids of ``device``'s PM records with an RH term of their own (``rh_coef`` not 0)."""
    out = set()
    for rid, text in _exec(conn, "SELECT id, record FROM calibrations WHERE device=? AND kind=?",
                           (device, PM_KIND)).fetchall():
        try:
            coef = json.loads(text).get("values", {}).get("rh_coef")
        except (ValueError, AttributeError):
            continue  # unreadable: the van applied whatever it had; growth is still undone
        if _number(coef):
            out.add(rid)
    return frozenset(out)


def pm_records(conn: Any, device: str) -> Records:
    """``device``'s usable PM records, as ``calibration.record_at`` takes them."""
    return device_records(conn, device, PM_KIND)


def pm_rows(device: str, samples: list[PmSample], kappa: Mapping[str, float],
            rh_fitted: frozenset[str] = frozenset(), recs: Records | None = None,
            rh: tuple[np.ndarray, np.ndarray] | None = None, housing: Housing | None = None
            ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(rows to write into ``derived``, keys of PM values that get none) for ``samples``.

    RH by the one rule (``quality.pm_rh``) over ``rh`` (times, values), by default the RH
    among ``samples`` themselves (taken to the housing's temperature by ``housing``, the van's
    ``pm_housing`` records; a given ``rh`` must be so already); ``recs``: the van's PM records
    (``pm_records``)."""
    pm = [s for s in samples if any(_number(s.values.get(q)) is not None for q in PM_DERIVED)]
    if not pm:
        return [], []
    rh_t, rh_v = _rh_series(samples, housing) if rh is None else rh
    t = np.array([math.nan if s.t_utc_ms is None else s.t_utc_ms for s in pm], dtype=float)
    own = np.array([quality.own_rh(s.values) for s in pm], dtype=float)
    chosen = quality.pm_rh(own, t, rh_t, rh_v)
    rows, none = [], []
    for s, x in zip(pm, chosen):
        record = None
        if recs is not None and recs.items and s.t_utc_ms is not None:
            record = record_at(recs, s.t_utc_ms, dict(s.values), PM_KIND)
        h = None if housing is None else housing.record(s.t_utc_ms)
        best = best_pm(s.values, None if math.isnan(x) else float(x), kappa, rh_fitted, record,
                       None if h is None else h.id)
        for q in PM_DERIVED:
            if q in best:
                rows.append((device, s.epoch, s.seq, q, *best[q]))
            elif _number(s.values.get(q)) is not None:
                none.append((device, s.epoch, s.seq, q))
    return rows, none


def write_pm(conn: Any, device: str, samples: list[PmSample], kappa: Mapping[str, float],
             *, prune: bool = False, rh: tuple[np.ndarray, np.ndarray] | None = None,
             housing: Housing | None = None) -> int:
    """Derive and upsert the best PM values of ``samples``; ``prune``: a value that now gets
    none loses the one it had (a recompute); ``rh``: the RH series to choose from, already as
    the housing sees it (default: the samples' own, converted with ``housing``); ``housing``:
    the van's ``pm_housing`` records (default: read them). Returns rows written."""
    if not any(_number(s.values.get(q)) is not None for s in samples for q in PM_DERIVED):
        return 0  # no PM here: no query for the van's records
    housing = housing or housing_records(conn, device)
    rows, none = pm_rows(device, samples, kappa, rh_fitted_records(conn, device), pm_records(conn, device), rh,
                         housing)
    write_derived(conn, rows, none if prune else [])
    return len(rows)


def pm_records_before(conn: Any, batch: Any) -> tuple[Records, Records] | None:
    """Before a batch's records are stored: the van's PM and ``pm_housing`` records, or None
    when the batch carries neither kind (then nothing ``derive_batch_pm`` checks can change)."""
    if not any(rec.kind in (PM_KIND, PM_HOUSING) for _, rec in records_in_batch(batch)):
        return None
    return pm_records(conn, batch.device), housing_records(conn, batch.device).recs


def derive_batch_pm(conn: Any, batch: Any, kappa: Mapping[str, float],
                    records_before: tuple[Records, Records] | None = None) -> tuple[int, list[Span]]:
    """The best PM values of one stored batch (RH from within the batch; its edges are judged
    again with the neighbouring uploads' RH by requality.humid_edges).

    ``records_before``: ``pm_records_before`` of this batch. Where the PM record in effect
    changed (a corrected record, v2 superseding v1; a record with its own RH term that arrives
    after values it calibrated; a new or corrected ``pm_housing`` record, whose warming changes
    the RH), the van's PM in those spans is derived again (``changed_spans``, ``recompute_pm``),
    as NO2's is: nothing else moves. Returns (rows written, the spans where the housing record
    changed): their ``humid``/``rh_missing`` flags are judged again with the housing's RH by the
    store (requality.humid_edges, within its read budget), so the flags do not depend on
    whether the record came before or after the values.
    """
    samples = [PmSample(batch.epoch, s.seq, s.t_utc_ms, s.values) for s in batch.samples
               if isinstance(s.values, dict)]
    n = write_pm(conn, batch.device, samples, kappa)
    if records_before is None:
        return n, []
    gain_before, housing_before = records_before
    warm = housing_spans(housing_before, housing_records(conn, batch.device).recs)
    for span in [*changed_spans(gain_before, pm_records(conn, batch.device)), *warm]:
        n += recompute_pm(conn, batch.device, kappa, span)  # an overlap is derived twice: the same values
    return n, warm


CHUNK = 5000


def recompute_pm(conn: Any, device: str, kappa: Mapping[str, float], span: Span = (None, None)) -> int:
    """Derive ``device``'s stored PM values timed in ``span`` ([lo, hi) ms; default: all) again,
    a chunk at a time in time order, each with every RH the van sent within 30 s of the chunk
    (any upload's): what ingest and humid_edges derived, reproduced. Untimed samples (only
    their own RH) come along when the span is open. Returns rows written."""
    w = quality.HUMID_WITHIN_MS
    n = 0
    housing = housing_records(conn, device)
    for rows in timed_chunks(conn, device, span, "s.epoch, s.seq, p.t_utc_ms, s.vals", "s.sensor <> 'gps'"):
        samples = [PmSample(e, q, t, json.loads(v) if isinstance(v, str) else dict(v or {})) for e, q, t, v, *_ in rows]
        pm = [x for x in samples
              if isinstance(x.values, dict) and any(_number(x.values.get(q)) is not None for q in PM_DERIVED)]
        if pm:
            ts = [x.t_utc_ms for x in pm]
            n += write_pm(conn, device, pm, kappa, prune=True, housing=housing,
                          rh=van_rh(conn, device, min(ts) - w, max(ts) + w, housing))
    if span == (None, None):
        n += _recompute_untimed(conn, device, kappa)
    return n


def _recompute_untimed(conn: Any, device: str, kappa: Mapping[str, float]) -> int:
    """The van's PM samples without a time (``positions.state`` no_time): own RH only."""
    n, after = 0, ("", -1)
    while True:
        rows = _exec(conn, "SELECT s.epoch, s.seq, s.vals FROM positions p JOIN samples s"
                           " ON s.device=p.device AND s.epoch=p.epoch AND s.seq=p.seq"
                           " WHERE p.device=? AND p.t_utc_ms IS NULL AND (s.epoch > ? OR (s.epoch = ? AND s.seq > ?))"
                           " ORDER BY s.epoch, s.seq LIMIT ?",
                     (device, after[0], after[0], after[1], CHUNK)).fetchall()
        samples = [PmSample(e, q, None, json.loads(v) if isinstance(v, str) else dict(v or {})) for e, q, v in rows]
        n += write_pm(conn, device, [x for x in samples if isinstance(x.values, dict)], kappa, prune=True,
                      housing=housing_records(conn, device))
        if len(rows) < CHUNK:
            return n
        after = (rows[-1][0], rows[-1][1])
