"""Quality flags for every measured value: flags rather than deletion.

Pure functions, no I/O (the store feeds them). Flags, after the practice in
shared/reference/datalab-store.md:

* ``out_of_range``: outside what the sensor can report, or a sentinel (-999);
* ``negative``: below zero where the quantity cannot be;
* ``stuck``: the same value over and over: the reference practice says 3+ repeats for
  per-minute data; at 1 Hz, integer-resolution sensors repeat three times in clean
  air all the time, so we flag runs of STUCK_RUN samples (30: half a minute);
* ``outlier``: outside median ± 3·MAD of a moving window of 15;
* ``humid``: PM measured at relative humidity above 75 % (optical PM reads high in fog);
* ``warming_up``: the sensor said so;
* ``no_fix``: the sample has no position (``no_time``: not even a time);
* ``clock_untrusted``: its time was stamped before the clock could be trusted.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# Physical or instrument limits per quantity (inclusive); values outside are not measurements.
RANGES: dict[str, tuple[float, float]] = {
    "pm1": (0.0, 1000.0),
    "pm25": (0.0, 1000.0),
    "pm10": (0.0, 2000.0),
    "no2_ppb": (-50.0, 2000.0),  # electrochemical cells read a little below zero in clean air
    "laeq": (20.0, 140.0),
    "lamax": (20.0, 140.0),
    "lamin": (20.0, 140.0),
}
NON_NEGATIVE = {"pm1", "pm25", "pm10", "no2_ppb"}
SENTINELS = {-999.0, -9999.0, 65535.0}
PM_QUANTITIES = {"pm1", "pm25", "pm10", "pm1_cf1", "pm25_cf1", "pm10_cf1"}
HUMID_RH = 75.0
STUCK_RUN = 30
WINDOW = 15
MAD_K = 3.0
CONTEXT = max(WINDOW, STUCK_RUN) - 1  # earlier values a batch needs to see

# The quantities that get flags (others, e.g. raw millivolts, are kept as they are).
FLAGGED = set(RANGES)


def value_flags(quantity: str, value: object) -> set[str]:
    """Flags that need only the value itself."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return set()
    v = float(value)
    out: set[str] = set()
    if v in SENTINELS:
        return {"out_of_range"}
    lo, hi = RANGES.get(quantity, (float("-inf"), float("inf")))
    if not lo <= v <= hi:
        out.add("out_of_range")
    if quantity in NON_NEGATIVE and v < 0:
        out.add("negative")
    return out


def series_flags(values: Sequence[float | None], context: Sequence[float] = ()) -> list[set[str]]:
    """``stuck`` and ``outlier`` for a time-ordered series, with earlier values as context.

    ``context`` holds the values just before ``values`` (up to WINDOW - 1), so a
    batch boundary does not reset the windows.
    """
    ctx = [float(c) for c in context][-CONTEXT:]
    seq: list[float | None] = [*ctx, *values]
    offset = len(ctx)
    out: list[set[str]] = [set() for _ in values]
    # stuck: runs of identical values of length >= STUCK_RUN (every member flagged)
    run_start = 0
    for i in range(1, len(seq) + 1):
        if i < len(seq) and seq[i] is not None and seq[i] == seq[run_start]:
            continue
        if seq[run_start] is not None and i - run_start >= STUCK_RUN:
            for j in range(max(run_start, offset), i):
                out[j - offset].add("stuck")
        run_start = i
    # outlier: median ± 3 MAD over a centred window of 15 (shifted inward at the ends),
    # computed for all windows at once with numpy: this runs for every value ingested.
    idx = [i for i, v in enumerate(seq) if v is not None]
    n = len(idx)
    if n < 5:
        return out
    vals = np.fromiter((seq[i] for i in idx), dtype=float, count=n)  # type: ignore[misc]
    w = min(WINDOW, n)
    windows = sliding_window_view(vals, w)
    med = np.median(windows, axis=1)
    mad = np.median(np.abs(windows - med[:, None]), axis=1)
    start = np.clip(np.arange(n) - WINDOW // 2, 0, n - w)
    m, d = med[start], mad[start]
    # A flat window has MAD 0; a floor (5 % of the median, at least half a unit)
    # keeps a single spike in it an outlier without flagging ordinary wobble.
    d = np.maximum(np.maximum(d, 0.05 * np.abs(m)), 0.5)
    for k in np.nonzero(np.abs(vals - m) > MAD_K * 1.4826 * d)[0]:
        i = idx[k]
        if i >= offset:
            out[i - offset].add("outlier")
    return out


def sample_flags(sample_flags_csv: str, time_src: str, position_state: str | None) -> set[str]:
    """Flags that hold for every value of one sample."""
    out = {f for f in sample_flags_csv.split(",") if f in ("warming_up", "time_implausible")}
    if time_src == "unsync":
        out.add("clock_untrusted")
    if position_state in ("no_fix", "no_time"):
        out.add(position_state)
    return out


def humid(quantity: str, rh: float | None) -> bool:
    return quantity in PM_QUANTITIES and rh is not None and rh > HUMID_RH


def join(flags: Iterable[str]) -> str:
    return ",".join(sorted(set(flags)))
