"""The van's buffer, issue 14's last points: damage that read back as valid data.

A bit flipped in the epoch text of ``meta`` (the buffer carried on under a new
identity), a WAL cut at a frame boundary (SQLite took it for a clean end), a
kill on a full card. Each test damages a real file the way a card would, opens
it as the agent does, and accounts for every sequence number: delivered, or
named by a gap record. Every test prints what it exercised and asserts that it
happened.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from buffer.store import Buffer
from tests.delivery_harness import report
from tests.test_card_faults_more import _build_p3, _drain_and_account
from core.wire import decode_batch


def _flip_epoch_text(db: Path, epoch: str) -> str:
    """Flip the lowest bit of one hex digit of the epoch in ``meta``'s row: it still reads as an epoch."""
    data = bytearray(db.read_bytes())
    at = data.find(b"epoch" + epoch.encode())
    assert at > 0 and data.find(b"epoch" + epoch.encode(), at + 1) < 0, "one copy of the epoch row"
    i = next(k for k, c in enumerate(epoch) if c.isdigit())
    data[at + 5 + i] ^= 1
    db.write_bytes(bytes(data))
    return epoch[:i] + chr(ord(epoch[i]) ^ 1) + epoch[i + 1:]


# --- 1. the epoch in meta ---------------------------------------------------------------------


def test_a_flipped_bit_in_the_epoch_text_quarantines_and_salvages_under_the_true_epoch(tmp_path):
    """One bit of the epoch text used to give the buffer a new identity, silently: the unsealed
    rows went out under an epoch that never existed and the true one ended without a word."""
    buf, ledger, delivered = _build_p3(tmp_path)
    epoch0 = buf.epoch
    buf.close()
    assert not (tmp_path / "b.db-wal").exists()  # checkpointed on close: the row is in the main file
    garbled = _flip_epoch_text(tmp_path / "b.db", epoch0)
    peek = Buffer(tmp_path / "b.db", "van-p3")  # what the agent sees at start
    epochs = {sb.epoch for sb in peek.pending(100)} | {peek.epoch}
    peek.close()
    out = _drain_and_account(tmp_path, epoch0, ledger, delivered)
    report("epoch-flip", epoch=epoch0, garbled=garbled, epochs_seen=sorted(epochs), **out)
    assert garbled not in epochs  # nothing goes out under the garbled identity
    assert out["new_epoch"] and any("meta: epoch" in r for r in out["quarantine"])
    # Everything not yet delivered comes back under its true epoch: nothing silent, doubled or altered.
    assert not out["silent"] and not out["doubled"] and out["altered"] == 0
    assert out["gapped"] == 0  # the file was otherwise sound: the salvage read every row


def test_damage_to_one_witness_of_the_epoch_is_repaired_not_quarantined(tmp_path):
    """The side file and the checksum each vouch for meta's epoch: damage to one of them alone
    (or a file from before the checksum) is repaired at open, and the epoch stays."""
    from buffer.identity import epoch_check

    path = tmp_path / "b.db"
    buf = Buffer(path, "van-w")
    epoch0 = buf.epoch
    buf.close()
    side = Path(str(path) + ".id")
    cases = []
    # a. The side file garbled (its epoch text changed): meta's checksum says meta is right.
    d = json.loads(side.read_text())
    side.write_text(json.dumps({**d, "epoch": "0" * 16}))
    b = Buffer(path, "van-w")
    cases.append(("side file garbled", b.epoch, json.loads(side.read_text())["epoch"]))
    b.close()
    # b. The checksum row garbled, or missing (a file from before it): the side file agrees.
    for how in ("UPDATE meta SET value='00000000' WHERE key='epoch_check'",
                "DELETE FROM meta WHERE key='epoch_check'"):
        db = sqlite3.connect(path)
        db.execute(how)
        db.commit()
        db.close()
        b = Buffer(path, "van-w")
        check = b._db.execute("SELECT value FROM meta WHERE key='epoch_check'").fetchone()[0]
        cases.append((how.split()[0].lower() + " check", b.epoch, check))
        b.close()
    report("epoch-witness", epoch=epoch0, cases=cases)
    assert not (tmp_path / "quarantine").exists()
    assert cases[0][1:] == (epoch0, epoch0)  # side file repaired
    assert [c[1:] for c in cases[1:]] == [(epoch0, epoch_check(epoch0))] * 2  # checksum repaired


def test_the_epoch_flip_found_while_only_the_side_file_survives_still_names_the_epoch(tmp_path):
    """meta garbled and its checksum too: the side file names the true epoch for the salvage."""
    buf, ledger, delivered = _build_p3(tmp_path)
    epoch0 = buf.epoch
    buf.close()
    db = sqlite3.connect(tmp_path / "b.db")
    db.execute("UPDATE meta SET value='ffffffff' WHERE key='epoch_check'")
    db.commit()
    db.close()
    _flip_epoch_text(tmp_path / "b.db", epoch0)
    out = _drain_and_account(tmp_path, epoch0, ledger, delivered)
    report("epoch-flip-no-check", **out)
    assert out["new_epoch"] and out["quarantine"]
    assert not out["silent"] and not out["doubled"] and out["altered"] == 0 and out["gapped"] == 0


