from receiver import quality
from receiver.store import SQLiteStore
from tests.test_receiver_store import RECEIVED, T, put
from edge.model import Sample, TimeSource
from uplink.wire import Batch


def test_value_flags():
    assert quality.value_flags("pm25", 12.0) == set()
    assert quality.value_flags("pm25", -999) == {"out_of_range"}
    assert quality.value_flags("pm25", -3.0) == {"out_of_range", "negative"}
    assert quality.value_flags("no2_ppb", -3.0) == {"negative"}  # a cell reads a bit below zero
    assert quality.value_flags("laeq", 150.0) == {"out_of_range"}
    assert quality.value_flags("pm25", None) == set()


def test_stuck_runs_across_the_context():
    run = quality.STUCK_RUN
    ctx = [5.0] * (run - 2)
    flags = quality.series_flags([5.0, 5.0, 6.0, 7.0], ctx)
    assert [("stuck" in f) for f in flags] == [True, True, False, False]
    # a shorter run is ordinary in clean air at 1 Hz
    flags = quality.series_flags([5.0] * (run - 1) + [6.0])
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
        pm = {"pm25": 12.0 if i != 20 else 400.0, "pm10": 20.0 + (i % 7), "rh": 80.0 if i >= 60 else 50.0}
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
