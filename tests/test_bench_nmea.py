"""The one-path-or-two NMEA bench at CI size: it compares like with like.

bench/bench_nmea.py times ``parse_sentence`` (our split for the seven fix sentences)
against pynmea2 for every sentence; its figures mean something only if the second path
is what parse_sentence would be without the split, on the u-blox mix it claims.
"""

from __future__ import annotations

import pytest

from bench import bench_nmea
from drivers.nmea import parse_sentence
from core.errors import ReadError

pytestmark = pytest.mark.skipif(not bench_nmea.FIXTURE.is_file(),
                                reason="shared GPS fixtures absent")


def test_the_mix_is_the_m9n_capture_with_all_four_gnss() -> None:
    lines, per_epoch = bench_nmea.corpus()
    assert len(lines) == 1403 and per_epoch == pytest.approx(23.0, abs=0.1)
    talkers = {ln[1:3] for ln in lines}
    assert {b"GP", b"GL", b"GA", b"GB"} <= talkers  # GPS, GLONASS, Galileo, BeiDou in view


def test_the_pynmea2_path_gives_what_parse_sentence_gives() -> None:
    lines, _ = bench_nmea.corpus()
    bad = b"$GNGGA,1,2*00\r\n"  # a wrong checksum: refused the same way by both
    for parse in (parse_sentence, bench_nmea.through_pynmea2):
        with pytest.raises(ReadError):
            parse(bad)
    assert ([repr(bench_nmea.through_pynmea2(ln)) for ln in lines]
            == [repr(parse_sentence(ln)) for ln in lines])


def test_a_short_run_reports_both_paths_per_van_hour() -> None:
    rows = {r["name"]: r for r in bench_nmea.run(rounds=1, min_cpu=0.01)}
    for path in ("split", "pynmea2"):
        rate = rows[f"gps.nmea_{path}_path"]["value"]
        cpu = rows[f"gps.nmea_{path}_path_cpu"]["value"]
        assert rate > 0 and cpu > 0
        # CPU-s per van-hour is sentences per van-hour over the rate (rounding aside).
        assert cpu == pytest.approx(23.0 * 3600 / rate, rel=0.02)
    assert rows["gps.nmea_split_saving_cpu_pi"]["value"] == pytest.approx(
        rows["gps.nmea_split_saving_cpu"]["value"] * bench_nmea.PI_FACTOR, abs=0.02)
