"""Issue 14, what the v14b re-test found (probes on branch v14b, probes/V14B_RESULTS.md): an intact
``.held`` note dropped after a cut WAL, a deleted database or damaged meta; a stale ``.id`` naming a
salvage; gap rows damaged in the database (a non-integral number, a range past the buffer's numbers
or over its samples, a ``sent_in`` naming no batch). Each fault is done to real files and the result
passed through the real receiver (``receiver.ingest.Ingestor`` over ``SQLiteStore``). Each test
prints what it exercised and asserts it happened.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from buffer.heldledger import HELD_REASON
from buffer.store import Buffer
from receiver.ingest import Ingestor
from receiver.store import SQLiteStore
from tests.delivery_harness import report
from tests.test_card_faults_more import _samples
from tests.test_issue14_v14 import _deliver as _deliver_as, _refused, _store
from tests.test_meta_and_wal_faults import _commit_frame_ends, _crash_image

DEV = "van-v14b"


def _deliver(buf: Buffer, ing: Ingestor) -> list[str]:
    return _deliver_as(buf, ing, DEV)


def _all_gaps(store: Path, dev: str = DEV) -> list[tuple[str, int, int, str]]:
    c = sqlite3.connect(store)
    rows = list(c.execute("SELECT epoch, first_seq, last_seq, reason FROM gaps WHERE device=?", (dev,)))
    c.close()
    return rows


def _damage_meta(db: Path) -> None:
    """Overwrite meta's pages in the main file (its table and index): the epoch is unreadable."""
    c = sqlite3.connect(db)
    roots = c.execute("SELECT group_concat(rootpage) FROM sqlite_master WHERE tbl_name='meta'").fetchone()[0]
    page = c.execute("PRAGMA page_size").fetchone()[0]
    c.close()
    raw = bytearray(db.read_bytes())
    for r in str(roots).split(","):
        raw[(int(r) - 1) * page:int(r) * page] = b"\xa5" * page
    db.write_bytes(bytes(raw))


def _cut_wal_to(image: Path, survive: int) -> None:
    """Cut the WAL at the last commit frame boundary that leaves ``survive`` as the last number."""
    wal_path = image / "b.db-wal"
    wal = wal_path.read_bytes()
    for end in reversed(_commit_frame_ends(wal)):
        trial = image.parent / "trial"
        shutil.rmtree(trial, ignore_errors=True)
        trial.mkdir()
        shutil.copy(image / "b.db", trial / "b.db")
        (trial / "b.db-wal").write_bytes(wal[:end])
        ro = sqlite3.connect(f"file:{trial / 'b.db'}?mode=ro", uri=True)
        last = ro.execute("SELECT seq FROM sqlite_sequence WHERE name='samples'").fetchone()[0]
        ro.close()
        if last == survive:
            wal_path.write_bytes(wal[:end])
            return
    raise AssertionError(f"no commit boundary leaves {survive}")


# --- 1. an intact .held note after a cut WAL, a deleted database, damaged meta ------------------

@pytest.mark.parametrize("fault", ["cut-wal", "deleted-db", "damaged-meta", "cut-wal+seq", "damaged-meta+seq",
                                   "cut-wal+stale-seq"])
