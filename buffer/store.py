"""The device's store-and-forward queue: samples in, sealed batches out.

Life of a sample here:

1. ``commit(samples)``: a group of samples is inserted in one transaction (one
   fsync). ``seq`` comes from an AUTOINCREMENT key, so a number is never
   reused, even after deletes; with the database's random ``epoch`` it is the
   sample's identity.
2. ``seal(max_samples)``: the oldest unsealed samples are encoded into one
   immutable batch (bytes and content hash stored), and the samples rows are
   deleted in the same transaction. The same batch id always carries the same
   bytes, so the receiver can deduplicate.
3. ``acknowledge(batch)``: the receiver said the batch is committed in the
   store: only now is it deleted.

Gap records (intentional drops) ride along in the next sealed batch.

SQLite in WAL mode with ``synchronous=FULL``: a commit that returned is on the
card. Only one thread touches a ``Buffer``.

What a van does to the file, and what the buffer does about it:

* **Size cap** (``max_bytes``): before the pages in use would pass the budget,
  the *oldest* data is dropped first (batches salvaged from an earlier epoch,
  then this epoch's oldest sealed batches, then the oldest unsealed samples),
  10 % below the budget at a time, and every dropped range becomes a gap
  record (reason ``"buffer full: ..."``) that is uploaded like any other.
  Deleted rows put their pages on SQLite's freelist and the next inserts
  reuse them, so the file stops growing at the cap without any VACUUM.
* **Disk full** (the file system, not the cap): committed data is never
  dropped for it. The ballast file is given up, a checkpoint lets the WAL
  restart, and the commit is tried once more; if it still cannot be written
  it raises ``BufferFullError`` (recoverable): nothing committed is lost and
  the caller keeps the samples and retries. Once the ballast is gone its size
  is a floor commits may not take (``Room.fits_on_disk``, re-read at every
  commit), kept for acknowledgements, sealing and checkpoints; an ack that
  still cannot be written is hidden and applied later (``housekeep``).
* **Row checksums**: each committed row carries a CRC32 (``buffer.rowcheck``);
  a row that fails it (or cannot be decoded) is set aside in ``bad_rows`` at
  sealing, with a gap record; salvage keeps only rows that verify.
* **Corruption** (at open: damaged WAL, not a database, ``quick_check`` not
  ok; during use: SQLITE_CORRUPT/NOTADB): the files move to
  ``quarantine/<utc>-<epoch>/`` (never deleted), a fresh database with a new
  epoch starts, and what can be read is salvaged (see ``buffer.recovery``).
  Batches of an earlier epoch stay publishable and acknowledgeable by batch id.
  ``meta``'s epoch is vouched for by a checksum row and the ``.id`` side file
  (``buffer.identity``): a garbled epoch is damage too, never a new identity.
* **A WAL cut at a frame boundary** (reads as a clean end): the ``.seq`` side
  file (``buffer.highwater``) keeps the last durable ``seq``; an open that
  finds the database behind it owns up with a gap record (``samples_lost_wal``).

The code is split by job into objects, each owning its state and taking its collaborators
(typed by the small Protocols of ``buffer.seams``) in its constructor: ``buffer.handle.FileHandle``
(the open file, shared), ``buffer.counters.Counters`` (figures), ``buffer.gaps.GapLog`` (gap
records), ``buffer.carriers.Carriers`` (earlier epochs' batches), ``buffer.room.Room`` (size cap,
full card), ``buffer.commit.Committer`` (samples in), ``buffer.seal.Sealer`` (batches out),
``buffer.outbox.Outbox`` (reading sealed batches), ``buffer.ack.Acknowledger`` (acknowledge,
reject), ``buffer.recover.Recovery`` (quarantine, salvage), ``buffer.epoch.EpochKeeper``
(identity) and ``buffer.held.HeldSamples`` (samples held in memory on a full card). ``Buffer``
here is the facade: it builds and wires them, and ``buffer.opening.Opener`` (the one part that
swaps the connection every part shares); keeps the public API; and wraps each public operation
in the corruption and full-card guards (``buffer.guards``), so the order of every fsync and
commit is the one-class store's.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from typing import Iterable

from buffer import recovery
from buffer.ack import Acknowledger
from buffer.carriers import Carriers
from buffer.commit import Committer, _encode_alone
from buffer.counters import Counters
from buffer.epoch import EpochKeeper
from buffer.errors import BufferFullError
from buffer.gaps import WAL_LOST_REASON, GapLog
from buffer.guards import _RAISE, _Tx, _recovering, _tolerate_full
from buffer.handle import FileHandle
from buffer.held import HeldSamples
from buffer.heldledger import HeldLedger, HeldNote
from buffer.highwater import HighWater
from buffer.identity import IdentityFile
from buffer.opening import NO_ROOM_BYTES, Opener
from buffer.outbox import Outbox
from buffer.records import BufferStats, Key, SealedBatch
from buffer.recover import SALVAGE_BATCH_SAMPLES, Recovery
from buffer.room import CAP_HYSTERESIS, DROP_CHUNK_SAMPLES, STUCK_RETRY_EVERY, Room
from buffer.schema import PAGE_SIZE, SCHEMA
from buffer.seal import Sealer
from core.sample import Sample

# The names callers and tests import from here, wherever they live now.
__all__ = [
    "Buffer", "BufferStats", "CAP_HYSTERESIS", "DEFAULT_MAX_BYTES", "DEFAULT_WAL_AUTOCHECKPOINT",
    "DROP_CHUNK_SAMPLES", "Key", "NO_ROOM_BYTES", "PAGE_SIZE", "SALVAGE_BATCH_SAMPLES", "SCHEMA",
    "STUCK_RETRY_EVERY", "SealedBatch", "WAL_LOST_REASON", "_encode_alone",
]


DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Pages the WAL may hold before the automatic checkpoint copies them into the
# main file (SQLite's default, set explicitly so it is a decision, not an
# accident). At 1 Hz x 4 sensors and a 5 s commit a commit writes ~3 pages, so
# a checkpoint runs about every 25 min: few double writes for the SD card,
# and a WAL of at most ~4 MiB to replay after a power cut.
DEFAULT_WAL_AUTOCHECKPOINT = 1000


class Buffer:
    """The SQLite store-and-forward buffer (see the module docstring): the facade over its parts."""

    def __init__(
        self,
        path: str | Path,
        device_id: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        wal_autocheckpoint: int = DEFAULT_WAL_AUTOCHECKPOINT,
        quarantine_dir: str | Path | None = None,
        check_on_open: bool = True,
        reserve_bytes: int | None = None,
    ) -> None:
        """Open (or create) the buffer at ``path``.

        ``max_bytes`` caps database + WAL on disk. ``wal_autocheckpoint`` is in
        pages; it is reduced so the WAL stays within 1/8 of ``max_bytes``.
        ``quarantine_dir`` defaults to ``<dir of path>/quarantine``.
        ``check_on_open`` runs the WAL check and ``PRAGMA quick_check``
        (reads the whole file once: about a second per 100 MiB on an SD card).
        ``reserve_bytes`` (default: twice the WAL limit) is the size of a
        ballast file kept beside the database and given up when the file
        system is full: without it, data still in the WAL could neither be
        checkpointed (the main file must grow) nor dropped (the WAL must grow),
        and the buffer would be stuck until a person freed space.
        """
        self.path = Path(path)
        self.device_id = device_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir else self.path.parent / "quarantine"
        # The last number a commit made durable, outside the WAL (buffer.highwater).
        self._highwater = HighWater(Path(str(self.path) + ".seq"), device_id)
        self._identity = IdentityFile(Path(str(self.path) + ".id"), device_id)
        # The parts, each with what it needs and nothing more (see buffer.seams).
        self._file = FileHandle(self.path, device_id)
        self._counters = Counters(self._file, self.quarantine_dir)
        self._gaps = GapLog(self._file, self._counters, self._highwater)
        self._carriers = Carriers(self._file, self._counters)
        self._room = Room(self._file, self._counters, self._gaps, self._carriers, max_bytes=max_bytes,
                          wal_autocheckpoint=wal_autocheckpoint, reserve_bytes=reserve_bytes)
        self._committer = Committer(self._file, self._room, self._gaps, self._counters, self._highwater,
                                    on_room_again=self.housekeep)
        self._sealer = Sealer(self._file, self._gaps, self._counters)
        # Acks a full card deferred: the acknowledger adds and deletes them, the outbox hides them.
        deferred: set[str] = set()
        self._outbox = Outbox(self._file, deferred)
        self._acks = Acknowledger(self._file, self._outbox, self._carriers, self._counters, self._room, deferred)
        self._epochs = EpochKeeper(self._file, self._counters, self._carriers, highwater=self._highwater,
                                   identity=self._identity, quarantine_dir=self.quarantine_dir,
                                   checkpoint=self._room.checkpoint)
        self._opener = Opener(self._file, self._room, self._epochs, self._identity, after_birth=self._after_birth)
        self._recovery = Recovery(self._file, self._carriers, self._counters, quarantine_dir=self.quarantine_dir,
                                  identity=self._identity, highwater=self._highwater,
                                  reopen=self._reopen, peek_epoch=self._opener.peek_epoch)
        # Samples the agent holds in memory on a full card, noted outside the database
        # (buffer.heldledger); losses of earlier runs not yet written as gap records.
        self._held = HeldLedger(Path(str(self.path) + ".held"), device_id)
        self._held_samples = HeldSamples(
            self._file, self._held, self._counters, self._gaps, self._carriers, highwater=self._highwater,
            identity=self._identity, quarantine_dir=self.quarantine_dir, unborn=lambda: self._opener.unborn,
            lost_witness=lambda: self._epochs.lost_witness, guarded_carried=self._own_up_to_carried,
            guarded_gone=self._own_up_to_gone_epochs_note)
        # First: on a full card one block fits where the database's birth does not.
        self._held_samples.ready = self._held.ensure()
        recovery.finish_quarantines(self.path, self.quarantine_dir)
        problem = self._opener.check_files() if check_on_open else None
        if problem:
            self._recovery.quarantine(problem, epoch=self._opener.peek_epoch())
        try:
            self._opener.open()
            if self._opener.check_deferred and not self._opener.unborn:
                self._opener.check_in_place()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if not recovery.is_corruption(exc):
                raise
            self._recover(f"open: {exc}")  # found without (or despite) the check at open
        else:
            if not self._opener.unborn:
                self._recovery.salvage_pending()
        self._room.ensure_reserve()
        self._held_samples.take_held_note()

    def close(self) -> None:
        self._file.db.close()
        self._highwater.close()

    # --- samples in (buffer.commit) ---

    @_recovering
    def commit(self, samples: list[Sample]) -> list[int]:
        """Insert a group of samples in one transaction; returns their sequence numbers.

        Durable when this returns; ``BufferFullError`` (nothing stored, nothing lost) when the
        file system is full even after making room: see ``Committer.commit``.
        """
        if not samples:
            return []
        if self._opener.unborn and not self._opener.be_born():
            return self._committer.refuse()
        if self._held_samples.carried:
            try:
                self._own_up_to_carried()  # before the commit moves last_seq past the note
            except BufferFullError:
                return self._committer.refuse()
        return self._committer.commit(samples)

    @_recovering
    def count_unsync(self, boot_id: str) -> int:
        """Unsealed samples of this boot stamped before the clock was trusted."""
        return self._committer.count_unsync(boot_id)

    @_recovering
    @_tolerate_full(0)
    def correct_unsync(self, boot_id: str, offset_ms: int) -> int:
        """Re-stamp this boot's unsynchronised samples from their monotonic time (never sealed ones)."""
        return self._committer.correct_unsync(boot_id, offset_ms)

    # --- batches out (buffer.seal, buffer.outbox) ---

    @property
    def unsealed_count(self) -> int:
        return self._file.unsealed

    @_recovering
    @_tolerate_full(None)
    def seal(self, max_samples: int, now_utc_ms: int) -> SealedBatch | None:
        """Seal the oldest unsealed samples (at most ``max_samples``) into one batch (``Sealer.seal``)."""
        return self._sealer.seal(max_samples, now_utc_ms)

    @_recovering
    def pending(self, limit: int, exclude: Iterable[Key] = frozenset()) -> list[SealedBatch]:
        """Sealed batches not yet acknowledged, oldest first (earlier epochs before this one)."""
        return self._outbox.pending(limit, exclude)

    @_recovering
    def newest(self, limit: int, exclude: Iterable[Key] = frozenset()) -> list[SealedBatch]:
        """This epoch's newest sealed batches, newest first: fresh data while a backlog drains."""
        return self._outbox.newest(limit, exclude)

    @_recovering
    def get(self, key: Key) -> SealedBatch | None:
        """A batch by this epoch's first_seq, or by batch id (any epoch); None if gone (or acked)."""
        return self._outbox.get(key)

    def _peek(self, key: Key) -> SealedBatch | None:
        """A batch by key, acknowledged or not."""
        return self._outbox.peek(key)

    # --- the receiver's answers (buffer.ack) ---

    @_recovering
    def acknowledge(self, key: Key) -> bool:
        """The receiver committed this batch: delete it (deferred on a full card). True if it was here."""
        return self._acks.acknowledge(key, self._acknowledge, self.get)

    @_tolerate_full(None)
    def _acknowledge(self, key: Key) -> bool | None:
        return self._acks.delete(key)

    @_recovering
    @_tolerate_full(False)
    def reject(self, key: Key, last_seq: int, reason: str, *, by: str = "receiver") -> bool:
        """The receiver (or ``by`` someone else) refused this batch for good: drop it, own up with a gap."""
        return self._acks.reject(key, last_seq, reason, by=by)

    # --- gap records (buffer.gaps) ---

    @_recovering
    @_tolerate_full(_RAISE)
    def add_gap(self, first_seq: int, last_seq: int, reason: str) -> None:
        self._gaps.add_gap(first_seq, last_seq, reason)

    @_recovering
    @_tolerate_full(_RAISE)
    def record_lost(self, n: int, reason: str) -> tuple[int, int]:
        """Own up to ``n`` samples that were taken but never committed (``GapLog.record_lost``)."""
        return self._gaps.record_lost(n, reason)

    # --- samples held in memory on a full card (buffer.held) ---

    def note_held(self, held: int, owed: int) -> None:
        """The agent holds ``held`` samples a full card refused (``owed`` more already discarded):
        noted outside the database, so the next open owns up to them (``HeldSamples.note_held``)."""
        self._held_samples.note_held(held, owed)

    @property
    def held_unnoted(self) -> int:
        """Samples held in memory whose count no file records: lost without a trace if the agent ends."""
        return self._held_samples.held_unnoted

    @_recovering
    @_tolerate_full(_RAISE)
    def _own_up_to_carried(self) -> None:
        self._held_samples.own_up_to_carried()

    @_recovering
    @_tolerate_full(None)
    def _own_up_to_gone_epochs_note(self, note: HeldNote) -> None:
        self._held_samples.own_up_to_gone_epochs_note(note)

    # --- room (buffer.room) ---

    def housekeep(self) -> None:
        """Cheap unless there is work: delete deferred acks, re-create the space reserve.

        The agent calls it every tick, so both happen as soon as room returns.
        """
        if self._opener.unborn:
            return  # nothing to keep house for; the first commit with room makes the file
        if self._opener.exclusive:
            self._opener.share_again()
        self._held_samples.ensure_ready()
        if self._acks.deferred:
            self._acks.flush()
        if self._room.reserve_bytes > 0 and not self.disk_full and not self._room.reserve_path.exists():
            self._room.ensure_reserve()

    def used_bytes(self) -> int:
        """Bytes of the main file in use (free pages are reused, so they do not count)."""
        return self._room.used_bytes()

    def _pages(self) -> tuple[int, int]:
        return self._room.pages()

    # --- corruption (buffer.recover) ---

    def _recover(self, reason: str) -> None:
        """Corruption found during use: move the files aside, start afresh, salvage."""
        self._recovery.recover(reason)

    def _reopen(self) -> None:
        self._epochs.damaged_epoch = None  # the new file's epoch is its own
        self._opener.open()

    def _after_birth(self) -> None:
        """A file born late (a card full at start): the held note gets its epoch, salvages run."""
        self._held_samples.rebase_held_note()
        self._recovery.salvage_pending()

    # --- figures (buffer.counters) ---

    def counters(self) -> dict[str, int]:
        """Persistent counters: samples_dropped, batches_dropped, gap_records, disk_full, ..."""
        return self._counters.counters()

    @_recovering
    def stats(self) -> BufferStats:
        # Batches acknowledged but not yet deleted (a full card) are no longer owed.
        hidden = [sb for k in self._acks.deferred if (sb := self._outbox.peek(k)) is not None]
        return self._counters.stats(hidden)

    def file_bytes(self) -> int:
        """Database + WAL as they take space on the card."""
        return self._counters.file_bytes()

    def last_seq(self) -> int:
        return self._file.last_seq()

    def integrity_ok(self) -> bool:
        return self._counters.integrity_ok()

    # --- the state callers (and tests) read, kept where it lives now ---

    @property
    def epoch(self) -> str:
        return self._file.epoch

    @property
    def _unborn(self) -> bool:
        return self._opener.unborn

    @property
    def _exclusive(self) -> bool:
        return self._opener.exclusive

    @property
    def _db(self) -> sqlite3.Connection:
        return self._file.db

    def _count_unsealed(self) -> int:
        return self._file.count_unsealed()

    def _tx(self) -> _Tx:
        return self._file.tx()

    @property
    def disk_full(self) -> bool:
        return self._room.disk_full

    @disk_full.setter
    def disk_full(self, value: bool) -> None:
        self._room.disk_full = value

    @property
    def refused_commits(self) -> int:
        return self._room.refused_commits

    @property
    def reserve_releases(self) -> int:
        return self._room.reserve_releases

    @property
    def max_bytes(self) -> int:
        return self._room.max_bytes

    @property
    def db_budget(self) -> int:
        return self._room.db_budget

    @property
    def wal_pages(self) -> int:
        return self._room.wal_pages

    @property
    def wal_limit_bytes(self) -> int:
        return self._room.wal_limit_bytes

    @property
    def reserve_path(self) -> Path:
        return self._room.reserve_path

    @property
    def reserve_bytes(self) -> int:
        return self._room.reserve_bytes
