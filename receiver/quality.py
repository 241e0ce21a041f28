"""Quality flags for every measured value: flags rather than deletion.

Pure functions, no I/O (the store feeds them). Flags, after the practice in
shared/reference/datalab-store.md:

* ``out_of_range``: outside what the sensor can report, or a sentinel (-999 ...: the one
  rule, receiver/flag_policy.py ``sentinel_mask``, that the maps use too);
* ``negative``: below zero where the quantity cannot be;
* ``stuck``: the same value over and over: the reference practice says 3+ repeats for
  per-minute data; at 1 Hz, integer-resolution sensors repeat three times in clean
  air all the time, so we flag runs of STUCK_RUN samples (30: half a minute);
* ``outlier``: outside median ± 3·MAD of a moving window of 15;
* ``humid``: PM measured at relative humidity above 75 % (optical PM reads high in fog);
* ``warming_up``: the sensor said so;
* ``no_fix``: the sample has no position (``no_time``: not even a time);
* ``clock_untrusted``: its time was stamped before the clock could be trusted;
* ``clock_step``: the van's clock or GPS time stepped around this sample and its time
  could be wrong or out of order with its neighbours (edge/timekeeping.py).

Which of these keep a value out of maps and exports is receiver/flag_policy.py's business.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# PM_QUANTITIES and SENTINELS live with the policy; still importable from here.
from receiver.flag_policy import PM_QUANTITIES, SENTINELS, sentinel_mask  # noqa: F401

# Physical or instrument limits per quantity (inclusive); values outside are not measurements.
RANGES: dict[str, tuple[float, float]] = {
    "pm1": (0.0, 1000.0),
    "pm25": (0.0, 1000.0),
    "pm10": (0.0, 2000.0),
    "no2_ppb": (-50.0, 2000.0),  # electrochemical cells read a little below zero in clean air
    "laeq": (20.0, 140.0),
    "lamax": (20.0, 140.0),
    "lamin": (20.0, 140.0),
    "la10": (20.0, 140.0),  # the microphone's minute statistics (drivers/noise/levels.py)
    "la50": (20.0, 140.0),
    "la90": (20.0, 140.0),
    "laeq_1min": (20.0, 140.0),
    "lceq": (20.0, 140.0),  # the sound module set to C or Z weighting (drivers/sound_module.py)
    "lcmax": (20.0, 140.0),
    "lcmin": (20.0, 140.0),
    "lzeq": (20.0, 140.0),
    "lzmax": (20.0, 140.0),
    "lzmin": (20.0, 140.0),
}
NON_NEGATIVE = {"pm1", "pm25", "pm10", "no2_ppb"}
HUMID_RH = 75.0
STUCK_RUN = 30
WINDOW = 15
MAD_K = 3.0
CONTEXT = max(WINDOW, STUCK_RUN) - 1  # earlier values a batch needs to see

# The quantities that get flags (others, e.g. raw millivolts, are kept as they are).
FLAGGED = set(RANGES)


# Every flag is a bit, in alphabetical order, so that a mask's names in bit order are
# sorted: the store works on integer masks of whole series at once (numpy) and turns
# each distinct mask into its text once.
FLAG_NAMES = tuple(sorted((
    "clock_step", "clock_untrusted", "humid", "negative", "no_fix", "no_time", "out_of_range",
    "outlier", "stuck", "time_implausible", "warming_up",
)))
BIT = {name: 1 << i for i, name in enumerate(FLAG_NAMES)}


@lru_cache(maxsize=1024)
def mask_text(mask: int) -> str:
    """The flags of ``mask`` as the store writes them: names, sorted, comma-separated."""
    return ",".join(n for n in FLAG_NAMES if mask & BIT[n])


def names(mask: int) -> set[str]:
    return {n for n in FLAG_NAMES if mask & BIT[n]}


def value_masks(quantity: str, v: np.ndarray) -> np.ndarray:
    """``out_of_range``/``negative`` for each value (NaN: not a number, no flag)."""
    sentinel = sentinel_mask(v)
    lo, hi = RANGES.get(quantity, (-np.inf, np.inf))
    with np.errstate(invalid="ignore"):
        out = np.where(~np.isnan(v) & ~((v >= lo) & (v <= hi)), BIT["out_of_range"], 0)
        if quantity in NON_NEGATIVE:
            out |= np.where(v < 0, BIT["negative"], 0)
    # a sentinel is not a measurement at all: out of range, and nothing else
    return np.where(sentinel, BIT["out_of_range"], out)


def value_flags(quantity: str, value: object) -> set[str]:
    """Flags that need only the value itself."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return set()
    return names(int(value_masks(quantity, np.array([float(value)]))[0]))


