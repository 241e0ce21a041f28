"""Issue 14, what an independent re-test found (probes on branch v2): each fault done to real files
and passed through the real receiver (``receiver.ingest.Ingestor`` over ``SQLiteStore``) where the
question is "does it reach the store". Every committed number must end up stored, or inside a gap
record the store holds; nothing silent. Each test prints what it exercised and asserts it happened.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
from pathlib import Path

import pytest

from buffer import highwater
from buffer.store import SCHEMA, WAL_LOST_REASON, Buffer
from core.calibration import CALIBRATION_SENSOR, CalibrationError
from edge.calibration import CalibrationStore
from core.sample import Sample, TimeSource
from receiver.ingest import Ingestor
from receiver.store import SQLiteStore
from tests.delivery_harness import report
from tests.test_card_faults_more import _samples
from tests.test_meta_and_wal_faults import _crash_image, _flip_epoch_text
from core.batch_limits import MAX_VALUE_CELLS
from core.wire import batch_topic, content_hash, decode_batch, parse_batch_id

DEV = "van-rt"


def _deliver(buf: Buffer, ing: Ingestor, log: list[str], max_samples: int = 2000, dev: str = DEV) -> None:
    """The agent's loop in small: seal, publish, acknowledge or reject (edge/agent.py's rule)."""
    for _ in range(30):
        sbs = buf.pending(100)
        if not sbs:
            sb = buf.seal(max_samples, 1)
            if sb is None:
                return
            sbs = [sb]
        for sb in sbs:
            ack = ing.handle(batch_topic("datalab/v1", dev), sb.payload, 1).ack
            log.append(f"{sb.batch_id}:{ack.status}")
            if ack.committed:
                buf.acknowledge(sb.batch_id)
            else:
                buf.reject(sb.batch_id, parse_batch_id(sb.batch_id)[3], ack.reason)
    raise AssertionError(f"delivery does not end: {log[-5:]}")


def _account(store: Path, epoch: str, committed: set[int]) -> tuple[set[int], list[tuple[int, int, str]], set[int]]:
    """(stored seqs, gap records, committed numbers neither stored nor in a gap) of one epoch."""
    c = sqlite3.connect(store)
    stored = {q for (q,) in c.execute("SELECT seq FROM samples WHERE device=? AND epoch=?", (DEV, epoch))}
    gaps = list(c.execute("SELECT first_seq, last_seq, reason FROM gaps WHERE device=? AND epoch=?", (DEV, epoch)))
    c.close()
    covered = {q for a, b, _ in gaps for q in range(a, min(b, 10**6) + 1)}
    return stored, gaps, committed - stored - covered


# --- 1. a whole epoch lost before its first checkpoint -----------------------------------------


@pytest.mark.parametrize("loss", ["db-gone", "schema-only", "wal-header-only"])
def test_an_epoch_gone_from_the_database_is_owned_up_to_under_that_epoch(tmp_path, loss):
    """The reopened buffer used to start a new epoch silently although .seq and .id named the lost
    one. Now: a gap over its committed numbers under the old epoch (reaching the receiver), counted.
    "wal-header-only": the checkpoint at epoch birth keeps the epoch, so the loss is named in it."""
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    old = buf.epoch
    committed = {q for k in range(10) for q in buf.commit(_samples(5, t0=10 * k))}  # 1..50
    image = tmp_path / "img"
    _crash_image(buf.path, image)
    buf.close()
    db, wal = image / "b.db", image / "b.db-wal"
    if loss == "wal-header-only":
        wal.write_bytes(wal.read_bytes()[:32])
    else:
        db.unlink()
        wal.unlink()
        if loss == "schema-only":  # the main file as it was before the epoch row reached it
            c = sqlite3.connect(db)
            c.executescript(SCHEMA)
            c.close()
    nb = Buffer(db, DEV, reserve_bytes=0)
    counters = nb.counters()
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    log: list[str] = []
    _deliver(nb, ing, log)
    stored, gaps, silent = _account(tmp_path / "store.sqlite", old, committed)
    report("epoch-gone", loss=loss, new_epoch=nb.epoch != old, gaps=[(a, b) for a, b, _ in gaps],
           samples_lost_wal=counters.get("samples_lost_wal"), deliveries=log)
    assert not silent, f"committed numbers of {old} gone without a record: {sorted(silent)[:5]}"
    assert (1, 50, WAL_LOST_REASON) in gaps
    assert counters.get("samples_lost_wal") == 50
    assert (nb.epoch == old) == (loss == "wal-header-only")
    nb.close()


def test_the_epoch_row_reaches_the_main_file_at_birth(tmp_path):
    """The checkpoint once per epoch: the main file alone (no WAL) already names the epoch."""
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    buf.commit(_samples(3))
    ro = sqlite3.connect(f"file:{tmp_path / 'b.db'}?immutable=1", uri=True)  # the main file, WAL ignored
    row = ro.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
    ro.close()
    report("epoch-at-birth", epoch=buf.epoch, main_file=row)
    assert row == (buf.epoch,)
    buf.close()


# --- 2. the .seq witness itself damaged ---------------------------------------------------------


def _seq_record(path: Path, text: str) -> None:
    path.write_bytes(text.encode().ljust(highwater.RECORD, b"\0"))


@pytest.mark.parametrize("damage", ["digit-flip", "crc-flip", "legacy-2^63+5", "legacy-10^30", "legacy-2^63-2",
                                    "crc-valid-2^63-2", "garbage"])
def test_a_damaged_seq_file_is_ignored_and_rewritten_never_a_loss(tmp_path, damage, caplog):
    """One flipped digit used to invent a loss (gap 21-60); 2^63+5 made every open raise, 2^63-2
    every later commit fail. A record that fails its CRC or passes the bound is damaged: ignored
    with a warning, rewritten at open; the buffer goes on from its own numbers."""
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    epoch = buf.epoch
    for k in range(4):
        buf.commit(_samples(5, t0=10 * k))  # 1..20
    buf.close()
    seq = tmp_path / "b.db.seq"
    good = seq.read_bytes().rstrip(b"\0").decode()
    assert good.split()[:2] == [epoch, "20"] and len(good.split()) == 4  # epoch, last_seq, device tag, CRC
    big = {"legacy-2^63+5": 2**63 + 5, "legacy-10^30": 10**30, "legacy-2^63-2": 2**63 - 2}
    if damage == "digit-flip":
        _seq_record(seq, good.replace(f"{epoch} 20 ", f"{epoch} 60 "))
    elif damage == "crc-flip":
        tag, crc = good.split()[2:]
        _seq_record(seq, f"{epoch} 20 {tag} {crc[:-1]}{'0' if crc[-1] != '0' else '1'}\n")
    elif damage in big:
        _seq_record(seq, f"{epoch} {big[damage]}\n")  # a record from before the CRC: the bound still holds
    elif damage == "crc-valid-2^63-2":
        _seq_record(seq, f"{epoch} {2**63 - 2} {highwater._check(epoch, 2**63 - 2)}\n")
    else:
        seq.write_bytes(bytes(range(256)) * 16)
    with caplog.at_level(logging.WARNING, logger="buffer.highwater"):
        nb = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    rewritten = seq.read_bytes().rstrip(b"\0").decode(errors="replace")
    nxt = nb.commit(_samples(2, t0=900))
    report("seq-damage", damage=damage, warned=len(warned), rewritten=rewritten.strip(),
           lost=nb.counters().get("samples_lost_wal", 0), next=nxt)
    assert nb.counters().get("samples_lost_wal", 0) == 0
    assert nb._db.execute("SELECT count(*) FROM gaps").fetchone()[0] == 0
    assert nxt == [21, 22]
    assert warned, "the damage is logged"
    assert rewritten.split()[:2] == [epoch, "20"] and highwater.HighWater(seq).read() == (epoch, 22)
    nb.close()


@pytest.mark.parametrize("legacy", ["flip-20-to-60", "other-epoch"])
def test_a_seq_file_from_before_the_checksum_is_not_evidence_of_a_loss(tmp_path, legacy, caplog):
    """Retest #14 f9.3: the old two-field record has no checksum, so it was believed: one flipped
    digit invented a loss (gap 21-60), a flipped epoch a loss under an epoch that never existed.
    It is ignored with a warning and rewritten in the checked form; no gap, no counter."""
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    for k in range(4):
        buf.commit(_samples(5, t0=10 * k))
    epoch = buf.epoch
    buf.close()
    seq = tmp_path / "b.db.seq"
    named = epoch if legacy == "flip-20-to-60" else "f" + epoch[1:]
    _seq_record(seq, f"{named} 60\n")
    with caplog.at_level(logging.WARNING, logger="buffer.highwater"):
        nb = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    gaps = nb._db.execute("SELECT first_seq, last_seq, reason FROM gaps").fetchall()
    warned = [r.getMessage() for r in caplog.records if "before the checksum" in r.getMessage()]
    report("seq-legacy", legacy=legacy, gaps=gaps, warned=len(warned))
    assert gaps == [] and nb.counters().get("samples_lost_wal", 0) == 0
    assert warned, "the ignored record is logged"
    assert highwater.HighWater(seq).read() == (epoch, 20), "rewritten in the checked form"
    assert nb.commit(_samples(1, t0=900)) == [21]
    nb.close()


# --- 3. a WAL cut that takes back a delivered seal ----------------------------------------------


def test_a_wal_cut_that_takes_back_a_delivered_seal_resends_identical_bytes(tmp_path):
    """Batch 1-20 stored and acked, 21-30 committed, then the WAL cut before the seal: 1-20 came
    back unsealed and were re-sealed with the lost gap 21-30 inside (same id, other bytes), refused
    forever, the gap marked sent and lost. Now the gap travels alone and 1-20 is a duplicate."""
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    log: list[str] = []
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    committed = {q for k in range(4) for q in buf.commit(_samples(5, t0=10 * k))}  # 1..20
    buf._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    _deliver(buf, ing, log)
    committed |= {q for k in range(2) for q in buf.commit(_samples(5, t0=100 + 10 * k))}  # 21..30
    image = tmp_path / "img"
    _crash_image(buf.path, image)
    buf.close()
    wal = image / "b.db-wal"
    wal.write_bytes(wal.read_bytes()[:32])  # everything after the checkpoint: seal, ack, 21-30
    nb = Buffer(image / "b.db", DEV, reserve_bytes=0)
    resealed = []
    while (sb := nb.seal(2000, 1)) is not None:
        resealed.append(sb)
    for sb in resealed:
        ack = ing.handle(batch_topic("datalab/v1", DEV), sb.payload, 1).ack
        log.append(f"{sb.batch_id}:{ack.status}")
        assert ack.committed, f"{sb.batch_id} refused: {ack.reason}"
        nb.acknowledge(sb.batch_id)
    stored, gaps, silent = _account(tmp_path / "store.sqlite", nb.epoch, committed)
    report("wal-cut-delivered-seal", deliveries=log, gaps=[(a, b) for a, b, _ in gaps], silent=len(silent))
    assert [sb.n_samples for sb in resealed] == [0, 20]  # the gap alone first, then 1-20 as before
    assert log[-1].endswith("1-20:duplicate")
    assert (21, 30, WAL_LOST_REASON) in gaps and not silent
    assert nb._db.execute("SELECT count(*) FROM gaps").fetchone()[0] == 0  # nothing stranded as "sent"
    nb.close()


# --- 4. gap records carried by a rejected batch -------------------------------------------------


def test_gaps_carried_by_a_rejected_batch_are_delivered_with_their_own_reasons(tmp_path):
    """A batch rotted on the card carried the gap of samples 1-5; the agent rejected it (hash
    mismatch) and the gap was left marked sent, then deleted by the replacement's ack."""
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    reason = "card full: samples held in memory lost when the agent ended"
    a, b = buf.record_lost(5, reason)  # 1-5
    committed = set(range(a, b + 1)) | set(buf.commit(_samples(5)))  # 6-10
    sb = buf.seal(2000, 1)
    assert sb is not None and [(g.first_seq, g.last_seq) for g in decode_batch(sb.payload).gaps] == [(1, 5)]
    buf._db.execute("UPDATE batches SET payload = CAST(substr(payload,1,10) || 'X' || substr(payload, 12) AS BLOB)")
    log: list[str] = []
    for x in buf.pending(10):
        if content_hash(x.payload) != x.sha256:  # the agent's own check and call (edge/agent.py)
            buf.reject(x.batch_id, x.last_seq, "corrupt on the device: content hash mismatch", by="device")
            log.append(f"{x.batch_id}:rejected-by-device")
    _deliver(buf, ing, log)
    stored, gaps, silent = _account(tmp_path / "store.sqlite", buf.epoch, committed)
    report("reject-carried-gaps", deliveries=log, gaps=[(a_, b_, r[:30]) for a_, b_, r in gaps])
    assert log[0].endswith("6-10:rejected-by-device")
    assert (1, 5, reason) in gaps  # its own reason, not the rejection's
    assert any(g[:2] == (6, 10) and "rejected by device" in g[2] for g in gaps)
    assert not silent
    buf.close()


