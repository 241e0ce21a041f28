"""Time a van can trust.

A Pi has no real-time clock: it boots with whatever time it last saved (or
1970), and NTP only helps once the van has a network. GPS brings true time
as soon as there is a fix. The ``TimeKeeper`` decides, sample by sample,
which time to stamp and how far to trust it:

1. GPS: once a GPS driver reported a time with a fix, the stamp is
   ``monotonic + offset``. It is immune to steps of the system clock, so an
   NTP step can neither reorder nor duplicate anything.
2. NTP: the kernel says the clock is disciplined (adjtimex); the system time.
3. Unsynchronised: the system time, flagged ``unsync``.

Samples stamped ``unsync`` in this boot are corrected once trusted time
arrives: the monotonic clock of the same boot ties them to it
(``utc = t_mono + offset``) and they become ``corrected``. The agent holds them
back from sealing until then (at most ``max_hold_s``). A stamp in a year the
sensors never lived in is never sent: it goes out as "time unknown".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from edge.clock import Clock
from edge.model import TimeSource

# Nothing of this project measured before 2025 or after 2050 (receivers default to 2080): a stamp outside is a clock fault.
MIN_PLAUSIBLE_UTC_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
MAX_PLAUSIBLE_UTC_MS = 2_524_608_000_000  # 2050-01-01T00:00:00Z


def plausible_utc_ms(t: int | None) -> bool:
    return t is not None and MIN_PLAUSIBLE_UTC_MS <= t < MAX_PLAUSIBLE_UTC_MS


@runtime_checkable
class TimeFixSource(Protocol):
    """A driver that knows true time (a GPS receiver with a fix)."""

    def time_fix(self) -> tuple[float, float] | None:
        """(UTC seconds, monotonic seconds when that UTC was valid), or None without a fix."""


@dataclass(frozen=True, slots=True)
class Stamp:
    t_utc_ms: int | None
    t_mono_ms: int
    source: TimeSource


class TimeKeeper:
    def __init__(
        self,
        clock: Clock,
        sources: list[TimeFixSource] | None = None,
        *,
        gps_valid_s: float = 3600.0,
    ) -> None:
        self.clock = clock
        self.sources = list(sources or [])
        self.gps_valid_s = gps_valid_s
        self._gps_offset: float | None = None  # utc - monotonic, from GPS
        self._gps_mono: float = 0.0  # monotonic time of the newest GPS time fix
        self._trusted_offset: float | None = None  # utc - monotonic from any trusted source
        self.steps_seen = 0

    def update(self) -> None:
        """Poll the time sources; call once per tick, before stamping."""
        for src in self.sources:
            try:
                fix = src.time_fix()
            except Exception:  # a time source failing is the driver's business, not ours
                continue
            if fix is None:
                continue
            utc, mono = fix
            if not plausible_utc_ms(int(utc * 1000)):
                continue  # a receiver's default date before its first fix is not time
            self._gps_offset = utc - mono
            self._gps_mono = mono
            self._trusted_offset = self._gps_offset
            return

    def _gps_fresh(self, mono: float) -> bool:
        return self._gps_offset is not None and mono - self._gps_mono <= self.gps_valid_s

    def stamp(self) -> Stamp:
        mono = self.clock.monotonic()
        mono_ms = int(round(mono * 1000))
        if self._gps_fresh(mono):
            assert self._gps_offset is not None
            return Stamp(int(round((mono + self._gps_offset) * 1000)), mono_ms, TimeSource.GPS)
        utc = self.clock.utc()
        src = self.clock.source()
        if src.trusted:
            offset = utc - mono
            if self._trusted_offset is not None and abs(offset - self._trusted_offset) > 1.0:
                self.steps_seen += 1
            self._trusted_offset = offset
            return Stamp(int(round(utc * 1000)), mono_ms, src)
        t = int(round(utc * 1000))
        return Stamp(t if plausible_utc_ms(t) else None, mono_ms, TimeSource.UNSYNC)

    def correction_offset_ms(self) -> int | None:
        """utc - monotonic in ms from a trusted source of this boot, or None."""
        return None if self._trusted_offset is None else int(round(self._trusted_offset * 1000))
