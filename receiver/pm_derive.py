"""The receiver's best PM value: the van's PM gain, then hygroscopic growth undone.

What is derived goes to ``derived`` (receiver/calibration.py's table) as PM's best value,
which every reader serves through ``value_source``/``best_join`` and the ``observations``
view; the van's raw value stays in ``samples`` untouched. Per PM value (``pm1``, ``pm25``,
``pm10``, any sensor section):

1. **Gain.** The input is the van's calibrated ``<quantity>_cal`` where its PM record
   wrote one (edge/calibration.py ``pm_corrected``), else the raw value.
2. **Growth.** Divided by the kappa-Koehler growth at the RH the particles grew at
   (receiver/pm_humidity.py): the sample's own RH, else the van's RH closest in time within
   30 s in the same batch (``quality.nearest_rh``, as the ``humid`` flag reads it).

Why gain first: the two act in that order in the world. The particles take up water in
the air, then the sensor, with its unit-to-unit gain, reports the wet mass it saw; the gain
record was fitted against a reference on the sensor's own output. Undoing them goes in
reverse: the record turns the sensor's output back into the wet mass, then growth turns wet
into dry. (For a pure gain the order is immaterial; for a record with an intercept it is not:
the intercept is in the sensor's units, which are wet.) A PM record with its own RH term
(``rh_coef``) is already a humidity correction fitted by co-location: growth is then not
undone again, and the value is served as the record made it.

The ``calibration`` of a derived value says what was applied: the van's record id, the
correction id (``kappa-koehler:0.22``), or both joined by ``+``. Where growth cannot be
corrected (no RH within 30 s, RH above 95 %) a gain-corrected value is still served; a raw
value with nothing to correct gets no derived row (the van's value is the best one).
Functions take a DB-API connection and run inside the caller's transaction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from receiver import quality
from receiver.calibration import _exec, _q, records_in_batch
from receiver.flag_policy import is_sentinel
from receiver.pm_humidity import FINE_OF_PM10, correction_id, dry_pm, dry_pm10

#: The PM quantities whose best value is derived here.
PM_DERIVED = ("pm1", "pm25", "pm10")
CAL_SUFFIX = "_cal"
PM_KIND = "pm"  # a PM calibration record's kind (edge/calibration.py KINDS)


@dataclass(frozen=True, slots=True)
class PmSample:
    """What the derivation needs of one stored sample."""

    epoch: str
    seq: int
    t_utc_ms: int | None
    values: Mapping[str, Any]


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _own_rh(values: Mapping[str, Any]) -> float | None:
    return next((x for k, v in values.items() if quality.is_rh_key(k) and (x := _number(v)) is not None), None)


def _rh_series(samples: Iterable[PmSample]) -> tuple[np.ndarray, np.ndarray]:
    """(times, values) of every RH among ``samples``, by time (any sensor's: it is the van's air)."""
    at = sorted((s.t_utc_ms, x) for s in samples if s.t_utc_ms is not None
                for k, v in s.values.items() if quality.is_rh_key(k) and (x := _number(v)) is not None)
    return np.array([a[0] for a in at], dtype=float), np.array([a[1] for a in at], dtype=float)


def best_pm(values: Mapping[str, Any], rh: float | None, kappa: Mapping[str, float],
            rh_fitted: frozenset[str] = frozenset()) -> dict[str, tuple[float, str]]:
    """quantity -> (best value, what was applied) for the PM values of one sample at ``rh``.

    ``rh_fitted``: ids of PM records with their own RH term. Only values something was
    applied to come out: a raw value at an RH that cannot be corrected is left out (the
    van's own value is then served as it is).
    """
    out: dict[str, tuple[float, str]] = {}
    cal = values.get("cal") if isinstance(values.get("cal"), str) else None
    inputs: dict[str, tuple[float, bool]] = {}
    for q in PM_DERIVED:
        calibrated, raw = _number(values.get(q + CAL_SUFFIX)), _number(values.get(q))
        if raw is not None and is_sentinel(raw):
            continue  # a "no value" code stays what it is (the sentinel rule drops it), never scaled into a number
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


def pm_rows(device: str, samples: list[PmSample], kappa: Mapping[str, float],
            rh_fitted: frozenset[str] = frozenset()) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(rows to write into ``derived``, keys of PM values that get none) for ``samples``,
    RH from their own values, else the nearest among ``samples`` within 30 s."""
    pm = [s for s in samples if any(_number(s.values.get(q)) is not None for q in PM_DERIVED)]
    if not pm:
        return [], []
    rh_t, rh_v = _rh_series(samples)
    t = np.array([math.nan if s.t_utc_ms is None else s.t_utc_ms for s in pm], dtype=float)
    near = quality.nearest_rh(t, rh_t, rh_v)
    rows, none = [], []
    for s, rh_near in zip(pm, near):
        rh = _own_rh(s.values)
        if rh is None and not math.isnan(rh_near):
            rh = float(rh_near)  # no RH of its own: the van's closest within 30 s
        best = best_pm(s.values, rh, kappa, rh_fitted)
        for q in PM_DERIVED:
            if q in best:
                rows.append((device, s.epoch, s.seq, q, *best[q]))
            elif _number(s.values.get(q)) is not None:
                none.append((device, s.epoch, s.seq, q))
    return rows, none


def write_pm(conn: Any, device: str, samples: list[PmSample], kappa: Mapping[str, float],
             *, prune: bool = False) -> int:
    """Derive and upsert the best PM values of ``samples``; ``prune``: a value that now gets
    none loses the one it had (a recompute). Returns rows written."""
    if not any(_number(s.values.get(q)) is not None for s in samples for q in PM_DERIVED):
        return 0  # no PM here: no query for the van's records
    rows, none = pm_rows(device, samples, kappa, rh_fitted_records(conn, device))
    cur = conn.cursor()
    if rows:
        cur.executemany(_q(conn, "INSERT INTO derived (device, epoch, seq, quantity, value, calibration)"
                                 " VALUES (?,?,?,?,?,?) ON CONFLICT (device, epoch, seq, quantity)"
                                 " DO UPDATE SET value=excluded.value, calibration=excluded.calibration"), rows)
    if none and prune:
        cur.executemany(_q(conn, "DELETE FROM derived WHERE device=? AND epoch=? AND seq=? AND quantity=?"), none)
    return len(rows)


def pm_records_before(conn: Any, batch: Any) -> frozenset[str] | None:
    """Before a batch's records are stored: the van's RH-fitted PM record ids, or None when the
    batch carries no PM record (then nothing ``derive_batch_pm`` checks can change)."""
    if not any(rec.kind == PM_KIND for _, rec in records_in_batch(batch)):
        return None
    return rh_fitted_records(conn, batch.device)


def derive_batch_pm(conn: Any, batch: Any, kappa: Mapping[str, float],
                    records_before: frozenset[str] | None = None) -> int:
    """The best PM values of one stored batch (RH from within the batch).

    ``records_before``: ``pm_records_before`` of this batch. A PM record with its own RH term
    that arrives after values it calibrated (a van announces its records when they become
    active and at every start, not before each sample) means those values had growth undone
    on top of it: the van's PM is derived again (``recompute_pm``), only then.
    """
    samples = [PmSample(batch.epoch, s.seq, s.t_utc_ms, s.values) for s in batch.samples
               if isinstance(s.values, dict)]
    n = write_pm(conn, batch.device, samples, kappa)
    if records_before is not None and rh_fitted_records(conn, batch.device) != records_before:
        n += recompute_pm(conn, batch.device, kappa)
    return n


CHUNK = 5000


def recompute_pm(conn: Any, device: str, kappa: Mapping[str, float]) -> int:
    """Derive every stored PM value of ``device`` again with ``kappa`` (after a kappa change),
    a chunk at a time in (epoch, seq) order; RH from within each chunk. Returns rows written."""
    n, after = 0, ("", -1)
    while True:
        rows = _exec(conn, "SELECT epoch, seq, t_utc_ms, vals FROM samples WHERE device=?"
                           " AND (epoch > ? OR (epoch = ? AND seq > ?)) ORDER BY epoch, seq LIMIT ?",
                     (device, after[0], after[0], after[1], CHUNK)).fetchall()
        samples = [PmSample(e, q, t, json.loads(v) if isinstance(v, str) else dict(v or {}))
                   for e, q, t, v in rows]
        n += write_pm(conn, device, [s for s in samples if isinstance(s.values, dict)], kappa, prune=True)
        if len(rows) < CHUNK:
            return n
        after = (rows[-1][0], rows[-1][1])


