"""The record every part of the system passes around: one timestamped sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class TimeSource(StrEnum):
    """Where a sample's UTC time came from, from most to least trustworthy."""

    GPS = "gps"  # GPS time from a receiver with a valid fix
    NTP = "ntp"  # the kernel clock, disciplined by NTP (adjtimex says synchronised)
    CORRECTED = "corrected"  # taken unsynchronised, corrected later in the same boot
    UNSYNC = "unsync"  # the kernel clock with nothing vouching for it

    @property
    def trusted(self) -> bool:
        return self is not TimeSource.UNSYNC


@dataclass(slots=True)
class Sample:
    """One reading of one sensor at one moment.

    ``seq`` is assigned by the buffer when the sample is committed; together
    with the device id and the buffer's epoch it is the sample's identity.
    ``values`` holds the measured quantities (``pm25``, ``no2_ppb``, ``lat`` ...);
    ``flags`` the quality remarks the driver made (``warming_up`` ...).
    """

    sensor: str
    t_utc_ms: int | None  # None: the time is unknown (an untrusted clock in an impossible year)
    t_mono_ms: int
    time_src: TimeSource
    values: dict[str, Any]
    flags: tuple[str, ...] = ()
    seq: int | None = None
    boot_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
