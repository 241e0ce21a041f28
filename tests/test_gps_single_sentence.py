"""GPS receivers with one position sentence per epoch, GNS, and dropped epochs (issue 15, 6).

Streams come from real u-blox captures (/work/shared/fixtures/gps) cut down to
one sentence type, and from the simulated receiver (RMC only, GGA only, GNS).
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
import serial
from click.testing import CliRunner

from drivers.gps import NmeaGpsDriver
from drivers.nmea import FixAssembler, Gns, decode_stream, parse_sentence
from edge.cli import main
from core.errors import ConfigError, FrameError
from edge.runtime import check_config_data
from edge.driver_factory import build_drivers, explain
from edge.config import SensorConfig
from simulator.gps_device import FakeGpsReceiver, ReceiverState, nmea_epoch, sentence
from tests.test_agent import make

UTC = dt.timezone.utc
ORIGIN = dt.datetime(2026, 5, 6, 7, 30, tzinfo=UTC)
GPS_DIR = Path(__file__).parents[2] / "shared" / "fixtures" / "gps"
LOGS = ["neo-m8n.log", "ublox-8.log", "ublox-neo-m9n-nmea.log"]


def path(t: float) -> tuple[float, float, float, float]:
    return (51.4545 + t * 7.6e-5, -2.5879 + t * 1.2e-4, 12.0, 45.0)


def stream(only: str | None, seconds: range, talker: str = "GP", fix=path) -> bytes:
    out = []
    for t in seconds:
        st = ReceiverState(utc=ORIGIN + dt.timedelta(seconds=t), fix=fix(t), talker=talker, only=only)
        out.extend(nmea_epoch(st))
    return b"".join(out)


class BytesPort:
    """A port whose bytes are all there: each read() of the driver takes what it holds."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    @property
    def in_waiting(self) -> int:
        return len(self.data)

    def read(self, n: int) -> bytes:
        out, self.data = self.data[:n], self.data[n:]
        return out

    def close(self) -> None:
        pass


def _log_lines(name: str) -> list[bytes]:
    lines = (GPS_DIR / name).read_bytes().split(b"\n")
    return [ln.strip() + b"\r\n" for ln in lines if ln.startswith(b"$")]


# -- real captures ------------------------------------------------------------------------------


@pytest.mark.skipif(not GPS_DIR.is_dir(), reason="shared GPS fixtures not mounted")
@pytest.mark.parametrize("kind", ["RMC", "GGA"])
@pytest.mark.parametrize("log", LOGS)
def test_capture_cut_to_one_sentence_gives_the_full_captures_positions(log: str, kind: str) -> None:
    lines = _log_lines(log)
    full, _ = decode_stream([b"".join(lines)])
    one = b"".join(ln for ln in lines if ln[3:6] == kind.encode())
    assert one, f"{log} has no {kind}"
    # Without the setting such a receiver gives nothing, and says why.
    strict = FixAssembler()
    none, rejected_strict = decode_stream([one], strict)
    assert none == [] and strict.stats.unconfirmed > 0
    single, rejected = decode_stream([one], FixAssembler(single_sentence=True))
    # (ublox-8.log holds one RMC garbled on the line: rejected either way.)
    assert rejected == rejected_strict and len(single) >= len(full) - rejected > 0
    by_tod = {f.tod: f for f in full}
    matched = [f for f in single if f.tod in by_tod]
    assert len(matched) >= 0.9 * len(full)
    for f in matched:
        ref = by_tod[f.tod]
        assert (f.lat, f.lon) == pytest.approx((ref.lat, ref.lon), abs=2e-5)
        if kind == "RMC":
            assert f.altitude is None and f.sats_used is None and f.hdop is None  # RMC lacks them
            assert f.speed == pytest.approx(ref.speed)
            assert f.utc == ref.utc
        else:
            assert f.altitude == ref.altitude and f.hdop == ref.hdop and f.fix_quality == ref.fix_quality
            assert f.utc is None and not f.time_confirmed  # GGA has no date
    if kind == "RMC":
        # The sequence of epochs vouches for the time after the first fix.
        assert all(f.time_confirmed for f in single[1:])


