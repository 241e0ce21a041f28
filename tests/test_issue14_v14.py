"""Issue 14, what the v14 re-test found (probes on branch v14, probes/V14_RESULTS.md): the side files
(``.held``, ``.seq``, ``.id``) believed as written or whatever van wrote them, ``record_lost`` taking
any count, and a card full before the buffer was ever born losing held samples without a trace.
Each fault is done to real files and, where the question is "does it reach the store", passed
through the real receiver (``receiver.ingest.Ingestor`` over ``SQLiteStore``). Each test prints
what it exercised and asserts it happened.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from buffer import highwater
from buffer.errors import BufferFullError
from buffer.heldledger import HELD_REASON
from buffer.store import Buffer
from receiver.ingest import Ingestor
from receiver.store import SQLiteStore
from tests.delivery_harness import report
from tests.test_card_faults import card  # noqa: F401  (fixture, used by name)
from tests.test_card_faults_more import _samples
from tests.test_issue14_retest import _deliver as deliver_as
from tests.test_issue14_retest import _leave_free

DEV = "van-v14"


def _deliver(buf: Buffer, ing: Ingestor, dev: str = DEV) -> list[str]:
    """The agent's loop in small (tests/test_issue14_retest.py), on ``dev``'s topic: the acks' log."""
    log: list[str] = []
    deliver_as(buf, ing, log, dev=dev)
    return log


def _store(path: Path, dev: str, epoch: str) -> tuple[set[int], list[tuple[int, int, str]]]:
    c = sqlite3.connect(path)
    stored = {q for (q,) in c.execute("SELECT seq FROM samples WHERE device=? AND epoch=?", (dev, epoch))}
    gaps = list(c.execute("SELECT first_seq, last_seq, reason FROM gaps WHERE device=? AND epoch=?", (dev, epoch)))
    c.close()
    return stored, gaps


def _refused(log: list[str]) -> list[str]:
    return [x for x in log if x.rsplit(":", 1)[-1] not in ("stored", "duplicate")]


# --- 1. the .held note: checksum, exact form, bounds, never a crash ----------------------------

def _damage_held(path: Path, old: bytes, new: bytes) -> None:
    """Change the note's record in place, keeping the rest of the block (its checksum line)."""
    raw = path.read_bytes()
    assert old in raw, raw[:200]
    path.write_bytes(raw.replace(old, new, 1)[:4096].ljust(4096, b"\0"))


@pytest.mark.parametrize("held", ["3", "7", "-3", "0", "null", "3.0", str(2**62), str(10**30), "legacy"])
def test_a_damaged_held_note_is_ignored_never_a_crash_nor_a_false_or_inverted_gap(tmp_path, held, caplog):
    """v14: a bit flip 3 -> 7 invented a loss of 4; 10^30 made every open raise OverflowError; -3 an
    inverted gap that sank the batch of 10 real samples; 2^62 burnt the number space; 0 / null lost
    the held samples without a word. Now a note is believed only with its checksum in the exact form
    written: "3" (untouched) owns up to exactly 3, anything else is ignored with a warning, counted."""
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    committed = set(buf.commit(_samples(10)))
    buf.note_held(3, 0)
    epoch = buf.epoch
    buf.close()
    note = Path(str(tmp_path / "b.db") + ".held")
    if held == "legacy":  # the form written before the checksum: nothing shows a flip in it
        note.write_bytes(note.read_bytes().split(b"\n")[0].ljust(4096, b"\0"))
    elif held != "3":
        _damage_held(note, b'"held": 3', b'"held": ' + held.encode())
    caplog.set_level("WARNING")
    nb = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)  # raised OverflowError for 10^30
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    log = _deliver(nb, ing)
    nxt = nb.commit(_samples(1, t0=100))
    counters = nb.counters()
    nb.close()
    stored, gaps = _store(tmp_path / "store.sqlite", DEV, epoch)
    held_gaps = [(a, b) for a, b, r in gaps if r == HELD_REASON]
    report("damaged .held note", held=held, uploads=log, gaps=gaps, next_seq=nxt, counters=counters)
    assert stored == committed == set(range(1, 11)), "committed samples not stored"
    assert not _refused(log), log
    if held == "3":
        assert held_gaps == [(11, 13)] and counters.get("samples_lost_in_memory") == 3
        assert nxt == [14] and not counters.get("held_notes_ignored")
    else:
        assert held_gaps == [], "a damaged note was taken for a loss"
        assert nxt == [11], "the number space moved"
        assert counters.get("held_notes_ignored") == 1
        assert not counters.get("samples_lost_in_memory")
        assert "not believable" in caplog.text