def test_an_intact_held_note_is_owned_up_to_after_a_database_fault(tmp_path, fault):
    """v14b FAIL 1: the note (3 held at 30) was believed only with the current epoch and the same
    last_seq, so after each of these faults the 3 held samples were lost with no gap, no counter
    ("+seq": .seq damaged as well; the note itself, or the quarantined file, vouches for 30).
    Now exactly 3 held numbers reach the store as a gap (under the note's epoch), counted once,
    and a second open does not own up to them again."""
    d = tmp_path / "van"
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    buf = Buffer(d / "b.db", DEV, reserve_bytes=0)
    buf.commit(_samples(10))
    _deliver(buf, ing)
    buf.commit(_samples(10, t0=10))
    if fault.startswith("damaged-meta"):
        buf._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    buf.commit(_samples(10, t0=20))
    if fault.startswith("damaged-meta"):
        buf._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    buf.note_held(3, 0)
    epoch = buf.epoch
    image = tmp_path / "img"
    _crash_image(buf.path, image)
    buf.close()
    db = image / "b.db"
    if fault.endswith("+seq"):  # the witness damaged too: the note (or the file) must speak
        (image / "b.db.seq").write_bytes(b"0123 garbage\n".ljust(4096, b"\0"))
    if fault.endswith("+stale-seq"):  # this van's own .seq of an earlier epoch (a restored backup)
        prev = Buffer(tmp_path / "prev" / "b.db", DEV, reserve_bytes=0)
        prev.commit(_samples(40))
        prev.close()
        shutil.copy(tmp_path / "prev" / "b.db.seq", image / "b.db.seq")
    if fault.startswith("cut-wal"):
        _cut_wal_to(image, 20)  # the commit of 21-30 gone, cleanly
    elif fault == "deleted-db":
        for p in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm")):
            p.unlink(missing_ok=True)
    else:
        _damage_meta(db)
    nb = Buffer(db, DEV, reserve_bytes=0)
    log = _deliver(nb, ing)
    counters = nb.counters()
    nb.close()
    again = Buffer(db, DEV, reserve_bytes=0)  # a second open must not own up to them twice
    log += _deliver(again, ing)
    counters2 = again.counters()
    again.close()
    gaps = _all_gaps(tmp_path / "store.sqlite")
    held = [(e, a, b) for e, a, b, r in gaps if r == HELD_REASON]
    report("intact .held + database fault", fault=fault, uploads=log, gaps=gaps, counters=counters)
    assert not _refused(log), log
    assert sum(b - a + 1 for _, a, b in held) == 3, f"held samples not owned up to exactly once: {held}"
    assert held == [(epoch, 31, 33)]
    assert counters.get("samples_lost_in_memory") == 3
    assert counters2.get("samples_lost_in_memory", 0) == 3  # not counted again at the second open
    stored, _ = _store(tmp_path / "store.sqlite", DEV, epoch)
    covered = {q for e, a, b, _ in gaps if e == epoch for q in range(a, min(b, 10**4) + 1)}
    assert set(range(1, 31)) <= stored | covered, "committed samples neither stored nor gapped"


# --- 2. this van's own stale .id + damaged meta -------------------------------------------------

@pytest.mark.parametrize("stale", ["earlier-epoch", "old-format"])
def test_a_stale_id_never_names_a_salvage_that_collides_with_stored_rows(tmp_path, stale):
    """v14b FAIL 2/3: epoch Y delivered 1-30; the van's next epoch E delivered 1-10, held 11-30
    unsealed; E's .id replaced by Y's (or an old-format .id naming another epoch), E's meta
    damaged: the salvage went out under Y, the receiver kept Y's rows, E's 11-30 vanished. Now the
    .seq (naming E) disagrees with the .id: salvaged under an epoch of their own, all 20 stored."""
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    y = Buffer(tmp_path / "y" / "b.db", DEV, reserve_bytes=0)
    for k in range(3):
        y.commit([s for s in _samples(10, t0=1000 + 10 * k)])
    _deliver(y, ing)
    ey = y.epoch
    y.close()
    e = Buffer(tmp_path / "e" / "b.db", DEV, reserve_bytes=0)
    e.commit(_samples(10, t0=1))
    _deliver(e, ing)
    e.commit(_samples(20, t0=11))
    ee = e.epoch
    e._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    e.close()
    idf = tmp_path / "e" / "b.db.id"
    if stale == "earlier-epoch":
        shutil.copy(tmp_path / "y" / "b.db.id", idf)
    else:
        idf.write_text('{"epoch": "%s", "device": "%s"}' % (ey, DEV))
    _damage_meta(tmp_path / "e" / "b.db")
    nb = Buffer(tmp_path / "e" / "b.db", DEV, reserve_bytes=0)
    log = _deliver(nb, ing)
    counters = nb.counters()
    nb.close()
    c = sqlite3.connect(tmp_path / "store.sqlite")
    y_rows = c.execute("SELECT count(*) FROM samples WHERE device=? AND epoch=?", (DEV, ey)).fetchone()[0]
    others = list(c.execute("SELECT epoch, seq, t_mono_ms FROM samples WHERE device=? AND epoch!=?", (DEV, ey))) \
        if "t_mono_ms" in [r[1] for r in c.execute("PRAGMA table_info(samples)")] else \
        list(c.execute("SELECT epoch, seq, NULL FROM samples WHERE device=? AND epoch!=?", (DEV, ey)))
    c.close()
    gaps = _all_gaps(tmp_path / "store.sqlite")
    report("stale .id + damaged meta", stale=stale, uploads=log, counters=counters,
           y_rows=y_rows, other_epochs=sorted({r[0] for r in others}), gaps=gaps)
    assert not _refused(log), log
    assert counters.get("salvaged_samples") == 20
    assert y_rows == 30
    assert len(others) == 30, f"E's committed samples missing at the store: {len(others)} of 30"
    assert not [g for g in gaps if g[0] == ey], "a loss invented under the old epoch"
    assert ee in {r[0] for r in others}


