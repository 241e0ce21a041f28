"""Where was the van when a sample was taken? Pure functions, no I/O.

A sample between two GPS fixes gets the linear interpolation of the two, as
long as the fixes are at most ``max_gap_ms`` apart; beyond that (a tunnel, a
long loss of fix) the sample is kept without a position and flagged. A sample
whose later fix has not arrived yet is ``pending`` and resolved when it does.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

EXACT = "exact"
INTERPOLATED = "interpolated"
NO_FIX = "no_fix"
PENDING = "pending"
NO_TIME = "no_time"  # the sample's time is unknown, so its place is too


@dataclass(frozen=True, slots=True)
class Fix:
    t_utc_ms: int
    lat: float
    lon: float
    speed_mps: float | None = None
    fix_quality: int | None = None


@dataclass(frozen=True, slots=True)
class Position:
    state: str
    lat: float | None = None
    lon: float | None = None
    speed_mps: float | None = None
    fix_quality: int | None = None


def locate(
    fixes: list[Fix],
    times: list[int],
    t_utc_ms: int,
    max_gap_ms: int,
    newest_known_ms: int,
) -> Position:
    """Position at ``t_utc_ms`` from ``fixes`` sorted by time (``times`` = their times).

    ``newest_known_ms`` is the newest sample time known (derived) for this van:
    once it is more than ``max_gap_ms`` past ``t`` and no later fix came, none
    is coming from the live stream, so the sample is flagged ``no_fix`` (a
    late-arriving backlog batch can still upgrade it).
    """
    i = bisect_left(times, t_utc_ms)
    if i < len(times) and times[i] == t_utc_ms:
        f = fixes[i]
        return Position(EXACT, f.lat, f.lon, f.speed_mps, f.fix_quality)
    before = fixes[i - 1] if i > 0 else None
    j = bisect_right(times, t_utc_ms)
    after = fixes[j] if j < len(fixes) else None
    if before is not None and after is not None:
        if after.t_utc_ms - before.t_utc_ms <= max_gap_ms:
            w = (t_utc_ms - before.t_utc_ms) / (after.t_utc_ms - before.t_utc_ms)
            speed = None
            if before.speed_mps is not None and after.speed_mps is not None:
                speed = before.speed_mps + w * (after.speed_mps - before.speed_mps)
            quality = min(before.fix_quality or 0, after.fix_quality or 0)
            return Position(
                INTERPOLATED,
                before.lat + w * (after.lat - before.lat),
                before.lon + w * (after.lon - before.lon),
                speed,
                quality,
            )
        return Position(NO_FIX)
    if after is None and newest_known_ms - t_utc_ms <= max_gap_ms:
        if before is None or t_utc_ms - before.t_utc_ms <= max_gap_ms:
            return Position(PENDING)
    return Position(NO_FIX)