# --- 5. two faults: meta's epoch flipped and .id gone: .seq names the epoch ----------------------


def test_a_flipped_epoch_with_the_identity_file_gone_is_salvaged_under_the_seq_epoch(tmp_path):
    """Only unsealed rows (no batch payload to name the epoch), meta's epoch flipped and ``.id``
    gone: 10 readable rows were dropped with "epoch unknown". ``.seq`` is the third witness."""
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    epoch0 = buf.epoch
    committed = {q for k in range(2) for q in buf.commit(_samples(5, t0=10 * k))}
    buf.close()
    (tmp_path / "b.db.id").unlink()
    _flip_epoch_text(tmp_path / "b.db", epoch0)
    nb = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    log: list[str] = []
    _deliver(nb, Ingestor(SQLiteStore(tmp_path / "store.sqlite")), log)
    stored, gaps, silent = _account(tmp_path / "store.sqlite", epoch0, committed)
    report("epoch-flip-no-id", new_epoch=nb.epoch, old=epoch0, deliveries=log, stored=len(stored), gaps=gaps)
    assert nb.epoch != epoch0 and (tmp_path / "quarantine").exists()
    assert stored == committed and not silent
    nb.close()


# --- 6. what the van admits, the receiver must take ------------------------------------------------


@pytest.mark.parametrize("kind, values, valid_from, says", [
    ("pm", {"slope": 1e16}, None, "slope"),
    ("pm", {"quantity": 5}, None, "quantity must be text"),
    ("noise", {"offset_db": 1.0}, 1e12, "valid_from"),
])
def test_the_calibration_store_refuses_a_record_the_receiver_would_refuse(tmp_path, kind, values, valid_from, says):
    store = CalibrationStore(tmp_path / "cal.db")
    with pytest.raises(CalibrationError, match=says):
        store.add(kind, "SER-1", "colocation", values, technician="t", valid_from=valid_from)
    ok = store.add(kind, "SER-1", "colocation", {}, technician="t")  # the good one still goes in
    report("cal-refused", kind=kind, values=values, valid_from=valid_from, next_version=ok.version)
    assert store.get(ok.id) is not None and ok.version == 1  # nothing of the refused one was kept


