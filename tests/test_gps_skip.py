"""The GPS driver leaves undecoded what no fix reads, and its fixes stay the same (issue #18).

A u-blox NEO-M9N epoch is 23 sentences, 12 of them GSV (satellites in view) plus a GST and
a GBS; the agent's fix uses only the count of satellites in view, which every message of a
GSV group repeats. ``drivers.nmea.used_by_fix`` picks the lines worth decoding from their
head bytes, and the driver decodes GSV headers only. Here the real captures go through the
driver over a real pseudo-terminal and must give exactly the fixes a full decode of every
sentence gives.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import serial

from core.errors import ReadError
from drivers.gps import NmeaGpsDriver, fix_values
from drivers.nmea import decode_stream, parse_sentence, used_by_fix

GPS_DIR = Path(__file__).parents[2] / "shared" / "fixtures" / "gps"
LOGS = ["neo-m8n.log", "ublox-8.log", "ublox-neo-m9n-nmea.log"]


def _lines(name: str) -> list[bytes]:
    return [ln.rstrip(b"\r") + b"\r\n" for ln in (GPS_DIR / name).read_bytes().split(b"\n") if ln.startswith(b"$")]


def test_used_by_fix_skips_only_well_formed_unused_sentences() -> None:
    assert used_by_fix(b"$GPGSV,4,1,16,05,01,047,,10,29,224,,1*65\r\n")  # first of its group: the count
    assert not used_by_fix(b"$GPGSV,4,2,16,16,25,306,30,1*6B\r\n")
    assert not used_by_fix(b"$GNGST,223745.00,228650,2.5,2.4,126,0.98,1.0,3.1*41\r\n")
    assert not used_by_fix(b"$GNGBS,223745.00,1.0,1.0,3.1,,,,,,*58\r\n")
    for needed in (b"$GNRMC,", b"$GNGGA,", b"$GNGSA,", b"$GNGLL,", b"$GNZDA,", b"$GNVTG,", b"$GNGNS,"):
        assert used_by_fix(needed + b"1,2*00\r\n")
    # Anything not plainly a talker sentence is decoded, so it is rejected and counted.
    for odd in (b"$GNGST,2237", b"$G\x01GST,1*00\r\n", b"$gpgsv,4,2,16*00\r\n", b"GPGSV,4,2*00\r\n",
                b"$GPGSV,,,*00\r\n", b"$PUBX,00,1*33\r\n"):
        assert used_by_fix(odd), odd


def test_gsv_header_parse_keeps_the_count_and_checks_the_checksum() -> None:
    line = b"$GPGSV,4,1,16,05,01,047,,10,29,224,,13,22,062,23,15,40,094,,1*65\r\n"
    full, head = parse_sentence(line), parse_sentence(line, satellites=False)
    assert len(full.satellites) == 4 and head.satellites == ()
    assert (head.num_messages, head.msg_num, head.num_in_view, head.signal_id) == (4, 1, 16, 1)
    assert (full.num_messages, full.msg_num, full.num_in_view, full.signal_id) == (4, 1, 16, 1)
    with pytest.raises(ReadError):
        parse_sentence(line.replace(b"4,1,16", b"4,1,17"), satellites=False)


@pytest.mark.skipif(not GPS_DIR.is_dir(), reason=f"GPS fixtures folder {GPS_DIR} is absent")
@pytest.mark.parametrize("name", LOGS)
def test_driver_fixes_match_a_full_decode(name: str) -> None:
    lines = _lines(name)
    fixes, rejected = decode_stream([b"".join(lines)])
    expected = [fix_values(f, f.utc_seconds if f.time_confirmed else None) for f in fixes]
    unused = sum(not used_by_fix(ln) for ln in lines)
    master, slave = os.openpty()
    port = serial.Serial(os.ttyname(slave), timeout=0)
    drv = NmeaGpsDriver(port, clock=lambda: 100.0)
    got: list[dict] = []
    try:
        # A line at a time: a read never completes two epochs (the driver would hand out the newer).
        for line in lines:
            os.write(master, line)
            target = drv.stats.bytes + len(line)
            deadline = time.monotonic() + 5.0
            while drv.stats.bytes < target:
                try:
                    r = drv.read()
                except ReadError:  # a capture's own damaged line (ublox-8.log ends in one)
                    continue
                if r is not None:
                    got.append(r.values)
                if drv.stats.bytes < target:
                    assert time.monotonic() < deadline, "the pty did not deliver the line"
                    time.sleep(0.0005)
    finally:
        drv.close()
        os.close(master)
        os.close(slave)
    # The last epoch waits for a quiet port (the clock here never moves); every other is the same.
    assert len(got) >= len(expected) - 1 >= 20
    assert got == expected[: len(got)]
    assert drv.stats.skipped == unused > 0
    assert drv.stats.sentences + drv.stats.skipped + rejected == len(lines)
    assert drv.stats.checksum_errors + drv.stats.frame_errors == rejected
    if name == "ublox-neo-m9n-nmea.log":
        # GST, GBS and 8 of its 12 GSV an epoch: 10 of 23 left undecoded.
        assert unused / len(lines) == pytest.approx(10 / 23, abs=0.01)
