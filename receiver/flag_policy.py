"""Which flagged values stay out of the published products, and what a sentinel is.

One policy for every product (street maps, their exports and API, the measurement
exports' ``excluded`` column), documented in docs/datalab.md "Flag policy". A value is
left out when its sample's flags (set by the van: ``samples.flags``) or its own
quality flags (set by the receiver: ``quality.flags``, receiver/quality.py) hold a flag
the policy excludes for its quantity. Flags are kept in the store either way: the
policy decides what a product uses, never what is stored.

Every flag the van or the receiver sets is listed in :data:`KNOWN_FLAGS` with the
decision and why. The defaults: every error flag keeps a value out; ``humid`` and
``negative`` only for PM (above 95 % RH optical PM counts fog and its growth
correction is not to be trusted; a negative PM count is a fault,
while an electrochemical NO2 cell reads a little below zero in clean air, and dropping
those would push clean streets up). The receiver config can change both lists
(``exclude_flags``, ``exclude_flags_pm``, receiver/config.py).

Sentinels (a sensor's "no value" codes, e.g. -999) are not measurements anywhere:
:func:`sentinel_mask` is the one rule, used by quality.py (flags them ``out_of_range``, no value in the windows)
and aggregate.py (leaves them out even where no quality row exists yet).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: Quantities measured by optical PM sensors (``humid`` and ``negative`` apply to these only by default).
PM_QUANTITIES = frozenset({"pm1", "pm25", "pm10", "pm1_cf1", "pm25_cf1", "pm10_cf1"})

#: Exact sentinel codes seen from sensor firmware (65535: an unsigned 16-bit "no value").
SENTINELS = frozenset({-999.0, -9999.0, 65535.0})
#: Any value at or below this is a sentinel too: firmware codes vary (-999.9, -990 ...), and
#: no quantity we measure goes that low (NO2 cells: a few ppb below zero at most).
SENTINEL_AT_OR_BELOW = -900.0

_SENTINELS = np.array(sorted(SENTINELS))

#: flag -> (who sets it, what the default policy does with it, why).
KNOWN_FLAGS: dict[str, tuple[str, str, str]] = {
    # receiver, per value (receiver/quality.py)
    "out_of_range": ("receiver", "exclude", "outside what the sensor can report, or a sentinel"),
    "negative": ("receiver", "exclude PM", "a negative PM count is a fault; NO2 cells read a little below "
                 "zero in clean air, dropping those would bias clean streets up"),
    "stuck": ("receiver", "exclude", "30 identical values (a small whole number: whole frames) in a row: the "
              "sensor stopped reporting"),
    "outlier": ("receiver", "exclude", "outside median ± 3·MAD of its 15 neighbours: a spike, not the street"),
    "humid": ("receiver", "exclude PM", "above 95 % RH optical PM counts fog droplets and its growth "
              "correction (receiver/pm_humidity.py) is not to be trusted; "
              "only PM gets it"),
    "rh_missing": ("receiver", "exclude PM", "no RH to undo hygroscopic growth by (none of its own, none of "
                   "the van's within 30 s: no shipped PM driver sends one, only the DGS-NO2's "
                   "no2_rh_pct does): the value is the sensor's wet one, biased up; only PM gets it"),
    "clock_untrusted": ("receiver", "exclude", "stamped before the clock was trusted: the position joined "
                        "by its time may be wrong"),
    # van, per sample (samples.flags), also copied into quality by the receiver
    "warming_up": ("van", "exclude", "the sensor says it has not settled (fan start, first second of audio)"),
    "clock_step": ("van", "exclude", "the clock stepped around the sample: time and position may be off"),
    "time_implausible": ("receiver", "exclude", "no believable time, so no position"),
    "device_error": ("van", "exclude", "the SPS30 reports a fault in its state byte"),
    "overload": ("van", "exclude", "the microphone clipped: the level is too low by an unknown amount"),
    # van, kept
    "noise_floor": ("van", "keep", "below the microphone's floor the level is an upper bound; the street "
                    "was quiet, and dropping quiet seconds would bias the map up"),
    "temp_outside_correction_table": ("van", "keep", "NO2 corrected with the nearest end of the "
                                      "temperature table: still the best value there is"),
    "no_temperature": ("van", "keep", "no2_ppb is null (not computed): nothing to leave out"),
    "cal_input_missing": ("van", "keep", "only the calibrated *_cal value is null; the raw value is sound"),
    "cal_unavailable": ("van", "keep", "the van's calibration file could not be read: the value is the "
                        "sensor's own (configured sheet/offset), uncalibrated; the receiver's best value "
                        "recomputes NO2 by the record valid then, and blanking a van's maps for a file on "
                        "its card would lose more than it protects"),
    "non_finite": ("van", "keep", "the NaN/inf value itself is stored as null; the sample's other "
                   "values are sound"),
    "salvaged": ("van", "keep", "recovered from a damaged buffer with its row checksum verified"),
    "no_gps_time": ("van", "keep", "GPS samples only: not a map quantity"),
    "time_untimed": ("van", "keep", "GPS samples only (the first fix of a run, before its arrival was "
                     "timed or its date confirmed): stamped at its read, up to a few s late"),
    "single_sentence": ("van", "keep", "GPS samples only (a receiver set to send one position sentence per "
                        "epoch): the fix was not cross-checked by a second sentence; positions from such "
                        "receivers are still the van's track, and excluding them would blank its maps"),
    "audio_gap": ("van", "keep", "seconds of audio before this one were dropped (the van stalled longer "
                  "than the driver's 30 s queue); this second's level is measured whole"),
    "audio_overrun": ("van", "keep", "the sound card dropped frames before this reading; the level is of "
                      "the audio that arrived, still the street's"),
    # positions (the observations view's quality column): maps use trusted positions only anyway
    "no_fix": ("receiver", "keep", "positions: maps take only exact or interpolated positions"),
    "no_time": ("receiver", "keep", "positions: maps take only exact or interpolated positions"),
}

DEFAULT_EXCLUDE = ("clock_step", "clock_untrusted", "device_error", "out_of_range", "outlier", "overload",
                   "stuck", "time_implausible", "warming_up")
DEFAULT_EXCLUDE_PM = ("humid", "negative", "rh_missing")


def sentinel_mask(v: np.ndarray) -> np.ndarray:
    """True where a value is a sentinel code, not a measurement (NaN: False)."""
    with np.errstate(invalid="ignore"):
        return np.isin(v, _SENTINELS) | (v <= SENTINEL_AT_OR_BELOW)


def is_sentinel(value: float) -> bool:
    return value in SENTINELS or value <= SENTINEL_AT_OR_BELOW


def unknown_flags(names: Iterable[str]) -> list[str]:
    """The names that are no flag we know (a typo in the config)."""
    return sorted(set(names) - set(KNOWN_FLAGS))


@dataclass(frozen=True, slots=True)
class FlagPolicy:
    """Flags that keep a value out of products: ``exclude`` for every quantity, ``exclude_pm`` for PM too."""

    exclude: frozenset[str] = frozenset(DEFAULT_EXCLUDE)
    exclude_pm: frozenset[str] = frozenset(DEFAULT_EXCLUDE_PM)

    @classmethod
    def of(cls, exclude: Iterable[str], exclude_pm: Iterable[str]) -> FlagPolicy:
        bad = unknown_flags([*exclude, *exclude_pm])
        if bad:
            hints = [f"'{b}': did you mean '{m[0]}'?" for b in bad
                     if (m := difflib.get_close_matches(b.strip().lower(), KNOWN_FLAGS, n=1, cutoff=0.6))]
            raise ValueError(f"unknown flag(s) {', '.join(bad)}{' (' + '; '.join(hints) + ')' if hints else ''}:"
                             f" known are {', '.join(sorted(KNOWN_FLAGS))}")
        return cls(frozenset(exclude), frozenset(exclude_pm))

    def excluded_for(self, quantity: str) -> frozenset[str]:
        """The flags that keep a value of ``quantity`` out."""
        return self.exclude | self.exclude_pm if quantity in PM_QUANTITIES else self.exclude

    def excludes(self, quantity: str, *flag_texts: str | None) -> bool:
        """Whether comma-separated flag texts (sample flags, value flags ...) keep the value out."""
        out = self.excluded_for(quantity)
        return any(f in out for text in flag_texts if text for f in text.split(","))

    def describe(self) -> dict[str, list[str]]:
        """The policy as it is recorded with a build and in exports."""
        return {"exclude": sorted(self.exclude), "exclude_pm": sorted(self.exclude_pm)}
