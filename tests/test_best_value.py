"""One best value that everyone reads (issue 15 point 4), on SQLite and PostgreSQL.

A van uploads NO2 with its record v1; a correction v2 arrives later. The ``observations``
view, the maps (aggregate.build), the measurement export and the HTTP API (aggregates and
SensorThings) must then all serve the value recomputed with v2 where v2 is valid, say
``v2`` for those values, and keep v1 as history. Every upload goes through the receiver's
real ``Ingestor``; expected values are computed here from the raw electrode values and the
records with ``no2_ppb_from_record``, independently of the receiver's derivation.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import threading
import urllib.request
from typing import Any

from core.calibration import CalibrationRecord, no2_ppb_from_record
from edge.calibration import CalibrationStore
from core.sample import Sample, TimeSource
from receiver.aggregate import Period, Rule, build
from receiver.api import make_server
from receiver.export import export_measurements
from receiver.ingest import Ingestor
from receiver.mapunits import H3Snapper
from receiver.store import SQLiteStore
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_calibration import SERIAL, T0, FakeClock, _cal_sample, sheet_values
from tests.test_store_contract import MakeStore, make, q  # noqa: F401  (make: fixture, used by name)
from core.wire import Batch, encode_batch

N = 60  # NO2 samples, one a second from T0 + 1 s
LAT, LON = 52.3702, 4.8952  # a van parked in one H3 cell: one pass, so the map value is their mean
RECEIVED = int(T0 * 1000) + 3_600_000  # when the receiver takes the first upload
LATER = RECEIVED + 86_400_000  # ... and the correction, a day later


def _we(i: int) -> float:
    return 300.0 + 2.0 * i  # raw working-electrode mV: every sample a different value


def _ppb(rec: CalibrationRecord, i: int) -> float:
    return no2_ppb_from_record(rec.values, _we(i), 306.0, 12.0)


def _confirmed(tmp_path: Any, device: str, t: float = T0 - 600, **values: float) -> CalibrationRecord:
    """A record confirmed on ``device``'s own calibration store (a file per van, as on the Pi)."""
    with CalibrationStore.for_data_dir(tmp_path / device, clock=FakeClock(t)) as cs:
        return cs.confirm(cs.add("no2", SERIAL, "sheet", sheet_values(**values), technician="t", device=device).id)


def _correct(tmp_path: Any, device: str, valid_from: float, **values: float) -> tuple[CalibrationRecord, ...]:
    """A co-location confirmed a day later, valid from ``valid_from``: (the closed old record, the new one)."""
    with CalibrationStore.for_data_dir(tmp_path / device, clock=FakeClock(T0 + 86_400)) as cs:
        old = cs.all_active()[0]
        new = cs.confirm(cs.add("no2", SERIAL, "colocation", sheet_values(**values), technician="t",
                                device=device, valid_from=valid_from).id)
        return cs.get(old.id), new  # type: ignore[return-value]


def _day(device: str, rec: CalibrationRecord, epoch: str = "e1") -> Batch:
    """The record, then per second a GPS fix and an NO2 sample the van calibrated with ``rec``."""
    samples = [_cal_sample(1, T0, rec)]
    for i in range(1, N + 2):  # a last fix after the last NO2 sample: every one is placed
        t_ms = int((T0 + i) * 1000)
        samples.append(Sample("gps", t_ms, t_ms, TimeSource.GPS, {"lat": LAT, "lon": LON, "fix_quality": 1},
                              (), 2 * i, "boot"))
        if i > N:
            break
        vals = {"no2_ppb": _ppb(rec, i), "no2_we_mv": _we(i), "no2_ae_mv": 306.0, "no2_temp_c": 12.0,
                "cal": rec.id}
        samples.append(Sample("no2", t_ms + 1, t_ms + 1, TimeSource.GPS, vals, (), 2 * i + 1, "boot"))
    return Batch(device, epoch, 1, 2 * N + 2, samples)


def _records(device: str, seq: int, *recs: CalibrationRecord) -> Batch:
    return Batch(device, "e1", seq, seq + len(recs) - 1,
                 [_cal_sample(seq + k, T0 + 86_400, r) for k, r in enumerate(recs)])


def _upload(ing: Ingestor, batch: Batch, received: int) -> None:
    out = ing.handle(f"datalab/v1/{batch.device}/batch", encode_batch(batch), received)
    assert out.ack is not None and out.ack.status == "stored", out.ack


def _observed(s: Any, device: str) -> dict[int, tuple[float, str | None]]:
    """NO2 second -> (value, calibration) from the observations view."""
    rows = q(s, "SELECT t_utc_ms, value, calibration FROM observations WHERE device=? AND quantity='no2_ppb'",
             device)
    return {round(t / 1000 - T0): (float(v), c) for t, v, c in rows}


def _history(s: Any, device: str) -> list[tuple[str, str]]:
    return q(s, "SELECT id, status FROM calibrations WHERE device=? ORDER BY version", device)


