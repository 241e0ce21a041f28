"""The buffer under what a van does to it: a full cap, a full disk, corrupt files, SIGKILL."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from buffer import recovery
from buffer.errors import BufferFullError
import buffer.store as store_mod
from buffer.store import Buffer
from core.errors import RecoverableError
from core.sample import Sample, TimeSource
from tests.tmpfs import mounted_tmpfs
from core.wire import decode_batch

ROOT = Path(__file__).resolve().parents[1]


def samples(n: int, t0: int = 0) -> list[Sample]:
    return [
        Sample(
            f"pm{(t0 + i) % 4}",
            1_700_000_000_000 + (t0 + i) * 1000,
            (t0 + i) * 1000,
            TimeSource.NTP,
            {"pm1": 1.0 + i, "pm25": 2.5 * i, "pm10": 10.25, "rh": 55.5, "note": "x" * 40},
            boot_id="b" * 32,
        )
        for i in range(n)
    ]


def expand(ranges) -> set[int]:
    return {q for a, b in ranges for q in range(a, b + 1)}


def present_seqs(b: Buffer) -> set[int]:
    """Seqs of this epoch still in the buffer: unsealed rows and sealed batch contents."""
    out = {r[0] for r in b._db.execute("SELECT seq FROM samples")}
    for (payload,) in b._db.execute("SELECT payload FROM batches"):
        out |= {s.seq for s in decode_batch(payload).samples}
    return out


def gap_seqs(b: Buffer) -> list[tuple[int, int, str]]:
    return [tuple(r) for r in b._db.execute("SELECT first_seq, last_seq, reason FROM gaps ORDER BY id")]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def quarantines(tmp_path: Path) -> list[Path]:
    root = tmp_path / "quarantine"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


# --- pragmas -------------------------------------------------------------------


def test_pragmas_are_explicit(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", "van-001", max_bytes=64 << 20, wal_autocheckpoint=500)
    q = lambda p: b._db.execute(f"PRAGMA {p}").fetchone()[0]  # noqa: E731
    assert q("journal_mode") == "wal" and q("synchronous") == 2
    assert q("wal_autocheckpoint") == 500
    assert q("journal_size_limit") == 500 * 4096
    assert q("auto_vacuum") == 0 and q("page_size") == 4096


# --- size cap --------------------------------------------------------------------


def test_cap_drops_oldest_with_exact_gaps_and_stays_under_cap(tmp_path):
    cap = 1 << 20
    b = Buffer(tmp_path / "b.sqlite", "van-001", max_bytes=cap, reserve_bytes=0)
    committed: list[int] = []
    max_size = 0
    for i in range(1500):  # 30 000 samples of ~150 bytes: several times the cap
        committed += b.commit(samples(20, i * 20))
        if i % 7 == 0:
            b.seal(100, 0)
        max_size = max(max_size, b.file_bytes())
    assert max_size <= cap, max_size
    present = present_seqs(b)
    gaps = gap_seqs(b)
    dropped = expand((g[0], g[1]) for g in gaps)
    assert gaps and all(g[2].startswith("buffer full: ") for g in gaps)
    # Every committed sample is either still here or covered by a gap: exactly, no overlap.
    assert present | dropped == set(committed)
    assert not present & dropped
    # Oldest first: everything dropped is older than everything kept; the newest is kept.
    assert max(dropped) < min(present)
    assert set(committed[-2000:]) <= present
    c = b.counters()
    assert c["samples_dropped"] == len(dropped)
    assert b.stats().samples_dropped == len(dropped) and b.stats().gap_records == c["gap_records"]
    # Gap records are not kept per chunk: adjacent drops merge into few records.
    assert len(gaps) < 50
    assert b.integrity_ok()


def test_cap_gaps_are_uploaded_in_the_next_batch(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", "van-001", max_bytes=1 << 20, reserve_bytes=0)
    for i in range(600):
        b.commit(samples(20, i * 20))
    expected = [(a, z) for a, z, _ in gap_seqs(b)]
    assert expected
    carried = []
    while (sb := b.seal(1000, 0)) is not None:
        carried += [(g.first_seq, g.last_seq) for g in decode_batch(sb.payload).gaps]
    assert carried == expected


def test_dropping_a_batch_requeues_the_gaps_it_carried(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", "van-001", max_bytes=1 << 20, reserve_bytes=0)
    b.commit(samples(3))
    s = b.seal(10, 0)
    b.reject(s.first_seq, s.last_seq, "bad")  # a gap record (1, 3)
    b.commit(samples(5, 10))
    carrier = b.seal(10, 0)
    assert [(g.first_seq, g.last_seq) for g in decode_batch(carrier.payload).gaps] == [(1, 3)]
    for i in range(600):  # push the carrier out under the cap
        b.commit(samples(20, 100 + i * 20))
    assert b.get(carrier.first_seq) is None
    unsent = [tuple(r) for r in b._db.execute("SELECT first_seq, last_seq FROM gaps WHERE sent_in IS NULL")]
    assert (1, 3) in unsent and (carrier.first_seq, carrier.last_seq) in unsent


def test_deleted_pages_are_reused_not_grown(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", "van-001", max_bytes=1 << 20, reserve_bytes=0)
    for i in range(400):
        b.commit(samples(20, i * 20))
    pages_then = b._pages()[0]
    for i in range(400, 1600):
        b.commit(samples(20, i * 20))
    assert b._pages()[0] <= pages_then + 8  # the file stopped growing: freed pages are reused


# --- disk full -------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 3 MiB file system (tmpfs), or a skip when mounting is not allowed."""
    with mounted_tmpfs(tmp_path / "mnt", "3m") as mnt:
        yield mnt


