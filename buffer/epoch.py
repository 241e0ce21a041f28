"""The buffer's identity: its epoch, born once per file and vouched for by its witnesses."""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Callable

from buffer import recovery
from buffer.highwater import HighWater
from buffer.identity import IdentityFile, epoch_check, vouched_epoch
from core.wire import Gap
from buffer.gaps import WAL_LOST_REASON
from buffer.handle import FileHandle
from buffer.seams import CarrierWriter, Tally

log = logging.getLogger("buffer.store")  # the name the one-class store logged under


class EpochKeeper:
    """Reads (and vouches for) the open file's epoch, or gives a new file its one."""

    def __init__(self, handle: FileHandle, tally: Tally, carriers: CarrierWriter, *, highwater: HighWater,
                 identity: IdentityFile, quarantine_dir: Path, checkpoint: Callable[[], None]) -> None:
        self._h = handle
        self._tally = tally
        self._carriers = carriers
        self._highwater = highwater
        self._identity = identity
        self.quarantine_dir = quarantine_dir
        self._checkpoint = checkpoint  # Room.checkpoint
        self.damaged_epoch: str | None = None  # the true epoch when meta's failed its check
        self.lost_witness: tuple[str, int] | None = None  # (epoch, last_seq) a new birth owned up to as gone
        # How the file is open (buffer.opening), set by ``init_epoch``'s caller for each open.
        self._exclusive = False
        self._unborn = False

    def init_epoch(self, real: bool = True, *, exclusive: bool = False, unborn: bool = False) -> str:
        """This file's epoch; a new one for a new file. ``real``: False for the in-memory stand-in.

        ``exclusive``/``unborn``: how the file is open (a card full at start): no write is tried
        that only tidies up."""
        self._exclusive, self._unborn = exclusive, unborn
        row = self._h.db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row:
            return self._vouch(str(row[0]))
        if self._has_data():
            # Rows without an epoch: meta lost its row (damage), not a new buffer. Quarantine
            # and salvage (the side files name the epoch) rather than renumber them silently.
            raise sqlite3.DatabaseError("database disk image is malformed (meta: no epoch, yet rows)")
        epoch = secrets.token_hex(8)
        witness = self._highwater.read() if real else None
        try:
            with self._h.tx():
                self._h.db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
                self._h.db.execute("INSERT INTO meta VALUES ('epoch_check', ?)", (epoch_check(epoch),))
                self._h.db.execute("INSERT INTO meta VALUES ('device', ?)", (self._h.device_id,))
                self._h.db.execute(
                    "INSERT INTO meta VALUES ('created_utc', ?)", (str(int(time.time())),)
                )
                # Ack evidence for salvage: nothing of a new epoch is delivered yet (see Acknowledger).
                self._h.db.execute("INSERT INTO meta VALUES ('acked_through', '0')")
                if witness is not None and witness[1] > 0:
                    self._own_up_to_lost_epoch(*witness)
        except sqlite3.IntegrityError as exc:
            # The epoch could not be read, yet a key of meta is taken: the table or its index
            # is damaged (one flipped bit does it). Corruption, so the file is quarantined and
            # salvaged rather than the agent failing to start for good.
            raise sqlite3.DatabaseError(f"database disk image is malformed (meta: {exc})") from exc
        if real and not self._exclusive:
            # The epoch row into the main file now (once per epoch, cheap): a WAL lost before the
            # first automatic checkpoint then still leaves the epoch and its witnesses agreeing.
            self._checkpoint()
        return epoch

    def _has_data(self) -> bool:
        return any(self._h.db.execute(sql).fetchone() for sql in (
            "SELECT 1 FROM samples LIMIT 1", "SELECT 1 FROM batches LIMIT 1",
            "SELECT 1 FROM sqlite_sequence WHERE name='samples' AND seq > 0"))

    def _own_up_to_lost_epoch(self, lost_epoch: str, last: int) -> None:
        """A new, empty database while ``.seq`` names an epoch with committed numbers: all of
        them are gone (the WAL cut to nothing before the first checkpoint, or the file deleted).
        Owned up to under that epoch, in a carrier of its own (inside the caller's transaction)."""
        if self._quarantine_holds(lost_epoch):
            return  # quarantined (a move cut short before .seq was blanked): salvage accounts for it
        device = self._h.device_id  # never another's: the receiver refuses a device that is not the topic's
        log.error("buffer %s: epoch %s (numbers 1-%d, per %s) is gone from the database: owned up"
                  " to as lost", self._h.path, lost_epoch, last, self._highwater.path)
        self._carriers.add_carrier(lost_epoch, device, [Gap(1, last, WAL_LOST_REASON)])
        self.lost_witness = (lost_epoch, last)  # a .held note of that epoch at ``last`` is owed too
        self._tally.bump("samples_lost_wal", last)

    def _quarantine_holds(self, epoch: str) -> bool:
        """Whether a quarantine folder holds ``epoch``, by its contents, not only its name.

        A folder is named ``<stamp>-unknown`` when the epoch could not be read at quarantine
        time; its copied ``.seq`` and ``.id`` (and the salvage summary, once done) still name
        it. Reading the name alone took salvaged, delivered samples for a WAL loss."""
        if not self.quarantine_dir.is_dir():
            return False
        for q in self.quarantine_dir.iterdir():
            if not q.is_dir():
                continue
            if epoch in q.name:
                return True
            seq = HighWater(q / self._highwater.path.name).read()
            ident = IdentityFile(q / self._identity.path.name).read()
            if epoch in (seq[0] if seq else None, ident[0] if ident else None):
                return True
            try:
                if json.loads((q / recovery.SALVAGED_MARK).read_text()).get("from_epoch") == epoch:
                    return True
            except (OSError, ValueError, AttributeError):
                pass  # not salvaged yet, or an unreadable summary: the copies above still speak
        return False

    def _vouch(self, epoch: str) -> str:
        """``meta``'s epoch if its witnesses vouch for it; else the file is damaged (raises).

        A flipped bit in the epoch text would otherwise make every later batch
        carry a new identity, silently: the receiver would take it for a new
        buffer, and the old epoch's numbers would end without a word. Damage
        goes the way of all damage: quarantine, salvage under the true epoch
        (``recovery.salvage`` checks the same way), a named loss.
        """
        row = self._h.db.execute("SELECT value FROM meta WHERE key='epoch_check'").fetchone()
        check = str(row[0]) if row else None
        trusted, true_epoch = vouched_epoch(epoch, check, self._side_epoch(check is not None))
        if not trusted:
            self.damaged_epoch = true_epoch
            raise sqlite3.DatabaseError(
                f"database disk image is malformed (meta: epoch {epoch[:40]!r} fails its check;"
                f" the identity file says {true_epoch!r})")
        if check != epoch_check(epoch) and not self._exclusive and not self._unborn:
            # A file from before the check, or the check itself damaged (the side file
            # agreed): write it now; a full card only delays it to the next open.
            try:
                with self._h.tx():
                    self._h.db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch_check', ?)",
                                     (epoch_check(epoch),))
            except sqlite3.DatabaseError as exc:
                self._h.rollback_quietly()
                if not recovery.is_disk_full(exc):
                    raise
        return epoch

    def _side_epoch(self, seq_too: bool) -> str | None:
        """The epoch the side files name: ``.id``, else ``.seq`` (the third witness).

        ``.seq`` only where meta has a checksum: a file from before the checksum has no
        witness to break a tie with a stale ``.seq``.
        """
        side = self._identity.epoch_of()
        if side is None and seq_too:
            found = self._highwater.read()
            side = found[0] if found else None
        return side