def series_masks(values: np.ndarray, context: Sequence[float] = ()) -> np.ndarray:
    """``stuck`` and ``outlier`` bits for a time-ordered series (NaN: no value), with context.

    ``context`` holds the values just before ``values`` (up to CONTEXT), so a
    batch boundary does not reset the windows.
    """
    ctx = np.asarray([float(c) for c in context][-CONTEXT:], dtype=float)
    seq = np.concatenate([ctx, np.asarray(values, dtype=float)])
    offset = len(ctx)
    mask = np.zeros(len(seq), dtype=np.int64)
    if not len(seq):
        return mask
    # stuck: runs of identical values of length >= STUCK_RUN (every member flagged);
    # NaN != NaN, so a missing value ends a run and is never part of one.
    starts = np.r_[True, seq[1:] != seq[:-1]]
    run = np.cumsum(starts) - 1
    long_run = np.bincount(run)[run] >= STUCK_RUN
    mask[long_run & ~np.isnan(seq)] |= BIT["stuck"]
    # outlier: median ± 3 MAD over a centred window of 15 (shifted inward at the ends),
    # for all windows at once: this runs for every value ingested.
    idx = np.nonzero(~np.isnan(seq))[0]
    n = len(idx)
    if n >= 5:
        vals = seq[idx]
        w = min(WINDOW, n)
        windows = sliding_window_view(vals, w)
        med = np.median(windows, axis=1)
        mad = np.median(np.abs(windows - med[:, None]), axis=1)
        start = np.clip(np.arange(n) - WINDOW // 2, 0, n - w)
        m, d = med[start], mad[start]
        # A flat window has MAD 0; a floor (5 % of the median, at least half a unit)
        # keeps a single spike in it an outlier without flagging ordinary wobble.
        d = np.maximum(np.maximum(d, 0.05 * np.abs(m)), 0.5)
        mask[idx[np.abs(vals - m) > MAD_K * 1.4826 * d]] |= BIT["outlier"]
    return mask[offset:]


def series_flags(values: Sequence[float | None], context: Sequence[float] = ()) -> list[set[str]]:
    """``stuck`` and ``outlier`` for a time-ordered series (None: no value), as sets."""
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    return [names(int(m)) for m in series_masks(arr, context)]


@lru_cache(maxsize=256)
def sample_mask(flags: tuple[str, ...], time_src: str) -> int:
    """Bits that hold for every value of one sample (its driver flags and clock)."""
    out = 0
    for f in flags:
        if f in ("warming_up", "time_implausible", "clock_step"):
            out |= BIT[f]
    if time_src == "unsync":
        out |= BIT["clock_untrusted"]
    return out


def sample_flags(sample_flags_csv: str, time_src: str, position_state: str | None) -> set[str]:
    """Flags that hold for every value of one sample."""
    out = names(sample_mask(tuple(sample_flags_csv.split(",")), time_src))
    if position_state in ("no_fix", "no_time"):
        out.add(position_state)
    return out


def humid_mask(t: np.ndarray, rh_t: np.ndarray, rh: np.ndarray, within_ms: float = 60_000) -> np.ndarray:
    """``humid`` where the relative humidity measured closest in time (within a minute) is above 75 %.

    ``t``: the values' times (NaN: unknown); ``rh_t`` sorted, ``rh`` beside it.
    Of two equally close measurements the earlier counts.
    """
    if not len(rh_t):
        return np.zeros(len(t), dtype=np.int64)
    i = np.searchsorted(rh_t, t, side="left")
    before = np.clip(i - 1, 0, len(rh_t) - 1)
    after = np.clip(i, 0, len(rh_t) - 1)
    with np.errstate(invalid="ignore"):
        take_after = (i < len(rh_t)) & ((i == 0) | (np.abs(rh_t[after] - t) < np.abs(rh_t[before] - t)))
        near = np.where(take_after, after, before)
        ok = (np.abs(rh_t[near] - t) <= within_ms) & (rh[near] > HUMID_RH)
    return np.where(ok, BIT["humid"], 0)


def humid(quantity: str, rh: float | None) -> bool:
    return quantity in PM_QUANTITIES and rh is not None and rh > HUMID_RH


def join(flags: Iterable[str]) -> str:
    return ",".join(sorted(set(flags)))