def _fill(path: Path, leave: int) -> None:
    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    with open(path, "wb") as f:
        f.write(b"\1" * max(0, free - leave))


def test_real_full_disk_keeps_what_was_committed_and_lives_in_its_own_pages(tiny_fs):
    b = Buffer(tiny_fs / "b.sqlite", "van-001", max_bytes=256 << 20, wal_autocheckpoint=32)
    assert b.reserve_path.exists()
    committed: list[int] = []
    for i in range(30):
        committed += b.commit(samples(20, i * 20))
    _fill(tiny_fs / "filler", leave=0)  # someone else (logs) took every last block
    full_errors = 0
    i = 30
    while full_errors < 20 and i < 5000:  # the reserve and sealing (compression) buy time
        try:
            committed += b.commit(samples(20, i * 20))
        except BufferFullError as exc:
            assert isinstance(exc, RecoverableError)
            full_errors += 1
            assert b.disk_full
        if i % 5 == 0:
            b.seal(200, 0)
        i += 1
    assert full_errors > 0, "the disk never filled: nothing exercised"
    assert not b.reserve_path.exists()  # given up to let the buffer breathe
    # Nothing committed was dropped to make room: all of it is still here, no gap record.
    assert b.counters().get("samples_dropped", 0) == 0 and gap_seqs(b) == []
    assert present_seqs(b) == set(committed)
    assert b.unsealed_count == b._count_unsealed() >= 0
    # The receiver acknowledges: deleted (or, with no room even for that, hidden and
    # deleted later). Either way the pages come back and commits go on, still full.
    acked = 0
    for sb in b.pending(10_000):
        assert b.acknowledge(sb.batch_id)
        assert b.get(sb.batch_id) is None and sb.batch_id not in {p.batch_id for p in b.pending(10_000)}
        acked += sb.n_samples
    b.housekeep()
    ok = 0
    for k in range(20):
        committed += b.commit(samples(20, (i + k) * 20))
        ok += 1
    print(f"[full-disk] full_errors={full_errors} acked_samples={acked} commits_after_acks={ok}")
    assert acked > 0 and ok == 20 and not b.disk_full
    assert b.integrity_ok()
    (tiny_fs / "filler").unlink()
    b.housekeep()
    assert b.reserve_path.exists()  # space returned: the reserve is back
    b.close()
    assert Buffer(tiny_fs / "b.sqlite", "van-001", check_on_open=True).integrity_ok()