def _record_sample(record: dict) -> Sample:
    return Sample(CALIBRATION_SENSOR, 1_795_000_000_000, 5, TimeSource.GPS, {"record": json.dumps(record)}, (),
                  None, "boot")


def test_samples_the_receiver_would_refuse_are_set_aside_at_commit_and_the_rest_arrive(tmp_path):
    """A calibration record failing the receiver's check (announced from an old store), a time
    source the receiver cannot decode, and a sample too large for any batch: each set aside alone
    at commit (bad_rows + gap record), the good samples around them stored."""
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    rnd = random.Random(1)
    huge = {f"t{j}": "".join(chr(rnd.randrange(0x4E00, 0x9FFF)) for _ in range(16384)) for j in range(64)}
    bad_record = {"id": "pm/S/1", "kind": "pm", "serial": "S", "version": 1, "method": "colocation",
                  "status": "active", "values": {"slope": 1e16}}
    group = _samples(2) + [_record_sample(bad_record)] + _samples(1, t0=50)
    group.append(Sample("pm", 1_795_000_000_100, 100, "bogus", {"v": 1.0}, (), None, "boot"))  # type: ignore[arg-type]
    group += [Sample("pm", 1_795_000_000_200, 200, TimeSource.GPS, huge, (), None, "boot")] + _samples(2, t0=60)
    seqs = buf.commit(group)
    bad = dict(buf._db.execute("SELECT seq, reason FROM bad_rows").fetchall())
    log: list[str] = []
    _deliver(buf, ing, log)
    stored, gaps, silent = _account(tmp_path / "store.sqlite", buf.epoch, set(seqs))
    report("refused-at-commit", bad={k: v[:60] for k, v in bad.items()}, deliveries=log, stored=sorted(stored))
    assert sorted(bad) == [seqs[2], seqs[4], seqs[5]]
    assert "calibration record" in bad[seqs[2]] and "time source" in bad[seqs[4]]
    assert "too large for any batch" in bad[seqs[5]]
    assert stored == set(seqs) - set(bad) and not silent
    assert all(":stored" in x or ":duplicate" in x for x in log), log  # no batch refused
    buf.close()


