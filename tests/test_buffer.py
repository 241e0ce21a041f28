import sqlite3

from buffer.store import Buffer
from core.sample import Sample, TimeSource
from core.wire import content_hash, decode_batch


def samples(n, t0=0):
    return [
        Sample("pm", 1_700_000_000_000 + (t0 + i) * 1000, (t0 + i) * 1000, TimeSource.NTP, {"pm25": float(i)})
        for i in range(n)
    ]


def test_wal_and_full_sync(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", "van-001")
    assert b._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert b._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_commit_assigns_consecutive_seqs_never_reused(tmp_path):
    path = tmp_path / "b.sqlite"
    b = Buffer(path, "van-001")
    assert b.commit(samples(3)) == [1, 2, 3]
    sealed = b.seal(100, 0)
    assert (sealed.first_seq, sealed.last_seq) == (1, 3)
    assert b.acknowledge(1)
    epoch = b.epoch
    b.close()
    b = Buffer(path, "van-001")  # a reboot: same epoch, numbering goes on
    assert b.epoch == epoch
    assert b.commit(samples(2)) == [4, 5]


def test_new_file_new_epoch(tmp_path):
    a = Buffer(tmp_path / "a.sqlite", "van-001")
    b = Buffer(tmp_path / "b.sqlite", "van-001")
    assert a.epoch != b.epoch and len(a.epoch) == 16


def test_seal_is_immutable_and_hashed(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", "van-001")
    b.commit(samples(10))
    s1 = b.seal(4, 0)
    s2 = b.seal(4, 0)
    assert (s1.first_seq, s1.last_seq, s2.first_seq, s2.last_seq) == (1, 4, 5, 8)
    assert b.unsealed_count == 2
    assert content_hash(s1.payload) == s1.sha256
    again = b.get(1)
    assert again.payload == s1.payload and again.batch_id == s1.batch_id
    decoded = decode_batch(s1.payload)
    assert [s.seq for s in decoded.samples] == [1, 2, 3, 4]
    assert decoded.samples[2].values == {"pm25": 2.0}
    # sealed samples left the samples table in the same transaction
    assert b._db.execute("SELECT count(*) FROM samples").fetchone()[0] == 2


def test_pending_oldest_first_with_exclusions(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", "van-001")
    b.commit(samples(9))
    for _ in range(3):
        b.seal(3, 0)
    assert [p.first_seq for p in b.pending(10)] == [1, 4, 7]
    assert [p.first_seq for p in b.pending(1, exclude={1})] == [4]
    assert b.acknowledge(4) and not b.acknowledge(4)
    assert [p.first_seq for p in b.pending(10)] == [1, 7]


def test_reject_writes_gap_that_travels_in_the_next_batch(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", "van-001")
    b.commit(samples(3))
    s = b.seal(10, 0)
    assert b.reject(s.first_seq, s.last_seq, "unsupported wire version")
    assert b.pending(10) == []
    b.commit(samples(2, t0=10))
    nxt = decode_batch(b.seal(10, 0).payload)
    assert [(g.first_seq, g.last_seq) for g in nxt.gaps] == [(1, 3)]
    assert "unsupported wire version" in nxt.gaps[0].reason
    # once that batch is acknowledged the gap is delivered and forgotten
    b.acknowledge(nxt.first_seq)
    assert b._db.execute("SELECT count(*) FROM gaps").fetchone()[0] == 0


def test_gap_alone_still_sealed(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", "van-001")
    b.add_gap(1, 50, "buffer cap")
    s = b.seal(10, 0)
    d = decode_batch(s.payload)
    assert d.samples == [] and d.gaps[0].reason == "buffer cap"


def test_stats_report_backlog_and_oldest(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", "van-001")
    b.commit(samples(5))
    b.seal(3, 0)
    st = b.stats()
    assert (st.unsealed, st.batches, st.backlog_samples, st.last_seq) == (2, 1, 5, 5)
    assert st.oldest_unsent_utc_ms == 1_700_000_000_000
    assert st.file_bytes > 0


def test_committed_data_survives_a_crash(tmp_path):
    """A commit that returned is durable: a second connection (a new process) sees it."""
    b = Buffer(tmp_path / "b.sqlite", "van-001")
    b.commit(samples(7))
    other = sqlite3.connect(tmp_path / "b.sqlite")
    assert other.execute("SELECT count(*) FROM samples").fetchone()[0] == 7
    assert b.integrity_ok()