def test_a_flipped_bit_anywhere_in_the_held_record_is_never_a_loss_or_a_crash(tmp_path):
    """Every single-bit flip of the record's bytes (the JSON and its checksum): never an exception,
    never a count other than the 3 written (a flip the checksum cannot see would have to keep it)."""
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    buf.commit(_samples(10))
    buf.note_held(3, 0)
    buf.close()
    note = Path(str(tmp_path / "b.db") + ".held")
    good = note.read_bytes()
    end = good.index(b"\0")
    from buffer.heldledger import HeldLedger

    believed = wrong = 0
    for i in range(end):
        for bit in (0x01, 0x04, 0x10, 0x40):
            raw = bytearray(good)
            raw[i] ^= bit
            note.write_bytes(bytes(raw))
            got = HeldLedger(note, DEV).read()
            believed += got is not None
            wrong += got is not None and (got.held, got.owed, got.carried, got.last_seq) != (3, 0, [], 10)
    report("bit flips in .held", flips=end * 4, believed=believed, wrong=wrong)
    assert wrong == 0 and believed == 0


# --- 2. record_lost and sealing: never an empty or inverted gap ---------------------------------

@pytest.mark.parametrize("n", [0, -3, 2**62])
def test_record_lost_refuses_a_count_that_is_not_one(tmp_path, n, caplog):
    """v14: record_lost(0) made gap (2, 1), record_lost(-3) gap (2, -2): the receiver refused the
    batch with its real samples. Now refused with a warning, nothing recorded, samples delivered."""
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    committed = set(buf.commit(_samples(5)))
    caplog.set_level("WARNING")
    first, last = buf.record_lost(n, "test loss")
    assert last < first and "refused" in caplog.text
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    log = _deliver(buf, ing)
    stored, gaps = _store(tmp_path / "store.sqlite", DEV, buf.epoch)
    report("record_lost bad count", n=n, uploads=log, gaps=gaps)
    assert stored == committed and gaps == [] and not _refused(log)
    assert buf.commit(_samples(1, t0=50)) == [6]
    buf.close()


def test_an_inverted_gap_row_never_rides_in_a_batch(tmp_path):
    """A gap row with first > last (damage, an older version) is dropped at sealing, logged and
    counted; the batch with the real samples and the valid gaps is stored."""
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    committed = set(buf.commit(_samples(5)))
    buf.record_lost(2, "real loss")  # 6-7
    buf._db.execute("INSERT INTO gaps (first_seq, last_seq, reason) VALUES (9, 4, 'inverted')")
    buf._db.execute("INSERT INTO gaps (first_seq, last_seq, reason) VALUES (0, 0, 'zero')")
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    log = _deliver(buf, ing)
    stored, gaps = _store(tmp_path / "store.sqlite", DEV, buf.epoch)
    report("inverted gap rows", uploads=log, gaps=gaps, counters=buf.counters())
    assert stored == committed and not _refused(log)
    assert [(a, b) for a, b, _ in gaps] == [(6, 7)]
    assert buf.counters().get("gaps_invalid") == 2
    buf.close()


# --- 3. side files swapped between vans ---------------------------------------------------------

def _van(d: Path, dev: str) -> tuple[Path, str, set[int]]:
    b = Buffer(d / "b.db", dev, reserve_bytes=0)
    committed = {q for k in range(2) for q in b.commit(_samples(5, 10 * k))}
    e = b.epoch
    b._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    b.close()
    return d / "b.db", e, committed


