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
  is a floor commits may not take (``_fits_on_disk``, re-read at every
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

The code is split by job, one module each, mixed into ``Buffer`` here (which keeps the
public API and the order of every fsync and commit): ``buffer.opening`` (connection, check
at open, a card full at start), ``buffer.epoch`` (identity), ``buffer.commit`` (samples
in), ``buffer.seal`` (batches out), ``buffer.outbox`` (reading sealed batches),
``buffer.ack`` (acknowledge, reject), ``buffer.gaps`` (gap records), ``buffer.room`` (size
cap, full card), ``buffer.recover`` (quarantine, salvage), ``buffer.held`` (samples held in
memory), ``buffer.counters`` (figures), on ``buffer.base`` (shared state) and
``buffer.guards`` (transaction, recovery and full-card wrappers).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from buffer import recovery
from buffer.ack import AckMixin
from buffer.commit import CommitMixin, _encode_alone
from buffer.counters import CountersMixin
from buffer.epoch import EpochMixin
from buffer.gaps import WAL_LOST_REASON, GapsMixin
from buffer.held import HeldMixin
from buffer.heldledger import HeldLedger
from buffer.highwater import HighWater
from buffer.identity import IdentityFile
from buffer.opening import NO_ROOM_BYTES, OpeningMixin
from buffer.outbox import OutboxMixin
from buffer.records import BufferStats, Key, SealedBatch
from buffer.recover import SALVAGE_BATCH_SAMPLES, RecoverMixin
from buffer.room import CAP_HYSTERESIS, DROP_CHUNK_SAMPLES, STUCK_RETRY_EVERY, RoomMixin
from buffer.schema import PAGE_SIZE, SCHEMA
from buffer.seal import SealMixin

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


class Buffer(OpeningMixin, EpochMixin, CommitMixin, SealMixin, OutboxMixin, AckMixin, GapsMixin,
             RoomMixin, RecoverMixin, HeldMixin, CountersMixin):
    """The SQLite store-and-forward buffer (see the module docstring)."""

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
        self.max_bytes = int(max_bytes)
        self.wal_pages = max(8, min(int(wal_autocheckpoint), self.max_bytes // PAGE_SIZE // 8))
        self.wal_limit_bytes = self.wal_pages * PAGE_SIZE
        # The WAL may pass the checkpoint mark by one transaction before it is
        # reset: reserve twice its limit, the rest is for the main file.
        self.db_budget = self.max_bytes - 2 * self.wal_limit_bytes
        if self.db_budget < 64 * PAGE_SIZE:
            raise ValueError(f"max_bytes={max_bytes} is too small for a buffer")
        self.reserve_path = Path(str(self.path) + ".reserve")
        self.reserve_bytes = 2 * self.wal_limit_bytes if reserve_bytes is None else int(reserve_bytes)
        # On a small card the configured WAL and reserve would take a good part of it
        # (the defaults are 4 MiB and 8 MiB): scale both down to 1/16 of the file system.
        fs_pages = self._fs_total() // PAGE_SIZE
        if fs_pages:
            self.wal_pages = max(8, min(self.wal_pages, fs_pages // 16))
            self.wal_limit_bytes = self.wal_pages * PAGE_SIZE
            self.reserve_bytes = min(self.reserve_bytes, fs_pages // 16 * PAGE_SIZE)
        # True from a commit the file system refused until a commit succeeds.
        self.disk_full = False
        self.refused_commits = 0  # since this object was made (not kept: writing it needs room)
        self.reserve_releases = 0  # times the ballast file was given up, likewise
        # (free bytes, free pages) when a write last gave up for want of room; None: not stuck.
        self._stuck_at: tuple[int, int] | None = None
        self._stuck_skips = 0
        # Acknowledged batches whose delete the full card refused, by batch id: never
        # handed out again, deleted by ``housekeep`` once there is room. Not kept across
        # a restart: the resync at the next connection has the receiver ack them again.
        self._deferred_acks: set[str] = set()
        self._db: sqlite3.Connection
        # A card already full at start (see ``_open_without_room``): True while the
        # connection is exclusive (no -shm file could be made), or while there is no
        # database file yet at all (``_unborn``: an empty one in memory stands in).
        self._exclusive = False
        self._unborn = False
        self._check_deferred = False  # quick_check could not run read-only for want of room
        # Samples the agent holds in memory on a full card, noted outside the database
        # (buffer.heldledger); losses of earlier runs not yet written as gap records.
        self._held = HeldLedger(Path(str(self.path) + ".held"), device_id)
        self._identity = IdentityFile(Path(str(self.path) + ".id"), device_id)
        self._damaged_epoch: str | None = None  # the true epoch when meta's failed its check
        # The last number a commit made durable, outside the WAL (buffer.highwater).
        self._highwater = HighWater(Path(str(self.path) + ".seq"), device_id)
        self._held_ready = False
        self._last_held = (0, 0)  # (held, owed) of the last note_held, re-noted at a late birth
        # Samples held in memory whose count no file records (0 bytes free, or the note failed):
        # lost without a trace if the agent ends now; the heartbeat shows it.
        self.held_unnoted = 0
        self._noted = False
        self._carried: list[tuple[int, str]] = []
        # First: on a full card one block fits where the database's birth does not.
        self._held_ready = self._held.ensure()
        recovery.finish_quarantines(self.path, self.quarantine_dir)
        problem = self._check_files() if check_on_open else None
        if problem:
            self._quarantine(problem, epoch=self._peek_epoch())
        try:
            self._open()
            if self._check_deferred and not self._unborn:
                self._check_in_place()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if not recovery.is_corruption(exc):
                raise
            self._recover(f"open: {exc}")  # found without (or despite) the check at open
        else:
            if not self._unborn:
                self._salvage_pending()
        self._ensure_reserve()
        self._take_held_note()

    def close(self) -> None:
        self._db.close()
        self._highwater.close()
