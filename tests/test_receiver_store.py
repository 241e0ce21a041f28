import pytest

from core.errors import PayloadError
from core.sample import Sample, TimeSource
from receiver.ingest import Ingestor
from receiver.store import SQLiteStore
from core.wire import Batch, Gap, content_hash, decode_ack, encode_ack, encode_batch

T = 1_790_000_000_000
RECEIVED = T + 3_600_000


def tick(seq, t_s, gps=True, lat=None):
    out = [Sample("pm", T + t_s * 1000, t_s * 1000, TimeSource.GPS, {"pm25": 10.0 + t_s}, (), seq)]
    if gps:
        out.append(Sample("gps", T + t_s * 1000 + 200, t_s * 1000, TimeSource.GPS,
                          {"lat": lat if lat is not None else 52.0 + t_s * 1e-4, "lon": 4.6, "speed": 5.0,
                           "fix_quality": 1}, (), seq + 1))
    else:
        out.append(Sample("gps", T + t_s * 1000 + 200, t_s * 1000, TimeSource.GPS,
                          {"fix_quality": 0}, ("no_fix",), seq + 1))
    return out


def batch(first_tick, n_ticks, gps_off=(), device="van-001", epoch="e1"):
    samples = []
    for i in range(first_tick, first_tick + n_ticks):
        samples += tick(2 * i + 1, i, gps=i not in gps_off)
    return Batch(device, epoch, samples[0].seq, samples[-1].seq, samples)


def put(store, b, gaps=()):
    b.gaps = list(gaps)
    payload = encode_batch(b)
    return store.ingest(b, content_hash(payload), RECEIVED)


def test_ingest_is_idempotent(tmp_path):
    s = SQLiteStore(tmp_path / "d.sqlite")
    b = batch(0, 10)
    assert put(s, b).status == "stored"
    r = put(s, b)
    assert r.status == "duplicate" and r.duplicate_samples == 20
    c = s.counts()
    assert c["samples"] == 20 and c["batches_duplicate"] == 1 and c["samples_duplicate"] == 20


def test_same_id_other_content_is_refused(tmp_path):
    s = SQLiteStore(tmp_path / "d.sqlite")
    b = batch(0, 3)
    put(s, b)
    b.samples[0].values["pm25"] = 999.0
    with pytest.raises(PayloadError, match="different content"):
        put(s, b)
    # the original stays as it arrived
    v = s.conn.execute("SELECT vals FROM samples WHERE seq=1").fetchone()[0]
    assert '"pm25":10.0' in v


def test_positions_join_within_and_across_batches(tmp_path):
    s = SQLiteStore(tmp_path / "d.sqlite", max_gap_s=10)
    put(s, batch(0, 5))
    # the pm sample of tick 4 is 200 ms before the gps fix of tick 4, which came in the same batch:
    rows = dict(s.conn.execute("SELECT seq, state FROM positions").fetchall())
    assert all(rows[2 * i + 1] == "interpolated" for i in range(1, 5))
    assert rows[1] == "pending" or rows[1] == "no_fix"  # before the first fix
    lat = s.conn.execute("SELECT lat FROM positions WHERE seq=5").fetchone()[0]
    # pm at t=2.0 s lies between fixes at 1.2 s and 2.2 s: 80 % of the way
    assert abs(lat - (52.0 + 1e-4 + 0.8 * 1e-4)) < 1e-9


def test_pending_resolved_by_the_next_batch_and_gaps_flagged(tmp_path):
    s = SQLiteStore(tmp_path / "d.sqlite", max_gap_s=10)
    # ticks 0-4; GPS lost for ticks 5..24 (tunnel), back at 25
    put(s, batch(0, 5))
    put(s, batch(5, 20, gps_off=range(5, 25)))
    put(s, batch(25, 5))
    states = dict(s.conn.execute("SELECT seq, state FROM positions").fetchall())
    assert states[2 * 10 + 1] == "no_fix"  # 20 s without a fix: not guessed
    assert states[2 * 26 + 1] == "interpolated"