def test_another_vans_seq_beside_a_new_buffer_is_not_a_loss(tmp_path, caplog):
    """v14: van A's .seq beside van B's deleted buffer made B own up to gap 1-30 under A's epoch."""
    dba, ea, _ = _van(tmp_path / "a", "van-a")
    dbb, eb, _ = _van(tmp_path / "b", "van-b")
    for p in (dbb, Path(str(dbb) + "-wal"), Path(str(dbb) + "-shm")):
        p.unlink(missing_ok=True)
    shutil.copy(str(dba) + ".seq", str(dbb) + ".seq")
    caplog.set_level("WARNING")
    nb = Buffer(dbb, "van-b", reserve_bytes=0)
    counters = nb.counters()
    gaps = list(nb._db.execute("SELECT first_seq, last_seq, reason FROM gaps"))
    carriers = list(nb._db.execute("SELECT epoch, device FROM epochs")) if nb._db.execute(
        "SELECT 1 FROM sqlite_master WHERE name='epochs'").fetchone() else []
    report("foreign .seq beside a new buffer", gaps=gaps, carriers=carriers, counters=counters)
    assert not counters.get("samples_lost_wal") and gaps == []
    assert all(e != ea for e, _ in carriers)
    assert "another device" in caplog.text
    # Its own .seq now: a loss of van B's own epoch is still seen.
    assert highwater.HighWater(Path(str(dbb) + ".seq"), "van-b").read() == (nb.epoch, 0)
    nb.close()


def test_van_bs_own_seq_beside_its_deleted_buffer_is_still_a_loss(tmp_path):
    """The binding must not blind the witness: B's own .seq still owns up to B's lost epoch."""
    dbb, eb, committed = _van(tmp_path / "b", "van-b")
    for p in (dbb, Path(str(dbb) + "-wal"), Path(str(dbb) + "-shm")):
        p.unlink(missing_ok=True)
    nb = Buffer(dbb, "van-b", reserve_bytes=0)
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    log = _deliver(nb, ing, "van-b")
    _, gaps = _store(tmp_path / "store.sqlite", "van-b", eb)
    report("own .seq, buffer deleted", gaps=gaps, uploads=log)
    assert [(a, b) for a, b, _ in gaps] == [(1, 10)] and nb.counters()["samples_lost_wal"] == 10
    nb.close()


@pytest.mark.parametrize("swap", [(".id",), (".id", ".seq")])
def test_another_vans_id_never_relabels_a_salvage(tmp_path, swap):
    """v14: van A's .id beside van B's buffer with damaged meta pages: B salvaged its 10 samples
    as van-a / epoch A, the receiver refused them (device not the topic's): neither stored nor
    gapped. Now the configured device wins: all 10 reach the store under van-b."""
    dba, ea, _ = _van(tmp_path / "a", "van-a")
    dbb, eb, committed = _van(tmp_path / "b", "van-b")
    c = sqlite3.connect(dbb)
    roots = c.execute("SELECT group_concat(rootpage) FROM sqlite_master WHERE tbl_name='meta'").fetchone()[0]
    page = c.execute("PRAGMA page_size").fetchone()[0]
    c.close()
    raw = bytearray(dbb.read_bytes())
    for r in str(roots).split(","):
        raw[(int(r) - 1) * page:int(r) * page] = b"\xa5" * page
    dbb.write_bytes(bytes(raw))
    for s in swap:
        shutil.copy(str(dba) + s, str(dbb) + s)
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    nb = Buffer(dbb, "van-b", reserve_bytes=0)
    log = _deliver(nb, ing, "van-b")
    counters = nb.counters()
    nb.close()
    sc = sqlite3.connect(tmp_path / "store.sqlite")
    by_dev = dict(sc.execute("SELECT device, count(*) FROM samples GROUP BY device").fetchall())
    b_seqs = {q for (q,) in sc.execute("SELECT seq FROM samples WHERE device='van-b'")}
    b_gaps = list(sc.execute("SELECT epoch, first_seq, last_seq FROM gaps WHERE device='van-b'"))
    sc.close()
    report("foreign .id + damaged meta", swap=swap, uploads=log, store=by_dev, gaps=b_gaps, counters=counters)
    assert not _refused(log), log
    assert "van-a" not in by_dev, "van B's samples went out as van A's"
    covered = {q for _, a, b in b_gaps for q in range(a, min(b, 10**4) + 1)}
    assert committed <= b_seqs | covered and counters.get("salvaged_samples") == 10
    assert b_seqs == committed, "salvaged samples not stored"