# --- 2. a WAL cut at a frame boundary ----------------------------------------------------------


def _commit_frame_ends(wal: bytes) -> list[int]:
    """Offsets just past each commit frame of a WAL (where a cut leaves a WAL that reads as whole)."""
    page = int.from_bytes(wal[8:12], "big")
    ends, off = [], 32
    while off + 24 + page <= len(wal):
        if int.from_bytes(wal[off + 4:off + 8], "big"):  # "size after commit": a commit frame
            ends.append(off + 24 + page)
        off += 24 + page
    return ends


def _crash_image(src: Path, dst: Path) -> None:
    """The files as a power cut would leave them with the agent running (no checkpoint on close)."""
    dst.mkdir()
    for suffix in ("", "-wal", ".id", ".seq", ".held"):
        f = Path(str(src) + suffix)
        if f.exists():
            (dst / f.name).write_bytes(f.read_bytes())


@pytest.mark.parametrize("lost_commits", [1, 2, 5])  # the seal, then 1 or 4 sample commits too
def test_a_wal_cut_at_a_frame_boundary_owns_up_to_the_lost_commits(tmp_path, lost_commits):
    """SQLite takes a WAL cut at a frame boundary for a clean end: the transactions after the cut
    were gone, their numbers handed out again, and nothing said so. The high-water side file
    (buffer/highwater.py) names the loss: a gap record over exactly those numbers, a counter."""
    from buffer.recovery import wal_problem
    from buffer.store import WAL_LOST_REASON
    from tests.test_card_faults_more import _samples

    buf = Buffer(tmp_path / "b.db", "van-wal", reserve_bytes=0)
    committed = [buf.commit(_samples(5, t0=10 * k)) for k in range(10)]  # 10 commits, 50 samples
    buf.seal(20, 1)  # sealing is a commit too (not a sample number): the cut may take it back
    image = tmp_path / "image"
    _crash_image(buf.path, image)
    buf.close()
    wal = (image / "b.db-wal").read_bytes()
    ends = _commit_frame_ends(wal)
    (image / "b.db-wal").write_bytes(wal[:ends[-1 - lost_commits]])  # the last commits gone, cleanly
    assert wal_problem(image / "b.db-wal") is None  # the WAL check cannot see it: it ends at a commit

    ro = sqlite3.connect(f"file:{image / 'b.db'}?mode=ro", uri=True)
    survived = ro.execute("SELECT seq FROM sqlite_sequence WHERE name='samples'").fetchone()[0]
    ro.close()
    nb = Buffer(image / "b.db", "van-wal", reserve_bytes=0)
    counters = nb.counters()
    (after,) = nb.commit(_samples(1, t0=999))  # a new sample must not take a lost number
    batches = []
    while (sb := nb.seal(100, 2)) is not None:
        batches.append(decode_batch(sb.payload))
        nb.acknowledge(sb.batch_id)
    gaps = [(g.first_seq, g.last_seq, g.reason) for b in batches for g in b.gaps]
    report("wal-cut", lost_commits=lost_commits, committed_last=committed[-1][-1], survived_last=survived,
           gaps=[(a, b) for a, b, _ in gaps], counter=counters.get("samples_lost_wal"), next_seq=after)
    lost = [q for seqs in committed for q in seqs if q > survived]
    assert len(lost) == 5 * (lost_commits - 1)  # the cut took what it was meant to take
    wal_gaps = [(a, b) for a, b, r in gaps if r == WAL_LOST_REASON]
    if lost:
        assert wal_gaps == [(lost[0], committed[-1][-1])]  # exactly the lost range, named
    else:
        assert wal_gaps == []  # only the seal was lost: its samples are back unsealed, nothing to own up to
        assert sorted(x.seq for b in batches for x in b.samples) == list(range(1, 52))  # type: ignore[type-var]
    assert counters.get("samples_lost_wal", 0) == len(lost)
    assert after == committed[-1][-1] + 1  # the lost numbers are never reused
    assert not (image / "quarantine").exists()  # the file itself is sound: no quarantine
    nb.close()


def test_an_intact_buffer_reopened_reports_no_wal_loss(tmp_path):
    """The witness lags (written after the commit), never leads: a clean stop and a crash image
    of an intact WAL own up to nothing."""
    from tests.test_card_faults_more import _samples

    buf = Buffer(tmp_path / "b.db", "van-ok", reserve_bytes=0)
    for k in range(5):
        buf.commit(_samples(3, t0=10 * k))
    _crash_image(buf.path, tmp_path / "image")
    buf.close()
    found = []
    for path in (tmp_path / "b.db", tmp_path / "image" / "b.db"):
        b = Buffer(path, "van-ok", reserve_bytes=0)
        found.append((b.last_seq(), b.counters().get("samples_lost_wal", 0),
                      b._db.execute("SELECT count(*) FROM gaps").fetchone()[0]))
        b.close()
    report("wal-intact", found=found)
    assert found == [(15, 0, 0), (15, 0, 0)]
