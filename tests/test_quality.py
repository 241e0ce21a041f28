from receiver import quality
from receiver.store import SQLiteStore
from tests.test_receiver_store import RECEIVED, T, put
from core.sample import Sample, TimeSource
from core.wire import Batch


def test_value_flags():
    assert quality.value_flags("pm25", 12.0) == set()
    assert quality.value_flags("pm25", -999) == {"out_of_range"}
    assert quality.value_flags("pm25", -3.0) == {"out_of_range", "negative"}
    assert quality.value_flags("no2_ppb", -3.0) == {"negative"}  # a cell reads a bit below zero
    assert quality.value_flags("laeq", 150.0) == {"out_of_range"}
    assert quality.value_flags("pm25", None) == set()


def test_stuck_runs_across_the_context():
    run = quality.STUCK_RUN
    ctx = [12.5] * (run - 2)
    flags = quality.series_flags([12.5, 12.5, 6.0, 7.0], ctx)
    assert [("stuck" in f) for f in flags] == [True, True, False, False]
    # a shorter run is ordinary in clean air at 1 Hz
    flags = quality.series_flags([12.5] * (run - 1) + [6.0])
    assert not any("stuck" in f for f in flags)


def test_outlier_median_mad():
    values = [10.0, 11.0, 9.5, 10.5, 10.0, 250.0, 10.2, 9.8, 10.1, 10.4, 9.9, 10.3, 10.0, 9.7, 10.6]
    flags = quality.series_flags(values)
    assert [i for i, f in enumerate(flags) if "outlier" in f] == [5]


def test_sample_level_flags():
    assert quality.sample_flags("warming_up", "unsync", "no_fix") == {"warming_up", "clock_untrusted", "no_fix"}
    assert quality.sample_flags("", "gps", "interpolated") == set()


def test_flags_reach_the_observations(tmp_path):
    s = SQLiteStore(tmp_path / "d.sqlite")
    samples = []
    for i in range(70):
        t = T + i * 1000
        pm = {"pm25": 12.0 if i != 20 else 400.0, "pm10": 20.0 + (i % 7), "rh": 97.0 if i >= 60 else 50.0}
        samples.append(Sample("pm", t, i * 1000, TimeSource.UNSYNC if i < 2 else TimeSource.GPS, pm,
                              ("warming_up",) if i < 3 else (), 2 * i + 1))
        samples.append(Sample("gps", t, i * 1000, TimeSource.GPS,
                              {"lat": 52.1 + i * 1e-5, "lon": 4.6, "fix_quality": 1}, (), 2 * i + 2))
    put(s, Batch("van-001", "e1", 1, 140, samples))
    q = dict(((seq, qty), fl) for seq, qty, fl in s.conn.execute(
        "SELECT seq, quantity, quality FROM observations WHERE quantity IN ('pm25','pm10')"))
    assert "warming_up" in q[(1, "pm25")] and "clock_untrusted" in q[(1, "pm25")]
    assert "outlier" in q[(41, "pm25")]  # the 400 µg/m³ spike
    assert "stuck" in q[(101, "pm25")]  # 12.0 for 49 s after the spike: a stuck sensor
    assert "stuck" not in q[(11, "pm25")]  # 20 s before it is not enough to say
    assert "humid" in q[(131, "pm10")] and "humid" not in q[(21, "pm10")]
    assert q[(21, "pm10")] == ""


def _pm_store(tmp_path, name, rows):
    """rows: (sensor, values) one a second, stored as one batch; pm25 flags by seq, leaving out
    ``rh_missing`` (these rows carry no RH: the rules tested here are about the values)."""
    s = SQLiteStore(tmp_path / f"{name}.sqlite")
    samples = [Sample(sensor, T + i * 1000, i * 1000, TimeSource.GPS, vals, (), i + 1)
               for i, (sensor, vals) in enumerate(rows)]
    put(s, Batch("van-001", "e1", 1, len(samples), samples))
    out = dict(s.conn.execute("SELECT seq, flags FROM quality WHERE quantity = 'pm25'").fetchall())
    s.close()
    kept = {seq: ",".join(x for x in f.split(",") if x != "rh_missing") for seq, f in out.items()}
    return {seq: f for seq, f in kept.items() if f}


def test_sentinels_are_no_values_in_the_windows(tmp_path):
    """-999 every other second: the sentinels are out_of_range, the real values untouched (was 26 of 30)."""
    rows = [("pm", {"pm25": round(10 + 0.1 * (k % 5), 2) if k % 2 == 0 else -999.0}) for k in range(60)]
    flags = _pm_store(tmp_path, "s", rows)
    assert {seq for seq, f in flags.items()} == {k + 1 for k in range(60) if k % 2}
    assert set(flags.values()) == {"out_of_range"}
    assert quality.series_flags([10.0, -999.0] * 15) == quality.series_flags([10.0, None] * 15)


def test_humid_from_the_no2_sensors_rh(tmp_path):
    """No driver sends ``rh``: the DGS-NO2's ``no2_rh_pct`` (drivers/dgs_no2.py) marks PM humid."""
    assert quality.is_rh_key("no2_rh_pct") and quality.is_rh_key("rh") and not quality.is_rh_key("no2_ppb")
    rows = []
    for k in range(20):
        rows.append(("pm", {"pm25": 10.0 + 0.1 * (k % 3)}))
        rows.append(("no2", {"no2_ppb": 5.0, "no2_rh_pct": 97.0 if k < 10 else 50.0}))
    flags = _pm_store(tmp_path, "h", rows)
    humid = sorted(seq for seq, f in flags.items() if "humid" in f)
    # the PM value at 20 s is as close to the last 95 % (19 s) as to the first 50 % (21 s): the earlier counts
    assert humid == [2 * k + 1 for k in range(11)]
    # an RH reading more than 30 s away says nothing
    far = [("no2", {"no2_rh_pct": 97.0})] + [("pm", {"pm25": 10.0 + 0.1 * (k % 3)}) for k in range(40)]
    flags = _pm_store(tmp_path, "far", far)
    assert sorted(seq for seq, f in flags.items() if "humid" in f) == list(range(2, 32))  # up to 30 s


def test_quantized_pm_in_clean_air_is_not_stuck_but_a_stuck_frame_is(tmp_path):
    """A PMS5003 at 2 µg/m³ for 40 s while its counts move is a clean street; a repeated frame is stuck."""
    clean = [("pm", {"pm25": 2.0, "pm10": 3.0 + k % 2, "n0_3": 150.0 + k}) for k in range(40)]
    assert _pm_store(tmp_path, "clean", clean) == {}
    frozen = [("pm", {"pm25": 2.0, "pm10": 3.0, "n0_3": 150.0}) for k in range(40)]
    assert set(_pm_store(tmp_path, "frozen", frozen).values()) == {"stuck"}
    # a value that is not a small whole number is stuck by its own run, as before
    high = [("pm", {"pm25": 12.34, "pm10": 20.0 + k, "n0_3": 150.0 + k}) for k in range(40)]
    assert set(_pm_store(tmp_path, "high", high).values()) == {"stuck"}