def test_a_seq_padding_flip_does_not_disable_the_witness(tmp_path):
    """v14: a flipped bit in the zero padding after the .seq record's newline voided the check."""
    hw = highwater.HighWater(tmp_path / "b.db.seq", DEV)
    hw.mark("00aa11bb22cc33dd", 20)
    hw.close()
    raw = bytearray((tmp_path / "b.db.seq").read_bytes())
    nl = raw.index(b"\n")
    spoiled = 0
    for i in range(nl + 1, highwater.RECORD):
        for bit in (0x01, 0x20, 0x80):
            r = bytearray(raw)
            r[i] ^= bit
            (tmp_path / "b.db.seq").write_bytes(bytes(r))
            hw = highwater.HighWater(tmp_path / "b.db.seq", DEV)
            spoiled += hw.behind("00aa11bb22cc33dd", 10) != 10
    report(".seq padding flips", flips=(highwater.RECORD - nl - 1) * 3, spoiled=spoiled)
    assert spoiled == 0
    r = bytearray(raw)
    r[3] ^= 0x01  # in the record itself: still damage
    (tmp_path / "b.db.seq").write_bytes(bytes(r))
    assert highwater.HighWater(tmp_path / "b.db.seq", DEV).behind("00aa11bb22cc33dd", 10) == 0


# --- 4. a card full before the buffer was ever born ---------------------------------------------

@pytest.mark.parametrize("leave_kib", [16, 130])
def test_held_samples_of_an_unborn_buffer_are_owned_up_to_after_a_stop(tmp_path, leave_kib):
    """v14: note_held wrote nothing while the buffer was unborn: 100 of 100 held samples lost at the
    stop with no gap and no counter. Now the one-block note is written where the birth does not fit,
    and the first database born owns up to exactly 100, delivered to the store."""
    from tests.tmpfs import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "card", "4m") as mnt:
        filler = _leave_free(mnt, leave_kib * 1024)
        buf = Buffer(mnt / "b.db", DEV, reserve_bytes=0)
        with pytest.raises(BufferFullError):
            buf.commit(_samples(100))
        buf.note_held(100, 0)
        unnoted = buf.held_unnoted
        buf.close()  # the agent stops (or is killed) holding 100 samples
        filler.unlink()
        nb = Buffer(mnt / "b.db", DEV, reserve_bytes=0)
        counters = nb.counters()
        ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
        log = _deliver(nb, ing)
        _, gaps = _store(tmp_path / "store.sqlite", DEV, nb.epoch)
        nxt = nb.commit(_samples(1, t0=500))
        nb.close()
    report("unborn buffer, held samples at stop", leave_kib=leave_kib, unnoted=unnoted, gaps=gaps,
           counters=counters, uploads=log)
    assert unnoted == 0
    assert counters.get("samples_lost_in_memory") == 100
    assert [(a, b, r) for a, b, r in gaps] == [(1, 100, HELD_REASON)] and not _refused(log)
    assert nxt == [101]


