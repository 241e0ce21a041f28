"""Real captured PM frames decode to the values published with them.

The fixtures (``/work/shared/fixtures/pm``: PyPMS captures, MIT) hold a
hexdump of the raw stream and a CSV of the decoded values per sensor. The
whole hexdump is fed to the stream parser as one stream, so framing, resync
and unstuffing are exercised on real bytes, not only the field decoding.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from drivers import pms, sds011, sps30
from core.errors import ChecksumError

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "pm"

pytestmark = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"PM fixtures not present at {FIXTURES}"
)


def hexdump_bytes(path: Path, *, check_offsets: bool = True) -> bytes:
    """Bytes of an ``xxd``-style dump: ``offset: hex hex ..  ascii``."""
    out = bytearray()
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        offset, _, rest = line.partition(": ")
        if check_offsets:
            assert int(offset, 16) == len(out), f"{path.name}: offset {offset} out of sequence"
        hex_part = rest.split("  ", 1)[0]
        out += bytes.fromhex(hex_part)
    return bytes(out)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, skipinitialspace=True))


def decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


def assert_published(value: float, published: str, what: str) -> None:
    """``value`` rounds to the published text (allowing either way on a tie)."""
    tolerance = 0.5 * 10 ** -decimals(published) + 1e-6
    assert abs(value - float(published)) <= tolerance, f"{what}: {value} vs published {published}"


# The offsets printed in SPS30.hexdump do not follow the byte counts of its
# lines (47, 100, 144, ... after lines of 48, 47, 50 bytes); each line is one
# whole flag-to-flag frame, so the bytes are read and the offsets ignored.
SPS30_OFFSETS_VALID = False


def test_fixture_files_present() -> None:
    for stem in ("PMSx003", "SDS01x", "SPS30"):
        assert (FIXTURES / f"{stem}.hexdump").is_file()
        assert (FIXTURES / f"{stem}.csv").is_file()


def test_pms_fixture_frames_decode_to_published_values() -> None:
    stream = hexdump_bytes(FIXTURES / "PMSx003.hexdump")
    rows = csv_rows(FIXTURES / "PMSx003.csv")
    parser = pms.PMSParser()
    frames = parser.feed(stream)
    assert len(frames) == len(rows) == 10
    assert parser.checksum_errors == parser.frame_errors == parser.garbage_bytes == 0
    for i, (frame, row) in enumerate(zip(frames, rows)):
        assert isinstance(frame, pms.PMSFrame)
        assert frame.raw == stream[32 * i : 32 * (i + 1)]
        # raw* are the CF=1 values, pm* the atmospheric ones (identical at these levels)
        assert_published(frame.pm1_cf1, row["raw01"], "raw01")
        assert_published(frame.pm25_cf1, row["raw25"], "raw25")
        assert_published(frame.pm10_cf1, row["raw10"], "raw10")
        assert_published(frame.pm1, row["pm01"], "pm01")
        assert_published(frame.pm25, row["pm25"], "pm25")
        assert_published(frame.pm10, row["pm10"], "pm10")
        # the CSV gives counts per cm³; the wire has them per 0.1 L
        counts = frame.counts_per_cm3()
        for key, column in (("n0_3", "n0_3"), ("n0_5", "n0_5"), ("n1_0", "n1_0"),
                            ("n2_5", "n2_5"), ("n5_0", "n5_0"), ("n10", "n10_0")):
            assert_published(counts[key], row[column], column)
        assert frame.reserved == 0x9700
        assert not frame.all_zero


def test_pms_fixture_frames_decode_one_by_one() -> None:
    stream = hexdump_bytes(FIXTURES / "PMSx003.hexdump")
    first = pms.decode_frame(stream[:32])
    assert isinstance(first, pms.PMSFrame)
    assert (first.pm1, first.pm25, first.pm10) == (0, 8, 8)
    assert (first.n0_3, first.n0_5, first.n1_0, first.n2_5) == (210, 70, 45, 30)
    tampered = bytearray(stream[:32])
    tampered[13] ^= 0x01  # PM2.5 atmospheric 8 -> 9
    with pytest.raises(ChecksumError):
        pms.decode_frame(bytes(tampered))


def test_sds_fixture_frames_decode_to_published_values() -> None:
    stream = hexdump_bytes(FIXTURES / "SDS01x.hexdump")
    rows = csv_rows(FIXTURES / "SDS01x.csv")
    parser = sds011.SDS011Parser()
    frames = parser.feed(stream)
    assert len(frames) == len(rows) == 10
    assert parser.checksum_errors == parser.frame_errors == parser.garbage_bytes == 0
    for frame, row in zip(frames, rows):
        assert isinstance(frame, sds011.SDSData)
        assert_published(frame.pm25, row["pm25"], "pm25")
        assert_published(frame.pm10, row["pm10"], "pm10")
        assert frame.device_id == 0x58D9  # bytes 58 D9 on the wire


def test_sds_datasheet_example() -> None:
    frame = sds011.decode_frame(bytes.fromhex("AA C0 D4 04 3A 0A A1 60 1D AB"))
    assert isinstance(frame, sds011.SDSData)
    assert (frame.pm25, frame.pm10, frame.device_id) == (123.6, 261.8, 0xA160)


def test_sps30_fixture_frames_decode_to_published_values() -> None:
    stream = hexdump_bytes(FIXTURES / "SPS30.hexdump", check_offsets=SPS30_OFFSETS_VALID)
    rows = csv_rows(FIXTURES / "SPS30.csv")
    parser = sps30.SPS30Parser()
    responses = parser.feed(stream)
    assert len(responses) == len(rows) == 10
    assert parser.errors == 0
    columns = ("pm01", "pm25", "pm04", "pm10", "n0_5", "n1_0", "n2_5", "n4_0", "n10_0", "diam")
    for response, row in zip(responses, rows):
        assert (response.address, response.command, response.state) == (0, sps30.CMD_READ, 0)
        m = sps30.decode_measurement(response.data)
        values = (m.pm1, m.pm25, m.pm4, m.pm10, m.nc0_5, m.nc1, m.nc2_5, m.nc4, m.nc10,
                  m.typical_size)
        for value, column in zip(values, columns):
            assert_published(value, row[column], column)


def test_sps30_fixture_contains_stuffed_bytes() -> None:
    """The captures exercise every escape, so unstuffing is tested on real data."""
    stream = hexdump_bytes(FIXTURES / "SPS30.hexdump", check_offsets=SPS30_OFFSETS_VALID)
    for escape in (b"\x7d\x5e", b"\x7d\x5d", b"\x7d\x31", b"\x7d\x33"):
        assert escape in stream
    # Frame by frame through the pure decoder as well.
    frames = [b"\x7e" + part + b"\x7e" for part in stream.split(b"\x7e") if part]
    assert len(frames) == 10
    for frame in frames:
        assert len(sps30.decode_frame(frame).data) == 40
