"""v15 attack, point 6: receivers with one position sentence per epoch (RMC only, GGA only,
GNS only), through FixAssembler(single_sentence=True). Sentences are built here with my own
encoder and checksum; expected positions are my own degree-minute conversion.

Run: .venv/bin/python -m pytest tests/attack_v15/probe_gps_single.py -q -p no:cacheprovider
"""

from __future__ import annotations

import datetime as dt
import functools
import operator

import pytest

from drivers.nmea import FixAssembler


def nmea(body: str) -> str:
    cs = functools.reduce(operator.xor, body.encode(), 0)
    return f"${body}*{cs:02X}\r\n"


def dm(value: float, lat: bool) -> tuple[str, str]:
    hemi = ("N" if value >= 0 else "S") if lat else ("E" if value >= 0 else "W")
    a = abs(value)
    deg = int(a)
    minutes = (a - deg) * 60.0
    return (f"{deg:02d}{minutes:09.6f}" if lat else f"{deg:03d}{minutes:09.6f}"), hemi


def rmc(t: dt.datetime, lat: float, lon: float, status: str = "A") -> str:
    la, lh = dm(lat, True)
    lo, oh = dm(lon, False)
    return nmea(f"GPRMC,{t:%H%M%S}.00,{status},{la},{lh},{lo},{oh},0.5,90.0,{t:%d%m%y},,,A")


def gga(t: dt.datetime, lat: float, lon: float, q: int = 1) -> str:
    la, lh = dm(lat, True)
    lo, oh = dm(lon, False)
    return nmea(f"GPGGA,{t:%H%M%S}.00,{la},{lh},{lo},{oh},{q},08,0.9,45.0,M,47.0,M,,")


def gns(t: dt.datetime, lat: float, lon: float, mode: str = "AAN") -> str:
    la, lh = dm(lat, True)
    lo, oh = dm(lon, False)
    return nmea(f"GNGNS,{t:%H%M%S}.00,{la},{lh},{lo},{oh},{mode},12,0.8,45.0,47.0,,,V")


T = dt.datetime(2026, 12, 31, 23, 59, 55, tzinfo=dt.timezone.utc)  # crosses midnight and the year
POS = [(52.5 + 1e-5 * i, 13.4 - 1e-5 * i) for i in range(10)]


def run(make, n=10, drop=(), **kw):
    a = FixAssembler(single_sentence=True)
    fixes = []
    for i in range(n):
        if i in drop:
            continue
        t = T + dt.timedelta(seconds=i)
        fixes += a.feed_line(make(t, *POS[i], **kw).strip())
    fixes += a.flush()
    return fixes


@pytest.mark.parametrize("make", [rmc, gga, gns], ids=["rmc", "gga", "gns"])
def test_one_sentence_per_epoch_gives_every_fix(make):
    fixes = run(make)
    assert len(fixes) == 10, f"{make.__name__}: {len(fixes)} fixes of 10"
    for i, f in enumerate(fixes):
        assert f.lat == pytest.approx(POS[i][0], abs=1e-8) and f.lon == pytest.approx(POS[i][1], abs=1e-8)
        t = T + dt.timedelta(seconds=i)
        assert f.tod == pytest.approx(t.hour * 3600 + t.minute * 60 + t.second)


def test_rmc_only_dates_across_midnight_and_year():
    fixes = run(rmc)
    assert [f.utc for f in fixes] == [T + dt.timedelta(seconds=i) for i in range(10)]


def test_gga_only_has_no_date():
    assert all(f.utc is None for f in run(gga))


@pytest.mark.parametrize("make,bad", [(rmc, {"status": "V"}), (gga, {"q": 0}), (gns, {"mode": "NNN"})],
                         ids=["rmc-V", "gga-0", "gns-NNN"])
def test_no_fix_sentences_give_no_fix(make, bad):
    assert run(make, **bad) == []


@pytest.mark.parametrize("make", [rmc, gga, gns], ids=["rmc", "gga", "gns"])
def test_southern_western_edges(make):
    a = FixAssembler(single_sentence=True)
    pts = [(-89.999999, -179.999999), (-0.000001, -0.000001), (0.0, 0.0)]
    out = []
    for i, p in enumerate(pts):
        out += a.feed_line(make(T + dt.timedelta(seconds=i), *p).strip())
    out += a.flush()
    assert [(round(f.lat, 6), round(f.lon, 6)) for f in out] == [(round(x, 6), round(y, 6)) for x, y in pts]


def test_gns_with_gps_only_mode_and_empty_position():
    a = FixAssembler(single_sentence=True)
    out = a.feed_line(gns(T, 52.5, 13.4, mode="A").strip())  # one-char mode (older NMEA 3.0)
    out += a.feed_line(nmea(f"GNGNS,{T + dt.timedelta(seconds=1):%H%M%S}.00,,,,,AAN,12,0.8,45.0,47.0,,,V").strip())
    out += a.flush()
    assert len(out) == 1 and out[0].lat == pytest.approx(52.5)


@pytest.mark.parametrize("drop", [(3, 4, 7), (1,), (1, 2)], ids=["mid", "second", "second-third"])
@pytest.mark.parametrize("make", [rmc, gga, gns], ids=["rmc", "gga", "gns"])
def test_dropped_epochs_are_counted(make, drop):
    """Health must count the epochs a one-sentence receiver missed (FixAssembler.stats.missed,
    reported by GpsDriver.epoch_health()['missed']), wherever the gap falls."""
    a = FixAssembler(single_sentence=True)
    for i in range(10):
        if i in drop:
            continue
        a.feed_line(make(T + dt.timedelta(seconds=i), *POS[i]).strip())
    a.flush()
    assert a.stats.missed == len(drop), (a.stats.missed, drop)