def test_sealing_splits_a_batch_over_the_cell_limit(tmp_path):
    """2,000 samples x 251 keys = 502,000 value cells > 500,000: the whole batch was refused."""
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    group = [Sample("pm", 1_795_000_000_000 + i, i, TimeSource.GPS, {f"k{i % 251}": 1.0}, (), None, "boot")
             for i in range(2000)]
    seqs = buf.commit(group)
    log: list[str] = []
    _deliver(buf, ing, log, max_samples=2000)
    stored, _, silent = _account(tmp_path / "store.sqlite", buf.epoch, set(seqs))
    report("cells-split", cells=2000 * 251, limit=MAX_VALUE_CELLS, deliveries=log)
    assert stored == set(seqs) and not silent
    assert len(log) >= 2 and all(x.endswith(":stored") for x in log)
    buf.close()


def test_sealing_splits_a_batch_over_the_payload_limit(tmp_path):
    """Samples that each fit a batch alone but together seal past 1 MiB: sealed in parts, all stored."""
    from core.batch_limits import MAX_PAYLOAD_BYTES

    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    rnd = random.Random(2)
    group = [Sample("pm", 1_795_000_000_000 + i, i, TimeSource.GPS,
                    {f"t{j}": "".join(chr(rnd.randrange(0x4E00, 0x9FFF)) for _ in range(16384)) for j in range(8)},
                    (), None, "boot") for i in range(5)]
    seqs = buf.commit(group)
    sizes = []
    while (sb := buf.seal(2000, 1)) is not None:
        sizes.append(len(sb.payload))
    log: list[str] = []
    _deliver(buf, ing, log)
    stored, _, silent = _account(tmp_path / "store.sqlite", buf.epoch, set(seqs))
    report("payload-split", payload_sizes=sizes, limit=MAX_PAYLOAD_BYTES, deliveries=log)
    assert sum(sizes) > MAX_PAYLOAD_BYTES and all(x <= MAX_PAYLOAD_BYTES for x in sizes) and len(sizes) >= 2
    assert stored == set(seqs) and not silent and all(x.endswith(":stored") for x in log)
    buf.close()