def _http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _van_a_day(make: MakeStore, tmp_path: Any) -> tuple[Any, Ingestor, CalibrationRecord]:
    """A store holding van A's day, its NO2 by a confirmed record: (store, ingestor, record)."""
    s = make()
    ing = Ingestor(s)
    rec = _confirmed(tmp_path, "van-a")
    _upload(ing, _day("van-a", rec), RECEIVED)
    return s, ing, rec


def _api_values(store: Any) -> tuple[float, float]:
    """The NO2 map value as the HTTP API serves it: /api/v1/aggregates and SensorThings Observations."""
    server = make_server(str(store.path) if isinstance(store, SQLiteStore) else store.dsn, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        rows = _http_json(f"{base}/api/v1/aggregates?format=json&scheme=h3:10&quantity=no2_ppb")
        obs = _http_json(f"{base}/sta/v1.1/Observations")["value"]
    finally:
        server.shutdown()
        server.server_close()
    (row,) = rows
    (sta,) = [o for o in obs if "no2_ppb" in o["@iot.id"]]
    return float(row["value"]), float(sta["result"])


def test_a_correction_reaches_every_reader(make: MakeStore, tmp_path: Any) -> None:
    s, ing, v1 = _van_a_day(make, tmp_path)
    assert all(c == v1.id for _, c in _observed(s, "van-a").values())

    # A retroactive co-location: v2 valid from before the day's first sample.
    v1_closed, v2 = _correct(tmp_path, "van-a", T0, slope=1.3, intercept_ppb=2.0)
    _upload(ing, _records("van-a", 200, v1_closed, v2), LATER)

    got = _observed(s, "van-a")
    assert sorted(got) == list(range(1, N + 1))
    for i, (v, cal) in got.items():
        assert cal == v2.id
        assert math.isclose(v, _ppb(v2, i), rel_tol=1e-9), (i, v, _ppb(v2, i))
    gap = max(abs(_ppb(v2, i) - _ppb(v1, i)) for i in got)
    assert gap > 3.0, "v1 and v2 really differ here: a reader of the old value would be seen"

    # History: v1 kept (superseded, with its window closed), and the van's own v1 values untouched.
    assert _history(s, "van-a") == [(v1.id, "superseded"), (v2.id, "active")]
    raw = q(s, "SELECT vals FROM samples WHERE device='van-a' AND sensor='no2' AND seq=11")[0][0]
    raw = json.loads(raw) if isinstance(raw, str) else raw
    assert raw["cal"] == v1.id and math.isclose(raw["no2_ppb"], _ppb(v1, 5))

    # Maps: the one pass's mean of the v2 values (rule relaxed: one pass on one day publishes).
    build(s.conn, H3Snapper(10), [Period("all")], rule=Rule(min_passes=1, min_days=1))
    ((map_value,),) = q(s, "SELECT value FROM aggregates WHERE quantity='no2_ppb'")
    want = sum(_ppb(v2, i) for i in got) / len(got)
    assert math.isclose(map_value, want, abs_tol=1e-3), (map_value, want)

    # Exports: value and calibration per row.
    out = io.StringIO()
    export_measurements(s.conn, out, "csv", quantities=("no2_ppb",))
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == N
    for r in rows:
        i = round(int(r["t_utc_ms"]) / 1000 - T0)
        assert r["calibration"] == v2.id and math.isclose(float(r["value"]), _ppb(v2, i), rel_tol=1e-9)

    # The API serves the maps: both routes give the v2 mean.
    api, sta = _api_values(s)
    assert math.isclose(api, want, abs_tol=1e-3) and math.isclose(sta, want, abs_tol=1e-3)
    print(f"NO2 map by v1 {sum(_ppb(v1, i) for i in got) / len(got):.3f} ppb -> by v2 {want:.3f} ppb "
          f"(largest per-value change {gap:.2f} ppb); API {api:.3f}, SensorThings {sta:.3f}")


def test_a_window_recomputes_only_what_it_covers(make: MakeStore, tmp_path: Any) -> None:
    s, ing, v1 = _van_a_day(make, tmp_path)
    before = _observed(s, "van-a")

    # v2 holds for seconds 20..39 only (a bounded window, as a superseded record has).
    v1_closed, v2 = _correct(tmp_path, "van-a", T0 + 19.5, slope=0.8, intercept_ppb=-3.0)
    v2 = dataclasses.replace(v2, valid_to=T0 + 39.5)
    _upload(ing, _records("van-a", 200, v2), LATER)

    got = _observed(s, "van-a")
    inside = {i for i in got if 20 <= i <= 39}
    assert len(inside) == 20
    for i, (v, cal) in got.items():
        if i in inside:
            assert cal == v2.id and math.isclose(v, _ppb(v2, i), rel_tol=1e-9)
        else:
            assert (v, cal) == before[i], f"second {i}, outside v2's window, was touched"
            assert cal == v1.id and math.isclose(v, _ppb(v1, i), rel_tol=1e-9)

    # The window moves (v2 re-sent valid 30..49): 20..29 go back to v1, 40..49 now v2.
    _upload(ing, _records("van-a", 300, dataclasses.replace(v2, valid_from=T0 + 29.5, valid_to=T0 + 49.5)),
            LATER + 1000)
    got = _observed(s, "van-a")
    for i, (v, cal) in got.items():
        rec = v2 if 30 <= i <= 49 else v1
        assert cal == rec.id and math.isclose(v, _ppb(rec, i), rel_tol=1e-9), (i, cal)
    assert [i for i, _ in _history(s, "van-a")] == [v1.id, v2.id]

    # v1 closed at second 10: seconds no record covers lose their derived value and serve the
    # van's own again (tagged v1 by the van), the rest is kept.
    _upload(ing, _records("van-a", 400, dataclasses.replace(v1_closed, valid_to=T0 + 10.5)), LATER + 2000)
    derived = {round(t / 1000 - T0): cal for t, cal in q(
        s, "SELECT p.t_utc_ms, d.calibration FROM derived d JOIN positions p"
        " ON p.device = d.device AND p.epoch = d.epoch AND p.seq = d.seq")}
    assert derived == {**{i: v1.id for i in range(1, 11)}, **{i: v2.id for i in range(30, 50)}}
    assert _observed(s, "van-a")[20] == (_ppb(v1, 20), v1.id)


def test_a_moved_sensor_keeps_both_vans_records(make: MakeStore, tmp_path: Any) -> None:
    """Serial X rides in van A on day 1, then moves to van B with a record of B's own."""
    s, ing, in_a = _van_a_day(make, tmp_path)
    a_before = _observed(s, "van-a")

    in_b = _confirmed(tmp_path, "van-b", t=T0 + 86_000, slope=1.6)  # B's technician checked it on arrival
    assert in_b.id == in_a.id and in_b.values != in_a.values
    day2 = _day("van-b", in_b)
    for smp in day2.samples:  # the same seconds a day later
        smp.t_utc_ms = smp.t_utc_ms + 86_400_000 if smp.t_utc_ms is not None else None
    _upload(ing, day2, LATER)

    rows = q(s, "SELECT device, kind, serial, version, id FROM calibrations ORDER BY device")
    assert rows == [("van-a", "no2", SERIAL, 1, in_a.id), ("van-b", "no2", SERIAL, 1, in_b.id)]
    assert CalibrationRecord.from_json(q(s, "SELECT record FROM calibrations WHERE device='van-a'")[0][0]) == in_a
    assert _observed(s, "van-a") == a_before, "van A's values keep van A's record"
    b = q(s, "SELECT t_utc_ms, value, calibration FROM observations WHERE device='van-b' AND quantity='no2_ppb'")
    assert len(b) == N
    for t, v, cal in b:
        i = round(t / 1000 - T0 - 86_400)
        assert cal == in_b.id and math.isclose(float(v), _ppb(in_b, i), rel_tol=1e-9)


def test_received_time_is_the_receivers(make: MakeStore, tmp_path: Any) -> None:
    """Inline and queued (``--derive separate``) derivation both store when the receiver took a record."""
    s = make()
    inline, queued = Ingestor(s), Ingestor(s, derive=False)
    v1 = _confirmed(tmp_path, "van-a")
    _upload(inline, _day("van-a", v1), RECEIVED)
    assert q(s, "SELECT received_utc_ms FROM calibrations") == [(RECEIVED,)]

    # Announced again at the next agent start, unchanged: still the time it first came.
    _upload(inline, _records("van-a", 200, v1), RECEIVED + 5000)
    assert q(s, "SELECT received_utc_ms FROM calibrations") == [(RECEIVED,)]

    # A correction stored by a fast receiver and derived later from the queue.
    v1_closed, v2 = _correct(tmp_path, "van-a", T0)
    _upload(queued, _records("van-a", 300, v1_closed, v2), LATER)
    assert s.derive_pending() == 1
    assert q(s, "SELECT id, received_utc_ms FROM calibrations ORDER BY version") == [
        (v1.id, LATER), (v2.id, LATER)]
    assert {c for _, c in _observed(s, "van-a").values()} == {v2.id}


def test_without_a_record_at_the_receiver_the_vans_value_and_tag_are_served(make: MakeStore,
                                                                             tmp_path: Any) -> None:
    """Records not (yet) at the DataLab: the van's own value, with the record id it was tagged with;
    a value no record calibrated (PM here) says so with NULL."""
    s = make()
    v1 = _confirmed(tmp_path, "van-a")
    day = _day("van-a", v1)
    day.samples = [smp for smp in day.samples if smp.sensor != "calibration"]
    day.first_seq = 2  # a batch is named after its first sample (receiver/batch_consistency.py)
    day.samples.append(Sample("pm", int((T0 + 5.5) * 1000), 0, TimeSource.GPS, {"pm25": 7.0}, (), 500, "boot"))
    day.last_seq = 500
    _upload(Ingestor(s), day, RECEIVED)
    got = _observed(s, "van-a")
    assert len(got) == N and all(cal == v1.id and math.isclose(v, _ppb(v1, i)) for i, (v, cal) in got.items())
    assert q(s, "SELECT count(*) FROM derived") == [(0,)]
    assert q(s, "SELECT value, calibration FROM observations WHERE quantity='pm25'") == [(7.0, None)]
