"""Quality flags for every measured value: flags rather than deletion.

Pure functions, no I/O (the store feeds them). Flags, after the practice in
shared/reference/datalab-store.md:

* ``out_of_range``: outside what the sensor can report, or a sentinel (-999 ...: the one
  rule, receiver/flag_policy.py ``sentinel_mask``, that the maps use too);
* ``negative``: below zero where the quantity cannot be;
* ``stuck``: the same value over and over: the reference practice says 3+ repeats for
  per-minute data; at 1 Hz, integer-resolution sensors repeat three times in clean
  air all the time, so we flag runs of STUCK_RUN samples (30: half a minute). A small
  whole number (within QUANTIZED_LOW of zero: 0, 1, 2 ... µg/m³ from a PMS5003 in clean
  air) repeats for minutes on a sound sensor, so there the run counts only while the
  sample's whole frame repeats too (every number the sensor sent: the other PM channels,
  the particle counts): a stuck sensor repeats its whole frame, a clean street repeats
  one small count while the counts behind it move. We chose this over a longer window
  because it still catches a sensor stuck at a low value within STUCK_RUN samples, and
  it needs no more context than the other rules;
* ``outlier``: outside median ± 3·MAD of a moving window of 15;
* sentinels and non-numbers are no values in the ``stuck`` and ``outlier`` windows (like
  nulls: they break a run and are skipped by the median), so a sensor that sends -999
  every other second does not drag its real values into ``outlier``;
* ``humid``: PM measured at relative humidity above 95 %, by any RH the van measured within
  30 s (``RH_KEYS``, ``is_rh_key``). Below that the receiver undoes hygroscopic growth
  (receiver/pm_humidity.py); above it the correction is not to be trusted (fog droplets, a
  growth term that diverges), so the value is flagged and the policy keeps it out of maps;
* ``rh_missing``: PM with no RH to undo its growth by (none of its own, none of the van's within
  30 s, or a negative one): served as the sensor saw it, wet, and kept out of maps by default.
  ``humid`` and ``rh_missing`` read the RH the growth correction reads: :func:`pm_rh`, the one rule;
* ``warming_up``: the sensor said so;
* ``no_fix``: the sample has no position (``no_time``: not even a time);
* ``clock_untrusted``: its time was stamped before the clock could be trusted;
* ``clock_step``: the van's clock or GPS time stepped around this sample and its time
  could be wrong or out of order with its neighbours (core/timekeeping.py).

Which of these keep a value out of maps and exports is receiver/flag_policy.py's business.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from receiver.pm_humidity import MAX_RH

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
# Where the growth correction stops and ``humid`` starts (75 % before the receiver corrected growth).
HUMID_RH = MAX_RH
STUCK_RUN = 30
QUANTIZED_LOW = 5.0  # a few resolution steps of a whole-number sensor (see the module doc)
WINDOW = 15
MAD_K = 3.0
CONTEXT = max(WINDOW, STUCK_RUN) - 1  # earlier real values a batch needs to see

# The quantities that get flags (others, e.g. raw millivolts, are kept as they are).
FLAGGED = set(RANGES)


# Every flag is a bit, in alphabetical order, so that a mask's names in bit order are
# sorted: the store works on integer masks of whole series at once (numpy) and turns
# each distinct mask into its text once.
FLAG_NAMES = tuple(sorted((
    "clock_step", "clock_untrusted", "humid", "negative", "no_fix", "no_time", "out_of_range",
    "outlier", "rh_missing", "stuck", "time_implausible", "warming_up",
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


def frame_key(values: dict[str, object]) -> int:
    """One number for a sample's whole frame (all its numbers): equal frames, equal keys."""
    return hash(tuple(sorted((k, v) for k, v in values.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool))))


def has_low_whole(v: np.ndarray) -> bool:
    """Whether any value is a small whole number (the ``stuck`` rule then needs frames)."""
    with np.errstate(invalid="ignore"):
        return bool(np.any((np.abs(v) <= QUANTIZED_LOW) & (v == np.round(v))))