def test_a_stored_record_the_receiver_would_refuse_is_not_announced(tmp_path):
    """A record stored before the van's check (written straight into the table, as an old store
    holds it) used to be re-announced at every start and take its batch down each time."""
    from dataclasses import replace

    from edge.calibration import CalibrationAnnouncer

    store = CalibrationStore(tmp_path / "cal.db")
    good = store.add("pm", "SER-1", "colocation", {"slope": 1.1}, technician="t")
    store.confirm(good.id)
    bad = replace(store.get(good.id), id="pm/SER-2/1", serial="SER-2", values={"slope": 1e16})
    store._put(bad)
    store._db.commit()
    ann = CalibrationAnnouncer(store)
    announced = []
    while (r := ann.read()) is not None:
        announced.append(r.values["id"])
    report("announce", announced=announced)
    assert announced == [good.id]


_HOT_JOURNAL_CHILD = r'''
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=DELETE")
conn.execute("PRAGMA cache_size=1")  # spill: the cut-short transaction reaches the main file
conn.execute("BEGIN")
conn.execute("CREATE TABLE filler (x BLOB)")
for _ in range(64):
    conn.execute("INSERT INTO filler VALUES (randomblob(4000))")
os.kill(os.getpid(), signal.SIGKILL)  # a kill inside the epoch birth's transaction
'''


def test_a_kill_inside_a_rollback_journal_transaction_does_not_stop_the_next_start(tmp_path):
    """Retest #14 f9.1: a SIGKILL during the epoch birth left a hot ``-journal``; the read-only
    quick_check at every later open raised "attempt to write a readonly database"."""
    import subprocess
    import sys

    db = tmp_path / "b.db"
    sqlite3.connect(db).close()  # the empty file the birth starts from
    run = subprocess.run([sys.executable, "-c", _HOT_JOURNAL_CHILD, str(db)], check=False)
    journal = Path(str(db) + "-journal")
    assert run.returncode == -9 and journal.stat().st_size > 0, "no hot journal made"
    report("hot journal after SIGKILL", journal_bytes=journal.stat().st_size)
    buf = Buffer(db, DEV, reserve_bytes=0)  # raised OperationalError (readonly) before the fix
    seqs = buf.commit(_samples(3))
    assert seqs == [1, 2, 3]
    names = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}
    assert "filler" not in names, "the cut-short transaction was not rolled back"
    assert not buf.quarantine_dir.exists() or not any(buf.quarantine_dir.iterdir()), "quarantined"