# --- 3-5. gap rows damaged in the database ------------------------------------------------------

def _gap_row_case(tmp_path: Path, sql: str) -> tuple[Buffer, Ingestor, str, set[int]]:
    """Commit 1-10 (delivered), 11-20 unsealed, record_lost(2) -> gap 21-22; close; damage the row."""
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    committed = set(buf.commit(_samples(10, t0=1)))
    _deliver(buf, ing)
    committed |= set(buf.commit(_samples(10, t0=11)))
    buf.record_lost(2, "probe loss")
    epoch = buf.epoch
    buf.close()
    c = sqlite3.connect(tmp_path / "b.db")
    c.execute(f"UPDATE gaps SET {sql}")
    c.commit()
    c.close()
    return Buffer(tmp_path / "b.db", DEV, reserve_bytes=0), ing, epoch, committed


def test_a_gap_row_with_a_non_integral_number_does_not_stop_sealing(tmp_path):
    """v14b FAIL 4: first_seq 11.5 passed the empty-gap check and every seal() raised TypeError."""
    nb, ing, epoch, committed = _gap_row_case(tmp_path, "first_seq=21.5")
    log = _deliver(nb, ing)
    committed |= set(nb.commit(_samples(1, t0=100)))
    log += _deliver(nb, ing)
    counters = nb.counters()
    nb.close()
    stored, gaps = _store(tmp_path / "store.sqlite", DEV, epoch)
    report("gap row with first_seq 21.5", uploads=log, gaps=gaps, counters=counters)
    assert stored == committed and not _refused(log)
    assert counters.get("gaps_invalid") == 1


@pytest.mark.parametrize("name, sql", [
    ("future", "last_seq=1000"),
    ("huge-last", f"last_seq={2**62}"),
    ("max-last", f"last_seq={2**63 - 1}"),
    ("covers-unsealed", "first_seq=11, last_seq=22"),
    ("covers-delivered", "first_seq=1, last_seq=22"),
    ("past-the-end", "first_seq=40, last_seq=45"),
])
def test_a_gap_row_never_claims_a_number_past_the_end_or_a_sample(tmp_path, name, sql):
    """v14b FAIL 5: a gap row reaching past last_seq was sent as is and the next sample was stored
    inside it; one widened over committed samples claimed them lost. Now clipped to the numbers no
    sample holds (or dropped), counted; the real loss 21-22 still reaches the store."""
    nb, ing, epoch, committed = _gap_row_case(tmp_path, sql)
    log = _deliver(nb, ing)
    nxt = nb.commit(_samples(1, t0=100))
    committed |= set(nxt)
    log += _deliver(nb, ing)
    counters = nb.counters()
    nb.close()
    stored, gaps = _store(tmp_path / "store.sqlite", DEV, epoch)
    covered = {q for a, b, _ in gaps for q in range(a, min(b, 10**4) + 1)}
    report("damaged gap row", case=name, uploads=log, gaps=gaps, next_seq=nxt, counters=counters)
    assert stored == committed and not _refused(log)
    assert not (covered & stored), f"a gap claims stored samples: {sorted(covered & stored)[:5]}"
    assert max((b for _, b, _ in gaps), default=0) <= 23
    assert counters.get("gaps_invalid") == 1
    if name != "past-the-end":
        assert {21, 22} <= covered, "the real loss did not reach the store"


@pytest.mark.parametrize("sent", [999, -5, 4])
def test_a_gap_row_whose_sent_in_names_no_batch_is_still_sent(tmp_path, sent):
    """v14b FAIL 6: a damaged sent_in made the row look sent: its loss never reached the store."""
    nb, ing, epoch, committed = _gap_row_case(tmp_path, f"sent_in={sent}")
    log = _deliver(nb, ing)
    counters = nb.counters()
    nb.close()
    stored, gaps = _store(tmp_path / "store.sqlite", DEV, epoch)
    report("gap row with a bogus sent_in", sent_in=sent, uploads=log, gaps=gaps, counters=counters)
    assert stored == committed and not _refused(log)
    assert [(a, b) for a, b, _ in gaps] == [(21, 22)]
    assert counters.get("gaps_resent") == 1