def series_masks(
    values: np.ndarray, context: Sequence[float] = (), *, frames: Sequence[int] | None = None,
    context_frames: Sequence[int] = (), with_context: bool = False,
) -> np.ndarray:
    """``stuck`` and ``outlier`` bits for a time-ordered series (NaN: no value), with context.

    ``context`` holds the values just before ``values`` (the caller bounds it:
    CONTEXT real values, and the nulls among them), so a batch boundary does not
    reset the windows. ``frames``/``context_frames``:
    each sample's :func:`frame_key` (None: a small whole number's run counts
    without them). ``with_context``: the bits of the context values too, as
    they stand now that ``values`` follow them (see :func:`revisit`).
    """
    ctx = np.asarray([float(c) for c in context], dtype=float)
    seq = np.concatenate([ctx, np.asarray(values, dtype=float)])
    # a sentinel is no value here either (flagged out_of_range by value_masks alone)
    seq[sentinel_mask(seq)] = np.nan
    offset = len(ctx)
    mask = np.zeros(len(seq), dtype=np.int64)
    if not len(seq):
        return mask
    # stuck: runs of identical values of length >= STUCK_RUN (every member flagged);
    # NaN != NaN, so a missing value ends a run and is never part of one.
    starts = np.r_[True, seq[1:] != seq[:-1]]
    if frames is not None:
        # a small whole number's run lasts only while the whole frame repeats
        cf = list(context_frames)[-len(ctx):] if len(ctx) else []
        cf = [0] * (len(ctx) - len(cf)) + cf  # a context without frames: one frame
        fr = np.concatenate([np.asarray(cf, dtype=np.int64), np.asarray(frames, dtype=np.int64)])
        with np.errstate(invalid="ignore"):
            low = (np.abs(seq) <= QUANTIZED_LOW) & (seq == np.round(seq))
        starts |= np.r_[False, low[1:] & (fr[1:] != fr[:-1])]
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
    return mask if with_context else mask[offset:]