def _leave_free(mnt: Path, leave: int) -> Path:
    """Someone else takes all but ``leave`` bytes of the card."""
    import os

    f = mnt / "filler"
    st = os.statvfs(mnt)
    with open(f, "wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return f


def test_a_card_too_full_for_the_epoch_birth_starts_and_holds_samples(tmp_path):
    """Retest #14 f9.2: with ~127-134 KiB free the epoch birth's COMMIT hit SQLITE_FULL and
    Buffer() raised (a crash loop). It must start, say disk_full, refuse commits (the agent holds
    the samples) and be born, with every sample delivered, once there is room."""
    from buffer.errors import BufferFullError
    from tests.tmpfs import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "card", "4m") as mnt:
        opened = 0
        for leave in range(112 * 1024, 148 * 1024 + 1, 4096):
            for p in mnt.iterdir():
                p.unlink()
            filler = _leave_free(mnt, leave)
            buf = Buffer(mnt / "b.db", DEV, reserve_bytes=0)  # raised "database or disk is full"
            opened += 1
            held: list[Sample] = []
            committed: set[int] = set()
            for s in _samples(20):
                try:
                    committed |= set(buf.commit(held + [s]))
                    held = []
                except BufferFullError:
                    held.append(s)
                    assert buf.disk_full, "a refused commit without disk_full"
            filler.unlink()
            if held:
                committed |= set(buf.commit(held))
            got: set[int] = set()
            while (sb := buf.seal(500, 1)) is not None:
                got |= {x.seq for x in decode_batch(sb.payload).samples}
                buf.acknowledge(sb.batch_id)
            assert got == committed == set(range(1, 21)), (leave, sorted(committed), sorted(got))
            buf.close()
        report("epoch birth on a nearly full card", opened=opened)


def test_a_quarantine_folder_named_unknown_still_guards_its_epoch_against_a_false_loss(tmp_path, monkeypatch):
    """Retest #14 f9.4: meta's pages unreadable and ``.id`` gone, so the quarantine folder is named
    ``...-unknown``; a cut between copying ``.seq`` into it and blanking the live one left ``.seq``
    naming the quarantined epoch. The guard looked for the epoch in the folder name only, so the
    salvaged, delivered samples 1-10 also went out as "WAL lost" (samples_lost_wal=10)."""
    db = tmp_path / "b.db"
    buf = Buffer(db, DEV, reserve_bytes=0)
    for k in range(2):
        buf.commit(_samples(5, t0=10 * k))  # 1..10, never sent
    epoch = buf.epoch
    buf._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    roots = buf._db.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name='meta'").fetchall()
    page = buf._db.execute("PRAGMA page_size").fetchone()[0]
    buf.close()
    Path(str(db) + ".id").unlink()
    raw = bytearray(db.read_bytes())
    for (r,) in roots:
        raw[(r - 1) * page:r * page] = b"\xa5" * page  # meta unreadable: the epoch is unknown
    db.write_bytes(bytes(raw))

    def copy_then_cut(self: highwater.HighWater, folder: Path) -> None:
        found = self.read()
        if found is not None:
            copy = highwater.HighWater(folder / self.path.name)
            copy.mark(*found)
            copy.close()
        # the cut: the live .seq is never blanked

    monkeypatch.setattr(highwater.HighWater, "move_to", copy_then_cut)
    nb = Buffer(db, DEV, reserve_bytes=0)
    monkeypatch.undo()
    folders = [q.name for q in nb.quarantine_dir.iterdir()]
    delivered: set[int] = set()
    lost: set[int] = set()
    for sb in nb.pending(100):
        b = decode_batch(sb.payload)
        if b.epoch == epoch:
            delivered |= {x.seq for x in b.samples}
            lost |= {q for g in b.gaps if g.reason == WAL_LOST_REASON for q in range(g.first_seq, g.last_seq + 1)}
    report("quarantine-unknown", folders=folders, delivered=len(delivered), wal_lost=len(lost),
           counter=nb.counters().get("samples_lost_wal", 0))
    assert any(f.endswith("-unknown") for f in folders), "the case needs a folder named unknown"
    assert delivered == set(range(1, 11)), "salvage delivers the readable rows"
    assert not (delivered & lost), "salvaged samples declared WAL lost"
    assert nb.counters().get("samples_lost_wal", 0) == 0
    nb.close()


