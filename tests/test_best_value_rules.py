"""One best value (issue 15 point 4), the rules tester v6 broke, on SQLite and PostgreSQL.

- an untagged NO2 sample takes a record only when it can be tied to one (the van's only serial);
- one window rule in whole ms: a bound with a fraction of a ms picks the same samples whether
  the record or the samples arrive first;
- a version's status follows the set of versions, not arrival order, inline or derived later;
- a routine confirmation (a new record after all data) recomputes nothing, and a recompute
  reads its samples a chunk at a time.

Every upload goes through the receiver's real ``Ingestor``; expected values come from
``no2_ppb_from_record`` on the raw electrode values, never from the receiver's derivation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

import receiver.calibration as rcal
from core.calibration import CalibrationRecord, no2_ppb_from_record
from core.sample import Sample, TimeSource
from receiver.ingest import Ingestor
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_best_value import LAT, LON, RECEIVED
from tests.test_calibration import T0, _cal_sample, sheet_values
from tests.test_store_contract import MakeStore, make, q  # noqa: F401  (make: fixture, used by name)
from core.wire import Batch, encode_batch

T0MS = int(T0 * 1000)


def _rec(device: str, serial: str, version: int, valid_from: float, valid_to: float | None = None,
         status: str = "active", **values: float) -> CalibrationRecord:
    return CalibrationRecord(id=f"no2:{serial}:v{version}", kind="no2", serial=serial, version=version,
                             technician="t", method="sheet" if version == 1 else "colocation",
                             values=sheet_values(**values), valid_from=valid_from, valid_to=valid_to,
                             created=valid_from, status=status, device=device)


def _raw(seq: int) -> tuple[float, float, float]:
    return 300.0 + 1.3 * (seq % 50), 306.0, 12.0  # every sample a different WE value


class Van:
    """Uploads of one van: records, and NO2 samples each placed by a GPS fix just before it."""

    def __init__(self, ing: Ingestor, device: str) -> None:
        self.ing, self.device, self.seq = ing, device, 0
        self.sent: dict[int, tuple[int, dict[str, Any]]] = {}  # NO2 seq -> (t_ms, values)

    def _upload(self, samples: list[Sample], received: int) -> None:
        batch = Batch(self.device, "e1", samples[0].seq, samples[-1].seq, samples)
        out = self.ing.handle(f"datalab/v1/{self.device}/batch", encode_batch(batch), received)
        assert out.ack is not None and out.ack.status == "stored", out.ack

    def records(self, recs: list[CalibrationRecord], received: int, seq: int | None = None) -> None:
        first = self.seq + 1 if seq is None else seq
        self._upload([_cal_sample(first + k, received / 1000 - 1, r) for k, r in enumerate(recs)], received)
        self.seq = max(self.seq, first + len(recs) - 1)

    def no2(self, times_ms: list[int], tag: CalibrationRecord | None, received: int, sensor: str = "no2") -> None:
        """NO2 samples as the van made them: its value by ``tag`` (None: its own sheet, untagged)."""
        samples = []
        for t in [*times_ms, times_ms[-1] + 500]:
            self.seq += 1
            samples.append(Sample("gps", t - 1, t - 1, TimeSource.GPS, {"lat": LAT, "lon": LON, "fix_quality": 1},
                                  (), self.seq, "boot"))
            if t == times_ms[-1] + 500:
                break  # a last fix after the last NO2 sample: every one is placed
            self.seq += 1
            we, ae, tc = _raw(self.seq)
            vals: dict[str, Any] = {"no2_we_mv": we, "no2_ae_mv": ae, "no2_temp_c": tc,
                                    "no2_ppb": no2_ppb_from_record(sheet_values() if tag is None else tag.values,
                                                                   we, ae, tc)}
            if tag is not None:
                vals["cal"] = tag.id
            samples.append(Sample(sensor, t, t, TimeSource.GPS, vals, (), self.seq, "boot"))
            self.sent[self.seq] = (t, vals)
        self._upload(samples, received)

    def served(self, s: Any) -> dict[int, tuple[float, str | None]]:
        """NO2 seq -> (value, calibration) as the observations view serves them."""
        return {int(seq): (float(v), c) for seq, v, c in q(
            s, "SELECT seq, value, calibration FROM observations WHERE device=? AND quantity='no2_ppb'",
            self.device)}

    def want(self, pick: Any) -> dict[int, tuple[float, str | None]]:
        """NO2 seq -> what must be served when ``pick(t_ms, values)`` names the record (None: the van's)."""
        out = {}
        for seq, (t, vals) in self.sent.items():
            rec = pick(t, vals)
            out[seq] = (vals["no2_ppb"], vals.get("cal")) if rec is None else (
                no2_ppb_from_record(rec.values, *_raw(seq)), rec.id)
        return out


def _same(got: dict[int, tuple[float, str | None]], want: dict[int, tuple[float, str | None]]) -> list[Any]:
    return [(k, got.get(k), want[k]) for k in want
            if k not in got or got[k][1] != want[k][1] or not math.isclose(got[k][0], want[k][0], rel_tol=1e-9)]


def _secs(*s: float) -> list[int]:
    return [T0MS + round(x * 1000) for x in s]


# -- 1. an untagged sample is tied to a record only when it can be --------------------------------

def test_an_untagged_second_sensor_is_not_calibrated_with_another_serial(make: MakeStore) -> None:
    s = make()
    van = Van(Ingestor(s), "van-a")
    a1 = _rec("van-a", "A", 1, T0 - 100)
    van.records([a1], RECEIVED)
    van.no2(_secs(*range(0, 20)), a1, RECEIVED + 1000)
    # Sensor B has no serial on the van: no record there, no tag. While A is the van's only
    # serial, its untagged samples are taken as A's (an older agent tags nothing).
    untagged_early = _secs(*[x + 0.5 for x in range(0, 10)])
    van.no2(untagged_early, None, RECEIVED + 2000, sensor="no2_b")
    early = [seq for seq, (_, v) in van.sent.items() if "cal" not in v]
    assert {van.served(s)[seq][1] for seq in early} == {a1.id}
    # B gets a serial and a record: the van has two serials now, so no untagged sample can be
    # tied to either; those stored already go back to the van's own value, uncalibrated.
    b1 = _rec("van-a", "B", 1, T0 + 60, we_e_mv=280.0, slope=1.4)
    van.records([b1], RECEIVED + 3000)
    untagged_late = _secs(*[x + 0.5 for x in range(10, 20)])
    van.no2(untagged_late, None, RECEIVED + 4000, sensor="no2_b")
    van.no2(_secs(*range(60, 70)), b1, RECEIVED + 5000, sensor="no2_b")

    def pick(t: int, vals: dict[str, Any]) -> CalibrationRecord | None:
        return None if "cal" not in vals else (a1 if vals["cal"] == a1.id else b1)
    got = van.served(s)
    assert not _same(got, van.want(pick))
    untagged = [got[seq] for seq, (t, v) in van.sent.items() if "cal" not in v]
    assert len(untagged) == 20 and all(c is None for _, c in untagged), "calibration NULL: not calibrated"


def test_an_untagged_sample_of_a_vans_only_serial_takes_its_records(make: MakeStore) -> None:
    s = make()
    van = Van(Ingestor(s), "van-a")
    a1 = _rec("van-a", "A", 1, T0 - 100)
    van.records([a1], RECEIVED)
    van.no2(_secs(*range(0, 20)), None, RECEIVED + 1000)  # an agent that tags nothing
    a1c, a2 = dataclasses.replace(a1, status="superseded", valid_to=T0 + 10), _rec("van-a", "A", 2, T0 + 10,
                                                                                   slope=1.2)
    van.records([a1c, a2], RECEIVED + 2000)
    assert not _same(van.served(s), van.want(lambda t, v: a2 if t >= T0MS + 10_000 else a1))


# -- 2. one window rule in whole ms --------------------------------------------------------------

@pytest.mark.parametrize("record_first", [False, True])
def test_sub_ms_bounds_pick_the_same_samples_in_either_order(make: MakeStore, record_first: bool) -> None:
    s = make()
    van = Van(Ingestor(s), "van-a")
    v1 = _rec("van-a", "A", 1, T0 - 100)
    v2 = _rec("van-a", "A", 2, T0 + 10.0004, T0 + 20.0004, slope=3.0)  # confirmed at time.time()
    v3 = _rec("van-a", "A", 3, T0 + 30.0, T0 + 40.0, slope=5.0)  # exact ms
    times = _secs(9.999, 10.0, 10.001, 19.999, 20.0, 20.001, 29.999, 30.0, 30.001, 39.999, 40.0, 40.001)
    van.records([v1], RECEIVED)
    if record_first:
        van.records([v2, v3], RECEIVED + 1000)
        van.no2(times, v1, RECEIVED + 2000)  # derived at arrival
    else:
        van.no2(times, v1, RECEIVED + 1000)
        van.records([v2, v3], RECEIVED + 2000)  # recomputed

    def pick(t: int, _: Any) -> CalibrationRecord:  # float seconds, as the records state them
        return next(r for r in (v3, v2, v1) if r.in_effect_at(t / 1000))
    got = van.served(s)
    assert not _same(got, van.want(pick))
    by_time = {van.sent[seq][0] - T0MS: c for seq, (_, c) in got.items()}
    assert [by_time[ms] for ms in (10_000, 10_001, 20_000, 20_001, 30_000, 40_000)] == [
        v1.id, v2.id, v2.id, v1.id, v3.id, v1.id]


# -- 3. status follows the set of versions -----------------------------------------------------

def _chain(device: str) -> tuple[CalibrationRecord, ...]:
    v1 = _rec(device, "A", 1, T0 - 100)
    v2 = _rec(device, "A", 2, T0 + 20, slope=1.2)
    v3 = _rec(device, "A", 3, T0 + 40, slope=0.7)
    return (v1, dataclasses.replace(v1, status="superseded", valid_to=T0 + 20), v2,
            dataclasses.replace(v2, status="superseded", valid_to=T0 + 40), v3)


@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize("order", ["in-order", "late-first-upload", "stale-resend"])
def test_a_version_going_backwards_never_reactivates(make: MakeStore, inline: bool, order: str) -> None:
    s = make()
    van = Van(Ingestor(s, derive=inline), "van-b")
    v1, v1c, v2, v2c, v3 = _chain("van-b")
    van.records([v1], RECEIVED)
    if not inline:
        s.derive_pending()
    van.no2(_secs(*range(0, 60)), v1, RECEIVED + 1000)
    if order == "late-first-upload":  # [v1c, v2] (seqs 62, 63) is delivered after [v2c, v3] (64, 65)
        van.records([v2c, v3], RECEIVED + 2000, seq=van.seq + 3)
        van.records([v1c, v2], RECEIVED + 3000, seq=van.seq - 3)
    else:
        van.records([v1c, v2], RECEIVED + 2000)
        van.records([v2c, v3], RECEIVED + 3000)
    if order == "stale-resend":  # v2 as announced active before v3 existed, delivered late
        van.records([v2], RECEIVED + 4000)
    if not inline:
        s.derive_pending()

    hist = q(s, "SELECT version, status, valid_from_ms, valid_to_ms FROM calibrations WHERE device='van-b'"
                " ORDER BY version")
    assert hist == [(1, "superseded", T0MS - 100_000, T0MS + 20_000), (2, "superseded", T0MS + 20_000, T0MS + 40_000),
                    (3, "active", T0MS + 40_000, None)]
    received = q(s, "SELECT version, received_utc_ms FROM calibrations WHERE device='van-b' ORDER BY version")
    assert received[1][1] in (RECEIVED + 2000, RECEIVED + 3000), "a stale re-send keeps the first received time"
    stored_v2 = CalibrationRecord.from_json(q(s, "SELECT record FROM calibrations WHERE device='van-b'"
                                                 " AND version=2")[0][0])
    assert stored_v2 == v2c
    assert not _same(van.served(s), van.want(
        lambda t, _: v3 if t >= T0MS + 40_000 else v2 if t >= T0MS + 20_000 else v1))


def test_any_newer_version_supersedes_the_older_ones(make: MakeStore) -> None:
    """v3 arrives already closed (its successor not yet here): v1, still active, is history now."""
    s = make()
    van = Van(Ingestor(s), "van-c")
    v1 = _rec("van-c", "A", 1, T0 - 100)
    van.records([v1], RECEIVED)
    van.records([_rec("van-c", "A", 3, T0 + 40, T0 + 50, status="superseded", slope=0.7)], RECEIVED + 1000)
    assert q(s, "SELECT version, status FROM calibrations WHERE device='van-c' ORDER BY version") == [
        (1, "superseded"), (3, "superseded")]
    stored = CalibrationRecord.from_json(q(s, "SELECT record FROM calibrations WHERE version=1")[0][0])
    assert stored == dataclasses.replace(v1, status="superseded"), "the stored record says what the row says"


# -- 4. cost: a confirmation recomputes nothing; reads are chunked ----------------------------

def test_a_routine_confirmation_reads_and_rewrites_nothing(make: MakeStore, monkeypatch: Any) -> None:
    s = make()
    van = Van(Ingestor(s), "van-l")
    n = 600
    v1 = _rec("van-l", "A", 1, T0 - 100)
    van.records([v1], RECEIVED)
    for k in range(0, n, 200):
        van.no2(_secs(*range(k, k + 200)), v1, RECEIVED + 1000 + k)
    derived = q(s, "SELECT epoch, seq, value, calibration FROM derived ORDER BY seq")
    assert len(derived) == n

    # The van's technician confirms v2 after the day: v1 closed where v2 starts, no stored value changes.
    rcal.stats.rows_read = 0
    v1c, v2 = dataclasses.replace(v1, status="superseded", valid_to=T0 + n + 5), _rec("van-l", "A", 2, T0 + n + 5)
    van.records([v1c, v2], RECEIVED + 10_000)
    assert rcal.stats.rows_read == 0, "a confirmation after all data must read no sample"
    assert q(s, "SELECT epoch, seq, value, calibration FROM derived ORDER BY seq") == derived
    assert q(s, "SELECT id, status FROM calibrations WHERE device='van-l' ORDER BY version") == [
        (v1.id, "superseded"), (v2.id, "active")]

    # A correction of 100 s in the middle reads those 100 samples, 30 at a time, and fixes all of them.
    monkeypatch.setattr(rcal, "CHUNK", 30)
    rcal.stats.rows_read = rcal.stats.largest_read = 0
    v3 = _rec("van-l", "A", 3, T0 + 250, T0 + 350, slope=0.9)
    van.records([v3], RECEIVED + 11_000)
    assert rcal.stats.rows_read == 100 and rcal.stats.largest_read == 30
    got = van.served(s)
    assert not _same(got, van.want(lambda t, _: v3 if T0MS + 250_000 <= t < T0MS + 350_000 else v1))
    assert sum(1 for _, c in got.values() if c == v3.id) == 100


def test_changed_spans_compare_the_record_in_effect() -> None:
    """The spans a change recomputes, from the records before and after (no store needed)."""
    def recs(*rs: CalibrationRecord) -> rcal.Records:
        items = sorted(rs, key=lambda r: -r.version)
        return rcal.Records(tuple((r, rcal._bound_ms(r.valid_from), rcal._bound_ms(r.valid_to))  # type: ignore[misc]
                                  for r in items), "A")
    v1 = _rec("d", "A", 1, T0)
    end = T0 + 1000
    v1c, v2 = dataclasses.replace(v1, status="superseded", valid_to=end), _rec("d", "A", 2, end, slope=2.0)
    assert rcal.changed_spans(recs(v1), recs(v1c, v2)) == [(int(end * 1000), None)]
    # The same record re-sent: nothing. Its window moved on: only the ms it gained or lost.
    assert rcal.changed_spans(recs(v1), recs(v1)) == []
    w = _rec("d", "A", 3, T0 + 10, T0 + 20, slope=3.0)
    moved = dataclasses.replace(w, valid_from=T0 + 15, valid_to=T0 + 25.0005)
    assert rcal.changed_spans(recs(v1, w), recs(v1, moved)) == [(T0MS + 10_000, T0MS + 15_000),
                                                                (T0MS + 20_000, T0MS + 25_001)]


# -- 5. PostgreSQL: the observations view is planned well before any ANALYZE ---------------------

def test_observations_plan_probes_derived_and_quality_by_key_without_statistics(pg_cluster: Any) -> None:  # noqa: F811
    """A fresh store (never ANALYZEd): the docs' check query and a full read of the view probe
    ``derived`` and ``quality`` by their primary key per value, never a nested loop filtering
    samples x derived (8.3 s at 10,000 samples before this view; a plan, not a clock, is asserted)."""
    import uuid

    from receiver.store_pg import PostgresStore
    name = f"t_{uuid.uuid4().hex[:12]}"
    s = PostgresStore(pg_cluster.create_database(name))
    try:
        van = Van(Ingestor(s), "van-o")
        v1 = _rec("van-o", "A", 1, T0 - 100)
        van.records([v1], RECEIVED)
        van.no2(_secs(*range(0, 300)), v1, RECEIVED + 1000)
        analyzed = q(s, "SELECT count(*) FROM pg_stat_user_tables WHERE relname IN ('samples', 'derived')"
                        " AND (last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL)")
        assert analyzed == [(0,)], "the point is a store without statistics"
        check = ("SELECT calibration, count(*), avg(value::float8) FROM observations WHERE device = 'van-o'"
                 " AND quantity = 'no2_ppb' GROUP BY 1")
        for sql in (check, "SELECT * FROM observations WHERE device = 'van-o'"):
            plan = "\n".join(r[0] for r in q(s, "EXPLAIN " + sql))
            for table in ("derived", "quality"):
                scans = [line for line in plan.splitlines() if f" on {table} " in line]
                assert scans, plan
                assert all("_pkey" in line for line in scans), plan
                assert f"Join Filter: (({table[0]}.device = s.device)" not in plan, plan
            assert "(seq = s.seq)" in plan, plan  # the probe is parameterized by the sample's key
        ((cal, n, mean),) = q(s, check)
        assert (cal, n) == (v1.id, 300)
        want = van.want(lambda t, _: v1)
        assert math.isclose(mean, sum(v for v, _ in want.values()) / 300, rel_tol=1e-9)
    finally:
        s.close()
        pg_cluster.drop_database(name)


# -- flags judge the served value, under any section name ---------------------------------------

@pytest.mark.parametrize("section", ["no2", "dgs_no2"])
def test_flags_of_a_recomputed_value_follow_it_under_any_section_name(make: MakeStore, section: str) -> None:
    """The van computed with a wrong electronic zero (values far below -50 ppb: out_of_range); the
    correction makes them ordinary, so their flags go and the maps count them."""
    s = make()
    van = Van(Ingestor(s), "van-f")
    bad = _rec("van-f", "A", 1, T0 - 100, we_e_mv=400.0)
    van.records([bad], RECEIVED)
    van.no2(_secs(*range(0, 40)), bad, RECEIVED + 1000, sensor=section)
    rows = q(s, "SELECT value, quality FROM observations WHERE device='van-f' AND quantity='no2_ppb'")
    assert all(v < -50 and "out_of_range" in (f or "") for v, f in rows), rows[:3]
    good = _rec("van-f", "A", 2, T0 - 100)
    van.records([dataclasses.replace(bad, status="superseded", valid_to=T0 - 100), good], RECEIVED + 2000)
    rows = q(s, "SELECT value, quality FROM observations WHERE device='van-f' AND quantity='no2_ppb'")
    assert len(rows) == 40 and all(v > -50 for v, _ in rows)
    assert not [f for _, f in rows if "out_of_range" in (f or "")], "flags of the van's value stayed"
