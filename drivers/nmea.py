"""NMEA 0183 decoding for GNSS receivers: sentences in, typed records and fixes out.

Pure code, no I/O: the serial driver (``drivers.gps``), the tests and the
benchmark all feed bytes in and get records back.

Three layers:

* ``SentenceFramer`` cuts a raw byte stream into candidate sentences (resyncs
  on ``$``, bounds line length so garbage on the port cannot grow a buffer).
* ``parse_sentence`` turns one line into a typed record. Framing and the
  checksum are checked here, before pynmea2 sees the line, because pynmea2
  accepts a sentence with no checksum at all; every field is then converted
  and range-checked by this module, because pynmea2 hands back the raw string
  when a field fails to convert and reports an empty latitude as 0.0 (a
  position at "Null Island" instead of no position). For the seven sentence
  types converted here, from an ordinary upper-case talker, all pynmea2 would
  add is splitting the fields, at about a third of the cost of a sentence: they
  are split here; every other sentence goes through pynmea2, and
  tests/test_nmea_decode_paths.py holds the two paths to the same results.
  Kept after measuring (issue 16; ``python -m bench.bench_nmea``, u-blox M9N
  mix): pynmea2 for every sentence costs ~0.75 CPU-s more per van-hour on the
  VM (~7.5 on a Pi Zero 2), 15 % of the agent's 5 CPU-s budget (docs/performance.md).
* ``FixAssembler`` groups sentences into navigation epochs (one UTC time of
  day) and emits one ``Fix`` per epoch in which the receiver has a valid fix.

Where pynmea2 1.19 gets NMEA 4.10+ wrong, and what is done instead:

* RMC: ``is_valid`` requires the navigation-status field (13th) to be one of
  S/C/U; u-blox M9N/F9P always send ``V`` there, which NMEA 4.10 defines as
  "equipment does not provide navigational status", so pynmea2 calls every
  M9N fix invalid. Validity here is status ``A`` and a mode indicator other
  than ``N``; the navigation status is reported but not used for validity.
* GSV: NMEA 4.10 appends a signal-id field after the satellite blocks. When
  the last message of a group holds fewer than four satellites, pynmea2 reads
  that signal id as the PRN of the next satellite slot (a phantom satellite).
  The field count tells the two apart: 3 header fields + 4 per satellite,
  plus one when a signal id is present.
* GSA: the 4.10 system-id field (18th) is not in pynmea2's table; it is read
  here so multi-constellation "GN" GSA sentences can be told apart.
* GNS (multi-constellation fix data, the position sentence of some receivers
  instead of GGA): framed and split by pynmea2 (not by the fast path above:
  new sentence types go through pynmea2, towards one parse path, issue 16),
  fields converted and range-checked here like the others. Its mode field has
  one character per constellation (GPS, GLONASS, Galileo, BeiDou...): the fix
  is valid if any of them is not ``N``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Union

import pynmea2

from core.errors import ChecksumError, FrameError, ReadError

__all__ = [
    "KNOT_MPS",
    "Gga",
    "Rmc",
    "Gsa",
    "Gsv",
    "Vtg",
    "Gll",
    "Zda",
    "Gns",
    "OtherSentence",
    "SatInView",
    "NmeaRecord",
    "Fix",
    "FixAssembler",
    "SentenceFramer",
    "parse_sentence",
    "nmea_checksum",
    "decode_stream",
    "AssemblerStats",
    "TIMED_RECORDS",
    "used_by_fix",
]

#: 1 international knot = 1852 m per hour (exact).
KNOT_MPS = 1852.0 / 3600.0

# NMEA 0183 allows 82 characters including "$" and CR LF; u-blox stays within
# it. A little slack for non-conforming receivers, but a bound all the same so
# a run of garbage without line ends is rejected rather than parsed.
MAX_SENTENCE_LEN = 120

_TALKER_RE = re.compile(r"^[A-Z]{2}$")
_TIME_RE = re.compile(r"^(\d{2})(\d{2})(\d{2})(\.\d{1,9})?$")
_DATE_RE = re.compile(r"^(\d{2})(\d{2})(\d{2})$")
_LAT_RE = re.compile(r"^(\d{2})(\d{2}(?:\.\d+)?)$")
_LON_RE = re.compile(r"^(\d{3})(\d{2}(?:\.\d+)?)$")
_NUM_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_NON_PRINTABLE_RE = re.compile(rb"[^\x20-\x7e]")


def nmea_checksum(body: str | bytes) -> int:
    """XOR of every byte between ``$`` and ``*`` (the NMEA 0183 checksum)."""
    data = body.encode("ascii") if isinstance(body, str) else body
    if len(data) > 128:
        c = 0
        for b in data:
            c ^= b
        return c
    # XOR-fold the bytes as one integer instead of a Python loop per byte (3x
    # faster, and every sentence pays it): after the shifts by 8, 16 ... 512
    # bits, the lowest byte is the XOR of bytes 0..127.
    x = int.from_bytes(data, "little")
    x ^= x >> 8
    x ^= x >> 16
    x ^= x >> 32
    x ^= x >> 64
    x ^= x >> 128
    x ^= x >> 256
    x ^= x >> 512
    return x & 0xFF


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gga:
    """GGA: time, position, fix quality, satellites used, HDOP, altitude (MSL)."""

    kind: ClassVar[str] = "GGA"
    talker: str
    tod: float | None  # UTC seconds of day
    lat: float | None
    lon: float | None
    quality: int | None  # 0 none, 1 GPS, 2 DGPS, 4 RTK fixed, 5 RTK float, 6 dead reckoning
    sats_used: int | None
    hdop: float | None
    altitude: float | None  # metres above mean sea level
    geoid_sep: float | None


@dataclass(frozen=True, slots=True)
class Gns:
    """GNS: time, position, per-constellation mode, satellites used, HDOP, altitude (MSL)."""

    kind: ClassVar[str] = "GNS"
    talker: str
    tod: float | None
    lat: float | None
    lon: float | None
    mode: str  # one character per constellation: N no fix, A autonomous, D differential ...
    sats_used: int | None
    hdop: float | None
    altitude: float | None
    geoid_sep: float | None

    @property
    def valid(self) -> bool:
        return any(c != "N" for c in self.mode)


@dataclass(frozen=True, slots=True)
class Rmc:
    """RMC: date and time, status, position, speed over ground (knots), course."""

    kind: ClassVar[str] = "RMC"
    talker: str
    tod: float | None
    status: str  # A valid, V void
    lat: float | None
    lon: float | None
    speed_knots: float | None
    course: float | None
    date: dt.date | None
    mode: str | None  # NMEA 2.3+: A autonomous, D differential, E estimated, N not valid ...
    nav_status: str | None  # NMEA 4.10+: S/C/U, V = not provided

    @property
    def valid(self) -> bool:
        # Not pynmea2's is_valid: the 4.10 navigation status "V" means "not
        # provided" and says nothing about the fix.
        return self.status == "A" and self.mode != "N"


@dataclass(frozen=True, slots=True)
class Gsa:
    """GSA: fix type 1/2/3, satellites used in the solution, DOPs (one per system)."""

    kind: ClassVar[str] = "GSA"
    talker: str
    selection: str | None  # M manual, A automatic 2D/3D
    fix_type: int | None  # 1 no fix, 2 2D, 3 3D
    prns: tuple[int, ...]
    pdop: float | None
    hdop: float | None
    vdop: float | None
    system_id: int | None  # NMEA 4.10+: 1 GPS, 2 GLONASS, 3 Galileo, 4 BeiDou, 5 QZSS, 6 NavIC


@dataclass(frozen=True, slots=True)
class SatInView:
    prn: int
    elevation: int | None
    azimuth: int | None
    snr: int | None


@dataclass(frozen=True, slots=True)
class Gsv:
    """One GSV message of a group: satellites in view for one talker (and signal)."""

    kind: ClassVar[str] = "GSV"
    talker: str
    num_messages: int
    msg_num: int
    num_in_view: int
    satellites: tuple[SatInView, ...]
    signal_id: int | None  # NMEA 4.10+; pynmea2 misreads it as a PRN


@dataclass(frozen=True, slots=True)
class Vtg:
    """VTG: course and speed over ground."""

    kind: ClassVar[str] = "VTG"
    talker: str
    course_true: float | None
    course_magnetic: float | None
    speed_knots: float | None
    speed_kmh: float | None
    mode: str | None

    @property
    def speed_mps(self) -> float | None:
        if self.speed_kmh is not None:
            return self.speed_kmh / 3.6
        if self.speed_knots is not None:
            return self.speed_knots * KNOT_MPS
        return None


@dataclass(frozen=True, slots=True)
class Gll:
    """GLL: position, time, status (u-blox sends it at the end of each cycle)."""

    kind: ClassVar[str] = "GLL"
    talker: str
    lat: float | None
    lon: float | None
    tod: float | None
    status: str
    mode: str | None

    @property
    def valid(self) -> bool:
        return self.status == "A" and self.mode != "N"


@dataclass(frozen=True, slots=True)
class Zda:
    """ZDA: UTC time and a four-digit-year date."""

    kind: ClassVar[str] = "ZDA"
    talker: str
    tod: float | None
    date: dt.date | None


@dataclass(frozen=True, slots=True)
class OtherSentence:
    """A well-formed sentence with a valid checksum of a type not decoded here."""

    talker: str  # "P" for proprietary sentences
    kind: str
    fields: tuple[str, ...]


NmeaRecord = Union[Gga, Rmc, Gsa, Gsv, Vtg, Gll, Zda, Gns, OtherSentence]


# --------------------------------------------------------------------------
# Field converters: strict, raise FrameError on anything malformed
# --------------------------------------------------------------------------


def _opt_float(s: str, what: str) -> float | None:
    if s == "":
        return None
    if not _NUM_RE.match(s):
        raise FrameError(f"{what}: not a number: {s!r}")
    return float(s)


def _opt_int(s: str, what: str) -> int | None:
    if s == "":
        return None
    if not (s.isascii() and s.isdigit()):  # cheaper than a regex; GSV is mostly integers
        raise FrameError(f"{what}: not an integer: {s!r}")
    return int(s)


def _req_int(s: str, what: str) -> int:
    v = _opt_int(s, what)
    if v is None:
        raise FrameError(f"{what}: missing")
    return v


def _tod(s: str) -> float | None:
    """hhmmss[.sss] -> seconds of day; second 60 is allowed (leap second)."""
    if s == "":
        return None
    m = _TIME_RE.match(s)
    if not m:
        raise FrameError(f"time: malformed {s!r}")
    h, mi, se = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if h > 23 or mi > 59 or se > 60:
        raise FrameError(f"time: out of range {s!r}")
    frac = float(m.group(4)) if m.group(4) else 0.0
    # Round to the millisecond so the same instant from two sentences compares equal.
    return round(h * 3600 + mi * 60 + se + frac, 3)


def _ddmmyy(s: str) -> dt.date | None:
    """RMC date. NMEA has no century: 80..99 is read as 19xx (the u-blox
    default 06-01-80 is the GPS epoch, 1980), everything else as 20xx."""
    if s == "":
        return None
    m = _DATE_RE.match(s)
    if not m:
        raise FrameError(f"date: malformed {s!r}")
    d, mo, yy = int(m.group(1)), int(m.group(2)), int(m.group(3))
    year = 1900 + yy if yy >= 80 else 2000 + yy
    try:
        return dt.date(year, mo, d)
    except ValueError as exc:
        raise FrameError(f"date: invalid {s!r}") from exc


def _coord(value: str, hemi: str, is_lat: bool) -> float | None:
    """ddmm.mmmm / dddmm.mmmm plus hemisphere -> signed degrees, or None if empty."""
    what = "latitude" if is_lat else "longitude"
    if value == "" and hemi == "":
        return None
    if value == "" or hemi == "":
        raise FrameError(f"{what}: value and hemisphere must both be present")
    m = (_LAT_RE if is_lat else _LON_RE).match(value)
    if not m:
        raise FrameError(f"{what}: malformed {value!r}")
    deg, minutes = int(m.group(1)), float(m.group(2))
    if minutes >= 60.0:
        raise FrameError(f"{what}: minutes out of range {value!r}")
    v = deg + minutes / 60.0
    if v > (90.0 if is_lat else 180.0):
        raise FrameError(f"{what}: out of range {value!r}")
    if hemi == ("N" if is_lat else "E"):
        return v
    if hemi == ("S" if is_lat else "W"):
        return -v
    raise FrameError(f"{what}: bad hemisphere {hemi!r}")


def _flag(s: str, allowed: str, what: str) -> str | None:
    if s == "":
        return None
    if len(s) != 1 or s not in allowed:
        raise FrameError(f"{what}: unexpected {s!r}")
    return s


def _need(fields: list[str], n: int, kind: str) -> None:
    if len(fields) < n:
        raise FrameError(f"{kind}: {len(fields)} fields, at least {n} expected")


# --------------------------------------------------------------------------
# Framing and parsing
# --------------------------------------------------------------------------


# The two checksum characters -> value, for strict hex only (what pynmea2's
# pattern accepts). A dict lookup instead of int(x, 16), which would also take
# " 1" or "+1".
_HEX_DIGITS = b"0123456789ABCDEFabcdef"
_HEX_PAIRS: dict[bytes, int] = {
    bytes((a, b)): int(bytes((a, b)), 16) for a in _HEX_DIGITS for b in _HEX_DIGITS
}


def _frame(line: bytes | str) -> tuple[str, bool]:
    """Check framing and checksum; return the sentence as ``$body*HH`` text.

    The flag says whether the checksum characters are strict hex digits.
    Truncated or malformed -> FrameError; whole but wrong checksum -> ChecksumError.
    """
    if isinstance(line, bytes):
        raw = line
    elif isinstance(line, str):
        try:
            raw = line.encode("ascii")
        except UnicodeEncodeError as exc:
            raise FrameError("non-ASCII characters in sentence") from exc
    elif isinstance(line, (bytearray, memoryview)):
        raw = bytes(line)
    else:
        raise FrameError(f"expected bytes or str, got {type(line).__name__}")
    raw = raw.rstrip(b"\r\n")
    if not raw:
        raise FrameError("empty line")
    if raw[:1] != b"$":
        raise FrameError("sentence does not start with '$'")
    if len(raw) > MAX_SENTENCE_LEN:
        raise FrameError(f"sentence longer than {MAX_SENTENCE_LEN} characters")
    # Printable ASCII only: a control or 8-bit byte means line noise, and it
    # could otherwise sneak through pynmea2's permissive regular expression.
    if _NON_PRINTABLE_RE.search(raw):
        raise FrameError("non-printable byte in sentence")
    star = raw.rfind(b"*")
    if star < 0 or len(raw) - star != 3:
        raise FrameError("truncated sentence: no '*hh' checksum at the end")
    body, hexsum = raw[1:star], raw[star + 1 :]
    if b"*" in body or b"$" in body:
        raise FrameError("stray '*' or '$' inside sentence (two sentences run together?)")
    expected = _HEX_PAIRS.get(hexsum)
    strict = expected is not None
    if expected is None:
        try:
            expected = int(hexsum, 16)
        except ValueError as exc:
            raise FrameError(f"checksum field {hexsum!r} is not hex") from exc
    actual = nmea_checksum(body)
    if actual != expected:
        raise ChecksumError(f"checksum mismatch: sentence says {expected:02X}, computed {actual:02X}")
    return raw.decode("ascii"), strict


def parse_sentence(line: bytes | str, *, satellites: bool = True) -> NmeaRecord:
    """Decode one NMEA sentence (with or without the trailing CR LF).

    The checksum is mandatory. Raises ``ChecksumError`` for a whole sentence
    whose checksum does not match, ``FrameError`` for anything truncated,
    malformed or with out-of-range fields. Never raises anything else.

    ``satellites=False``: a GSV's header only (message number and count,
    satellites in view, signal id; ``satellites`` empty): all a ``Fix`` uses of
    it, without converting and range-checking up to four satellite blocks
    (issue #18: GSV is half of a u-blox epoch).
    """
    text, strict_hex = _frame(line)
    if strict_hex:
        head = _KNOWN_HEAD_RE.match(text)
        if head is not None:
            # One of the sentences decoded here, from an ordinary talker: for
            # these pynmea2 only splits the fields (its pattern takes the same
            # talker, type and data, and these classes keep the data as
            # split), so split them here, without its per-sentence machinery.
            # Checksum characters pynmea2's pattern refuses (" 7") go to it below.
            kind = head.group(2)
            fields = text[head.end() : -3].split(",")
            if kind == "GSV" and not satellites:
                return _convert_fields(head.group(1), kind, fields, _gsv_header)
            return _convert_fields(head.group(1), kind, fields)
    try:
        msg = pynmea2.NMEASentence.parse(text, check=True)
    except pynmea2.ChecksumError as exc:  # pragma: no cover - checked above
        raise ChecksumError(str(exc)) from exc
    except pynmea2.SentenceTypeError:
        # A talker sentence pynmea2 has no class for: still a valid sentence.
        head, _, rest = text[1:-3].partition(",")
        return OtherSentence(talker=head[:2], kind=head[2:], fields=tuple(rest.split(",")))
    except Exception as exc:  # pynmea2 raises ParseError/ValueError and more on junk
        raise FrameError(f"unparseable sentence: {exc}") from exc
    try:
        return _convert(msg)
    except FrameError:
        raise
    except Exception as exc:  # defensive: a converter bug must not escape as a crash
        raise FrameError(f"cannot decode sentence: {exc!r}") from exc


def _convert(msg: pynmea2.NMEASentence) -> NmeaRecord:
    if isinstance(msg, pynmea2.ProprietarySentence):
        return OtherSentence(talker="P", kind=msg.manufacturer, fields=tuple(msg.data))
    if not isinstance(msg, pynmea2.TalkerSentence):
        return OtherSentence(talker="", kind=type(msg).__name__, fields=tuple(msg.data))
    # msg.data is a fresh list from str.split; the converters only read it.
    talker, kind, f = msg.talker, msg.sentence_type, msg.data
    if not _TALKER_RE.match(talker):
        raise FrameError(f"bad talker id {talker!r}")
    conv = _CONVERTERS.get(kind) or _PYNMEA2_CONVERTERS.get(kind)
    if conv is None:
        return OtherSentence(talker=talker, kind=kind, fields=tuple(f))
    return conv(talker, f)


def _convert_fields(talker: str, kind: str, fields: list[str],
                    conv: Callable[[str, list[str]], NmeaRecord] | None = None) -> NmeaRecord:
    """A converter on fields split without pynmea2, with parse_sentence's error handling."""
    try:
        return (conv or _CONVERTERS[kind])(talker, fields)
    except FrameError:
        raise
    except Exception as exc:  # defensive: a converter bug must not escape as a crash
        raise FrameError(f"cannot decode sentence: {exc!r}") from exc


def _fix_fields(f: list[str], kind: str, geoid_at: int) -> dict[str, float | int | None]:
    """The fields GGA and GNS share (same places but the geoid separation), parsed in order."""
    return {
        "lat": _coord(f[1], f[2], True),
        "lon": _coord(f[3], f[4], False),
        "sats_used": _opt_int(f[6], f"{kind} satellites"),
        "hdop": _opt_float(f[7], f"{kind} hdop"),
        "altitude": _opt_float(f[8], f"{kind} altitude"),
        "geoid_sep": _opt_float(f[geoid_at], f"{kind} geoid separation"),
    }


def _gga(talker: str, f: list[str]) -> Gga:
    # pynmea2's GGA field table: time, lat, N/S, lon, E/W, quality, sats,
    # hdop, alt, M, geoid sep, M, dgps age, station id.
    _need(f, 12, "GGA")
    quality = _opt_int(f[5], "GGA quality")
    if quality is not None and quality > 8:
        raise FrameError(f"GGA quality out of range: {quality}")
    return Gga(
        talker=talker,
        tod=_tod(f[0]),
        quality=quality,
        **_fix_fields(f, "GGA", geoid_at=10),
    )


def _rmc(talker: str, f: list[str]) -> Rmc:
    # 11 fields (NMEA 2.0), 12 with the mode indicator (2.3), 13 with the
    # navigation status (4.10).
    _need(f, 11, "RMC")
    status = _flag(f[1], "AV", "RMC status")
    if status is None:
        raise FrameError("RMC status missing")
    return Rmc(
        talker=talker,
        tod=_tod(f[0]),
        status=status,
        lat=_coord(f[2], f[3], True),
        lon=_coord(f[4], f[5], False),
        speed_knots=_opt_float(f[6], "RMC speed"),
        course=_opt_float(f[7], "RMC course"),
        date=_ddmmyy(f[8]),
        mode=_flag(f[11], "ADEFMNPRS", "RMC mode") if len(f) > 11 else None,
        nav_status=_flag(f[12], "SCUV", "RMC navigation status") if len(f) > 12 else None,
    )


def _gsa(talker: str, f: list[str]) -> Gsa:
    # mode, fix type, 12 satellite slots, PDOP, HDOP, VDOP [, system id (4.10)]
    _need(f, 17, "GSA")
    fix_type = _opt_int(f[1], "GSA fix type")
    if fix_type is not None and fix_type not in (1, 2, 3):
        raise FrameError(f"GSA fix type out of range: {fix_type}")
    slots = f[2:14]
    used = [s for s in slots if s]
    joined = "".join(used)
    if joined.isdigit() and joined.isascii():  # all numbers: the common case, one check
        prns = tuple(map(int, used))
    else:  # empty, or something malformed: field by field, to name the bad one
        prns = tuple(p for p in (_opt_int(s, "GSA satellite") for s in slots) if p is not None)
    return Gsa(
        talker=talker,
        selection=_flag(f[0], "AM", "GSA selection"),
        fix_type=fix_type,
        prns=prns,
        pdop=_opt_float(f[14], "GSA pdop"),
        hdop=_opt_float(f[15], "GSA hdop"),
        vdop=_opt_float(f[16], "GSA vdop"),
        system_id=_opt_int(f[17], "GSA system id") if len(f) > 17 else None,
    )


def _gsv_header(talker: str, f: list[str]) -> Gsv:
    """A GSV without its satellite blocks (``parse_sentence(satellites=False)``)."""
    return _gsv(talker, f, satellites=False)


def _gsv(talker: str, f: list[str], satellites: bool = True) -> Gsv:
    _need(f, 3, "GSV")
    # 3 header fields + 4 per satellite (at most 4), plus 1 signal id in 4.10+.
    # pynmea2 maps fields by position only, so a signal id after fewer than
    # four satellites lands in the next "sv_prn_num" slot; count instead.
    n_sat_fields = len(f) - 3
    if n_sat_fields % 4 == 1:
        signal_id = _opt_int(f[-1], "GSV signal id")
        sat_fields = f[3:-1]
    elif n_sat_fields % 4 == 0:
        signal_id = None
        sat_fields = f[3:]
    else:
        raise FrameError(f"GSV: {len(f)} fields is not 3 + 4n (+1)")
    if len(sat_fields) > 16:
        raise FrameError("GSV: more than four satellites in one message")
    num_messages = _req_int(f[0], "GSV message count")
    msg_num = _req_int(f[1], "GSV message number")
    if not (1 <= msg_num <= num_messages <= 9):
        raise FrameError(f"GSV: message {msg_num} of {num_messages}")
    sats = []
    for i in range(0, len(sat_fields) if satellites else 0, 4):
        prn_s, el_s, az_s, snr_s = sat_fields[i : i + 4]
        if not prn_s:
            continue  # empty slot padding
        joined = prn_s + el_s + az_s + snr_s
        if joined.isdigit() and joined.isascii():
            # Every field a number or empty (the common case): one check for
            # the four instead of one call per field.
            prn = int(prn_s)
            el = int(el_s) if el_s else None
            az = int(az_s) if az_s else None
            snr = int(snr_s) if snr_s else None
        else:  # something malformed: field by field, to name the bad one
            prn = _req_int(prn_s, "GSV prn")
            el = _opt_int(el_s, "GSV elevation")
            az = _opt_int(az_s, "GSV azimuth")
            snr = _opt_int(snr_s, "GSV snr")
        if (el is not None and el > 90) or (az is not None and az > 359) or (snr is not None and snr > 99):
            raise FrameError("GSV: satellite field out of range")
        sats.append(SatInView(prn, el, az, snr))
    return Gsv(
        talker=talker,
        num_messages=num_messages,
        msg_num=msg_num,
        num_in_view=_req_int(f[2], "GSV satellites in view"),
        satellites=tuple(sats),
        signal_id=signal_id,
    )


def _vtg(talker: str, f: list[str]) -> Vtg:
    # course T, T, course M, M, speed kn, N, speed km/h, K [, mode]
    _need(f, 8, "VTG")
    return Vtg(
        talker=talker,
        course_true=_opt_float(f[0], "VTG course"),
        course_magnetic=_opt_float(f[2], "VTG magnetic course"),
        speed_knots=_opt_float(f[4], "VTG speed knots"),
        speed_kmh=_opt_float(f[6], "VTG speed km/h"),
        mode=_flag(f[8], "ADEFMNPRS", "VTG mode") if len(f) > 8 else None,
    )


def _gll(talker: str, f: list[str]) -> Gll:
    _need(f, 6, "GLL")
    status = _flag(f[5], "AV", "GLL status")
    if status is None:
        raise FrameError("GLL status missing")
    return Gll(
        talker=talker,
        lat=_coord(f[0], f[1], True),
        lon=_coord(f[2], f[3], False),
        tod=_tod(f[4]),
        status=status,
        mode=_flag(f[6], "ADEFMNPRS", "GLL mode") if len(f) > 6 else None,
    )


def _zda(talker: str, f: list[str]) -> Zda:
    _need(f, 4, "ZDA")
    day, month, year = (_opt_int(f[i], "ZDA date") for i in (1, 2, 3))
    date = None
    if day is not None and month is not None and year is not None:
        try:
            date = dt.date(year, month, day)
        except ValueError as exc:
            raise FrameError("ZDA: invalid date") from exc
    return Zda(talker=talker, tod=_tod(f[0]), date=date)


def _gns(talker: str, f: list[str]) -> Gns:
    # pynmea2's GNS field table: time, lat, N/S, lon, E/W, mode (one character per
    # constellation), sats, hdop, alt, geoid sep, dgps age, station id [, nav status (4.10)].
    _need(f, 10, "GNS")
    mode = f[5]
    if not mode or any(c not in "ADEFMNPRS" for c in mode):
        raise FrameError(f"GNS mode out of range: {mode!r}")
    return Gns(
        talker=talker,
        tod=_tod(f[0]),
        mode=mode,
        **_fix_fields(f, "GNS", geoid_at=9),
    )


_CONVERTERS = {"GGA": _gga, "RMC": _rmc, "GSA": _gsa, "GSV": _gsv, "VTG": _vtg, "GLL": _gll, "ZDA": _zda}
# Converted from pynmea2's split, never by the fast path (see the module docstring).
_PYNMEA2_CONVERTERS = {"GNS": _gns}

# "$" + talker + one of the types above + ",": what pynmea2 would hand to a
# TalkerSentence with the rest split at commas. Not for talkers starting with
# "P" (pynmea2 reads "$PxGGA" as proprietary) nor lower case (it upper-cases):
# those, and everything else, still go through pynmea2.
_KNOWN_HEAD_RE = re.compile(r"\$([A-OQ-Z][A-Z])(" + "|".join(_CONVERTERS) + "),")


# A well-formed talker sentence's head: "$", talker, type, and for a GSV its message count and
# number. Only lines of this shape are ever skipped (below); anything else is decoded, so
# garbage is still rejected and counted.
_HEAD_BYTES_RE = re.compile(rb"\$[A-OQ-Z][A-Z]([A-Z]{3}),(?:(\d),(\d),)?")
# The sentence types a Fix is built from (FixAssembler._build): everything else (GST, GBS,
# TXT, proprietary...) becomes an OtherSentence that no fix reads.
FIX_TYPES = frozenset({b"GGA", b"RMC", b"GLL", b"ZDA", b"GNS", b"GSA", b"VTG", b"GSV"})


def used_by_fix(line: bytes) -> bool:
    """Whether a ``Fix`` could use this line: False only for a well-formed talker sentence
    whose type no fix reads, or a GSV message after the first of its group.

    Checked on the head's bytes, before the checksum or any decoding (issue #18: a u-blox
    NEO-M9N epoch has 23 sentences, of which 12 GSV and a GST and GBS; the fix uses the
    count of satellites in view, which every message of a GSV group repeats). A skipped
    line's checksum is never checked: it cannot change a fix either way. With the skip the
    epoch's last sentence (the cycle ender the assembler learns) is the last one decoded.
    """
    head = _HEAD_BYTES_RE.match(line)
    if head is None or not line.rstrip(b"\r\n")[-3:-2] == b"*":
        return True  # not a plain talker sentence: decode it, so it is rejected and counted
    kind = head.group(1)
    if kind not in FIX_TYPES:
        return False
    return kind != b"GSV" or head.group(3) in (b"1", None)


class SentenceFramer:
    """Cut a byte stream into candidate NMEA lines.

    Bytes before a ``$`` are discarded (binary UBX traffic, line noise); a
    ``$`` that arrives before the line end cuts the previous candidate short,
    which ``parse_sentence`` then rejects as truncated. A candidate longer
    than ``max_len`` without a line end is handed out as is (and rejected),
    so the buffer stays bounded whatever arrives.
    """

    def __init__(self, max_len: int = 2 * MAX_SENTENCE_LEN) -> None:
        self._buf = bytearray()
        self._max_len = max_len
        self.discarded_bytes = 0

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        self._buf += data
        buf = self._buf
        while buf:
            start = buf.find(b"$")
            if start < 0:
                self.discarded_bytes += len(buf)
                buf.clear()
                break
            if start:
                self.discarded_bytes += start
                del buf[:start]
            nl = buf.find(b"\n")
            nxt = buf.find(b"$", 1)
            if nxt >= 0 and (nl < 0 or nxt < nl):
                out.append(bytes(buf[:nxt]))  # truncated by a new sentence start
                del buf[:nxt]
                continue
            if nl < 0:
                if len(buf) > self._max_len:
                    out.append(bytes(buf))
                    buf.clear()
                break
            out.append(bytes(buf[: nl + 1]))
            del buf[: nl + 1]
        return out

    def pending(self) -> bytes:
        """Bytes held back waiting for their line end."""
        return bytes(self._buf)

    def reset(self) -> None:
        self._buf.clear()


# --------------------------------------------------------------------------
# Epoch assembly
# --------------------------------------------------------------------------

# The sentences that carry the epoch's UTC time of day (and open an epoch).
TIMED_RECORDS = (Gga, Rmc, Gll, Zda, Gns)
# GNS mode character -> the GGA quality indicator it corresponds to.
_GNS_QUALITY = {"A": 1, "D": 2, "P": 3, "R": 4, "F": 5, "E": 6, "M": 7, "S": 8}
# Single-sentence receivers: an epoch's time counts as confirmed when it follows the previous
# fix's by more than 0 and at most this (a corrupted time of day breaks the sequence).
MAX_EPOCH_STEP_S = 2.0
# Epochs missing from the sequence are counted up to this many intervals; a longer silence
# is the receiver stopped or unplugged, which the port's errors say.
MAX_COUNTED_GAP = 10


@dataclass(frozen=True, slots=True)
class Fix:
    """One navigation epoch of a receiver that has a valid fix.

    ``utc`` is None when the epoch carried no date (no RMC/ZDA) or the date is
    implausible; it is never set from a receiver without a valid fix.

    ``time_confirmed`` is the assembler's defence against the weak NMEA
    checksum (an 8-bit XOR: two flips of the same bit in one sentence pass):
    two sentence types (RMC and GGA) carried this time of day, and the date
    agrees with the previous epoch's (or with ZDA). Only confirmed times
    should be used as a clock.
    """

    tod: float  # UTC seconds of day of the epoch
    utc: dt.datetime | None
    lat: float
    lon: float
    altitude: float | None  # metres above mean sea level
    speed: float | None  # m/s over ground
    course: float | None  # degrees true
    fix_quality: int | None  # GGA quality indicator
    fix_mode: int  # 1 none, 2 2D, 3 3D (GSA, or derived)
    sats_used: int | None
    sats_in_view: int | None
    hdop: float | None
    pdop: float | None = None
    vdop: float | None = None
    time_confirmed: bool = False
    sentences: tuple[str, ...] = ()
    # Sentences of the epoch that carried the position (a GNGNS followed by GPGNS/GLGNS with
    # empty positions is one: the single_sentence flag counts these, not sentences).
    position_sentences: int = 0

    @property
    def utc_seconds(self) -> float | None:
        return self.utc.timestamp() if self.utc is not None else None


@dataclass(slots=True)
class _Epoch:
    tod: float
    records: list[NmeaRecord] = field(default_factory=list)
    key_counts: dict[tuple, int] = field(default_factory=dict)
    last_key: tuple | None = None
    emitted: bool = False
    closed_by_ender: bool = False
    had_fix: bool = False
    late: bool = False  # records arrived after it was emitted
    cut_short: bool = False  # closed before its learnt last sentence came


@dataclass(slots=True)
class AssemblerStats:
    epochs: int = 0
    fixes: int = 0
    no_fix: int = 0
    inconsistent: int = 0
    implausible_dates: int = 0
    # The reasons an epoch gave no fix are disjoint: no_fix + unconfirmed + inconsistent +
    # incomplete + missed == dropped (the heartbeat shows them as one breakdown).
    unconfirmed: int = 0  # valid fix claimed by a single sentence only (epoch complete)
    orphans: int = 0  # untimed sentences before the first timed one
    # Epochs whose learnt last sentence never came (lost or corrupted) and that gave no fix for
    # want of it (unconfirmed or inconsistent as received); a cut-short epoch that still gave a
    # fix is not a loss, and one the receiver called void is no_fix.
    incomplete: int = 0
    missed: int = 0  # epochs never seen: a gap in the sequence of times of day

    @property
    def dropped(self) -> int:
        """Epochs that gave no fix: seen without a usable one, or never seen at all."""
        return self.epochs - self.fixes + self.missed


class FixAssembler:
    """Group decoded sentences into epochs and emit a ``Fix`` per valid epoch.

    Sentences of one epoch share a UTC time of day (RMC, GGA, GLL, ZDA carry
    it; GSA, GSV, VTG follow the timed sentence they belong to). An epoch is
    complete when a timed sentence with another time arrives, or as soon as
    the learned last sentence of the receiver's cycle arrives (the same
    sentence ended the cycle twice running; gpsd learns its "cycle ender" the
    same way). ``flush()`` completes the pending epoch at end of input.

    An epoch gives a fix only if some sentence says the fix is valid and none
    says it is not (RMC/GLL status, GGA quality, GSA fix type), and if the
    positions of RMC, GGA and GLL in it agree. With ``require_confirmation``
    (the default) at least two of them must carry the position: the XOR
    checksum lets some double bit errors through, and two sentences
    corrupted into the same wrong position do not happen in practice. Every
    u-blox default configuration sends RMC, GGA and GLL; set it False only
    for a receiver configured to send a single position sentence.

    ``single_sentence``: the receiver sends one position sentence per epoch
    (RMC only, GGA only or GNS only: Meinberg, Hemisphere and others set up
    so). Implies ``require_confirmation=False``; the epoch's time counts as
    confirmed when its date is corroborated and its time of day follows the
    previous fix's by at most ``MAX_EPOCH_STEP_S`` (the sequence stands in for
    the second sentence). Fields the sentence does not carry are None.
    """

    def __init__(
        self,
        *,
        min_year: int = 2000,
        max_year: int = 2079,
        max_disagreement_deg: float = 1e-5,
        require_confirmation: bool = True,
        single_sentence: bool = False,
    ) -> None:
        self.min_year = min_year
        self.max_year = max_year
        self.max_disagreement_deg = max_disagreement_deg
        self.single_sentence = single_sentence
        self.require_confirmation = require_confirmation and not single_sentence
        self._prev_fix_tod: float | None = None
        self._prev_tod: float | None = None
        self._interval: float | None = None  # shortest step between epochs seen
        self._prev_date: tuple[dt.date, float] | None = None
        self.stats = AssemblerStats()
        self._cur: _Epoch | None = None
        self._ender: tuple | None = None
        self._ender_candidate: tuple | None = None

    @property
    def epoch_interval(self) -> float | None:
        """The receiver's epoch period (the shortest step seen between times of day), once known."""
        return self._interval

    # -- feeding ---------------------------------------------------------

    def feed_line(self, line: bytes | str) -> list[Fix]:
        """Parse and feed one line; parse errors propagate (ReadError subclasses)."""
        return self.feed(parse_sentence(line))

    def feed(self, rec: NmeaRecord) -> list[Fix]:
        out: list[Fix] = []
        tod = rec.tod if isinstance(rec, TIMED_RECORDS) else None
        cur = self._cur
        if tod is not None and (cur is None or cur.tod != tod):
            if cur is not None:
                if not cur.emitted:
                    cur.cut_short = self._ender is not None  # its last sentence never came
                    out.extend(self._close(cur))
                self._observe_cycle_end(cur)
            self._count_gap(tod)
            cur = self._cur = _Epoch(tod)
        if cur is None:
            self.stats.orphans += 1  # tail of a cycle whose start we did not see
            return out
        if cur.emitted:
            cur.late = True
            cur.last_key = self._key(cur, rec)
            return out
        key = self._key(cur, rec)
        cur.records.append(rec)
        cur.last_key = key
        if key == self._ender:
            cur.closed_by_ender = True
            out.extend(self._close(cur))
        return out

    def flush(self) -> list[Fix]:
        """Complete the pending epoch (end of input, or the port went quiet)."""
        cur = self._cur
        if cur is None or cur.emitted:
            return []
        cur.cut_short = self._ender is not None  # the port went quiet before its last sentence
        return self._close(cur)

    def reset(self) -> None:
        """Forget the pending epoch (after a port reopen)."""
        self._cur = None
        self._prev_tod = None

    def _count_gap(self, tod: float) -> None:
        """Count the epochs missing between the previous epoch's time of day and this one."""
        prev, self._prev_tod = self._prev_tod, tod
        if prev is None:
            return
        step = (tod - prev) % 86400.0
        if step <= 0.0 or step > 43200.0:  # the same or an earlier time: a repeat or a corrupt time
            return
        if self._interval is None or step < self._interval:
            self._interval = step
            return
        gaps = round(step / self._interval) - 1
        if 0 < gaps <= MAX_COUNTED_GAP:
            self.stats.missed += gaps

    @staticmethod
    def _key(ep: _Epoch, rec: NmeaRecord) -> tuple:
        base: tuple = (rec.talker, rec.kind)
        if isinstance(rec, Gsv):
            # A GSV group's size follows the satellites in view, which change from epoch to
            # epoch: name its sentences by place (first, last, or number), not by the group's
            # size, or the learnt cycle ender stops matching whenever a satellite rises or sets.
            place = "last" if rec.msg_num == rec.num_messages else ("first" if rec.msg_num == 1 else rec.msg_num)
            base += (rec.signal_id, place)
        n = ep.key_counts.get(base, 0)
        ep.key_counts[base] = n + 1
        return base + (n,)

    def _observe_cycle_end(self, ep: _Epoch) -> None:
        # Only epochs the ender did not close (or that went on after it) teach
        # anything; a candidate must repeat before it replaces the ender, so
        # one lost sentence does not make the assembler cut cycles short.
        # Void epochs (tunnel) are shorter (fewer GSV): they do not teach
        # either, or the first epochs after the fix returns would wait.
        if (ep.closed_by_ender and not ep.late) or not ep.had_fix:
            return
        if ep.last_key is not None and ep.last_key == self._ender_candidate:
            self._ender = ep.last_key
        self._ender_candidate = ep.last_key

    # -- building the fix ------------------------------------------------

    def _close(self, ep: _Epoch) -> list[Fix]:
        ep.emitted = True
        self.stats.epochs += 1
        fix = self._build(ep)
        if fix is None:
            return []
        ep.had_fix = True
        self.stats.fixes += 1
        return [fix]

    def _build(self, ep: _Epoch) -> Fix | None:
        # One pass over the epoch's records instead of one per sentence type.
        rmcs: list[Rmc] = []
        ggas: list[Gga] = []
        glls: list[Gll] = []
        gsas: list[Gsa] = []
        gsvs: list[Gsv] = []
        vtgs: list[Vtg] = []
        zdas: list[Zda] = []
        gnss: list[Gns] = []
        by_type: dict[type, list] = {
            Rmc: rmcs, Gga: ggas, Gll: glls, Gsa: gsas, Gsv: gsvs, Vtg: vtgs, Zda: zdas, Gns: gnss,
        }
        for r in ep.records:
            bucket = by_type.get(type(r))
            if bucket is not None:
                bucket.append(r)

        # A valid fix: some sentence says so and none says otherwise. Plain
        # loops rather than any(...) generators: this runs every epoch.
        valid = invalid = False
        for sentences in (rmcs, glls, gnss):  # these carry a valid/invalid status
            for r in sentences:
                if r.valid:
                    valid = True
                else:
                    invalid = True
        for g in ggas:
            if g.quality == 0:
                invalid = True
            elif (g.quality or 0) > 0:
                valid = True
        for a in gsas:
            if a.fix_type == 1:
                invalid = True
        for v in vtgs:
            if v.mode == "N":
                invalid = True
        if invalid or not valid:
            self.stats.no_fix += 1
            return None

        positions = [
            (r.lat, r.lon) for r in (*ggas, *gnss, *rmcs, *glls) if r.lat is not None and r.lon is not None
        ]
        if not positions:
            self.stats.no_fix += 1
            return None
        if self.require_confirmation and len(positions) < 2:
            if ep.cut_short:
                self.stats.incomplete += 1  # its second position sentence may be what was lost
            else:
                self.stats.unconfirmed += 1
            return None
        lat, lon = positions[0]
        tol = self.max_disagreement_deg
        if any(abs(a - lat) > tol or abs(b - lon) > tol for a, b in positions[1:]):
            if ep.cut_short:
                self.stats.incomplete += 1
            else:
                self.stats.inconsistent += 1
            return None

        utc, date_confirmed = self._utc(ep.tod, rmcs, zdas)

        gga = ggas[0] if ggas else None
        gns = gnss[0] if gnss else None
        speed = next((r.speed_knots * KNOT_MPS for r in rmcs if r.speed_knots is not None), None)
        if speed is None:
            speed = next((v.speed_mps for v in vtgs if v.speed_mps is not None), None)
        course = next((r.course for r in rmcs if r.course is not None), None)
        if course is None:
            course = next((v.course_true for v in vtgs if v.course_true is not None), None)

        fix_types = [g.fix_type for g in gsas if g.fix_type is not None]
        if fix_types:
            fix_mode = max(fix_types)
        else:
            # No GSA: an altitude from GGA means a 3D solution, otherwise 2D.
            alt_known = (gga is not None and gga.altitude is not None) or (gns is not None and gns.altitude is not None)
            fix_mode = 3 if alt_known else 2

        if gsas:
            # One GSA per constellation; the same PRN number can mean different
            # satellites in different systems (4.10 system id tells them apart).
            used = {(g.system_id, p) for g in gsas for p in g.prns}
            sats_used: int | None = len(used)
        elif gga is not None:
            sats_used = gga.sats_used
        else:
            sats_used = gns.sats_used if gns is not None else None

        sats_in_view = None
        if gsvs:
            # Per talker, several signal ids (L1, L2...) list the same
            # satellites: take the largest group total, then sum the talkers.
            per_talker: dict[str, int] = {}
            for g in gsvs:
                per_talker[g.talker] = max(per_talker.get(g.talker, 0), g.num_in_view)
            sats_in_view = sum(per_talker.values())

        hdop = gga.hdop if gga is not None and gga.hdop is not None else None
        if hdop is None and gns is not None:
            hdop = gns.hdop
        if hdop is None:
            hdop = next((g.hdop for g in gsas if g.hdop is not None), None)
        pdop = next((g.pdop for g in gsas if g.pdop is not None), None)
        vdop = next((g.vdop for g in gsas if g.vdop is not None), None)

        timed_kinds = {r.kind for r in ep.records if isinstance(r, TIMED_RECORDS)}
        # A single-sentence receiver has no second sentence to vouch for the time: the
        # sequence does (this epoch follows the previous fix by at most MAX_EPOCH_STEP_S).
        prev_fix_tod, self._prev_fix_tod = self._prev_fix_tod, ep.tod
        time_vouched = len(timed_kinds) >= 2
        if self.single_sentence and not time_vouched and prev_fix_tod is not None:
            time_vouched = 0.0 < (ep.tod - prev_fix_tod) % 86400.0 <= MAX_EPOCH_STEP_S
        altitude = gga.altitude if gga is not None else None
        if altitude is None and gns is not None:
            altitude = gns.altitude
        quality = gga.quality if gga is not None else None
        if quality is None and gns is not None:
            quality = next((_GNS_QUALITY[c] for c in gns.mode if c in _GNS_QUALITY), None)
        return Fix(
            tod=ep.tod,
            utc=utc,
            lat=lat,
            lon=lon,
            altitude=altitude,
            speed=speed,
            course=course,
            fix_quality=quality,
            fix_mode=fix_mode,
            sats_used=sats_used,
            sats_in_view=sats_in_view,
            hdop=hdop,
            pdop=pdop,
            vdop=vdop,
            time_confirmed=utc is not None and date_confirmed and time_vouched,
            sentences=tuple(f"{r.talker}{r.kind}" for r in ep.records),
            position_sentences=len(positions),
        )

    def _utc(self, tod: float, rmcs: list[Rmc], zdas: list[Zda]) -> tuple[dt.datetime | None, bool]:
        """UTC of a valid epoch, and whether its date is corroborated."""
        dates = {r.date for r in (*rmcs, *zdas) if r.date is not None}
        if not dates:
            return None, False
        if len(dates) > 1:  # RMC and ZDA disagree: one of them is corrupt
            self.stats.implausible_dates += 1
            return None, False
        (date,) = dates
        if not self.min_year <= date.year <= self.max_year:
            self.stats.implausible_dates += 1
            return None, False
        prev, self._prev_date = self._prev_date, (date, tod)
        confirmed = bool(rmcs) and bool(zdas)  # two sentences carried the date
        if prev is not None:
            # Same day as the previous epoch, or the next one across midnight.
            expected = prev[0] if tod >= prev[1] else prev[0] + dt.timedelta(days=1)
            confirmed = confirmed or date == expected
        # timedelta, not time(): a leap second (60) has no time() value.
        utc = dt.datetime(date.year, date.month, date.day, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=tod)
        return utc, confirmed


def decode_stream(chunks: Iterable[bytes], assembler: FixAssembler | None = None) -> tuple[list[Fix], int]:
    """Decode a whole byte stream (e.g. a capture file); returns (fixes, rejected sentences).

    Convenience for tests and benchmarks; the driver does the same incrementally.
    """
    asm = assembler or FixAssembler()
    framer = SentenceFramer()
    fixes: list[Fix] = []
    rejected = 0
    for chunk in chunks:
        for line in framer.feed(chunk):
            try:
                fixes.extend(asm.feed_line(line))
            except ReadError:
                rejected += 1
    tail = framer.pending()
    if tail:
        # A last line without its line end: try it (it may be whole), so a
        # truncated one is counted as rejected rather than silently dropped.
        try:
            fixes.extend(asm.feed_line(tail))
        except ReadError:
            rejected += 1
    fixes.extend(asm.flush())
    return fixes, rejected