@pytest.mark.parametrize("reason", ["x" * 1500, "lost\x00here", "[" * 200, "held \ud800 lost"])
def test_a_loss_with_a_reason_the_receiver_would_refuse_still_reaches_the_store(tmp_path, reason):
    """Retest #14 f9.5: ``record_lost`` took any reason; one over 1,024 characters or with a NUL
    made the receiver refuse the batch, the replacement carried it again, and every gap was
    dropped (committed numbers silent). The reason is sanitised and bounded at the buffer."""
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    log: list[str] = []
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    committed = set(buf.commit(_samples(5)))
    first, last = buf.record_lost(8, reason)
    committed |= set(buf.commit(_samples(5, t0=100)))
    _deliver(buf, ing, log)
    stored, gaps, silent = _account(tmp_path / "store.sqlite", buf.epoch, committed | set(range(first, last + 1)))
    report("loss-reason", reason=repr(reason[:12]), log=log, gaps=[(a, b, len(r)) for a, b, r in gaps])
    assert log and all(entry.endswith(":stored") for entry in log), f"a batch refused: {log}"
    assert not silent, f"numbers neither stored nor in a gap: {sorted(silent)}"
    assert [(a, b) for a, b, _ in gaps] == [(first, last)]
    assert len(gaps[0][2]) <= 1024 and "\x00" not in gaps[0][2]
    buf.close()


def test_a_refused_gaps_only_batch_keeps_its_loss_visible_in_a_persisted_counter(tmp_path):
    """Retest #14 f9.5: a gaps-only batch the receiver refuses anyway is not sent again (it would
    be refused forever); the loss it told of was only a log line. Now a persisted counter, in
    ``stats()`` (the heartbeat's ``gaps_undelivered``), across a restart."""
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    buf.commit(_samples(3))
    sb = buf.seal(500, 1)
    assert sb is not None
    buf.acknowledge(sb.batch_id)
    buf.record_lost(4, "held in memory, lost at a kill")
    sb = buf.seal(500, 1)
    assert sb is not None and sb.n_samples == 0, "a gaps-only batch"
    assert buf.reject(sb.batch_id, sb.last_seq, "refused by a future receiver rule")
    buf.close()
    nb = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0)
    c = nb.counters()
    report("gaps-only refused", counters=c, stats_gaps_undelivered=nb.stats().gaps_undelivered)
    assert c.get("gap_records_undelivered") == 1 and c.get("samples_in_undelivered_gaps") == 4
    assert nb.stats().gaps_undelivered == 1
    nb.close()


def _sample_just_under_the_payload_limit(rnd: random.Random, margin: int) -> Sample:
    """One valid sample whose batch alone is within ``margin`` bytes under the 1 MiB payload limit."""
    from buffer.store import _encode_alone
    from core.batch_limits import MAX_PAYLOAD_BYTES

    def make(values: dict[str, str]) -> Sample:
        return Sample("pm", 1_795_000_000_000, 0, TimeSource.GPS, values, (), None, "boot")

    values: dict[str, str] = {}
    while len(_encode_alone([make(values)])) < MAX_PAYLOAD_BYTES - margin - 40_000:
        values[f"t{len(values)}"] = "".join(chr(rnd.randrange(0x4E00, 0x9FFF)) for _ in range(16384))
    lo, hi = 0, 16384  # the last value's length, bisected into the window
    tail = "".join(chr(rnd.randrange(0x4E00, 0x9FFF)) for _ in range(hi))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_encode_alone([make({**values, "tail": tail[:mid]})])) <= MAX_PAYLOAD_BYTES - margin // 2:
            lo = mid
        else:
            hi = mid - 1
    return make({**values, "tail": tail[:lo]})


