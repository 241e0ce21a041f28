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
from uplink.wire import decode_batch


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