# -- simulated receivers ------------------------------------------------------------------------


@pytest.fixture
def pty_driver():
    made = []

    def build(only: str, talker: str = "GP", **kw):
        clock = [100.0]
        sim = FakeGpsReceiver(path, clock=lambda: clock[0], utc_origin=ORIGIN, talker=talker, only=only)
        sim.start(background=False)
        port = serial.serial_for_url(sim.port_name, baudrate=9600, timeout=0)
        drv = NmeaGpsDriver(port, clock=lambda: clock[0], **kw)
        made.append((sim, drv))
        return sim, drv, clock

    yield build
    for sim, drv in made:
        drv.close()
        sim.stop()


def run_epochs(sim, drv, clock, n: int) -> list:
    out = []
    for t in range(n):
        clock[0] = 100.0 + t
        sim.emit(float(t))
        before = drv.stats.bytes
        r = None
        for _ in range(500):  # the pty hands the bytes over within a few ms
            r = drv.read()
            if r is not None or drv.stats.bytes > before:
                break
            time.sleep(0.002)
        if r is None:
            clock[0] += 0.6  # the port went quiet: the pending epoch completes
            r = drv.read()
        out.append(r)
    return [r for r in out if r is not None]


@pytest.mark.parametrize(("only", "talker"), [("RMC", "GP"), ("GGA", "GP"), ("GNS", "GN")])
def test_single_sentence_receivers_give_fixes_marked_as_such(pty_driver, only: str, talker: str) -> None:
    sim, drv, clock = pty_driver(only, talker, single_sentence=True)
    readings = run_epochs(sim, drv, clock, 5)
    assert len(readings) >= 4
    for r in readings:
        lat, lon, *_ = path(r.meta["tod"] - (ORIGIN.hour * 3600 + ORIGIN.minute * 60))
        assert (r.values["lat"], r.values["lon"]) == pytest.approx((lat, lon), abs=2e-5)
        assert "single_sentence" in r.flags
    last = readings[-1]
    if only == "RMC":
        assert last.values["alt"] is None and last.values["sats_used"] is None
        assert last.values["gps_time"] is not None and "no_gps_time" not in last.flags
    else:  # GGA and GNS carry altitude and satellites but no date
        assert last.values["alt"] == 48.5 and last.values["sats_used"] == 9 and last.values["hdop"] == 0.92
        assert last.values["gps_time"] is None and "no_gps_time" in last.flags
    if only == "GNS":
        assert last.values["fix_quality"] == 1  # mode "AA": autonomous
    assert drv.epoch_health()["dropped"] == 0


def test_without_the_setting_a_single_sentence_receiver_counts_every_epoch_dropped(pty_driver) -> None:
    sim, drv, clock = pty_driver("RMC")
    assert run_epochs(sim, drv, clock, 4) == []
    health = drv.epoch_health()
    assert health["fixes"] == 0 and health["dropped"] >= 3 and health["unconfirmed"] >= 3


# -- GNS ----------------------------------------------------------------------------------------


