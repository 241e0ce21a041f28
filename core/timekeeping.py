"""Time a van can trust.

A Pi has no real-time clock: it boots with whatever time it last saved (or
1970), and NTP only helps once the van has a network. GPS brings true time
as soon as there is a fix. The ``TimeKeeper`` decides, sample by sample,
which time to stamp and how far to trust it.

The spine is the monotonic clock: it never steps within a boot. A trusted
stamp is always ``monotonic + offset``, and the offset comes from the best
*reference* that agrees with it:

1. GPS: a time fix from a receiver with a fix (fresh for ``gps_valid_s``).
2. NTP: the system clock while the kernel says it is disciplined (adjtimex).
3. Neither: with an offset known from earlier in this boot, holdover on it
   (``corrected``); before any, the system time, stamped ``unsync``: samples
   of this boot stamped so are re-stamped from their monotonic time once the
   offset is known (``corrected``). A stamp in a year the sensors never lived
   in is never sent: it goes out as "time unknown".

Steps. A reference whose offset moves by more than ``tolerance_s`` from the
spine's is *suspect*; who is right is decided, not assumed:

* another reference agrees with the spine: the suspect is wrong and ignored
  (a system clock stepped under a GPS fix, a GPS glitch under NTP);
* another reference agrees with the suspect: the spine was wrong; re-base;
* the other reference left the spine too, to a time of its own (both stepped at
  once, opposite ways): *contested*, as below, but neither can win by waiting
  while the other contradicts it; the spine is kept until they agree (with it or
  with each other), or one of them goes quiet and the other then keeps its time
  unopposed for ``confirm_s``;
* nobody else to ask: the step is *contested*. Samples keep the spine's time
  but go out as ``unsync`` with the ``clock_step`` flag, so the agent holds
  them back; if the reference returns to the spine it was a glitch, if it
  keeps the new value for ``confirm_s`` the spine is re-based onto it, and the
  held samples are re-stamped from monotonic time with the winning offset.

After a backward re-base, stamps up to the newest one already issued overlap
earlier samples: they are flagged ``clock_step`` too. Within the tolerance
the spine follows its reference but never goes backwards (a slew): no sample
is ever stored silently out of order. A GPS date 1024 weeks in the past (a
receiver with a 10-bit week number past its rollover) is moved forward.
The error budget is in docs/architecture.md ("Time").
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from core.clock import Clock
from core.sample import TimeSource

log = logging.getLogger(__name__)

# Nothing of this project measured before 2025 or after 2050 (receivers default to 2080): a stamp outside is a clock fault.
MIN_PLAUSIBLE_UTC_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
MAX_PLAUSIBLE_UTC_MS = 2_524_608_000_000  # 2050-01-01T00:00:00Z

# GPS broadcasts the week number in 10 bits: it wraps every 1024 weeks (1999-08-22, 2019-04-07).
GPS_ROLLOVER_S = 1024 * 7 * 86400
CLOCK_STEP_FLAG = "clock_step"
# A GPS time fix is timed when its bytes are read: a late read (a stalled loop, a busy card)
# makes it look early, never late. Of the fixes of the last GPS_FILTER_S seconds the least
# delayed one counts (NTP's minimum-delay filter), so a stall is not taken for a step.
GPS_FILTER_S = 10.0
# Reading.meta keys by which a driver says when its value was measured (see TimeKeeper.stamp):
# monotonic seconds (of the clock the agent runs on), and the instrument's own UTC seconds.
MEASURED_MONO = "measured_mono"
MEASURED_UTC = "measured_utc"
# A value measured longer ago than this is stamped as if this old (a bound, not a case:
# drivers hand over their newest measurement within a tick or two).
MAX_MEASUREMENT_AGE_S = 5.0
# A measuring instrument's own UTC (a GPS fix's time) places its value when, mapped through
# the spine, it falls at most this long before the value's arrival (the receiver's output
# latency, tens of ms, plus one read period where bytes are timed at the read: 1 s at 1 Hz)
# or this long after it (the spine's own error): well inside a time step, which the spine
# judges separately.
UTC_HINT_BEFORE_S = 1.5
UTC_HINT_AFTER_S = 0.25
# A value whose arrival was not measured (a GPS fix before the driver's timing thread has
# timed an epoch) is known only to have been measured before its read, by up to the delivery
# lag the driver allows: its hand-out queue (drivers/gps.py MAX_READY = 3 fixes, one per
# read) times the read period plus the read that found it and the receiver's latency, 4-5 s
# at 1 Hz. Its own UTC is taken within that, bounded by the age clamp; outside it, it is
# stamped at its read as before. (Flagging such values instead would leave them 1-3.5 s late
# for nothing: the fix's UTC, checked against the spine, is the better time.)
UNTIMED_HINT_BEFORE_S = MAX_MEASUREMENT_AGE_S
# GPS time and an NTP-disciplined clock should differ by the receiver's output latency only
# (GPS time is taken at its bytes' arrival). A difference beyond the expected latency by more
# than this, for GPS_DISAGREE_FOR_S, is a receiver whose UTC is off (or an NTP server that
# is): the heartbeat says gps_time_disagrees. Well above NTP's error over a mobile link
# (tens of ms), well below a step (judged separately).
GPS_DISAGREE_S = 0.25
GPS_DISAGREE_FOR_S = 60.0


def plausible_utc_ms(t: int | None) -> bool:
    return t is not None and MIN_PLAUSIBLE_UTC_MS <= t < MAX_PLAUSIBLE_UTC_MS


def unroll_gps_week(utc_s: float, pivot_s: float = MIN_PLAUSIBLE_UTC_MS / 1000) -> tuple[float, bool]:
    """(UTC, whether it was moved): a GPS time within one 1024-week period before ``pivot_s`` moves forward.

    Like gpsd's build-date pivot: no real fix is older than the pivot, so such a
    date is a rolled-over week number. Only one period: the receiver default
    date (1980-01-06) stays what it is, not time.
    """
    if pivot_s - GPS_ROLLOVER_S <= utc_s < pivot_s:
        return utc_s + GPS_ROLLOVER_S, True
    return utc_s, False


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
    flags: tuple[str, ...] = ()


@dataclass(slots=True)
class TimeStats:
    gps_steps: int = 0  # GPS time left the spine by more than the tolerance
    system_steps: int = 0  # so did the system clock (while trusted)
    rebases: int = 0  # the spine moved to a new offset
    contested_stamps: int = 0  # samples stamped while nobody could say which time was right
    overlap_stamps: int = 0  # samples flagged because a backward re-base overlapped earlier stamps
    gps_rollovers: int = 0  # GPS time fixes moved forward by 1024 weeks
    # GPS offset minus the NTP-disciplined system clock's, ms, when both were last there:
    # about minus the receiver's output latency (GPS time is taken at its bytes' arrival).
    gps_minus_system_ms: int | None = None
    gps_disagreements: int = 0  # times GPS and NTP began to disagree for GPS_DISAGREE_FOR_S


GPS, SYSTEM = "gps", "system"


class TimeKeeper:
    def __init__(
        self,
        clock: Clock,
        sources: list[TimeFixSource] | None = None,
        *,
        gps_valid_s: float = 3600.0,
        tolerance_s: float = 2.0,
        confirm_s: float = 60.0,
        gps_latency_s: float = 0.0,
        disagree_s: float = GPS_DISAGREE_S,
        disagree_for_s: float = GPS_DISAGREE_FOR_S,
    ) -> None:
        self.clock = clock
        self.sources = list(sources or [])
        self.gps_valid_s = gps_valid_s
        # Above a GPS time fix's jitter (it is timed when read(), once per tick) and NTP's
        # slews; below any step worth the name.
        self.tolerance_s = tolerance_s
        self.confirm_s = confirm_s
        # The receiver's output latency (first byte of an epoch after its second), expected in
        # gps - ntp as -gps_latency_s; beyond it by disagree_s for disagree_for_s: disagreement.
        self.gps_latency_s = gps_latency_s
        self.disagree_s = disagree_s
        self.disagree_for_s = disagree_for_s
        self._disagree_since: float | None = None
        self.gps_time_disagrees = False
        self.stats = TimeStats()
        self._gps: tuple[float, float] | None = None  # (utc - monotonic, monotonic of the fix)
        self._fixes: deque[tuple[float, float]] = deque()  # recent (utc - monotonic, monotonic)
        self._offset: float | None = None  # the spine: utc - monotonic, seconds
        self._source = TimeSource.UNSYNC  # the reference the spine follows
        self._suspects: dict[str, tuple[float, float]] = {}  # reference -> (its offset, monotonic since)
        self._contested = False
        self._last_ms: int | None = None  # newest stamp issued outside a contest
        self._overlap_until_ms: int | None = None

    @property
    def steps_seen(self) -> int:
        return self.stats.gps_steps + self.stats.system_steps

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
            utc, rolled = unroll_gps_week(utc)
            if not plausible_utc_ms(int(utc * 1000)):
                continue  # a receiver's default date before its first fix is not time
            if self._fixes and self._fixes[-1][1] == mono:
                return  # the same fix again
            self.stats.gps_rollovers += rolled
            self._fixes.append((utc - mono, mono))
            while mono - self._fixes[0][1] > GPS_FILTER_S:
                self._fixes.popleft()
            self._gps = (max(o for o, _ in self._fixes), mono)
            return

    def _references(self, mono: float) -> dict[str, tuple[float, TimeSource]]:
        refs: dict[str, tuple[float, TimeSource]] = {}
        if self._gps is not None and mono - self._gps[1] <= self.gps_valid_s:
            refs[GPS] = (self._gps[0], TimeSource.GPS)
        src = self.clock.source()
        if src.trusted:
            refs[SYSTEM] = (self.clock.utc() - mono, src)
            if GPS in refs:
                self.stats.gps_minus_system_ms = int(round((refs[GPS][0] - refs[SYSTEM][0]) * 1000))
                self._watch_agreement(refs[GPS][0] - refs[SYSTEM][0], mono)
        return refs

    def _watch_agreement(self, gps_minus_system: float, mono: float) -> None:
        """Say when GPS and NTP time disagree beyond the receiver's latency for a sustained time.

        GPS stays the spine's reference (it is there in every street; NTP over a mobile link
        may be the one that is wrong): this only tells. Fixes are placed by their own UTC, so
        a receiver whose UTC is off shifts their stamps by that much; the heartbeat shows it
        (``gps_time_disagrees``) for a person to look at the receiver or the NTP server.
        """
        beyond = abs(gps_minus_system + self.gps_latency_s) > self.disagree_s
        if not beyond:
            if self.gps_time_disagrees:
                log.warning("GPS and NTP time agree again (gps - ntp %+d ms)", int(gps_minus_system * 1000))
            self._disagree_since, self.gps_time_disagrees = None, False
            return
        if self._disagree_since is None:
            self._disagree_since = mono
        if not self.gps_time_disagrees and mono - self._disagree_since >= self.disagree_for_s:
            self.gps_time_disagrees = True
            self.stats.gps_disagreements += 1
            log.warning("GPS time disagrees with NTP: gps - ntp %+d ms for %.0f s (expected %+d ms, the receiver's "
                        "latency): GPS fixes are stamped by the receiver's UTC; check the receiver and NTP",
                        int(gps_minus_system * 1000), mono - self._disagree_since, -int(self.gps_latency_s * 1000))

    def _judge(self, refs: dict[str, tuple[float, TimeSource]], mono: float) -> None:
        """Follow the references that agree with the spine; decide about those that do not."""
        assert self._offset is not None
        tol = self.tolerance_s
        agree = [k for k, (o, _) in refs.items() if abs(o - self._offset) <= tol]
        for k in agree:
            self._suspects.pop(k, None)
        if agree:
            best = GPS if GPS in agree else SYSTEM
            self._offset, self._source = refs[best]
        self._contested = False
        for k, (o, src) in refs.items():
            if k in agree:
                continue
            seen = self._suspects.get(k)
            if seen is None or abs(seen[0] - o) > tol:
                self._suspects[k] = seen = (o, mono)
                if k == GPS:
                    self.stats.gps_steps += 1
                else:
                    self.stats.system_steps += 1
                log.warning("%s time stepped %+.1f s from the monotonic spine", k, o - self._offset)
            others = [o2 for k2, (o2, _) in refs.items() if k2 != k]
            if any(abs(o2 - o) <= tol for o2 in others):
                self._rebase(o, src, f"{k} corroborated")  # two references say the spine is wrong
                return
            if others:
                # Another reference contradicts this one: it vouches for the spine (this one is
                # wrong), or it left the spine too, elsewhere (both stepped at once, opposite
                # ways: nobody can tell which is right, so neither wins by waiting and the spine
                # is kept). The confirmation window starts again, so this one cannot win the
                # moment the other goes quiet; it must then keep its time unopposed for confirm_s.
                self._suspects[k] = (o, mono)
                self._contested = self._contested or not agree
                continue
            if mono - seen[1] >= self.confirm_s:
                self._rebase(o, src, f"{k} kept its new time for {self.confirm_s:.0f} s")
                return
            self._contested = True

    def _rebase(self, offset: float, src: TimeSource, why: str) -> None:
        assert self._offset is not None
        log.warning("time re-based by %+.1f s (%s)", offset - self._offset, why)
        if offset < self._offset and self._last_ms is not None:
            self._overlap_until_ms = self._last_ms
        self._offset, self._source = offset, src
        self._suspects.clear()
        self._contested = False
        self.stats.rebases += 1

    def stamp(self, at_mono: float | None = None, at_utc: float | None = None) -> Stamp:
        """The stamp of a value measured now, or at monotonic ``at_mono`` (seconds, not later than now).

        ``at_mono`` is when the sensor measured (a GPS epoch's first byte off the port, the end
        of a second of audio); the spine is judged at the current monotonic time as always, and
        the stamp moves back by the measurement's age, so the no-step-backwards rule and the
        flags apply as to a value read now. ``at_utc`` is a measuring instrument's own UTC for
        the value (a GPS fix's time): when it agrees with the spine (``UTC_HINT_BEFORE_S``,
        ``UTC_HINT_AFTER_S``) it places the value exactly (no output latency), mapped through
        the spine's offset so it stays consistent with every other stamp of this boot.
        """
        mono_now = self.clock.monotonic()
        refs = self._references(mono_now)
        untimed = at_mono is None or not at_mono == at_mono  # None or NaN: measured now, or not timed
        if untimed:
            mono = mono_now
        else:
            mono = min(max(at_mono, mono_now - MAX_MEASUREMENT_AGE_S), mono_now)
        if self._offset is None:
            if not refs:
                t = int(round((self.clock.utc() - (mono_now - mono)) * 1000))
                return Stamp(t if plausible_utc_ms(t) else None, int(round(mono * 1000)), TimeSource.UNSYNC)
            self._offset, self._source = refs[GPS] if GPS in refs else refs[SYSTEM]
        elif refs:
            self._judge(refs, mono_now)
        if at_utc is not None and not self._contested:
            # Measured before it arrived: within the receiver's latency plus a read period
            # before (a value with no measured arrival: the driver's delivery lag), and no
            # later than the spine's own error after.
            before = UNTIMED_HINT_BEFORE_S if untimed else UTC_HINT_BEFORE_S
            measured = at_utc - self._offset
            if -before <= measured - mono <= UTC_HINT_AFTER_S:
                mono = min(max(measured, mono_now - MAX_MEASUREMENT_AGE_S), mono_now)
        mono_ms = int(round(mono * 1000))
        age_ms = int(round(mono_now * 1000)) - mono_ms
        t = int(round((mono_now + self._offset) * 1000))
        if self._contested:
            # Nobody can say which time is right yet: unsync, re-stamped when it is decided.
            self.stats.contested_stamps += 1
            return Stamp(t - age_ms, mono_ms, TimeSource.UNSYNC, (CLOCK_STEP_FLAG,))
        # No reference right now (GPS lost, no NTP): holdover on the last offset one gave,
        # as the stale-clock correction does.
        source = self._source if refs else TimeSource.CORRECTED
        flags: tuple[str, ...] = ()
        if self._overlap_until_ms is not None:
            if t - age_ms <= self._overlap_until_ms:
                flags = (CLOCK_STEP_FLAG,)
                self.stats.overlap_stamps += 1
            elif t - MAX_MEASUREMENT_AGE_S * 1000 > self._overlap_until_ms:
                self._overlap_until_ms = None  # no later value can be measured inside the overlap
        if not flags and self._last_ms is not None and t < self._last_ms:
            t = self._last_ms  # a step within the tolerance: slew, never go backwards
        # The rules above run on the time of the read (t); the value keeps its own age.
        self._last_ms = t if self._last_ms is None else max(t, self._last_ms)
        return Stamp(t - age_ms, mono_ms, source, flags)

    def spine(self) -> tuple[int, int | None] | None:
        """(offset ms, newest stamp ms) of the decided spine, to persist; None before any or while contested."""
        if self._offset is None or self._contested:
            return None
        return int(round(self._offset * 1000)), self._last_ms

    def resume(self, offset_ms: int, last_ms: int | None) -> None:
        """Take up the spine of an earlier run of this boot (the monotonic clock is the same).

        The references are then judged against it as against a spine of this run: one that
        left it while the agent was down is a step (flagged, decided by another reference or
        by ``confirm_s``), and a backward re-base flags stamps up to ``last_ms``. Until a
        reference agrees, stamps are holdover on it (``corrected``)."""
        self._offset, self._source = offset_ms / 1000.0, TimeSource.CORRECTED
        self._last_ms = last_ms

    def correction_offset_ms(self) -> int | None:
        """utc - monotonic in ms from a trusted source of this boot, or None (also while contested)."""
        if self._offset is None or self._contested:
            return None
        return int(round(self._offset * 1000))
