"""The time oracle: are a van's stored samples in order, or flagged, and are their times right?

The delivery oracle (``simulator/oracle.py``) says whether every committed
sample arrived once; this one reads the same store for what a clock step
can spoil. Simulated vans run on a ``SimClock``, whose true UTC at a
monotonic reading is known, so a stored time can be checked against the truth.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

FLAG = "clock_step"


@dataclass
class TimeVerdict:
    device: str
    samples: int = 0
    flagged: int = 0  # samples carrying the clock_step flag
    silent_disorder: list[int] = field(default_factory=list)  # unflagged, earlier than one committed before
    wrong_unflagged: list[int] = field(default_factory=list)  # unflagged, further from the truth than allowed
    wrong_flagged: list[int] = field(default_factory=list)  # flagged and off the truth (the spine was not kept)
    observations_flagged: int = 0  # samples whose rows in the observations view name clock_step (flags)
    quality_flagged: int = 0  # samples whose quality (per value, measured quantities only) names clock_step
    sources: dict[str, int] = field(default_factory=dict)  # time_src -> samples


def check_times(
    store_path: Path, device: str, truth_ms: Callable[[int], int], *, tolerance_ms: int = 1500,
) -> TimeVerdict:
    """Look at ``device``'s sensor samples (not GPS, not calibration) in commit (seq) order, per sensor."""
    db = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=30)
    like = f"%,{FLAG},%"
    try:
        rows = db.execute(
            "SELECT sensor, seq, t_utc_ms, t_mono_ms, time_src, flags FROM samples"
            " WHERE device=? AND sensor NOT IN ('gps', 'calibration') ORDER BY sensor, epoch, seq",
            (device,),
        ).fetchall()
        v = TimeVerdict(device)
        v.observations_flagged, v.quality_flagged = db.execute(
            "SELECT count(DISTINCT CASE WHEN ',' || flags || ',' LIKE ? THEN epoch || seq END),"
            " count(DISTINCT CASE WHEN ',' || quality || ',' LIKE ? THEN epoch || seq END)"
            " FROM observations WHERE device=?",
            (like, like, device),
        ).fetchone()
    finally:
        db.close()
    newest: dict[str, int] = {}
    for sensor, seq, t, mono, src, flags in rows:
        v.samples += 1
        v.sources[src] = v.sources.get(src, 0) + 1
        is_flagged = FLAG in (flags or "").split(",")
        v.flagged += is_flagged
        if t is None:
            continue
        if not is_flagged:
            if sensor in newest and t < newest[sensor]:
                v.silent_disorder.append(seq)
            if abs(t - truth_ms(mono)) > tolerance_ms:
                v.wrong_unflagged.append(seq)
        elif abs(t - truth_ms(mono)) > tolerance_ms:
            v.wrong_flagged.append(seq)
        newest[sensor] = max(t, newest.get(sensor, t))
    return v
