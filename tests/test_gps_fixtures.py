"""The NMEA decoder against real u-blox captures and gpsd's decoding of them.

Each ``*.log`` holds raw receiver output after ``#`` comment lines; the
``*.log.chk`` next to it is gpsd's regression output: the same NMEA lines
interleaved with the JSON reports gpsd made from them. gpsd reports a TPV
several times per epoch while it learns where the receiver's cycle ends (mode
2 after RMC, mode 3 once GGA/GSA arrived); the last TPV with a given time is
gpsd's complete view of that epoch, and that is what one ``Fix`` must match.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import pynmea2
import pytest

from drivers.nmea import (
    KNOT_MPS,
    Fix,
    FixAssembler,
    Gsv,
    Rmc,
    SentenceFramer,
    decode_stream,
    parse_sentence,
)
from core.errors import FrameError, ReadError

FIXTURES = Path(__file__).parents[2] / "shared" / "fixtures"
GPS_DIR = FIXTURES / "gps"

pytestmark = pytest.mark.skipif(
    not GPS_DIR.is_dir(), reason=f"GPS fixtures folder {GPS_DIR} is absent (shared fixtures not mounted)"
)

LOGS = ["neo-m8n.log", "ublox-8.log", "ublox-neo-m9n-nmea.log"]

# gpsd moves dates it considers older than its own build forward by 1024 GPS
# weeks (its guard against the GPS week-number rollover). The NEO-M8N capture
# is from 2015-03-18 (RMC date field "180315", capture header "Date =
# 2015-03-18"), so gpsd's regression output says 2034-11-01: exactly 1024
# weeks later. The receiver's date is the truth; we match gpsd's time minus
# that shift, and assert the shift is exactly that, not a fudge.
GPSD_ROLLOVER_SHIFT = {"neo-m8n.log": dt.timedelta(weeks=1024)}


def _log_body(path: Path) -> bytes:
    lines = path.read_bytes().split(b"\n")
    i = 0
    while i < len(lines) and lines[i].startswith(b"#"):
        i += 1
    return b"\n".join(lines[i:])


@dataclass
class GpsdView:
    last_tpv_by_time: dict[str | None, dict] = field(default_factory=dict)
    timeless_tpvs: list[dict] = field(default_factory=list)
    sky_by_tod: dict[float, dict] = field(default_factory=dict)


def _gpsd_view(chk: Path) -> GpsdView:
    view = GpsdView()
    tod: float | None = None
    for line in chk.read_text(encoding="ascii", errors="replace").splitlines():
        if line.startswith("$"):
            # Track which epoch gpsd is in, to attribute SKY reports (which carry no time).
            try:
                rec = parse_sentence(line)
            except ReadError:
                continue
            if isinstance(rec, Rmc) and rec.tod is not None:
                tod = rec.tod
            continue
        if not line.startswith("{"):
            continue
        rep = json.loads(line)
        if rep.get("class") == "TPV":
            if "time" in rep:
                view.last_tpv_by_time[rep["time"]] = rep
            else:
                view.timeless_tpvs.append(rep)
        elif rep.get("class") == "SKY" and "satellites" in rep and tod is not None:
            view.sky_by_tod[tod] = rep
    return view


def _decode(name: str, **kw: object) -> tuple[list[Fix], int]:
    return decode_stream([_log_body(GPS_DIR / name)], FixAssembler(**kw))


@pytest.mark.parametrize("name", LOGS)
def test_every_gpsd_fix_is_reproduced(name: str) -> None:
    fixes, _ = _decode(name)
    view = _gpsd_view(GPS_DIR / (name + ".chk"))
    assert view.last_tpv_by_time, "gpsd reported no timed fix: fixture unreadable?"
    shift = GPSD_ROLLOVER_SHIFT.get(name, dt.timedelta(0))
    by_utc = {f.utc: f for f in fixes if f.utc is not None}

    for t, tpv in view.last_tpv_by_time.items():
        gpsd_time = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
        fix = by_utc.get(gpsd_time - shift)
        assert fix is not None, f"{name}: gpsd reports a fix at {t}, decoder has none"
        # Time is corroborated by ZDA, or by the previous epoch's date (so
        # only the very first epoch of a ZDA-less capture is unconfirmed).
        assert fix.time_confirmed or (fix is fixes[0] and name == "neo-m8n.log")
        assert fix.lat == pytest.approx(tpv["lat"], abs=1e-6)
        assert fix.lon == pytest.approx(tpv["lon"], abs=1e-6)
        # gpsd prints speed with 3 decimals
        assert fix.speed == pytest.approx(tpv["speed"], abs=5e-4 + 1e-9)
        assert fix.fix_mode == tpv["mode"]
        if "altMSL" in tpv:
            assert fix.altitude == pytest.approx(tpv["altMSL"], abs=1e-3)

    # Fixes gpsd did not report: only the final epoch, cut off by the end of
    # the capture before its cycle completed (gpsd waits for the cycle end).
    gpsd_times = {
        dt.datetime.fromisoformat(t.replace("Z", "+00:00")) - shift for t in view.last_tpv_by_time
    }
    extra = [f for f in fixes if f.utc is not None and f.utc not in gpsd_times]
    assert len(extra) <= 1
    if extra:
        assert extra[0] is fixes[-1]

    # No timeless fixes: see test_single_sentence_epoch_needs_opt_in.
    assert all(f.utc is not None for f in fixes)


def test_single_sentence_epoch_needs_opt_in() -> None:
    """gpsd reports one TPV without time in neo-m8n: the capture starts at the
    end of an epoch, whose only position sentence is a GLL. By default a
    position must be carried by two sentences (the XOR checksum misses some
    double bit errors), so the decoder does not report it; with
    ``require_confirmation=False`` it reproduces gpsd exactly."""
    view = _gpsd_view(GPS_DIR / "neo-m8n.log.chk")
    assert len(view.timeless_tpvs) == 1
    strict, _ = _decode("neo-m8n.log")
    assert all(f.utc is not None for f in strict)
    lax, _ = _decode("neo-m8n.log", require_confirmation=False)
    timeless = [f for f in lax if f.utc is None]
    assert len(timeless) == 1 and timeless[0].sentences == ("GNGLL",)
    tpv = view.timeless_tpvs[0]
    assert timeless[0].lat == pytest.approx(tpv["lat"], abs=1e-6)
    assert timeless[0].lon == pytest.approx(tpv["lon"], abs=1e-6)
    assert timeless[0].fix_mode == tpv["mode"]
    assert len(lax) == len(strict) + 1


def test_gpsd_rollover_shift_is_exactly_1024_weeks() -> None:
    """The neo-m8n date really is 2015 in the receiver output."""
    fixes, _ = _decode("neo-m8n.log")
    dated = [f for f in fixes if f.utc is not None]
    assert dated and all(f.utc.date() == dt.date(2015, 3, 18) for f in dated)
    view = _gpsd_view(GPS_DIR / "neo-m8n.log.chk")
    first = min(view.last_tpv_by_time)
    assert dt.datetime.fromisoformat(first.replace("Z", "+00:00")) - dated[0].utc == dt.timedelta(weeks=1024)


@pytest.mark.parametrize("name", LOGS)
def test_satellite_counts_match_gpsd_sky(name: str) -> None:
    fixes, _ = _decode(name)
    view = _gpsd_view(GPS_DIR / (name + ".chk"))
    by_tod = {f.tod: f for f in fixes}
    compared = 0
    for tod, sky in view.sky_by_tod.items():
        fix = by_tod.get(tod)
        if fix is None or fix.sats_in_view is None:
            continue
        assert fix.sats_in_view == sky["nSat"], f"{name} tod={tod}"
        assert fix.sats_used == sky["uSat"], f"{name} tod={tod}"
        assert fix.hdop == pytest.approx(sky["hdop"])
        compared += 1
    assert compared >= 0.8 * len(view.last_tpv_by_time)


def test_truncated_last_sentence_of_ublox8_yields_nothing() -> None:
    body = _log_body(GPS_DIR / "ublox-8.log")
    last = body.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
    assert last.startswith(b"$GNRMC,001053.00")
    with pytest.raises(FrameError):
        parse_sentence(last)

    fixes, rejected = _decode("ublox-8.log")
    assert rejected == 1  # that sentence, and nothing else in the capture
    truncated_tod = 10 * 60 + 53.0
    assert all(f.tod != truncated_tod for f in fixes)
    assert fixes[-1].utc == dt.datetime(2017, 1, 10, 0, 10, 52, tzinfo=dt.timezone.utc)
    view = _gpsd_view(GPS_DIR / "ublox-8.log.chk")
    assert not any(t.startswith("2017-01-10T00:10:53") for t in view.last_tpv_by_time)


def test_leading_binary_garbage_is_skipped_not_fatal() -> None:
    """ublox-8.log starts with UBX binary traffic glued to the first RMC."""
    body = _log_body(GPS_DIR / "ublox-8.log")
    first_line = body.split(b"\n", 1)[0]
    assert not first_line.startswith(b"$")
    framer = SentenceFramer()
    lines = framer.feed(first_line + b"\n")
    assert len(lines) == 1 and lines[0].startswith(b"$GNRMC,000941.00")
    assert framer.discarded_bytes > 100
    assert parse_sentence(lines[0]).tod == 581.0


def test_m9n_rmc_navigation_status_does_not_void_the_fix() -> None:
    """pynmea2 1.19 calls every NMEA 4.10 u-blox RMC invalid (nav status 'V')."""
    line = "$GNRMC,223745.00,A,3806.62964,N,12237.61382,W,0.040,,110720,,,D,V*0E"
    assert line.encode() in (GPS_DIR / "ublox-neo-m9n-nmea.log").read_bytes()
    assert pynmea2.parse(line).is_valid is False  # the upstream behaviour we correct
    rec = parse_sentence(line)
    assert isinstance(rec, Rmc)
    assert rec.valid and rec.mode == "D" and rec.nav_status == "V"
    assert rec.speed_knots * KNOT_MPS == pytest.approx(0.021, abs=5e-4)


def test_m9n_gsv_signal_id_is_not_a_satellite() -> None:
    """pynmea2 1.19 reads the 4.10 signal id after a short last GSV block as a PRN."""
    line = "$GLGSV,3,3,10,83,52,346,29,84,05,307,,1*72"
    assert line.encode() in (GPS_DIR / "ublox-neo-m9n-nmea.log").read_bytes()
    assert pynmea2.parse(line).sv_prn_num_3 == "1"  # phantom satellite upstream
    rec = parse_sentence(line)
    assert isinstance(rec, Gsv)
    assert [s.prn for s in rec.satellites] == [83, 84]
    assert rec.signal_id == 1

    # Over the whole capture: every GSV group lists exactly the satellites it
    # announces, which a phantom PRN would break.
    groups: dict[tuple, list[int]] = {}
    announced: dict[tuple, int] = {}
    asm_fixes = 0
    for raw in _log_body(GPS_DIR / "ublox-neo-m9n-nmea.log").splitlines():
        rec = parse_sentence(raw)
        if isinstance(rec, Gsv):
            if rec.msg_num == 1:
                key = (rec.talker, rec.signal_id, asm_fixes)
                asm_fixes += 1
                groups[key] = []
                announced[key] = rec.num_in_view
            groups[key].extend(s.prn for s in rec.satellites)
    assert groups
    for key, prns in groups.items():
        assert len(prns) == announced[key], key


def test_every_fixture_sentence_decodes() -> None:
    """Apart from the one truncated sentence, every line of every capture is accepted."""
    for name in LOGS:
        asm = FixAssembler()
        framer = SentenceFramer()
        bad = []
        for line in framer.feed(_log_body(GPS_DIR / name)):
            try:
                asm.feed_line(line)
            except ReadError as exc:
                bad.append((line, exc))
        if name == "ublox-8.log":
            assert [line[:16] for line, _ in bad] == [b"$GNRMC,001053.00"]
            assert isinstance(bad[0][1], FrameError)
        else:
            assert not bad, (name, bad[:3])
