"""The buffer's parts are separate objects behind Protocols (buffer.seams): each one is built here
alone, on a real SQLite file, with fakes of the others, and does its job.

If a part reached into another's state (the mixins of old called each other through ``self``),
it could not be built like this: the fakes below have only what the seam names.
"""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path

import pytest

from buffer import rowcheck
from buffer.ack import Acknowledger
from buffer.commit import Committer
from buffer.errors import BufferFullError
from buffer.handle import FileHandle
from buffer.outbox import Outbox
from buffer.records import Key, SealedBatch
from buffer.schema import SCHEMA
from buffer.seal import Sealer
from core.sample import Sample, TimeSource
from core.wire import Gap, decode_batch

BUFFER_DIR = Path(__file__).resolve().parent.parent / "buffer"


class FakeTally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def bump(self, name: str, by: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + by

    def bump_quietly(self, name: str) -> None:
        self.bump(name)


class FakeGaps:
    """Records what the part owns up to; writes nothing (so no gap rides in a batch)."""

    def __init__(self) -> None:
        self.gaps: list[tuple[int, int, str]] = []
        self.last: int = 0

    def gap(self, first: int, last: int, reason: str) -> None:
        self.gaps.append((first, last, reason))

    def set_last_seq(self, last: int) -> None:
        self.last = max(self.last, last)

    def lose(self, n: int, reason: str) -> tuple[int, int]:
        raise AssertionError("not used by these parts")


class FakeSpace:
    """A card whose room the test decides."""

    def __init__(self, fits: bool) -> None:
        self.fits = fits
        self.disk_full = False
        self.refused_commits = 0
        self.reserve_bytes = 4096
        self.caps: list[int] = []
        self.stuck_cleared = 0

    def fits_on_disk(self, extra: int) -> bool:
        return self.fits

    def enforce_cap(self, extra: int) -> None:
        self.caps.append(extra)

    def make_room(self) -> None:
        raise AssertionError("no disk-full error in these tests")

    def clear_stuck(self) -> None:
        self.stuck_cleared += 1


class FakeWitness:
    def __init__(self) -> None:
        self.marks: list[tuple[str, int]] = []

    def mark(self, epoch: str, seq: int) -> None:
        self.marks.append((epoch, seq))


class FakeStuck:
    def __init__(self, stuck: bool) -> None:
        self.stuck = stuck
        self.marked = 0

    def still_stuck(self) -> bool:
        return self.stuck

    def mark_stuck(self) -> None:
        self.marked += 1

    def clear_stuck(self) -> None:
        self.stuck = False


class FakeCarriers:
    def __init__(self) -> None:
        self.added: list[tuple[str, str, list[Gap]]] = []

    def add_carrier(self, epoch: str, device: str, gaps: list[Gap]) -> None:
        self.added.append((epoch, device, gaps))


def _file(tmp_path: Path) -> FileHandle:
    h = FileHandle(tmp_path / "b.sqlite", "van-7")
    h.db = sqlite3.connect(h.path, isolation_level=None)
    h.db.executescript(SCHEMA)
    h.db.create_function("row_crc", 8, rowcheck.row_crc, deterministic=True)
    h.epoch = "0123456789abcdef"
    return h


def _samples(n: int) -> list[Sample]:
    return [Sample("pm", 1_700_000_000_000 + i * 1000, i * 1000, TimeSource.GPS, {"pm25": float(i)}, (), None, "boot")
            for i in range(n)]


def _fake_commit(h: FileHandle, samples: list[Sample]) -> None:
    """What a commit leaves in the file, written without the Committer: the sealer's only input."""
    rows = [(s.sensor, s.t_utc_ms, s.t_mono_ms, str(s.time_src), s.boot_id, f'{{"pm25":{s.values["pm25"]}}}', "")
            for s in samples]
    with h.tx():
        h.db.executemany(
            "INSERT INTO samples (seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags, crc)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            [(q, *r, rowcheck.commit_crc(q, *r)) for q, r in enumerate(rows, 1)])
    h.unsealed = len(rows)


def test_the_sealer_seals_rows_of_a_fake_commit_and_owns_up_to_a_damaged_one(tmp_path: Path) -> None:
    h = _file(tmp_path)
    _fake_commit(h, _samples(5))
    h.db.execute("UPDATE samples SET vals='{\"pm25\":99.0}' WHERE seq=3")  # a flipped value: crc fails
    gaps, tally = FakeGaps(), FakeTally()
    sealed = Sealer(h, gaps, tally).seal(100, 1_700_000_100_000)
    assert sealed is not None and (sealed.first_seq, sealed.last_seq, sealed.n_samples) == (1, 5, 4)
    batch = decode_batch(sealed.payload)
    assert [s.seq for s in batch.samples] == [1, 2, 4, 5] and batch.epoch == h.epoch and batch.device == "van-7"
    assert [s.values["pm25"] for s in batch.samples] == [0.0, 1.0, 3.0, 4.0]
    # The damaged row went to bad_rows, and was owned up to through the seam, not a table of its own.
    assert gaps.gaps == [(3, 3, gaps.gaps[0][2])] and "set aside" in gaps.gaps[0][2]
    assert tally.counts == {"rows_set_aside": 1}
    assert h.db.execute("SELECT seq FROM bad_rows").fetchall() == [(3,)]
    assert h.db.execute("SELECT count(*) FROM samples").fetchone()[0] == 0 and h.unsealed == 0
    assert Sealer(h, gaps, tally).seal(100, 0) is None  # nothing left


def test_the_committer_refuses_on_a_full_fake_card_and_writes_nothing(tmp_path: Path) -> None:
    h = _file(tmp_path)
    space, witness = FakeSpace(fits=False), FakeWitness()
    committer = Committer(h, space, FakeGaps(), FakeTally(), witness, on_room_again=lambda: None)
    with pytest.raises(BufferFullError):
        committer.commit(_samples(3))
    assert h.db.execute("SELECT count(*) FROM samples").fetchone()[0] == 0
    assert (space.disk_full, space.refused_commits, witness.marks) == (True, 1, [])


def test_the_committer_on_room_again_numbers_marks_the_witness_and_calls_back(tmp_path: Path) -> None:
    h = _file(tmp_path)
    space, witness, called = FakeSpace(fits=True), FakeWitness(), []
    space.disk_full = True  # the last commit was refused
    committer = Committer(h, space, FakeGaps(), FakeTally(), witness, on_room_again=lambda: called.append(1))
    assert committer.commit(_samples(3)) == [1, 2, 3]
    assert committer.commit(_samples(2)) == [4, 5]
    assert witness.marks == [(h.epoch, 3), (h.epoch, 5)]  # the durable number, outside the WAL
    assert called == [1] and not space.disk_full and h.unsealed == 5 and len(space.caps) == 2
    # Rows verify: what the sealer will read is what was committed.
    rows = h.db.execute(f"SELECT {rowcheck.SELECT_COLS} FROM samples ORDER BY seq").fetchall()
    assert all(rowcheck.check_row(r).sample is not None for r in rows)


def test_a_deferred_ack_is_hidden_by_the_outbox_and_flushed_only_when_room_changes(tmp_path: Path) -> None:
    h = _file(tmp_path)
    _fake_commit(h, _samples(4))
    sealed = Sealer(h, FakeGaps(), FakeTally()).seal(2, 0)
    assert sealed is not None
    deferred: set[str] = set()
    outbox = Outbox(h, deferred)
    stuck, tally = FakeStuck(stuck=True), FakeTally()
    acks = Acknowledger(h, outbox, FakeCarriers(), tally, stuck, deferred)

    def no_room(key: Key) -> bool | None:
        return None  # what the facade's full-card guard returns when the delete found no room

    assert acks.acknowledge(sealed.batch_id, no_room) is True
    assert outbox.get(sealed.batch_id) is None and outbox.pending(10) == []  # hidden at once
    assert outbox.peek(sealed.batch_id) == sealed  # ... though still in the file
    assert tally.counts == {"acks_deferred": 1}
    acks.flush()  # nothing changed on the card: not even tried
    assert outbox.peek(sealed.batch_id) is not None and deferred == {sealed.batch_id}
    stuck.stuck = False
    acks.flush()
    assert outbox.peek(sealed.batch_id) is None and deferred == set()


def test_a_rejected_salvaged_batch_owns_up_through_the_carrier_seam(tmp_path: Path) -> None:
    h = _file(tmp_path)
    h.db.execute("INSERT INTO salvaged VALUES ('oldepoch', 1, 9, 'van-7', 9, x'00', 'h', 0, NULL)")
    carriers = FakeCarriers()
    acks = Acknowledger(h, Outbox(h, set()), carriers, FakeTally(), FakeStuck(False), set())
    sb: SealedBatch | None = Outbox(h, set()).get("van-7/oldepoch/1-9")
    assert sb is not None
    assert acks.reject(sb.batch_id, 9, "bad", by="receiver")
    assert carriers.added == [("oldepoch", "van-7", [Gap(1, 9, "rejected by receiver: bad")])]
    assert h.db.execute("SELECT count(*) FROM salvaged").fetchone()[0] == 0


# The parts that are objects: none may import another part's module, only the seams, the shared
# handle and leaf helpers. (The facade, buffer.store, is the one place they are wired.)
PARTS = ("commit", "seal", "outbox", "ack", "room", "gaps", "carriers", "counters", "recover", "epoch",
         "held", "opening")
LEAVES = {"buffer.seams", "buffer.handle", "buffer.records", "buffer.errors", "buffer.schema", "buffer.rowcheck",
          "buffer.gaprows", "buffer.recovery", "buffer.heldledger", "buffer.highwater", "buffer.identity",
          "buffer.guards", "buffer"}


@pytest.mark.parametrize("part", PARTS)
def test_a_part_imports_no_other_part(part: str) -> None:
    tree = ast.parse((BUFFER_DIR / f"{part}.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    others = {m for m in imported if m.startswith("buffer") and m not in LEAVES}
    # Shared constants and pure functions are fine (WAL_LOST_REASON, _encodes); classes are not.
    allowed = {"buffer.gaps": {"WAL_LOST_REASON"}, "buffer.commit": {"_encodes"}}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module in others:
            names = {a.name for a in n.names}
            extra = names - allowed.get(n.module, set())
            assert not extra, f"buffer/{part}.py imports {extra} from {n.module}: use a Protocol in buffer.seams"
