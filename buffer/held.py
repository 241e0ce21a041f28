"""Samples the agent holds in memory on a full card (buffer.heldledger): noted, then owned up to."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Callable

from buffer import recovery
from buffer.heldledger import HeldNote
from buffer.identity import IdentityFile
from buffer.highwater import HighWater
from core.sample_rules import gap_reason
from core.wire import Gap
from buffer.errors import BufferFullError
from buffer.gaps import WAL_LOST_REASON
from buffer.handle import FileHandle
from buffer.heldledger import HeldLedger
from buffer.seams import CarrierWriter, GapRecorder, Tally

log = logging.getLogger("buffer.store")  # the name the one-class store logged under


class HeldSamples:
    """Samples the agent holds in memory on a full card: noted outside the database, owned up to.

    Two of its writes run under the facade's corruption and full-card guards (buffer.guards), as
    the one-class store ran them: the facade wraps ``own_up_to_carried`` and
    ``own_up_to_gone_epochs_note`` and hands the wrappers back (``guarded_carried``,
    ``guarded_gone``), which is what this object calls itself.
    """

    def __init__(self, handle: FileHandle, ledger: HeldLedger, tally: Tally, gaps: GapRecorder,
                 carriers: CarrierWriter, *, highwater: HighWater, identity: IdentityFile,
                 quarantine_dir: Path, unborn: Callable[[], bool],
                 lost_witness: Callable[[], tuple[str, int] | None],
                 guarded_carried: Callable[[], None],
                 guarded_gone: Callable[[HeldNote], None]) -> None:
        self._h = handle
        self._held = ledger
        self._tally = tally
        self._gaps = gaps
        self._carriers = carriers
        self._highwater = highwater
        self._identity = identity
        self.quarantine_dir = quarantine_dir
        self._is_unborn = unborn  # no database file yet (buffer.opening): notes carry no epoch
        self._lost_witness = lost_witness  # EpochKeeper.lost_witness
        self._guarded_carried = guarded_carried
        self._guarded_gone = guarded_gone
        self.ready = False
        self._last_held = (0, 0)  # (held, owed) of the last note_held, re-noted at a late birth
        # Samples held in memory whose count no file records (0 bytes free, or the note failed):
        # lost without a trace if the agent ends now; the heartbeat shows it.
        self.held_unnoted = 0
        self._noted = False
        # Losses of earlier runs not yet written as gap records: (count, reason).
        self.carried: list[tuple[int, str]] = []

    @property
    def _unborn(self) -> bool:
        return self._is_unborn()

    def ensure_ready(self) -> bool:
        """Make the side file (one block) if it is not there yet; True once it is."""
        self.ready = self.ready or self._held.ensure()
        return self.ready

    def note_held(self, held: int, owed: int) -> None:
        """The agent holds ``held`` samples a full card refused (``owed`` more already discarded).

        Written in place to the side file and fsynced, so a stop, a kill or a
        power cut that loses them still leaves their count; the next open turns
        it into gap records. Costs nothing while nothing is held.
        """
        if not (held or owed or self._noted or self.carried):
            return
        try:
            last = 0 if self._unborn else self._h.last_seq()
        except sqlite3.DatabaseError as exc:
            log.error("buffer: cannot note %d held samples: %s", held, exc)  # the next write finds the damage
            return
        # Unborn (no database yet): a note without an epoch, believed by the first one born.
        note = HeldNote("" if self._unborn else self._h.epoch, last, held, owed, list(self.carried))
        self._last_held = (held, owed)
        empty = not (held or owed or self.carried)
        self.ready = self.ready or self._held.ensure()  # 4 KiB fit where a birth does not
        written = self.ready and self._held.write(None if empty else note)
        if written:
            self._noted = not empty
        self.held_unnoted = 0 if written else held + owed + sum(n for n, _ in self.carried)

    def take_held_note(self) -> None:
        """At open: what the last run noted and never settled becomes gap records."""
        self.ready = self._held.ensure()
        note = self._held.read()
        if self._held.ignored:
            self._tally.bump_quietly("held_notes_ignored")
        if self._unborn:
            if note is not None and note.epoch == "":  # an unborn run's: carried until the birth
                self.carried, self._noted = note.losses(), True
            return
        last = self._h.last_seq()
        witness = self._highwater.read()
        wal_lost = max(0, witness[1] - last) if witness is not None and witness[0] == self._h.epoch else 0
        if ((witness is None or witness[0] != self._h.epoch) and note is not None
                and note.epoch == self._h.epoch and note.last_seq > last
                and all(r != WAL_LOST_REASON for _, r in note.carried)):
            # .seq damaged, gone or stale (another epoch's), and a cut WAL took back commits the
            # (checksummed) note saw: the note is the witness of how far this epoch went.
            wal_lost = note.last_seq - last
        # An unborn run's note (no epoch) belongs to the first database born after it, while that
        # has numbered nothing: owning up takes numbers, so it is never applied twice.
        # A WAL cut at a frame boundary took back commits the note saw: .seq vouches for its
        # last_seq (the note's held samples come after the lost range, owned up to first).
        if note is not None and (note.epoch in (self._h.epoch, "") and note.last_seq == last
                                 or note.epoch == self._h.epoch and wal_lost and note.last_seq == last + wal_lost):
            # (Otherwise none, or settled since: every settling write takes a new sequence number.)
            self.carried = note.losses()
            self._noted = True
        elif note is not None and note.epoch not in (self._h.epoch, "") and self._epoch_gone_at(note):
            self._guarded_gone(note)
        if self._highwater.damaged:
            self._highwater.mark(self._h.epoch, last)  # rewritten now: ignored, never a loss
        if wal_lost and all(r != WAL_LOST_REASON for _, r in self.carried):  # not yet in a note
            # Committed transactions are gone from the WAL (cut at a frame boundary): their
            # numbers are owned up to first, so the gap names exactly the lost range.
            log.error("buffer %s: %d committed sample numbers (%d-%d) are missing: the WAL lost"
                      " committed transactions", self._h.path, wal_lost, last + 1, last + wal_lost)
            self.carried.insert(0, (wal_lost, WAL_LOST_REASON))
        if self.carried:
            try:
                self._guarded_carried()
            except BufferFullError:
                log.error("buffer: no room yet to record %s; kept in %s", self.carried, self._held.path)

    def _epoch_gone_at(self, note: HeldNote) -> bool:
        """Whether the note's epoch is gone (a deleted database, or one quarantined) and its own
        witness, ``.seq``, ended at the note's last_seq: the note was never settled, so its
        losses are owed under that epoch. A settled note would have moved ``.seq`` past it."""
        if self._lost_witness() == (note.epoch, note.last_seq):
            return True  # the new birth owned up to that epoch's numbers (EpochKeeper._own_up_to_lost_epoch)
        if not self.quarantine_dir.is_dir():
            return False
        for q in self.quarantine_dir.iterdir():
            if not q.is_dir():
                continue
            if HighWater(q / self._highwater.path.name).read() == (note.epoch, note.last_seq):
                return True
            # .seq damaged too: the quarantined file itself, if its .id copy names the note's
            # epoch and its last number handed out is the note's.
            ident = IdentityFile(q / self._identity.path.name).read()
            if ident is not None and ident[0] == note.epoch and _last_number(q / self._h.path.name) == note.last_seq:
                return True
        return False

    def own_up_to_gone_epochs_note(self, note: HeldNote) -> None:
        """The note's losses as gap records of its own (gone) epoch, in a carrier of that epoch,
        numbered on from its last_seq like the WAL-lost gap; once (a meta mark), then cleared."""
        mark = f"held_owned:{note.epoch}:{note.last_seq}"
        losses = note.losses()
        if self._h.db.execute("SELECT 1 FROM meta WHERE key=?", (mark,)).fetchone() is None and losses:
            gaps, nxt = [], note.last_seq + 1
            for n, reason in losses:
                gaps.append(Gap(nxt, nxt + n - 1, gap_reason(reason)))
                nxt += n
            with self._h.tx():
                self._carriers.add_carrier(note.epoch, self._h.device_id, gaps)
                for n, reason in losses:
                    self._tally.bump(
                        "samples_lost_wal" if reason == WAL_LOST_REASON else "samples_lost_in_memory", n)
                self._h.db.execute("INSERT INTO meta VALUES (?, '1')", (mark,))
            log.error("buffer: %d samples lost at the end of gone epoch %s, owned up to under it as %s",
                      sum(n for n, _ in losses), note.epoch, [(g.first_seq, g.last_seq) for g in gaps])
        if self.ready and self._held.write(None):
            self._noted = False

    def rebase_held_note(self) -> None:
        """Born at last: an unborn run's losses get this epoch's numbers, what is held now its note."""
        if self.carried:
            try:
                self._guarded_carried()
            except BufferFullError:
                return  # the note without an epoch still stands, believed while nothing is numbered
        if self._last_held != (0, 0):
            self.note_held(*self._last_held)

    def own_up_to_carried(self) -> None:
        carried = list(self.carried)
        with self._h.tx():
            for n, reason in carried:
                first, last = self._gaps.lose(n, reason)
                log.error("buffer: %d samples lost at the last run's end, owned up to as gap %d-%d (%s)",
                          n, first, last, reason)
        self.carried = []
        self._highwater.mark(self._h.epoch, self._h.last_seq())
        # The note is void now (last_seq moved past it); clear it anyway so it is not read again.
        if self.ready and self._held.write(None):
            self._noted = False


def _last_number(db: Path) -> int | None:
    """The last sequence number a quarantined buffer file handed out, or None if unreadable."""
    if not db.exists():
        return None
    try:
        conn = recovery._open_ro(db)
        try:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='samples'").fetchone()
        finally:
            conn.close()
    except (sqlite3.DatabaseError, UnicodeDecodeError):
        return None
    return row[0] if row and type(row[0]) is int else None