def test_full_disk_raises_recoverable_then_resumes_when_space_returns(tiny_fs):
    b = Buffer(tiny_fs / "b.sqlite", "van-001", wal_autocheckpoint=32, reserve_bytes=0)
    first = b.commit(samples(20))
    _fill(tiny_fs / "filler", leave=0)
    with pytest.raises(BufferFullError):
        for i in range(1, 2000):
            b.commit(samples(200, i * 200))
    assert b.integrity_ok() and b.disk_full
    assert set(first) <= present_seqs(b) and gap_seqs(b) == []
    (tiny_fs / "filler").unlink()
    assert len(b.commit(samples(20, 10**6))) == 20  # liveness once space is back
    assert not b.disk_full


class _CardRefusingDeletes(Buffer):
    """A card with no room even for the WAL frames of a delete: SQLite's own error, injected."""

    refuse = False

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        delete_batch = self._acks._delete_batch  # the acknowledger's delete (buffer.ack)

        def refusing(key):  # type: ignore[no-untyped-def]
            if self.refuse:
                raise sqlite3.OperationalError("database or disk is full")
            return delete_batch(key)

        self._acks._delete_batch = refusing  # type: ignore[method-assign]


def test_ack_on_a_full_disk_is_recorded_not_lost(tmp_path):
    """With no room even for a delete, an ack hides the batch and is applied when room returns."""
    b = _CardRefusingDeletes(tmp_path / "b.sqlite", "van-001", reserve_bytes=0)
    for i in range(5):
        b.commit(samples(40, i * 40))
        b.seal(40, 0)
    one, two = b.pending(2)
    b.refuse = True
    assert b.acknowledge(one.batch_id)  # recorded: the caller must not wait for it again
    assert b._peek(one.batch_id) is not None  # ... though still on the card
    assert b.get(one.batch_id) is None
    assert one.batch_id not in {p.batch_id for p in b.pending(100)}
    assert one.batch_id not in {p.batch_id for p in b.newest(100)}
    assert b.stats().batches == 4 and b.stats().backlog_samples == 160
    b.housekeep()  # still no room: stays deferred
    assert b._peek(one.batch_id) is not None
    b.refuse = False
    for _ in range(store_mod.STUCK_RETRY_EVERY):  # tried again when room changes, or now and then
        b.housekeep()
    assert b._peek(one.batch_id) is None  # really deleted now
    assert b.acknowledge(two.batch_id) and b.stats().batches == 3
    assert b.counters()["acks_deferred"] == 1


def test_page_limit_full_is_recoverable(tmp_path):
    """The same path without a mount: SQLite's max_page_count makes the 'disk' full."""
    b = Buffer(tmp_path / "b.sqlite", "van-001", reserve_bytes=0)
    committed = []
    for i in range(20):
        committed += b.commit(samples(20, i * 20))
    b._db.execute(f"PRAGMA max_page_count={b._pages()[0] + 2}")
    refused = 0
    for i in range(20, 200):
        try:
            committed += b.commit(samples(20, i * 20))
        except BufferFullError:
            refused += 1
    assert refused > 0 and b.integrity_ok()
    assert b.counters().get("samples_dropped", 0) == 0 and gap_seqs(b) == []
    assert present_seqs(b) == set(committed)


# --- row checksums ----------------------------------------------------------------