def test_gns_decodes_through_pynmea2_and_joins_the_epoch() -> None:
    rec = parse_sentence(b"$GNGNS,014035.00,4332.69262,S,17235.48549,E,RR,13,0.9,25.63,11.24,,*70\r\n")
    assert isinstance(rec, Gns) and rec.valid and rec.mode == "RR" and rec.sats_used == 13
    assert rec.lat == pytest.approx(-(43 + 32.69262 / 60)) and rec.altitude == 25.63
    void = parse_sentence(sentence("GNGNS,014036.00,,,,,NN,00,99.99,,,,,V"))
    assert isinstance(void, Gns) and not void.valid and void.lat is None
    with pytest.raises(FrameError):
        parse_sentence(sentence("GNGNS,014036.00,4332.69262,S,17235.48549,E,XX,13,0.9,25.63,11.24,,"))
    # RMC + GNS (a GNS receiver's usual set): two sentences, so a confirmed fix in normal mode.
    rmc = stream("RMC", range(3), talker="GN")
    gns = stream("GNS", range(3), talker="GN")
    interleaved = b"".join(r + b"\r\n" + g + b"\r\n" for r, g in
                           zip(rmc.split(b"\r\n")[:3], gns.split(b"\r\n")[:3]))
    fixes, rejected = decode_stream([interleaved])
    assert rejected == 0 and len(fixes) == 3
    assert fixes[-1].altitude == 48.5 and fixes[-1].time_confirmed and fixes[-1].sats_used == 9


def test_multi_system_gns_fix_is_flagged_single_sentence() -> None:
    """GNGNS with the combined position, then GPGNS/GLGNS with empty positions (NMEA 4.10).

    Three sentences, one position: the position was not cross-checked, so the flag is set
    (the tester's gns_multi.py: 19 of 19 fixes went out without it).
    """
    port = BytesPort()
    drv = NmeaGpsDriver(port, single_sentence=True)
    flags = []
    for k in range(6):
        t = (ORIGIN + dt.timedelta(seconds=k)).strftime("%H%M%S") + ".00"
        port.data += b"".join([
            sentence(f"GNGNS,{t},5127.2700,N,00235.2740,W,AAN,14,0.9,25.0,47.0,,,V"),
            sentence(f"GPGNS,{t},,,,,A,09,,,,,,V"),
            sentence(f"GLGNS,{t},,,,,A,05,,,,,,V"),
        ])
        r = drv.read()
        if r is not None:
            assert r.meta["sentences"] == 3
            flags.append(r.flags)
    assert len(flags) >= 4 and all("single_sentence" in f for f in flags)
    # RMC + GNS from one receiver: two sentences carry the position, no flag.
    rmc = stream("RMC", range(3), talker="GN").split(b"\r\n")
    gns = stream("GNS", range(3), talker="GN").split(b"\r\n")
    fixes, _ = decode_stream([b"".join(r + b"\r\n" + g + b"\r\n" for r, g in zip(rmc[:3], gns[:3]))])
    assert [f.position_sentences for f in fixes] == [2, 2, 2]


# -- dropped epochs -----------------------------------------------------------------------------


def test_dropped_epochs_are_counted_and_shown_in_the_heartbeat(tmp_path) -> None:
    """A tunnel (void epochs), two epochs lost on the line, one cut short: all in the heartbeat.

    The reasons are disjoint and add up to ``dropped``: an epoch cut short that still gave a
    fix (13: its last GSV lost) is no loss; one cut short before its second position
    sentence (12: only RMC and VTG came) is ``incomplete``, not also ``unconfirmed``.
    """
    tunnel = range(5, 8)

    def pos(t):
        return None if t in tunnel else path(t)

    data = b""
    for t in range(15):
        epoch = nmea_epoch(ReceiverState(utc=ORIGIN + dt.timedelta(seconds=t), fix=pos(t)))
        if t in (10, 11):
            continue  # lost entirely (e.g. a reconnecting adapter)
        if t == 12:
            epoch = epoch[:2]  # RMC and VTG, then the line dropped the rest
        if t == 13:
            epoch = epoch[:-1]  # its last GSV never came
        data += b"".join(epoch)
    asm = FixAssembler()
    fixes, _ = decode_stream([data], asm)
    st = asm.stats
    assert st.missed == 2 and st.no_fix == len(tunnel) and st.incomplete == 1 and st.unconfirmed == 0
    assert st.dropped == len(tunnel) + 3 and len(fixes) == 15 - len(tunnel) - 3
    assert st.no_fix + st.unconfirmed + st.inconsistent + st.incomplete + st.missed == st.dropped

    # The same numbers reach the heartbeat through the driver.
    drv = NmeaGpsDriver(BytesPort(data), clock=lambda: 0.0)
    agent, *_ = make(tmp_path, drivers=[drv])
    agent.sample()
    drv._asm.flush()
    gps = agent.status()["gps_epochs"]["gps"]
    # One read() decodes the whole stream: the newest fix is handed out, the others superseded.
    assert gps["superseded"] == 15 - len(tunnel) - 3 - 1 and gps["fixes"] == 1
    assert gps["dropped"] == len(tunnel) + 3 + gps["superseded"] and gps["missed"] == 2
    assert gps["no_fix"] == len(tunnel) and gps["incomplete"] == 1
    reasons = ("no_fix", "unconfirmed", "inconsistent", "incomplete", "missed", "superseded")
    assert sum(gps[k] for k in reasons) == gps["dropped"] and gps["fixes"] + gps["dropped"] == gps["epochs"]


