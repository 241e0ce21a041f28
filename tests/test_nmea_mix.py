"""The captured u-blox sentence mix the CPU bench feeds the GPS driver (issue #18)."""

from __future__ import annotations

import datetime as dt

import pytest

from drivers.nmea import Gll, Rmc, Zda, parse_sentence
from simulator.gps_device import FakeGpsReceiver
from simulator.nmea_mix import load_capture_mix

UTC0 = dt.datetime(2026, 12, 6, 15, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("name, per_epoch", [("neo-m8n.log", 13), ("ublox-neo-m9n-nmea.log", 23)])
def test_mix_has_the_captures_rate_and_the_simulated_time_and_place(fixtures_dir, name, per_epoch):
    mix = load_capture_mix(fixtures_dir / "gps" / name)
    rx = FakeGpsReceiver(lambda t: (52.1244, 4.6578, 8.0, 90.0), utc_origin=UTC0, talker="GN", mix=mix)
    for t in range(3):
        lines = rx.lines_at(float(t))
        rx.epochs_sent += 1
        records = [parse_sentence(line) for line in lines]  # every checksum and field valid
        assert len(records) == per_epoch
        now = UTC0 + dt.timedelta(seconds=t)
        rmc = next(r for r in records if isinstance(r, Rmc))
        assert rmc.lat == pytest.approx(52.1244, abs=1e-5)
        for r in records:
            if isinstance(r, Gll):
                assert r.lat == pytest.approx(52.1244, abs=1e-5), "GLL carries the capture's place"
            if isinstance(r, Zda):
                assert r.date == now.date()


def test_capture_without_epochs_is_refused(tmp_path):
    bad = tmp_path / "empty.log"
    bad.write_text("# nothing\n$GPGSV,1,1,00*79\n")
    with pytest.raises(ValueError, match="no NMEA epochs"):
        load_capture_mix(bad)