def test_correcting_unsync_rows_keeps_checksums_true_and_damage_visible(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", "van-001")
    rows = [Sample("pm", None, 1000 * i, TimeSource.UNSYNC, {"pm25": float(i)}, boot_id="boot1")
            for i in range(1, 11)]
    seqs = b.commit(rows)
    # The card changes one digit of one row before the time is corrected.
    b._db.execute("UPDATE samples SET vals='{\"pm25\":9.5}' WHERE seq=?", (seqs[4],))
    assert b.correct_unsync("boot1", 1_700_000_000_000) == 10
    sb = b.seal(100, 0)
    got = decode_batch(sb.payload)
    print(f"[unsync-correct] sealed={len(got.samples)} set_aside={b.counters().get('rows_set_aside')}")
    assert [s.seq for s in got.samples] == seqs[:4] + seqs[5:]  # corrected rows verify
    assert all(s.time_src == TimeSource.CORRECTED and s.t_utc_ms == 1_700_000_000_000 + s.t_mono_ms
               for s in got.samples)
    # The correction did not bless the damaged row: it was set aside, with a gap.
    assert [(g.first_seq, g.last_seq) for g in got.gaps] == [(seqs[4], seqs[4])]
    assert "row checksum mismatch" in got.gaps[0].reason


def test_file_from_before_checksums_is_upgraded_and_still_seals(tmp_path):
    path = tmp_path / "b.sqlite"
    b = Buffer(path, "van-001")
    old = b.commit(samples(30))
    b.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE samples DROP COLUMN crc")  # as a file of the previous release
    db.close()
    b = Buffer(path, "van-001")
    new = b.commit(samples(10, 30))
    crcs = dict(b._db.execute("SELECT seq, crc FROM samples"))
    assert all(crcs[q] is None for q in old) and all(crcs[q] is not None for q in new)
    sb = b.seal(100, 0)
    assert [s.seq for s in decode_batch(sb.payload).samples] == old + new


# --- corruption ------------------------------------------------------------------


def _make_db(path: Path, n_batches: int = 3, unsealed: int = 2000) -> tuple[str, list]:
    b = Buffer(path, "van-001")
    for i in range(n_batches):
        b.commit(samples(50, i * 50))
        b.seal(50, 0)
    b.commit(samples(unsealed, 10_000))
    batches = [(x.batch_id, x.payload) for x in b.pending(100)]
    epoch = b.epoch
    b.close()
    return epoch, batches


def _root_page(path: Path, table: str) -> int:
    c = sqlite3.connect(path)
    try:
        return c.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()[0]
    finally:
        c.close()


def _garble_page(path: Path, page: int) -> None:
    with open(path, "r+b") as f:
        f.seek((page - 1) * 4096 + 8)
        f.write(random.Random(1).randbytes(2000))  # fixed garbage: the same damage every run


def test_corrupt_samples_table_quarantined_batches_salvaged(tmp_path):
    path = tmp_path / "buffer.sqlite"
    old_epoch, batches = _make_db(path)
    _garble_page(path, _root_page(path, "samples"))
    before = sha(path)
    b = Buffer(path, "van-001")
    (q,) = quarantines(tmp_path)
    assert (q / "buffer.sqlite").exists() and sha(q / "buffer.sqlite") == before  # moved, untouched
    assert (q / recovery.SALVAGED_MARK).exists() and "quick_check" in (q / recovery.REASON_FILE).read_text()
    assert b.epoch != old_epoch and b.integrity_ok()
    assert b._db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    got = {p.batch_id: p.payload for p in b.pending(100) if p.n_samples}
    for bid, payload in batches:
        assert got[bid] == payload  # the same id with the same bytes: the receiver deduplicates
    # The unsealed samples were lost: a gap of the old epoch says so, in a carrier batch.
    carriers = [decode_batch(p.payload) for p in b.pending(100) if p.n_samples == 0]
    assert len(carriers) == 1 and carriers[0].epoch == old_epoch
    assert carriers[0].first_seq > 150 + 2000  # named past the epoch's end: a new id
    assert [(g.first_seq, g.last_seq) for g in carriers[0].gaps] == [(151, 2150)]
    assert b.stats().quarantined == 1


def test_old_epoch_batches_acknowledge_and_reject_by_id(tmp_path):
    path = tmp_path / "buffer.sqlite"
    old_epoch, batches = _make_db(path)
    _garble_page(path, _root_page(path, "samples"))
    b = Buffer(path, "van-001")
    b.commit(samples(50))
    own = b.seal(50, 0)
    assert own.first_seq == 1 and own.epoch == b.epoch
    old = [p for p in b.pending(100) if p.epoch == old_epoch and p.n_samples]
    assert old[0].first_seq == 1  # the same first_seq in two epochs: ids keep them apart
    assert b.get(old[0].batch_id).payload == old[0].payload
    assert [p.batch_id for p in b.pending(100, exclude={old[0].batch_id, 1})] == [
        p.batch_id for p in b.pending(100) if p.batch_id != old[0].batch_id and p.epoch == old_epoch
    ]
    assert b.acknowledge(old[0].batch_id) and not b.acknowledge(old[0].batch_id)
    assert b.get(1) is not None  # this epoch's batch 1 untouched
    assert b.reject(old[1].batch_id, old[1].last_seq, "bad")
    carrier_gaps = [g for p in b.pending(100) if p.n_samples == 0 for g in decode_batch(p.payload).gaps]
    assert (old[1].first_seq, old[1].last_seq) in [(g.first_seq, g.last_seq) for g in carrier_gaps]


def test_unsealed_samples_salvaged_into_old_epoch_batches(tmp_path):
    path = tmp_path / "buffer.sqlite"
    old_epoch, batches = _make_db(path, unsealed=30)
    _garble_page(path, _root_page(path, "batches"))
    b = Buffer(path, "van-001")
    salvaged = [decode_batch(p.payload) for p in b.pending(100) if p.n_samples]
    seqs = [s.seq for x in salvaged for s in x.samples]
    assert seqs == list(range(151, 181)) and {x.epoch for x in salvaged} == {old_epoch}
    assert salvaged[0].samples[0].values == samples(1, 10_000)[0].values
    # Salvage is idempotent: a crash before the folder is marked done salvages nothing twice.
    (q,) = quarantines(tmp_path)
    (q / recovery.SALVAGED_MARK).unlink()
    n = len(b.pending(100))
    b.close()
    b = Buffer(path, "van-001")
    assert len(b.pending(100)) == n and (q / recovery.SALVAGED_MARK).exists()


def test_not_a_database(tmp_path):
    path = tmp_path / "buffer.sqlite"
    old_epoch, _ = _make_db(path)
    with open(path, "r+b") as f:
        f.write(b"garbage garbage garbage!" * 4)  # the header
    before = sha(path)
    b = Buffer(path, "van-001")
    (q,) = quarantines(tmp_path)
    assert sha(q / "buffer.sqlite") == before
    assert b.epoch != old_epoch and b.integrity_ok()
    assert b.commit(samples(2)) == [1, 2]


def _crash_image(path: Path, commits: int) -> Path:
    """Files as a power cut leaves them: the WAL full of committed transactions."""
    b = Buffer(path, "van-001", wal_autocheckpoint=10_000)
    for i in range(commits):
        b.commit(samples(20, i * 20))
    img = path.parent / "img"
    img.mkdir()
    for f in recovery.companion_files(path):
        if f.exists():
            (img / f.name).write_bytes(f.read_bytes())
    b.close()
    return img / path.name


def test_wal_header_garbage_is_detected_and_quarantined(tmp_path):
    db = _crash_image(tmp_path / "buffer.sqlite", 30)
    wal = Path(str(db) + "-wal")
    with open(wal, "r+b") as f:
        f.write(b"\xde\xad\xbe\xef" * 4)
    wal_sha = sha(wal)
    b = Buffer(db, "van-001")
    (q,) = quarantines(tmp_path / "img")
    assert sha(q / wal.name) == wal_sha and (q / db.name).exists()
    assert "WAL" in (q / recovery.REASON_FILE).read_text()
    assert b.integrity_ok() and b.last_seq() == 0


def test_wal_frame_damage_is_detected(tmp_path):
    db = _crash_image(tmp_path / "buffer.sqlite", 30)
    wal = Path(str(db) + "-wal")
    frames = (wal.stat().st_size - 32) // (24 + 4096)
    assert frames > 20
    with open(wal, "r+b") as f:
        f.seek(32 + (frames // 3) * (24 + 4096) + 24 + 100)  # page data of a frame in the middle
        f.write(b"\x55" * 64)
    assert recovery.wal_problem(wal) is not None
    Buffer(db, "van-001")
    assert len(quarantines(tmp_path / "img")) == 1


def test_torn_last_frame_is_not_corruption(tmp_path):
    db = _crash_image(tmp_path / "buffer.sqlite", 30)
    wal = Path(str(db) + "-wal")
    with open(wal, "r+b") as f:
        f.truncate(wal.stat().st_size - 3000)  # the last commit was half written
    assert recovery.wal_problem(wal) is None
    b = Buffer(db, "van-001")
    assert quarantines(tmp_path / "img") == [] and b.last_seq() >= 29 * 20


def test_corruption_found_during_use_recovers_and_keeps_committing(tmp_path):
    path = tmp_path / "buffer.sqlite"
    old_epoch, batches = _make_db(path, unsealed=10)
    _garble_page(path, _root_page(path, "batches"))
    b = Buffer(path, "van-001", check_on_open=False)  # the damage shows only when touched
    assert b.epoch == old_epoch
    assert b.commit(samples(5, 500)) == [161, 162, 163, 164, 165]  # samples table still fine
    pend = b.pending(100)  # touches the damaged table: quarantine, new epoch, salvage
    assert b.epoch != old_epoch and len(quarantines(tmp_path)) == 1
    old_seqs = [s.seq for p in pend if p.epoch == old_epoch for s in decode_batch(p.payload).samples]
    assert set(range(151, 166)) <= set(old_seqs)  # committed before the damage showed: salvaged
    assert b.commit(samples(2, 900)) == [1, 2] and b.integrity_ok()


def test_corruption_at_open_without_check(tmp_path):
    path = tmp_path / "buffer.sqlite"
    old_epoch, batches = _make_db(path)
    _garble_page(path, _root_page(path, "samples"))
    b = Buffer(path, "van-001", check_on_open=False)
    assert b.epoch != old_epoch and len(quarantines(tmp_path)) == 1
    assert {p.batch_id for p in b.pending(100) if p.n_samples} >= {bid for bid, _ in batches}


def test_interrupted_quarantine_is_completed(tmp_path):
    path = tmp_path / "buffer.sqlite"
    _crash_image(path, 5)
    db = tmp_path / "img" / "buffer.sqlite"
    partial = tmp_path / "img" / "quarantine" / "20260101T000000Z-x.partial"
    partial.mkdir(parents=True)
    os.replace(Path(str(db) + "-wal"), partial / "buffer.sqlite-wal")  # power cut here
    Buffer(db, "van-001")
    (q,) = quarantines(tmp_path / "img")
    assert q.name == "20260101T000000Z-x"
    assert {"buffer.sqlite", "buffer.sqlite-wal"} <= {f.name for f in q.iterdir()}


# --- SIGKILL while committing -------------------------------------------------------

CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[2])
from buffer.store import Buffer
from core.sample import Sample, TimeSource
b = Buffer(sys.argv[1], "van-001")
out = int(sys.argv[3])
i = 0
while True:
    seqs = b.commit([Sample("pm", 1, i * 20 + k, TimeSource.NTP, {"pm25": float(k)}) for k in range(20)])
    os.write(out, f"{seqs[-1]}\n".encode())  # reported only after commit returned
    if i % 5 == 0:
        b.seal(100, 0)
    i += 1
"""


def test_sigkill_while_committing_loses_nothing_that_returned(tmp_path):
    path = tmp_path / "buffer.sqlite"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rnd = random.Random(7)
    deadline = time.monotonic() + 18
    kills = 0
    while kills < 20 and time.monotonic() < deadline:
        r, w = os.pipe()
        p = subprocess.Popen([sys.executable, str(script), str(path), str(ROOT), str(w)], pass_fds=(w,))
        os.close(w)
        time.sleep(0.25 + rnd.random() * 0.3)
        p.send_signal(signal.SIGKILL)
        p.wait()
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        returned = [int(x) for x in data.split()]
        b = Buffer(path, "van-001")
        assert b.integrity_ok()
        assert quarantines(tmp_path) == []  # a power cut is not corruption
        if returned:
            assert set(range(1, returned[-1] + 1)) <= present_seqs(b)
        b.close()
        kills += 1
    assert kills >= 10