# -- configuration ------------------------------------------------------------------------------


def test_config_check_accepts_and_explains_the_setting(tmp_path) -> None:
    good = tmp_path / "gps.toml"
    good.write_text(f'[device]\nid = "van-gps"\ndata_dir = "{tmp_path}/data"\n'  # a file must name its van
                    '[sensors.gps]\ndriver = "nmea-gps"\nport = "/dev/serial0"\nsingle_sentence = true\n'
                    '[sensors.pm]\ndriver = "pms5003"\nport = "/dev/ttyUSB0"\n')
    r = CliRunner().invoke(main, ["config", "check", str(good)])
    assert r.exit_code == 0, r.output
    assert "note: sensors.gps.single_sentence = true: fixes from a receiver that sends one position" in r.output
    bad = {"sensors": {"gps": {"driver": "nmea-gps", "port": "/dev/serial0", "single_sentence": "yes"}}}
    errors = check_config_data(bad)
    assert [e.key for e in errors] == ["sensors.gps.single_sentence"]
    assert explain(SensorConfig("gps", "nmea-gps", {"single_sentence": False})) == []
    with pytest.raises(ConfigError, match="single_sentence"):
        build_drivers([SensorConfig("gps", "nmea-gps", {"port": "loop://", "single_sentence": 1})], {})


def test_config_check_refuses_a_misspelt_option_as_run_does(tmp_path) -> None:
    """`single_sentance = true` was OK for `edge config check` and refused by `edge run`."""
    cfg = tmp_path / "gps.toml"
    cfg.write_text('[sensors.gps]\ndriver = "nmea-gps"\nport = "/dev/serial0"\nsingle_sentance = true\n')
    r = CliRunner().invoke(main, ["config", "check", str(cfg)])
    assert r.exit_code != 0, r.output
    assert "sensors.gps.single_sentance" in r.output and "did you mean 'single_sentence'?" in r.output
    # The same error, from the same code, when the agent builds its drivers.
    sc = SensorConfig("gps", "nmea-gps", {"port": "loop://", "single_sentance": True})
    with pytest.raises(ConfigError, match="did you mean 'single_sentence'") as run_err:
        build_drivers([sc], {})
    (check_err,) = check_config_data({"sensors": {"gps": {"driver": "nmea-gps", "port": "loop://",
                                                           "single_sentance": True}}})
    assert (check_err.key, str(check_err)) == (run_err.value.key, str(run_err.value))
    # Other drivers go the same way; a good table still passes, and no device is opened.
    bad_pm = {"sensors": {"pm": {"driver": "pms5003", "port": "/dev/nonexistent", "moed": "active"}}}
    assert [e.key for e in check_config_data(bad_pm)] == ["sensors.pm.moed"]
    good = {"sensors": {"pm": {"driver": "pms5003", "port": "/dev/nonexistent"},
                        "gps": {"driver": "nmea-gps", "port": "/dev/nonexistent", "gap_s": 0.03}}}
    assert check_config_data(good) == []