def test_late_backlog_upgrades_no_fix(tmp_path):
    """A batch with fixes that arrives after newer data (a drained backlog) fills the hole."""
    s = SQLiteStore(tmp_path / "d.sqlite", max_gap_s=10)
    put(s, batch(0, 3))
    put(s, batch(30, 3))
    put(s, batch(3, 27))  # arrives last
    states = dict(s.conn.execute("SELECT seq, state FROM positions").fetchall())
    assert all(st in ("interpolated", "exact") for q, st in states.items() if q > 1)


def test_gaps_are_stored(tmp_path):
    s = SQLiteStore(tmp_path / "d.sqlite")
    put(s, batch(10, 2), gaps=[Gap(1, 20, "buffer cap: oldest dropped")])
    assert s.conn.execute("SELECT first_seq, last_seq, reason FROM gaps").fetchall() == [
        (1, 20, "buffer cap: oldest dropped")
    ]


def test_observations_view(tmp_path):
    s = SQLiteStore(tmp_path / "d.sqlite")
    put(s, batch(0, 3))
    rows = s.conn.execute(
        "SELECT quantity, value, position FROM observations WHERE seq=3"
    ).fetchall()
    assert rows == [("pm25", 11.0, "interpolated")]


def test_ingestor_accepts_and_rejects(tmp_path):
    s = SQLiteStore(tmp_path / "d.sqlite")
    ing = Ingestor(s)
    b = batch(0, 2)
    payload = encode_batch(b)
    out = ing.handle("datalab/v1/van-001/batch", payload, RECEIVED)
    assert out.device == "van-001" and out.ack.status == "stored"
    assert ing.handle("datalab/v1/van-001/batch", payload, RECEIVED).ack.status == "duplicate"
    # published on another van's topic: refused, the store is untouched
    out = ing.handle("datalab/v1/van-002/batch", payload, RECEIVED)
    assert out.ack.status == "rejected" and "claims device" in out.ack.reason
    # garbage: refused with its hash so the sender can tell which upload it was
    out = ing.handle("datalab/v1/van-002/batch", b"\x00garbage", RECEIVED)
    assert out.ack.status == "rejected" and out.ack.sha256 == content_hash(b"\x00garbage")
    assert decode_ack(encode_ack(out.ack)) == out.ack
    dl = s.conn.execute("SELECT device, reason FROM dead_letters ORDER BY id").fetchall()
    assert [d for d, _ in dl] == ["van-002", "van-002"]
    assert s.counts()["samples"] == 4 and s.counts()["dead_letters"] == 2


def test_impossible_times_are_never_stored(tmp_path):
    s = SQLiteStore(tmp_path / "d.sqlite")
    b = batch(0, 3)
    b.samples[0].t_utc_ms = 315_964_800_000  # 1980: a receiver's default date
    b.samples[2].t_utc_ms = RECEIVED + 400 * 86_400_000  # next year
    b.samples[4].t_utc_ms = None  # the device already said: unknown
    put(s, b)
    rows = dict(s.conn.execute("SELECT seq, t_utc_ms FROM samples").fetchall())
    assert rows[1] is None and rows[3] is None and rows[5] is None
    assert rows[2] is not None
    flags = s.conn.execute("SELECT flags FROM samples WHERE seq=1").fetchone()[0]
    assert "time_implausible" in flags
    assert s.conn.execute("SELECT state FROM positions WHERE seq=1").fetchone()[0] == "no_time"


def test_stored_json_orjson_refuses_reads_back_with_64_bit_integers_exact() -> None:
    """``read_json``'s fallback (rows orjson refuses, e.g. a 10^400 stored before the admission
    schema): a negative 19-digit integer is 20 characters with its sign and used to read as
    NaN (issue 13 review); what 64 bits or a double cannot hold is NaN, never inf or a bigint."""
    import math

    from receiver.store import read_json

    row = ('{"neg19": -1234567890123456789, "min": -9223372036854775808, "max": 9223372036854775807,'
           ' "over": 9223372036854775808, "under": -9223372036854775809, "huge": 1e400, "pos19": 1234567890123456789,'
           ' "digits": -' + "9" * 5000 + "}")
    got = read_json(row)
    assert got["neg19"] == -1234567890123456789 and got["pos19"] == 1234567890123456789
    assert got["min"] == -(2**63) and got["max"] == 2**63 - 1
    assert all(math.isnan(got[k]) for k in ("over", "under", "huge", "digits")), got
