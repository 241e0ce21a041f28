"""A u-blox sentence mix modelled on a real capture (issue #18: realistic GPS input).

Our synthetic epoch (simulator/gps_device.py) is RMC, VTG, GGA, GSA and three
GSV: 7 sentences a second. A u-blox receiver with its factory NMEA set sends
13-23 (/work/shared/fixtures/gps: NEO-M8N ~14, NEO-M9N ~23: GSA per
constellation, GSV for four constellations, GLL, GST, GBS, ZDA). Parsing them
is the GPS driver's main cost, so a bench must feed them all.

``load_capture_mix`` cuts a capture into epochs (each starts at RMC) and keeps
every sentence but the three whose content we model (RMC, VTG, GGA).
``mixed_epoch`` sends our RMC, VTG, GGA for the receiver state, then the
capture's other sentences, cycling through its epochs, with their time (and
ZDA's date) rewritten to the state's UTC and the checksum redone: the driver
sees the captured mix at the simulated time and place.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from simulator.gps_device import ReceiverState, nmea_epoch, sentence

__all__ = ["load_capture_mix", "mixed_epoch"]

_MODELLED = ("RMC", "VTG", "GGA")
# Field index (after the address field) of the hhmmss.ss time in sentences that carry one.
_TIME_FIELD = {"GLL": 5, "GST": 1, "GBS": 1, "ZDA": 1}


def load_capture_mix(path: Path) -> list[list[str]]:
    """Per epoch, the bodies (between ``$`` and ``*``) of the capture's other sentences."""
    epochs: list[list[str]] = []
    current: list[str] | None = None
    for raw in path.read_bytes().splitlines():
        line = raw.strip()
        if not line.startswith(b"$") or b"*" not in line:
            continue  # comments, binary UBX frames, the torn last line
        try:
            body = line[1 : line.rindex(b"*")].decode("ascii")
        except UnicodeDecodeError:
            continue
        kind = body[2:5]
        if kind == "RMC":
            current = []
            epochs.append(current)
        elif current is not None and kind not in _MODELLED:
            current.append(body)
    epochs = [e for e in epochs if e]
    if not epochs:
        raise ValueError(f"{path}: no NMEA epochs (RMC ...) found")
    return epochs


def _retime(body: str, utc: dt.datetime, latlon: list[str]) -> str:
    fields = body.split(",")
    if fields[0][2:5] == "GLL" and len(fields) > 5:
        # GLL repeats the position: ours, not the capture's (or void without a fix).
        fields[1:5] = latlon
        fields[6] = "A" if latlon[0] else "V"
    i = _TIME_FIELD.get(fields[0][2:5])
    if i is None or i >= len(fields) or not fields[i]:
        return body
    fields[i] = f"{utc.hour:02d}{utc.minute:02d}{utc.second:02d}.{utc.microsecond // 10000:02d}"
    if fields[0][2:5] == "ZDA" and len(fields) >= 5:
        fields[2:5] = [f"{utc.day:02d}", f"{utc.month:02d}", f"{utc.year:04d}"]
    return ",".join(fields)


def mixed_epoch(state: ReceiverState, mix: list[list[str]], index: int) -> list[bytes]:
    """One epoch: our RMC, VTG, GGA for ``state``, then the capture's epoch ``index`` (cyclic)."""
    own = [s for s in nmea_epoch(state) if s[3:6].decode() in _MODELLED]
    gga = next(s for s in own if s[3:6] == b"GGA").decode("ascii").split(",")
    latlon = gga[2:6]
    return own + [sentence(_retime(b, state.utc, latlon)) for b in mix[index % len(mix)]]
