"""The fast decode paths give exactly what the reference paths give.

``parse_sentence`` splits the sentence types it decodes itself instead of
handing them to pynmea2, hands pynmea2 the rest without the (already checked)
checksum, and computes the checksum by folding an integer: each of these must
be indistinguishable from going through pynmea2 with its own checksum check.
"""

from __future__ import annotations

import datetime as dt
from functools import reduce
from operator import xor
from pathlib import Path

import pynmea2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import nmea
from drivers.nmea import Gga, Gsv, OtherSentence, nmea_checksum, parse_sentence
from core.errors import ChecksumError, FrameError, ReadError
from simulator.gps_device import ReceiverState, nmea_epoch, sentence
from tests.test_gps_fuzz import FUZZ, REAL_SENTENCES

GPS_DIR = Path(__file__).parents[2] / "shared" / "fixtures" / "gps"
CHECKS = FUZZ
SAMPLES = REAL_SENTENCES[:7]  # one of each type the fast path splits


def through_pynmea2(line: bytes) -> object:
    """The reference: pynmea2 parses the whole sentence and checks its checksum."""
    text = line.decode("ascii").rstrip("\r\n")
    try:
        msg = pynmea2.NMEASentence.parse(text, check=True)
    except pynmea2.SentenceTypeError:
        head, _, rest = text[1:-3].partition(",")
        return OtherSentence(talker=head[:2], kind=head[2:], fields=tuple(rest.split(",")))
    except Exception as exc:
        return ("unparseable", str(exc))
    try:
        return nmea._convert(msg)
    except FrameError as exc:
        return ("frame error", str(exc))


def outcome(line: bytes) -> object:
    try:
        return parse_sentence(line)
    except ChecksumError:
        raise
    except FrameError as exc:
        msg = str(exc)
        if msg.startswith("unparseable sentence: "):
            return ("unparseable", msg.removeprefix("unparseable sentence: "))
        return ("frame error", msg)


@given(st.binary(max_size=300))
def test_checksum_fold_is_the_xor_of_every_byte(data: bytes) -> None:
    assert nmea_checksum(data) == reduce(xor, data, 0)
    assert nmea_checksum(data.decode("latin-1").encode("latin-1")) == reduce(xor, data, 0)


def _fixture_sentences() -> list[bytes]:
    lines: list[bytes] = []
    for path in sorted(GPS_DIR.glob("*.log")) if GPS_DIR.is_dir() else []:
        lines += [ln + b"\r\n" for ln in path.read_bytes().splitlines() if ln.startswith(b"$")]
    t0 = dt.datetime(2025, 5, 6, 7, 30, tzinfo=dt.timezone.utc)
    for talker in ("GP", "GN", "GL"):
        lines += nmea_epoch(ReceiverState(utc=t0, fix=(52.1, 4.6, 8.0, 90.0), talker=talker))
    return lines


def test_every_sentence_decodes_as_through_pynmea2() -> None:
    lines = _fixture_sentences() + SAMPLES
    assert len(lines) > 20
    for line in lines:
        if b"*" not in line:
            continue
        try:
            got = outcome(line)
        except ReadError:
            continue  # corrupt in the capture: pynmea2 is not the reference for those
        assert got == through_pynmea2(line), line


@st.composite
def edited_sentences(draw) -> bytes:
    """A real sentence with one field or the head replaced, checksum made valid again."""
    line = draw(st.sampled_from(SAMPLES))
    fields = line[1 : line.index(b"*")].split(b",")
    k = draw(st.integers(0, len(fields) - 1))
    alphabet = st.sampled_from(list(b"0123456789,.-+ ANSEWVPQpgnxz_"))
    fields[k] = bytes(draw(st.lists(alphabet, max_size=8)))
    return sentence(b",".join(fields).decode("ascii"))


@CHECKS
@given(edited_sentences())
def test_edited_sentences_decode_or_fail_as_through_pynmea2(line: bytes) -> None:
    assert outcome(line) == through_pynmea2(line)


@pytest.mark.parametrize(
    "body, expected",
    [
        # A talker starting with P is a proprietary sentence to pynmea2, not a GGA.
        ("PQGGA,1,2", OtherSentence),
        # Lower case: pynmea2 upper-cases the type, so this is a GGA.
        ("gpgga,223745.00,3806.62964,N,12237.61382,W,2,12,0.54,83.1,M,-29.5,M,,0000", Gga),
        ("GPGSV,1,1,01,07,45,120,33", Gsv),
        ("GPTXT,01,01,02,ANTSTATUS=OK", OtherSentence),
    ],
)
def test_heads_take_the_same_path_as_in_pynmea2(body: str, expected: type) -> None:
    line = sentence(body)
    rec = parse_sentence(line)
    assert isinstance(rec, expected)
    assert rec == through_pynmea2(line)


def test_checksum_characters_must_be_hex_digits() -> None:
    body = "GPGSV,1,1,01,07,45,120,33"
    cs = nmea_checksum(body)
    assert isinstance(parse_sentence(f"${body}*{cs:02x}"), Gsv)  # lower-case hex is fine
    # int(" 7", 16) would accept these; pynmea2 never did, and neither does the decoder.
    # A sentence whose checksum is 0x07, so that " 7" and "+7" are that number to int().
    body = "GPTXT,01,01,02," + chr(nmea_checksum("GPTXT,01,01,02,") ^ 0x07)
    cs = nmea_checksum(body)
    assert cs == 0x07
    assert isinstance(parse_sentence(f"${body}*07"), OtherSentence)
    for odd in (f" {cs:X}", f"+{cs:X}"):
        with pytest.raises(FrameError):
            parse_sentence(f"${body}*{odd}")
    with pytest.raises(ChecksumError):
        parse_sentence(f"${body}*{cs ^ 1:02X}")