def test_pending_gaps_never_get_a_sample_that_fits_alone_set_aside(tmp_path):
    """Retest #14 f9.6: 40 gaps of ~640 random characters + one large valid sample went over the
    1 MiB compressed limit; halving reached one sample and set it aside as "too large for any
    batch" though it fits alone. Now the gaps are sealed in a batch of their own first."""
    from core.batch_limits import MAX_PAYLOAD_BYTES

    rnd = random.Random(30)
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0, max_bytes=2 << 30)
    lost: set[int] = set()
    for k in range(40):
        a, b = buf.record_lost(1, f"lost {k} " + "".join(rnd.choice("abcdef0123456789") for _ in range(640)))
        lost |= set(range(a, b + 1))
    big = _sample_just_under_the_payload_limit(rnd, 12_000)
    seqs = buf.commit([big])
    assert not buf._db.execute("SELECT 1 FROM bad_rows").fetchone(), "admitted at commit: it fits alone"
    log: list[str] = []
    _deliver(buf, ing, log)
    aside = buf._db.execute("SELECT seq, reason FROM bad_rows").fetchall()
    stored, gaps, silent = _account(tmp_path / "store.sqlite", buf.epoch, set(seqs) | lost)
    report("gaps + one big sample", deliveries=log, set_aside=[(q, r[:60]) for q, r in aside],
           stored=sorted(stored), gaps=len(gaps), limit=MAX_PAYLOAD_BYTES)
    assert not aside, "a sample that fits alone was set aside"
    assert stored == set(seqs) and not silent and all(x.endswith(":stored") for x in log)
    assert len(gaps) == 40 and {q for a, b, _ in gaps for q in range(a, b + 1)} == lost
    buf.close()


def test_the_gap_budget_is_counted_against_the_compressed_limit(tmp_path):
    """Retest #14 f9.6: the gap budget bounded 1 MiB of text before compression (a quarter of the
    inflated 4 MiB); reasons of random 7-bit text barely compress, so one batch of gaps took ~0.9
    MiB of the 1 MiB payload and crowded out every sample riding with it. Now a quarter of the
    smaller limit: the gaps leave at least half the payload to samples; all gaps delivered."""
    from core.batch_limits import MAX_PAYLOAD_BYTES

    rnd = random.Random(7)
    ing = Ingestor(SQLiteStore(tmp_path / "store.sqlite"))
    buf = Buffer(tmp_path / "b.db", DEV, reserve_bytes=0, max_bytes=2 << 30)
    lost: set[int] = set()
    for k in range(1200):  # 1.2 MB of reasons: past the old 1 MiB text budget
        a, b = buf.record_lost(1, "".join(chr(rnd.randrange(1, 128)) for _ in range(1000)))
        lost |= set(range(a, b + 1))
    sizes: list[int] = []
    while (sb := buf.seal(500, 1)) is not None:
        sizes.append(len(sb.payload))
        ack = ing.handle(batch_topic("datalab/v1", DEV), sb.payload, 1).ack
        assert ack.committed, ack.reason
        buf.acknowledge(sb.batch_id)
    stored, gaps, silent = _account(tmp_path / "store.sqlite", buf.epoch, lost)
    report("gap budget", batches=len(sizes), largest=max(sizes), limit=MAX_PAYLOAD_BYTES)
    assert max(sizes) <= MAX_PAYLOAD_BYTES // 2, "gaps alone took most of the payload"
    assert not silent and len(gaps) == 1200
    buf.close()


@pytest.mark.parametrize("text", ["{e} 0009 {c9}", "{e} +9 {c9}", "{e} 1_0 {c10}", "\t{e}\x0b9\x0c{c9}",
                                  "{e}\x1c9\x1d{c9}"])
def test_a_seq_record_not_in_the_exact_written_form_is_no_evidence_of_a_loss(tmp_path: Path, text: str) -> None:
    """Outside test: int() and split() read non-standard text whose CRC (over the number) is valid."""
    from buffer.highwater import HighWater, _check

    hw = HighWater(tmp_path / "b.db.seq")
    hw.mark("e1", 5)
    epoch = "e1"
    hw.close()
    body = text.format(e=epoch, c9=_check(epoch, 9), c10=_check(epoch, 10)).encode()
    (tmp_path / "b.db.seq").write_bytes(body.ljust(96, b"\0"))
    assert HighWater(tmp_path / "b.db.seq").behind(epoch, 5) == 0
    (tmp_path / "b.db.seq").write_bytes(f"{epoch} 9 {_check(epoch, 9)}".encode().ljust(96, b"\0"))
    assert HighWater(tmp_path / "b.db.seq").behind(epoch, 5) == 4  # the exact form still counts
