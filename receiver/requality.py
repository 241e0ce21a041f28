"""Quality flags judged again where one batch alone could not judge them.

``requality``: on the best value, after the receiver recomputed values.
``humid_edges``: ``humid`` at a batch's time edges, with the RH of the batches around it.

For ``requality``, the flags must describe the number that is served: when
receiver/calibration.py writes or removes a recomputed ``no2_ppb`` (``derived``), the value flags (``out_of_range``,
``negative``) and the window flags (``stuck``, ``outlier``) of those samples are judged
again on the best value (the derived one, else the van's), and so are the neighbours
whose windows hold them. The flags of the sample itself (``warming_up``, clock flags,
``humid``) stay as they were. Backend-neutral (sqlite3 or psycopg connection), inside
the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from receiver import quality
from receiver.calibration import NO2_QUANTITY, _exec, _q
from receiver.pm_derive import PmSample, housing_records, rh_readings, write_pm

# The bits judged from the value (and its neighbours); the others belong to the sample.
_VALUE_BITS = quality.BIT["out_of_range"] | quality.BIT["negative"] | quality.BIT["outlier"] | quality.BIT["stuck"]
_HALF = quality.WINDOW // 2


def requality(conn: Any, device: str, touched: Iterable[tuple[str, int, str]]) -> int:
    """Judge the ``no2_ppb`` flags of ``touched`` (epoch, seq, sensor) samples again; rows changed.

    A stream is a sensor's (its section name: any name, not only ``no2``) in one epoch.
    """
    by_stream: dict[tuple[str, str], list[int]] = {}
    for epoch, seq, sensor in touched:
        by_stream.setdefault((epoch, sensor), []).append(seq)
    return sum(_epoch(conn, device, epoch, sensor, min(seqs), max(seqs))
               for (epoch, sensor), seqs in by_stream.items())


def _edge(conn: Any, device: str, epoch: str, sensor: str, seq: int, before: bool) -> tuple[int, bool]:
    """The seq CONTEXT NO2 samples before (after) ``seq``, and whether the stream goes on past it."""
    op, order = ("<", "DESC") if before else (">", "ASC")
    rows = _exec(conn, f"SELECT seq FROM samples WHERE device=? AND epoch=? AND sensor=? AND seq {op} ?"
                       f" ORDER BY seq {order} LIMIT ?",
                 (device, epoch, sensor, seq, quality.CONTEXT + 1)).fetchall()
    if len(rows) <= quality.CONTEXT:
        return (rows[-1][0] if rows else seq), False
    return rows[-2][0], True


def _epoch(conn: Any, device: str, epoch: str, sensor: str, lo: int, hi: int) -> int:
    first, cut_before = _edge(conn, device, epoch, sensor, lo, True)
    last, cut_after = _edge(conn, device, epoch, sensor, hi, False)
    rows = _exec(conn, "SELECT s.seq, s.vals, d.value, q.flags FROM samples s"
                       " LEFT JOIN derived d ON d.device=s.device AND d.epoch=s.epoch AND d.seq=s.seq"
                       " AND d.quantity=?"
                       " LEFT JOIN quality q ON q.device=s.device AND q.epoch=s.epoch AND q.seq=s.seq"
                       " AND q.quantity=?"
                       " WHERE s.device=? AND s.epoch=? AND s.sensor=? AND s.seq BETWEEN ? AND ? ORDER BY s.seq",
                 (NO2_QUANTITY, NO2_QUANTITY, device, epoch, sensor, first, last)).fetchall()
    from receiver.store import _num_or_nan, _values  # the store's readers of a vals column

    rows = [(seq, _values(vals), d, flags) for seq, vals, d, flags in rows]
    rows = [r for r in rows if NO2_QUANTITY in r[1]]
    if not rows:
        return 0
    best = np.array([_num_or_nan(d if d is not None else vals[NO2_QUANTITY]) for _, vals, d, _ in rows])
    frames = [quality.frame_key(vals) for _, vals, _, _ in rows]
    series = quality.series_masks(best, frames=frames)
    value = quality.value_masks(NO2_QUANTITY, best)
    judge = _judged(best, cut_before, cut_after)
    return rewrite_flags(conn, device, (
        (epoch, seq, NO2_QUANTITY, flags, (quality.mask_of(flags) & ~_VALUE_BITS) | int(value[i]) | int(series[i]))
        for i, (seq, _, _, flags) in enumerate(rows) if judge[i]))


def _judged(v: np.ndarray, cut_before: bool, cut_after: bool) -> np.ndarray:
    """Which values of the read the read can judge: where the stream was cut short, the
    first (last) WINDOW // 2 real values' windows reach past it, and a run at the cut may be
    longer than what was read; those keep their flags (they are far from the change)."""
    real = ~np.isnan(v) & ~quality.sentinel_mask(v)
    rank = np.cumsum(real) - 1
    total = int(real.sum())
    ok = np.ones(len(v), dtype=bool)
    if cut_before:
        ok &= rank >= _HALF
        ok &= ~_first_run(v)
    if cut_after:
        ok &= rank < total - _HALF
        ok &= ~_first_run(v[::-1])[::-1]
    return ok


def _first_run(v: np.ndarray) -> np.ndarray:
    out = np.zeros(len(v), dtype=bool)
    if len(v):
        out[0] = True
        for i in range(1, len(v)):
            if not v[i] == v[i - 1]:
                break
            out[i] = True
    return out


# Sample rows one ingest group may read to judge ``humid`` at batch edges in the ack path
# (issue 13 re-test: uploads packed in time put a van's whole backlog within +-30 s of every
# batch's edges, and each upload re-read it all with its values: 22 -> 82 s per group, RSS
# growing with the backlog). A window over the budget is judged later by the deriver.
HUMID_BUDGET = 20_000
HUMID_CHUNK = 20_000  # rows judged per transaction of the deriver (``humid_slice``)


def humid_windows(times: list[int]) -> list[tuple[int, int]]:
    """The time windows whose PM values ``humid_edges`` judges again for a batch of ``times``."""
    if not times:
        return []
    w = quality.HUMID_WITHIN_MS
    lo, hi = min(times), max(times)
    return [(lo - w, lo + w), (hi - w, hi + w)] if hi - lo > 2 * w else [(lo - w, hi + w)]


def span_windows(conn: Any, device: str, spans: Iterable[tuple[int | None, int | None]]) -> list[tuple[int, int]]:
    """Time spans ([lo, hi) ms, None open; e.g. where a late ``pm_housing`` record changed the RH)
    as windows for ``humid_edges``' ``also``: an open end closed at the van's first (last) timed
    sample; a span holding none of its samples gives no window."""
    first, last = _exec(conn, "SELECT min(t_utc_ms), max(t_utc_ms) FROM positions WHERE device=?",
                        (device,)).fetchone()
    if first is None:
        return []
    out = []
    for lo, hi in spans:
        a, b = max(first, lo if lo is not None else first), min(last, hi - 1 if hi is not None else last)
        if a <= b:
            out.append((int(a), int(b)))
    return out


def humid_edges(conn: Any, device: str, times: list[int], budget: int | None = None,
                kappa: Mapping[str, float] | None = None, also: Iterable[tuple[int, int]] = ()
                ) -> tuple[int, int, list[tuple[int, int]]]:
    """``humid`` of PM values near a batch's time edges, judged with every RH the van sent.

    A batch judges ``humid`` with the RH readings inside it; a PM value within
    HUMID_WITHIN_MS of the batch's first or last time may have its closest RH in a
    neighbouring batch (either side, whichever arrived first). So both edges are judged
    again with the van's RH readings around them, read by time through
    ``positions(device, t_utc_ms)``: two short windows per batch, whatever its length.
    Only the ``humid`` and ``rh_missing`` bits change, by the RH ``quality.pm_rh`` chooses; with
    ``kappa`` (the store's) those PM values are derived again with the same RH
    (receiver/pm_derive.py ``write_pm``), so flag and correction never read different RH.
    ``also``: more windows judged the same way, whole (``span_windows``: where a late housing
    record changed the RH every PM value there reads). ``budget``: the most sample rows to read; a window
    that would read more is not judged here but returned, for ``humid_slice`` later.
    Returns (rows changed, sample rows read, windows left).
    """
    changed = read = 0
    left: list[tuple[int, int]] = []
    for a, b in [*humid_windows(times), *also]:
        if budget is not None and _rows_within(conn, device, a, b, budget - read) > budget - read:
            left.append((a, b))
            continue
        c, r = _humid_window(conn, device, a, b, kappa)
        changed, read = changed + c, read + r
    return changed, read, left


def humid_slice(conn: Any, device: str, lo: int, hi: int, chunk: int = HUMID_CHUNK,
                kappa: Mapping[str, float] | None = None) -> tuple[int | None, int]:
    """Judge ``humid`` again for the PM values of a deferred window from ``lo``: its first
    ``chunk`` samples' times. Returns (where the rest starts, None when done; rows read)."""
    rows = _exec(conn, "SELECT t_utc_ms FROM positions WHERE device=? AND t_utc_ms >= ?"
                       " AND t_utc_ms <= ? ORDER BY t_utc_ms LIMIT ?", (device, lo, hi, chunk + 1)).fetchall()
    end = rows[chunk - 1][0] if len(rows) > chunk else hi
    _, read = _humid_window(conn, device, lo, end, kappa)
    return (end + 1 if len(rows) > chunk and end < hi else None), read + len(rows)


def _rows_within(conn: Any, device: str, a: float, b: float, most: int) -> int:
    """Sample rows (any sensor) a window's read would cover, counted up to ``most + 1``
    (the index only, no values)."""
    w = quality.HUMID_WITHIN_MS
    return int(_exec(conn, "SELECT count(*) FROM (SELECT 1 FROM positions WHERE device=?"
                           " AND t_utc_ms >= ? AND t_utc_ms <= ? LIMIT ?) AS x",
                     (device, int(a - w), int(b + w), max(most, 0) + 1)).fetchone()[0])


def _humid_window(conn: Any, device: str, a: float, b: float,
                  kappa: Mapping[str, float] | None = None) -> tuple[int, int]:
    w = quality.HUMID_WITHIN_MS
    cur = _exec(conn, "SELECT s.epoch, s.seq, p.t_utc_ms, s.vals FROM positions p JOIN samples s"
                      " ON s.device=p.device AND s.epoch=p.epoch AND s.seq=p.seq"
                      " WHERE p.device=? AND p.t_utc_ms >= ? AND p.t_utc_ms <= ? AND s.sensor <> 'gps'",
                (device, int(a - w), int(b + w)))
    from receiver.store import _values

    housing = housing_records(conn, device)  # ambient RH taken to the PM housing's (its warming record)
    rh_at: list[tuple[int, float]] = []
    pm: list[tuple[str, int, int, str]] = []  # epoch, seq, t, quantity
    own: list[float] = []
    judged: dict[tuple[str, int], PmSample] = {}  # the PM samples judged: derived again below
    read = 0
    for epoch, seq, t, vals in cur:  # streamed: only the RH readings and the window's PM samples are kept
        read += 1
        v = _values(vals)
        rh_at.extend((t, x) for x in rh_readings(v, housing(t)))
        for key in v:
            if key in quality.PM_QUANTITIES and key in quality.FLAGGED and a <= t <= b:
                pm.append((epoch, seq, t, key))
                own.append(quality.own_rh(v))
                judged[(epoch, seq)] = PmSample(epoch, seq, t, v)
    if not pm:
        return 0, read
    rh_at.sort()
    rh_t = np.array([r[0] for r in rh_at], dtype=float)
    rh_v = np.array([r[1] for r in rh_at], dtype=float)
    bits = quality.pm_rh_mask(quality.pm_rh(np.array(own, dtype=float), np.array([p[2] for p in pm], dtype=float),
                                            rh_t, rh_v))
    if kappa is not None:
        write_pm(conn, device, list(judged.values()), kappa, prune=True, rh=(rh_t, rh_v), housing=housing)
    stored: dict[tuple[str, int, str], str] = {}
    for epoch in {p[0] for p in pm}:
        seqs = [p[1] for p in pm if p[0] == epoch]
        stored.update({(epoch, seq, q): f for seq, q, f in _exec(
            conn, "SELECT seq, quantity, flags FROM quality WHERE device=? AND epoch=? AND seq BETWEEN ? AND ?",
            (device, epoch, min(seqs), max(seqs))).fetchall()})
    humid = quality.BIT["humid"] | quality.BIT["rh_missing"]
    return rewrite_flags(conn, device, (
        (epoch, seq, q, stored.get((epoch, seq, q)), (quality.mask_of(stored.get((epoch, seq, q))) & ~humid) | int(bit))
        for (epoch, seq, _, q), bit in zip(pm, bits))), read


def rewrite_flags(conn: Any, device: str, items: Iterable[tuple[str, int, str, str | None, int]]) -> int:
    """Store new flag masks of earlier values: (epoch, seq, quantity, stored text, new mask).

    Only changed rows are written; a value left without flags loses its row (as one never
    flagged has none). Returns rows changed.
    """
    put, drop = [], []
    for epoch, seq, q, old, mask in items:
        text = quality.mask_text(mask)
        if text == (old or ""):
            continue
        if mask:
            put.append((device, epoch, seq, q, text))
        else:
            drop.append((device, epoch, seq, q))
    cur = conn.cursor()
    if put:
        cur.executemany(_q(conn, "INSERT INTO quality VALUES (?,?,?,?,?) ON CONFLICT (device, epoch, seq, quantity)"
                                 " DO UPDATE SET flags = excluded.flags"), put)
    if drop:
        cur.executemany(_q(conn, "DELETE FROM quality WHERE device=? AND epoch=? AND seq=? AND quantity=?"), drop)
    return len(put) + len(drop)
