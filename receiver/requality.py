"""Quality flags judged again on the best value, after the receiver recomputed values.

The flags must describe the number that is served: when receiver/calibration.py writes
or removes a recomputed ``no2_ppb`` (``derived``), the value flags (``out_of_range``,
``negative``) and the window flags (``stuck``, ``outlier``) of those samples are judged
again on the best value (the derived one, else the van's), and so are the neighbours
whose windows hold them. The flags of the sample itself (``warming_up``, clock flags,
``humid``) stay as they were. Backend-neutral (sqlite3 or psycopg connection), inside
the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from receiver import quality
from receiver.calibration import NO2_QUANTITY, NO2_SENSOR, _exec, _q

# The bits judged from the value (and its neighbours); the others belong to the sample.
_VALUE_BITS = quality.BIT["out_of_range"] | quality.BIT["negative"] | quality.BIT["outlier"] | quality.BIT["stuck"]
_HALF = quality.WINDOW // 2


def requality(conn: Any, device: str, touched: Iterable[tuple[str, int]]) -> int:
    """Judge the ``no2_ppb`` flags of ``touched`` (epoch, seq) samples again; rows changed."""
    by_epoch: dict[str, list[int]] = {}
    for epoch, seq in touched:
        by_epoch.setdefault(epoch, []).append(seq)
    return sum(_epoch(conn, device, epoch, min(seqs), max(seqs)) for epoch, seqs in by_epoch.items())


def _edge(conn: Any, device: str, epoch: str, seq: int, before: bool) -> tuple[int, bool]:
    """The seq CONTEXT NO2 samples before (after) ``seq``, and whether the stream goes on past it."""
    op, order = ("<", "DESC") if before else (">", "ASC")
    rows = _exec(conn, f"SELECT seq FROM samples WHERE device=? AND epoch=? AND sensor=? AND seq {op} ?"
                       f" ORDER BY seq {order} LIMIT ?",
                 (device, epoch, NO2_SENSOR, seq, quality.CONTEXT + 1)).fetchall()
    if len(rows) <= quality.CONTEXT:
        return (rows[-1][0] if rows else seq), False
    return rows[-2][0], True


def _epoch(conn: Any, device: str, epoch: str, lo: int, hi: int) -> int:
    first, cut_before = _edge(conn, device, epoch, lo, True)
    last, cut_after = _edge(conn, device, epoch, hi, False)
    rows = _exec(conn, "SELECT s.seq, s.vals, d.value, q.flags FROM samples s"
                       " LEFT JOIN derived d ON d.device=s.device AND d.epoch=s.epoch AND d.seq=s.seq"
                       " AND d.quantity=?"
                       " LEFT JOIN quality q ON q.device=s.device AND q.epoch=s.epoch AND q.seq=s.seq"
                       " AND q.quantity=?"
                       " WHERE s.device=? AND s.epoch=? AND s.sensor=? AND s.seq BETWEEN ? AND ? ORDER BY s.seq",
                 (NO2_QUANTITY, NO2_QUANTITY, device, epoch, NO2_SENSOR, first, last)).fetchall()
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
    put, drop = [], []
    for i, (seq, _, _, flags) in enumerate(rows):
        if not judge[i]:
            continue
        old = quality.mask_of(flags)
        mask = (old & ~_VALUE_BITS) | int(value[i]) | int(series[i])
        if mask == old:
            continue
        if mask:
            put.append((device, epoch, seq, NO2_QUANTITY, quality.mask_text(mask)))
        else:
            drop.append((device, epoch, seq, NO2_QUANTITY))
    cur = conn.cursor()
    if put:
        cur.executemany(_q(conn, "INSERT INTO quality VALUES (?,?,?,?,?) ON CONFLICT (device, epoch, seq, quantity)"
                                 " DO UPDATE SET flags = excluded.flags"), put)
    if drop:
        cur.executemany(_q(conn, "DELETE FROM quality WHERE device=? AND epoch=? AND seq=? AND quantity=?"), drop)
    return len(put) + len(drop)


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