def test_an_unborn_buffer_born_mid_run_owns_up_to_the_last_runs_note_and_commits_the_held(tmp_path):
    """Run 1 unborn notes 40 held and is killed; run 2 starts unborn too (carries the note), then
    the card gets room: the birth owns up to run 1's 40 and run 2's held samples are committed."""
    from tests.tmpfs import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "card", "4m") as mnt:
        filler = _leave_free(mnt, 16 * 1024)
        b1 = Buffer(mnt / "b.db", DEV, reserve_bytes=0)
        with pytest.raises(BufferFullError):
            b1.commit(_samples(40))
        b1.note_held(40, 0)
        b1.close()
        b2 = Buffer(mnt / "b.db", DEV, reserve_bytes=0)
        held = _samples(7, t0=100)
        with pytest.raises(BufferFullError):
            b2.commit(held)
        b2.note_held(7, 0)
        filler.unlink()
        committed = b2.commit(held)
        b2.note_held(0, 0)
        ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
        log = _deliver(b2, ing)
        stored, gaps = _store(tmp_path / "store.sqlite", DEV, b2.epoch)
        b2.close()
        b3 = Buffer(mnt / "b.db", DEV, reserve_bytes=0)  # the note is settled: not applied again
        counters = b3.counters()
        b3.close()
    report("unborn over two runs", gaps=gaps, committed=committed, counters=counters)
    assert [(a, b) for a, b, _ in gaps] == [(1, 40)] and committed == list(range(41, 48))
    assert stored == set(committed) and not _refused(log)
    assert counters.get("samples_lost_in_memory") == 40


def test_at_zero_bytes_free_the_unnoted_held_count_is_visible(tmp_path):
    """At 0 bytes free not even the one-block note can be made: the limit docs/durability.md names.
    The count of held samples no file records is then in memory (``held_unnoted``, in the
    heartbeat), and the note is made as soon as a block is free."""
    from tests.tmpfs import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "card", "4m") as mnt:
        filler = _leave_free(mnt, 0)
        buf = Buffer(mnt / "b.db", DEV, reserve_bytes=0)
        with pytest.raises(BufferFullError):
            buf.commit(_samples(30))
        buf.note_held(30, 0)
        at_zero = buf.held_unnoted
        with open(filler, "r+b") as f:  # someone frees 64 KiB: a block for the note, not a birth
            f.truncate(filler.stat().st_size - 64 * 1024)
        buf.note_held(30, 0)
        after = buf.held_unnoted
        buf.close()
        filler.unlink()
        nb = Buffer(mnt / "b.db", DEV, reserve_bytes=0)
        lost = nb.counters().get("samples_lost_in_memory")
        nb.close()
    report("unborn at 0 bytes free", at_zero=at_zero, after_a_block_freed=after, owned_up=lost)
    assert at_zero == 30 and after == 0 and lost == 30


def test_the_agent_heartbeat_shows_held_samples_no_file_records(card, mosquitto):  # noqa: F811  (fixture)
    """The agent on a card filled to its last block before the buffer was born: the heartbeat says
    ``disk_full`` and counts the held samples no note records (``samples_held_unnoted``); once one
    block is free the note is made and the count goes to 0 (the samples are still at risk)."""
    from tests.test_card_faults import fill, make_agent

    fill(card / "filler")
    agent, _link = make_agent(card, mosquitto.port, device="van-unborn", sensors=2, max_pending=100_000)
    assert agent.buffer._unborn
    agent.run(duration_s=10)
    full = agent.status()
    with open(card / "filler", "r+b") as f:  # 64 KiB freed: room for the note, not for a birth
        f.truncate((card / "filler").stat().st_size - 64 * 1024)
    agent.run(duration_s=3)
    freed = agent.status()
    agent.buffer.close()
    report("agent heartbeat, unborn at 0 bytes", health=full["health"], at_risk=full["samples_at_risk"],
           unnoted=full["samples_held_unnoted"], unnoted_after_a_block=freed["samples_held_unnoted"],
           at_risk_after=freed["samples_at_risk"])
    assert full["health"] == "disk_full" and full["samples_at_risk"] > 0
    assert full["samples_held_unnoted"] == full["samples_at_risk"]
    assert freed["samples_held_unnoted"] == 0 and freed["samples_at_risk"] > 0