def revisit(context: Sequence[float], full: np.ndarray, cut: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which context values' ``stuck``/``outlier`` bits the values after them settle.

    A centred window cannot judge a series' last values until the values after
    them arrive (it is shifted inward at the end), and a run becomes ``stuck``
    only when it is long enough. So when a batch follows, the flags of the
    previous batch's tail are judged again: the last WINDOW - 1 real values
    (a value's window is fixed once WINDOW - 1 values follow it, even at the
    start of a series) get their ``outlier`` bit set anew, and every member of
    a run reaching into the batch gets ``stuck`` (never taken away: a run only
    grows). A context ``cut`` short (more values before it) cannot judge its
    first WINDOW // 2 real values, whose windows reach further back: those stay
    as they were (with CONTEXT real values in the context, none of them needs
    judging again). With this, a stream's flags do not depend on where its
    batches split (tests/test_quality_batches.py).

    ``full``: :func:`series_masks` of context + batch ``with_context``. Returns
    (indices into the context, bits to set, bits to clear first).
    """
    ctx = np.asarray([float(c) for c in context], dtype=float)
    n = len(ctx)
    if not n:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    real = ~np.isnan(ctx) & ~sentinel_mask(ctx)
    rank = np.cumsum(real) - 1
    total = int(real.sum())
    judge = real & (rank >= total - (WINDOW - 1))
    if cut:  # more values before it
        judge &= rank >= WINDOW // 2
    head = full[:n]
    # stuck members of the run that reaches the batch (the context's last run)
    same = np.r_[ctx[1:] == ctx[:-1], False]  # same as the next
    tail_run = np.zeros(n, dtype=bool)
    tail_run[n - 1] = True
    for i in range(n - 2, -1, -1):  # short: stops at the first change
        if not same[i]:
            break
        tail_run[i] = True
    stuck = tail_run & ((head & BIT["stuck"]) != 0)
    pick = np.nonzero(judge | stuck)[0]
    bits = head[pick] & np.where(judge[pick], BIT["outlier"] | BIT["stuck"], BIT["stuck"])
    clear = np.where(judge[pick], BIT["outlier"], 0).astype(np.int64)
    return pick, bits.astype(np.int64), clear


def mask_of(text: str | None) -> int:
    """The bits of a stored flags text (names we do not know are not ours to change)."""
    return sum(BIT[n] for n in (text or "").split(",") if n in BIT)


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


#: Value keys that are a relative humidity in %: the simulator's PM sample sends ``rh``,
#: others ``rh_pct``, and a sensor that measures it beside its own quantity prefixes its
#: name (the DGS-NO2: ``no2_rh_pct``). The one list: the receiver takes any of them.
RH_KEYS = frozenset({"rh", "rh_pct"})
RH_SUFFIX = "_rh_pct"
#: How far in time an RH reading speaks for a PM value (the van's air changes slowly).
HUMID_WITHIN_MS = 30_000


def is_rh_key(key: str) -> bool:
    """Whether a value key is a relative humidity (any sensor's: fog is the van's air)."""
    return key in RH_KEYS or key.endswith(RH_SUFFIX)


def nearest_rh(
    t: np.ndarray, rh_t: np.ndarray, rh: np.ndarray, within_ms: float = HUMID_WITHIN_MS
) -> np.ndarray:
    """The relative humidity measured closest in time to each of ``t`` (within ``within_ms``), NaN
    where none is. ``t``: the values' times (NaN: unknown); ``rh_t`` sorted, ``rh`` beside it.
    Of two equally close measurements the earlier counts."""
    if not len(rh_t):
        return np.full(len(t), np.nan)
    i = np.searchsorted(rh_t, t, side="left")
    before = np.clip(i - 1, 0, len(rh_t) - 1)
    after = np.clip(i, 0, len(rh_t) - 1)
    with np.errstate(invalid="ignore"):
        take_after = (i < len(rh_t)) & ((i == 0) | (np.abs(rh_t[after] - t) < np.abs(rh_t[before] - t)))
        near = np.where(take_after, after, before)
        return np.where(np.abs(rh_t[near] - t) <= within_ms, rh[near], np.nan)


def humid_mask(
    t: np.ndarray, rh_t: np.ndarray, rh: np.ndarray, within_ms: float = HUMID_WITHIN_MS
) -> np.ndarray:
    """``humid`` where the relative humidity measured closest in time (within 30 s) is above HUMID_RH."""
    with np.errstate(invalid="ignore"):
        return np.where(nearest_rh(t, rh_t, rh, within_ms) > HUMID_RH, BIT["humid"], 0)


#: A relative humidity outside this is a broken reading (or a sentinel): flagged ``out_of_range``
#: and never used for PM (warming it into the housing would make it look plausible, issue #15).
RH_RANGE = (0.0, 100.0)


def usable_rh(x: float) -> float:
    """``x`` if it is a possible relative humidity, else NaN (its PM value is then ``rh_missing``)."""
    return x if RH_RANGE[0] <= x <= RH_RANGE[1] else math.nan  # NaN and the sentinels fail too


def rh_masks(v: np.ndarray) -> np.ndarray:
    """``out_of_range`` for RH readings outside RH_RANGE (sentinels included; NaN: no flag)."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isnan(v) & ~((v >= RH_RANGE[0]) & (v <= RH_RANGE[1]))
    return np.where(bad | sentinel_mask(v), BIT["out_of_range"], 0)


def own_rh(values: Mapping[str, object]) -> float:
    """The RH a sample carries itself (any RH key, a finite number; NaN when none, and an
    impossible one is none: ``usable_rh``)."""
    for k, v in values.items():
        if is_rh_key(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return usable_rh(float(v))
    return math.nan


def pm_rh(own: np.ndarray, t: np.ndarray, rh_t: np.ndarray, rh: np.ndarray,
          within_ms: float = HUMID_WITHIN_MS) -> np.ndarray:
    """The one RH rule for PM samples: what the ``humid``/``rh_missing`` flags judge and the growth
    correction (receiver/pm_derive.py) divides by, at ingest, at a batch's edges and in a recompute.

    A sample's own RH first (``own``, NaN where none: an RH measured with the PM is the air its
    particles grew in), else the van's RH measured closest in time within 30 s, any sensor's,
    any batch's (``rh_t``/``rh`` sorted by time: the caller decides how wide it reads). NaN: none.
    Own first also settles a tie (another sensor's RH in the same ms) the same way everywhere.
    """
    near = nearest_rh(t, rh_t, rh, within_ms)
    return np.where(np.isnan(own), near, own)


def pm_rh_mask(rh: np.ndarray) -> np.ndarray:
    """``humid`` above HUMID_RH, ``rh_missing`` where there is no usable RH (NaN or below 0)."""
    with np.errstate(invalid="ignore"):
        return (np.where(rh > HUMID_RH, BIT["humid"], 0)
                | np.where(np.isnan(rh) | (rh < 0.0), BIT["rh_missing"], 0))


def humid(quantity: str, rh: float | None) -> bool:
    return quantity in PM_QUANTITIES and rh is not None and rh > HUMID_RH


def join(flags: Iterable[str]) -> str:
    return ",".join(sorted(set(flags)))
