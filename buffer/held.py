"""Samples the agent holds in memory on a full card (buffer.heldledger): noted, then owned up to."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from buffer import recovery
from buffer.heldledger import HeldNote
from buffer.identity import IdentityFile
from buffer.highwater import HighWater
from core.sample_rules import gap_reason
from core.wire import Gap
from buffer.errors import BufferFullError
from buffer.base import BufferBase
from buffer.gaps import WAL_LOST_REASON
from buffer.guards import _RAISE, _recovering, _tolerate_full

log = logging.getLogger("buffer.store")  # the name the one-class store logged under


class HeldMixin(BufferBase):
    """Buffer's part: samples the agent holds in memory on a full card (see the module docstring)."""

    def note_held(self, held: int, owed: int) -> None:
        """The agent holds ``held`` samples a full card refused (``owed`` more already discarded).

        Written in place to the side file and fsynced, so a stop, a kill or a
        power cut that loses them still leaves their count; the next open turns
        it into gap records. Costs nothing while nothing is held.
        """
        if not (held or owed or self._noted or self._carried):
            return
        try:
            last = 0 if self._unborn else self._file.last_seq()
        except sqlite3.DatabaseError as exc:
            log.error("buffer: cannot note %d held samples: %s", held, exc)  # the next write finds the damage
            return
        # Unborn (no database yet): a note without an epoch, believed by the first one born.
        note = HeldNote("" if self._unborn else self.epoch, last, held, owed, list(self._carried))
        self._last_held = (held, owed)
        empty = not (held or owed or self._carried)
        self._held_ready = self._held_ready or self._held.ensure()  # 4 KiB fit where a birth does not
        written = self._held_ready and self._held.write(None if empty else note)
        if written:
            self._noted = not empty
        self.held_unnoted = 0 if written else held + owed + sum(n for n, _ in self._carried)

    def _take_held_note(self) -> None:
        """At open: what the last run noted and never settled becomes gap records."""
        self._held_ready = self._held.ensure()
        note = self._held.read()
        if self._held.ignored:
            self._counters.bump_quietly("held_notes_ignored")
        if self._unborn:
            if note is not None and note.epoch == "":  # an unborn run's: carried until the birth
                self._carried, self._noted = note.losses(), True
            return
        last = self._file.last_seq()
        witness = self._highwater.read()
        wal_lost = max(0, witness[1] - last) if witness is not None and witness[0] == self.epoch else 0
        if ((witness is None or witness[0] != self.epoch) and note is not None and note.epoch == self.epoch and note.last_seq > last
                and all(r != WAL_LOST_REASON for _, r in note.carried)):
            # .seq damaged, gone or stale (another epoch's), and a cut WAL took back commits the
            # (checksummed) note saw: the note is the witness of how far this epoch went.
            wal_lost = note.last_seq - last
        # An unborn run's note (no epoch) belongs to the first database born after it, while that
        # has numbered nothing: owning up takes numbers, so it is never applied twice.
        # A WAL cut at a frame boundary took back commits the note saw: .seq vouches for its
        # last_seq (the note's held samples come after the lost range, owned up to first).
        if note is not None and (note.epoch in (self.epoch, "") and note.last_seq == last
                                 or note.epoch == self.epoch and wal_lost and note.last_seq == last + wal_lost):
            # (Otherwise none, or settled since: every settling write takes a new sequence number.)
            self._carried = note.losses()
            self._noted = True
        elif note is not None and note.epoch not in (self.epoch, "") and self._epoch_gone_at(note):
            self._own_up_to_gone_epochs_note(note)
        if self._highwater.damaged:
            self._highwater.mark(self.epoch, last)  # rewritten now: ignored, never a loss
        if wal_lost and all(r != WAL_LOST_REASON for _, r in self._carried):  # not yet in a note
            # Committed transactions are gone from the WAL (cut at a frame boundary): their
            # numbers are owned up to first, so the gap names exactly the lost range.
            log.error("buffer %s: %d committed sample numbers (%d-%d) are missing: the WAL lost"
                      " committed transactions", self.path, wal_lost, last + 1, last + wal_lost)
            self._carried.insert(0, (wal_lost, WAL_LOST_REASON))
        if self._carried:
            try:
                self._own_up_to_carried()
            except BufferFullError:
                log.error("buffer: no room yet to record %s; kept in %s", self._carried, self._held.path)

    def _epoch_gone_at(self, note: HeldNote) -> bool:
        """Whether the note's epoch is gone (a deleted database, or one quarantined) and its own
        witness, ``.seq``, ended at the note's last_seq: the note was never settled, so its
        losses are owed under that epoch. A settled note would have moved ``.seq`` past it."""
        if self._epochs.lost_witness == (note.epoch, note.last_seq):
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
            if ident is not None and ident[0] == note.epoch and _last_number(q / self.path.name) == note.last_seq:
                return True
        return False

    @_recovering
    @_tolerate_full(None)
    def _own_up_to_gone_epochs_note(self, note: HeldNote) -> None:
        """The note's losses as gap records of its own (gone) epoch, in a carrier of that epoch,
        numbered on from its last_seq like the WAL-lost gap; once (a meta mark), then cleared."""
        mark = f"held_owned:{note.epoch}:{note.last_seq}"
        losses = note.losses()
        if self._file.db.execute("SELECT 1 FROM meta WHERE key=?", (mark,)).fetchone() is None and losses:
            gaps, nxt = [], note.last_seq + 1
            for n, reason in losses:
                gaps.append(Gap(nxt, nxt + n - 1, gap_reason(reason)))
                nxt += n
            with self._file.tx():
                self._carriers.add_carrier(note.epoch, self.device_id, gaps)
                for n, reason in losses:
                    self._counters.bump(
                        "samples_lost_wal" if reason == WAL_LOST_REASON else "samples_lost_in_memory", n)
                self._file.db.execute("INSERT INTO meta VALUES (?, '1')", (mark,))
            log.error("buffer: %d samples lost at the end of gone epoch %s, owned up to under it as %s",
                      sum(n for n, _ in losses), note.epoch, [(g.first_seq, g.last_seq) for g in gaps])
        if self._held_ready and self._held.write(None):
            self._noted = False

    def _rebase_held_note(self) -> None:
        """Born at last: an unborn run's losses get this epoch's numbers, what is held now its note."""
        if self._carried:
            try:
                self._own_up_to_carried()
            except BufferFullError:
                return  # the note without an epoch still stands, believed while nothing is numbered
        if self._last_held != (0, 0):
            self.note_held(*self._last_held)

    @_recovering
    @_tolerate_full(_RAISE)
    def _own_up_to_carried(self) -> None:
        carried = list(self._carried)
        with self._file.tx():
            for n, reason in carried:
                first, last = self._gaps.lose(n, reason)
                log.error("buffer: %d samples lost at the last run's end, owned up to as gap %d-%d (%s)",
                          n, first, last, reason)
        self._carried = []
        self._highwater.mark(self.epoch, self._file.last_seq())
        # The note is void now (last_seq moved past it); clear it anyway so it is not read again.
        if self._held_ready and self._held.write(None):
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
