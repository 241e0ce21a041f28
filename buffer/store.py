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
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn, Sequence, TypeVar

from buffer import recovery, rowcheck
from buffer.heldledger import HeldLedger, HeldNote, make_with_real_blocks
from buffer.highwater import HighWater
from buffer.identity import IdentityFile, epoch_check, vouched_epoch
from buffer.errors import BufferFullError
from core.sample import Sample, TimeSource
from core.batch_limits import (GAP_TEXT_BUDGET, MAX_GAPS_PER_BATCH, SMALL_SAMPLE_BYTES, batch_problem,
                                 sample_never_fits)
from core.sample_rules import gap_reason, sample_problem
from core.wire import Batch, Gap, batch_id, content_hash, encode_batch, parse_batch_id
from core.errors import PayloadError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
PAGE_SIZE = 4096
# Pages the WAL may hold before the automatic checkpoint copies them into the
# main file (SQLite's default, set explicitly so it is a decision, not an
# accident). At 1 Hz x 4 sensors and a 5 s commit a commit writes ~3 pages, so
# a checkpoint runs about every 25 min: few double writes for the SD card,
# and a WAL of at most ~4 MiB to replay after a power cut.
DEFAULT_WAL_AUTOCHECKPOINT = 1000
# Keep the budget this far below the cap: a full buffer frees 10 % at once
# instead of dropping a little at every commit.
CAP_HYSTERESIS = 0.9
DROP_CHUNK_SAMPLES = 256  # unsealed samples dropped per step (one gap record per run)
SALVAGE_BATCH_SAMPLES = 1000
# On a full file system, a write that found no room is tried again when room changes,
# and at least every this many calls (about every 30 s at one tick a second).
STUCK_RETRY_EVERY = 30
# Below this much free space an I/O error at open is taken for a full card (see Buffer._no_room).
NO_ROOM_BYTES = 64 * PAGE_SIZE
# The gap reason for numbers a commit made durable that an open no longer finds (buffer.highwater).
# Their batches may have gone out before the loss: the receiver subtracts what it holds.
WAL_LOST_REASON = "WAL lost committed transactions: samples missing at open (may include delivered ones)"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sensor TEXT NOT NULL,
    t_utc_ms INTEGER,  -- NULL: time unknown
    t_mono_ms INTEGER NOT NULL,
    time_src TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    vals TEXT NOT NULL,
    flags TEXT NOT NULL,
    crc INTEGER  -- buffer.rowcheck.row_crc of the row; NULL in files made before checksums
);
-- Unsealed rows that could not be sealed (checksum mismatch, unreadable JSON): set
-- aside with the bytes as read, never deleted by the buffer; a gap record owns up.
CREATE TABLE IF NOT EXISTS bad_rows (
    seq INTEGER,
    reason TEXT NOT NULL,
    raw BLOB NOT NULL,
    set_aside_utc_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    payload BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    sealed_utc_ms INTEGER NOT NULL,
    oldest_utc_ms INTEGER  -- earliest sample time inside, for the heartbeat's backlog age
);
CREATE TABLE IF NOT EXISTS gaps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    sent_in INTEGER  -- first_seq of the batch that carries it, NULL until sealed
);
-- Sealed batches of earlier epochs (salvaged from a quarantined file), published
-- as they are under their old id. n_samples = 0: a gap carrier of that epoch.
CREATE TABLE IF NOT EXISTS salvaged (
    epoch TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    device TEXT NOT NULL,
    n_samples INTEGER NOT NULL,
    payload BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    sealed_utc_ms INTEGER NOT NULL,
    oldest_utc_ms INTEGER,
    PRIMARY KEY (epoch, first_seq)
);
-- Per dead epoch: the next sequence number to name a gap carrier after (past the
-- epoch's last sample, so a carrier id never equals a real batch id).
CREATE TABLE IF NOT EXISTS epochs (
    epoch TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    next_carrier INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

# One encoder for every commit: json.dumps with separators builds a new one per call.
_VALUES_ENCODER = json.JSONEncoder(separators=(",", ":")).encode

# row_crc's arguments in SQL, text as bytes (see buffer.rowcheck).
_CRC_ARGS = "seq, CAST(sensor AS BLOB), t_utc_ms, t_mono_ms, CAST(time_src AS BLOB), CAST(boot_id AS BLOB)," \
    " CAST(vals AS BLOB), CAST(flags AS BLOB)"
QUOTED_CORRECTED = "'corrected'"

_BATCH_COLS = "first_seq, last_seq, n_samples, payload, sha256"
_SALV_COLS = "first_seq, last_seq, n_samples, payload, sha256, epoch, device"

Key = int | str  # first_seq of this epoch's batch, or any batch id "device/epoch/first-last"


@dataclass(frozen=True, slots=True)
class SealedBatch:
    batch_id: str
    first_seq: int
    last_seq: int
    n_samples: int
    payload: bytes
    sha256: str
    epoch: str = ""  # the epoch the batch belongs to (an earlier one if salvaged)


@dataclass(frozen=True, slots=True)
class BufferStats:
    unsealed: int
    batches: int
    backlog_samples: int
    oldest_unsent_utc_ms: int | None
    last_seq: int
    file_bytes: int
    samples_dropped: int = 0  # by the size cap / disk full, each covered by a gap record
    gap_records: int = 0  # gap records the buffer wrote (cap, reject, salvage)
    quarantined: int = 0  # databases moved to quarantine since this file was made
    salvaged_batches: int = 0  # earlier-epoch batches still waiting for their ack
    quarantine_bytes: int = 0
    gaps_undelivered: int = 0  # gap records in gaps-only batches the receiver refused (never stored)


T = TypeVar("T")


def _recovering(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a method; if the file turns out corrupt, quarantine, salvage and run it once more."""

    @functools.wraps(fn)
    def wrapper(self: "Buffer", *args: Any, **kwargs: Any) -> T:
        try:
            return fn(self, *args, **kwargs)
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if not recovery.is_corruption(exc):
                raise
            self._rollback_quietly()
            self._recover(f"{fn.__name__}: {exc}")
            return fn(self, *args, **kwargs)

    return wrapper


_RAISE = object()  # _tolerate_full: raise BufferFullError instead of skipping


def _tolerate_full(default: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Writes on a full file system: make room (never by dropping data), retry once, else give up.

    Room comes from the space reserve and a checkpoint (see ``_make_room``).
    Giving up is safe for each housekeeping write (seal, reject, ...): it is
    retried naturally on a later tick. ``commit`` and ``add_gap`` raise
    ``BufferFullError``: their caller holds something that exists nowhere else.
    """

    def deco(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(self: "Buffer", *args: Any, **kwargs: Any) -> T:
            if self._unborn and not self._be_born():
                # No database file yet (a full card at start): nothing to write into.
                if default is _RAISE:
                    raise BufferFullError(f"buffer {self.path}: no room to create it ({fn.__name__})")
                return default
            if self._still_stuck():
                # Nothing freed since a write last found no room: do not try (and
                # checkpoint) again every tick for nothing (CPU and card on a Pi).
                if default is _RAISE:
                    raise BufferFullError(f"buffer {self.path}: disk full in {fn.__name__}")
                return default
            for attempt in range(2):
                try:
                    result = fn(self, *args, **kwargs)
                except sqlite3.DatabaseError as exc:
                    if not recovery.is_disk_full(exc):
                        raise
                    if attempt == 0:
                        log.error("buffer: disk full in %s, making room", fn.__name__)
                        self._make_room()
                else:
                    self._stuck_at = None
                    return result
            self._rollback_quietly()
            self._stuck_at = self._room_signature()
            if default is _RAISE:
                raise BufferFullError(f"buffer {self.path}: disk full in {fn.__name__}")
            return default

        return wrapper

    return deco


class Buffer:
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
        self._held = HeldLedger(Path(str(self.path) + ".held"))
        self._identity = IdentityFile(Path(str(self.path) + ".id"))
        self._damaged_epoch: str | None = None  # the true epoch when meta's failed its check
        # The last number a commit made durable, outside the WAL (buffer.highwater).
        self._highwater = HighWater(Path(str(self.path) + ".seq"))
        self._held_ready = False
        self._noted = False
        self._carried: list[tuple[int, str]] = []
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

    # -- opening ----------------------------------------------------------------

    def _connect(self, exclusive: bool = False) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a group of
        # samples is exactly one transaction and one fsync.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            return self._prepare(db, exclusive)
        except BaseException:
            db.close()  # an exclusive lock left behind would keep every later open out
            raise

    def _prepare(self, db: sqlite3.Connection, exclusive: bool) -> sqlite3.Connection:
        if exclusive:
            # Set before the WAL is first touched: SQLite then keeps the WAL index in
            # heap memory and never makes the -shm file, which a full card cannot hold
            # (growing it fails as "disk I/O error"). Other processes cannot read the
            # file meanwhile; ``housekeep`` goes back to shared mode once there is room.
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
        # Both only take effect on a new, empty file. auto_vacuum=NONE: freed
        # pages stay on the freelist and the next inserts reuse them, so the
        # file settles at its working size; FULL would move pages at every
        # commit (more SD writes), INCREMENTAL needs periodic work for nothing.
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("PRAGMA auto_vacuum=NONE")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA wal_autocheckpoint={self.wal_pages}")
        # After a checkpoint resets the WAL, truncate it back to this size: it
        # cannot grow without bound, and keeps this much space as a reserve a
        # full disk cannot take away (the next transactions overwrite it).
        db.execute(f"PRAGMA journal_size_limit={self.wal_limit_bytes}")
        # No VACUUM, ever: it rewrites the whole file (SD wear), needs twice the
        # space (impossible on a full disk) and a power cut in the middle of it
        # is the riskiest moment of the file's life. The freelist does the job.
        db.executescript(SCHEMA)
        if "crc" not in {r[1] for r in db.execute("PRAGMA table_info(samples)")}:
            db.execute("ALTER TABLE samples ADD COLUMN crc INTEGER")  # a file from before checksums
        db.create_function("row_crc", 8, rowcheck.row_crc, deterministic=True)
        return db

    def _open(self) -> None:
        try:
            self._db = self._connect()
            self._exclusive = False
        except sqlite3.DatabaseError as exc:
            if not self._no_room(exc):
                raise
            self._db = self._open_without_room(exc)
        try:
            self.epoch = self._init_epoch(real=not self._unborn)
        except sqlite3.DatabaseError as exc:
            # The card had room for the schema but not for the epoch birth's COMMIT
            # (~130 KiB free): start as on a card full at open, not crash-loop.
            if self._unborn or not self._no_room(exc):
                raise
            self._rollback_quietly()
            self._db.close()
            self._db = self._open_without_room(exc)
            self.epoch = self._init_epoch(real=not self._unborn)
        self._unsealed = self._count_unsealed()
        self._identity.write(self.epoch, self.device_id)

    def _no_room(self, exc: BaseException) -> bool:
        """An error that means "the card is full", not "the file is bad".

        SQLITE_FULL, or SQLITE_IOERR while the file system has (almost) no room:
        making or growing the -shm file on a full card fails as a plain I/O error.
        """
        if recovery.is_disk_full(exc):
            return True
        return (isinstance(exc, sqlite3.OperationalError) and "disk i/o error" in str(exc).lower()
                and self._disk_free() < NO_ROOM_BYTES)

    def _open_without_room(self, exc: BaseException) -> sqlite3.Connection:
        """Open on a card that is already full: the agent must start anyway.

        An existing buffer opens in exclusive mode (no -shm file needed): its
        sealed backlog can be read and sent, acks deferred, commits refused
        until there is room. A buffer that does not exist yet cannot be made:
        an empty database in memory stands in (nothing is ever written to it;
        ``commit`` refuses) and the real file is made at the first commit that
        finds room (``_be_born``).
        """
        log.error("buffer %s: card full at open (%s): opening without a -shm file", self.path, exc)
        try:
            db = self._connect(exclusive=True)
            if db.execute("SELECT 1 FROM meta WHERE key='epoch'").fetchone():
                self._exclusive = True
                self.disk_full = True
                return db
            db.close()
        except sqlite3.DatabaseError as exc2:
            if not self._no_room(exc2):
                raise
        log.error("buffer %s: no room to create the buffer; samples are held until there is", self.path)
        self._unborn = True
        self.disk_full = True
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        db.executescript(SCHEMA)
        db.create_function("row_crc", 8, rowcheck.row_crc, deterministic=True)
        return db

    def _be_born(self) -> bool:
        """Make the real database file once the card has room; False while it has not."""
        if self._disk_free() < NO_ROOM_BYTES:
            return False
        try:
            db = self._connect()
        except sqlite3.DatabaseError as exc:
            if not self._no_room(exc):
                raise
            return False
        stand_in, self._db = self._db, db
        try:
            self.epoch = self._init_epoch()
        except sqlite3.DatabaseError as exc:
            self._db = stand_in
            db.close()
            if not self._no_room(exc):
                raise
            return False
        stand_in.close()
        self._unborn = False
        self._identity.write(self.epoch, self.device_id)  # the stand-in's epoch was never real
        self._unsealed = self._count_unsealed()
        log.warning("buffer %s: created now that the card has room (epoch %s)", self.path, self.epoch)
        self._salvage_pending()
        return True

    def _share_again(self) -> None:
        """Leave the exclusive mode a full card forced at open, once the card has room."""
        if self._disk_free() < max(2 * self.reserve_bytes, NO_ROOM_BYTES):
            return
        self._db.close()
        try:
            self._db = self._connect()
            self._exclusive = False
            log.warning("buffer %s: card has room again, back to shared mode", self.path)
        except sqlite3.DatabaseError as exc:
            if not self._no_room(exc):
                raise
            self._db = self._connect(exclusive=True)

    def _check_in_place(self) -> None:
        """The check at open that a full card prevented, run on the (exclusive) connection."""
        rows = [str(r[0]) for r in self._db.execute("PRAGMA quick_check").fetchall()]
        self._check_deferred = False
        if rows != ["ok"]:
            raise sqlite3.DatabaseError("database disk image is malformed: quick_check: " + "; ".join(rows[:5]))

    def _count_unsealed(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM samples").fetchone()[0])

    def _check_files(self) -> str | None:
        """Why the files at ``path`` cannot be trusted, or None. Never writes to them."""
        wal_problem = recovery.wal_problem(Path(str(self.path) + "-wal"))
        if wal_problem:
            return wal_problem
        if not self.path.exists():
            return None
        self._roll_back_hot_journal()
        try:
            # Read-only: a read-write connection would checkpoint a damaged WAL
            # into the main file on close, destroying the evidence.
            conn = sqlite3.connect(self.path.as_uri() + "?mode=ro", uri=True)
            try:
                rows = conn.execute("PRAGMA quick_check").fetchall()
            finally:
                conn.close()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if recovery.is_corruption(exc):
                return f"open: {exc}"
            if self._no_room(exc):
                # A read-only connection needs a -shm file too: check after opening instead.
                log.error("buffer %s: card full, checking it after opening (%s)", self.path, exc)
                self._check_deferred = True
                return None
            raise
        result = [str(r[0]) for r in rows]
        return None if result == ["ok"] else "quick_check: " + "; ".join(result[:5])

    def _roll_back_hot_journal(self) -> None:
        """A kill inside a rollback-journal transaction (the epoch birth, before WAL mode)
        leaves a hot ``-journal``; a read-only connection cannot roll it back, so every
        later check would fail with "readonly database" and the agent never start. A
        read-write connection rolls it back on first read; with no ``-wal`` present
        there is no WAL it could checkpoint, so no evidence is destroyed."""
        journal = Path(str(self.path) + "-journal")
        if not journal.exists() or journal.stat().st_size == 0:
            return
        if Path(str(self.path) + "-wal").exists():
            return  # WAL mode: the journal is not hot; leave the WAL to the read-only check
        try:
            conn = sqlite3.connect(self.path)
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                conn.close()
            log.warning("buffer %s: rolled back a transaction cut short (hot journal)", self.path)
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            # Left to the read-only check below, which names corruption or a full card.
            log.error("buffer %s: could not roll back its journal (%s)", self.path, exc)

    def _peek_epoch(self) -> str | None:
        if self._damaged_epoch is not None:
            return self._damaged_epoch  # meta's epoch failed its check: the side file's
        try:
            conn = sqlite3.connect(self.path.as_uri() + "?immutable=1", uri=True)
            try:
                row = conn.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            finally:
                conn.close()
        except (sqlite3.DatabaseError, UnicodeDecodeError):
            return self._identity.epoch_of()
        return str(row[0]) if row else None

    # -- identity -------------------------------------------------------------

    def _init_epoch(self, real: bool = True) -> str:
        """This file's epoch; a new one for a new file. ``real``: False for the in-memory stand-in."""
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row:
            return self._vouch(str(row[0]))
        if self._has_data():
            # Rows without an epoch: meta lost its row (damage), not a new buffer. Quarantine
            # and salvage (the side files name the epoch) rather than renumber them silently.
            raise sqlite3.DatabaseError("database disk image is malformed (meta: no epoch, yet rows)")
        epoch = secrets.token_hex(8)
        witness = self._highwater.read() if real else None
        try:
            with self._tx():
                self._db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
                self._db.execute("INSERT INTO meta VALUES ('epoch_check', ?)", (epoch_check(epoch),))
                self._db.execute("INSERT INTO meta VALUES ('device', ?)", (self.device_id,))
                self._db.execute(
                    "INSERT INTO meta VALUES ('created_utc', ?)", (str(int(time.time())),)
                )
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
        return any(self._db.execute(sql).fetchone() for sql in (
            "SELECT 1 FROM samples LIMIT 1", "SELECT 1 FROM batches LIMIT 1",
            "SELECT 1 FROM sqlite_sequence WHERE name='samples' AND seq > 0"))

    def _own_up_to_lost_epoch(self, lost_epoch: str, last: int) -> None:
        """A new, empty database while ``.seq`` names an epoch with committed numbers: all of
        them are gone (the WAL cut to nothing before the first checkpoint, or the file deleted).
        Owned up to under that epoch, in a carrier of its own (inside the caller's transaction)."""
        if self._quarantine_holds(lost_epoch):
            return  # quarantined (a move cut short before .seq was blanked): salvage accounts for it
        ident = self._identity.read()
        device = ident[1] if ident is not None and ident[0] == lost_epoch else self.device_id
        log.error("buffer %s: epoch %s (numbers 1-%d, per %s) is gone from the database: owned up"
                  " to as lost", self.path, lost_epoch, last, self._highwater.path)
        self._add_carrier(lost_epoch, device, [Gap(1, last, WAL_LOST_REASON)])
        self._bump("samples_lost_wal", last)

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
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch_check'").fetchone()
        check = str(row[0]) if row else None
        trusted, true_epoch = vouched_epoch(epoch, check, self._side_epoch(check is not None))
        if not trusted:
            self._damaged_epoch = true_epoch
            raise sqlite3.DatabaseError(
                f"database disk image is malformed (meta: epoch {epoch[:40]!r} fails its check;"
                f" the identity file says {true_epoch!r})")
        if check != epoch_check(epoch) and not self._exclusive and not self._unborn:
            # A file from before the check, or the check itself damaged (the side file
            # agreed): write it now; a full card only delays it to the next open.
            try:
                with self._tx():
                    self._db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch_check', ?)",
                                     (epoch_check(epoch),))
            except sqlite3.DatabaseError as exc:
                self._rollback_quietly()
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

    def _tx(self) -> "_Tx":
        return _Tx(self._db)

    def _rollback_quietly(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass  # SQLite may have rolled back on its own (SQLITE_FULL, SQLITE_CORRUPT)

    def _bump(self, name: str, by: int = 1) -> None:
        """Add to a persistent counter; call inside the transaction it counts."""
        if by:
            self._db.execute(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                (name, by, by),
            )

    def counters(self) -> dict[str, int]:
        """Persistent counters: samples_dropped, batches_dropped, gap_records, disk_full, ..."""
        return {str(k): int(v) for k, v in self._db.execute("SELECT name, value FROM counters")}

    # -- corruption -----------------------------------------------------------

    def _quarantine(self, reason: str, epoch: str | None) -> Path:
        log.error("buffer %s is corrupt (%s): quarantining it", self.path, reason)
        qdir = recovery.quarantine(self.path, self.quarantine_dir, epoch, reason)
        self._identity.copy_to(qdir, epoch)  # names the epoch if the file cannot
        self._highwater.move_to(qdir)  # a third witness; the new epoch starts without it
        return qdir

    def _recover(self, reason: str) -> None:
        """Corruption found during use: move the files aside, start afresh, salvage."""
        old_epoch = getattr(self, "epoch", None) or self._peek_epoch()
        # A read-only connection kept open while the writer closes stops the
        # writer from checkpointing the (damaged) WAL into the main file.
        keeper: sqlite3.Connection | None = None
        try:
            keeper = sqlite3.connect(self.path.as_uri() + "?mode=ro", uri=True)
            keeper.execute("BEGIN")
            keeper.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError:
            pass
        try:
            if hasattr(self, "_db"):
                self._db.close()
        except sqlite3.DatabaseError:
            pass
        self._quarantine(reason, old_epoch)
        self._damaged_epoch = None
        if keeper is not None:
            keeper.close()
        self._open()
        self._salvage_pending()

    def _salvage_pending(self) -> None:
        """Salvage every quarantined file whose salvage is not recorded as done."""
        for qdir in recovery.unsalvaged(self.quarantine_dir):
            mark = f"salvaged:{qdir.name}"
            if self._db.execute("SELECT 1 FROM meta WHERE key=?", (mark,)).fetchone():
                recovery.mark_salvaged(qdir, {"into_epoch": self.epoch})
                continue
            ident = IdentityFile(qdir / self._identity.path.name).read()
            if ident is None:
                # No identity file: the .seq copy still names the epoch (the third witness).
                seq = HighWater(qdir / self._highwater.path.name).read()
                ident = (seq[0], self.device_id) if seq else None
            found = recovery.salvage(qdir / self.path.name, ident)
            try:
                summary = self._apply_salvage(found, mark)
            except sqlite3.DatabaseError as exc:
                if not recovery.is_disk_full(exc):
                    raise
                self._rollback_quietly()
                log.error("no room to salvage %s yet; will retry at next start", qdir)
                continue
            recovery.mark_salvaged(qdir, summary)
            log.warning("salvaged %s: %s", qdir, summary)

    def _apply_salvage(self, s: recovery.Salvage, mark: str) -> dict[str, Any]:
        """Write one salvage into this database, in one transaction (all or nothing).

        Unsealed samples are sealed into batches *of their old epoch* rather
        than committed again as new samples: their identity (epoch, seq) stays
        the one they were given when their commit returned, so the old epoch's
        sequence space is accounted for in one place (salvaged batches +
        gap records), and running the salvage twice (a crash before the
        quarantine is marked done) produces the same ids with the same bytes,
        which the receiver deduplicates. Re-committing would give them new
        numbers each time: duplicates in the store.
        """
        device = s.device or self.device_id
        n_samples = 0
        with self._tx():
            for b in s.batches:
                self._insert_salvaged(b.epoch, b.device, b.first_seq, b.last_seq, b.n_samples,
                                      b.payload, b.sealed_utc_ms, b.oldest_utc_ms)
            for e, nxt in s.carrier_next.items():
                self._db.execute(
                    "INSERT INTO epochs VALUES (?, ?, ?) ON CONFLICT(epoch)"
                    " DO UPDATE SET next_carrier = max(next_carrier, excluded.next_carrier)",
                    (e, device, nxt),
                )
            if s.epoch is not None:
                n_samples = self._seal_salvaged_samples(s.epoch, device, s.samples)
                if s.carrier_base is not None:
                    self._ensure_epoch(s.epoch, device, s.carrier_base)
                self._add_carrier(s.epoch, device, s.gaps)
            for e, gaps in s.other_gaps.items():
                self._add_carrier(e, device, gaps)
            summary = {
                "into_epoch": self.epoch,
                "from_epoch": s.epoch,
                "batches": len(s.batches),
                "samples": n_samples,
                "gaps": [[g.first_seq, g.last_seq, g.reason] for g in s.gaps],
                "notes": s.notes,
            }
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (mark, json.dumps(summary)))
            self._bump("quarantined")
            self._bump("salvaged_batches", len(s.batches))
            self._bump("salvaged_samples", n_samples)
        return summary

    def _insert_salvaged(self, epoch: str, device: str, first: int, last: int, n: int,
                         payload: bytes, sealed_ms: int, oldest_ms: int | None) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO salvaged VALUES (?,?,?,?,?,?,?,?,?)",
            (epoch, first, last, device, n, payload, content_hash(payload), sealed_ms, oldest_ms),
        )

    def _seal_salvaged_samples(self, epoch: str, device: str, samples: list[Sample]) -> int:
        """Seal runs of consecutive unsealed samples into batches of their old epoch."""
        # One row per number: a damaged b-tree can hand the same row out twice (read forwards
        # and backwards, or "Rowid out of order"), and a second run starting at a number
        # already used would be dropped by INSERT OR IGNORE without a trace. The checksum
        # covers seq, so two rows that verify with one number are the same sample.
        samples = sorted({x.seq: x for x in reversed(samples)}.values(), key=lambda x: x.seq or 0)
        runs: list[list[Sample]] = []
        for smp in samples:
            if runs and smp.seq == (runs[-1][-1].seq or 0) + 1 and len(runs[-1]) < SALVAGE_BATCH_SAMPLES:
                runs[-1].append(smp)
            else:
                runs.append([smp])
        for run in runs:
            first, last = run[0].seq, run[-1].seq
            assert first is not None and last is not None
            payload = encode_batch(Batch(device, epoch, first, last, run, []))
            oldest = min((x.t_utc_ms for x in run if x.t_utc_ms is not None), default=None)
            self._insert_salvaged(epoch, device, first, last, len(run), payload, 0, oldest)
        return len(samples)

    def _ensure_epoch(self, epoch: str, device: str, base: int) -> None:
        self._db.execute(
            "INSERT INTO epochs VALUES (?, ?, ?) ON CONFLICT(epoch)"
            " DO UPDATE SET next_carrier = max(next_carrier, excluded.next_carrier)",
            (epoch, device, base),
        )

    def _add_carrier(self, epoch: str, device: str, gaps: list[Gap]) -> None:
        """Gap records of an earlier epoch travel in a sample-less batch of that epoch.

        It is named after a sequence number past the epoch's end, so its id is
        new to the receiver (which refuses a known id with other bytes).
        """
        if not gaps:
            return
        row = self._db.execute("SELECT next_carrier FROM epochs WHERE epoch=?", (epoch,)).fetchone()
        if row is None:
            top = self._db.execute(
                "SELECT coalesce(max(last_seq), 0) FROM salvaged WHERE epoch=?", (epoch,)
            ).fetchone()[0]
            n = max(top, max(g.last_seq for g in gaps)) + recovery.CARRIER_OFFSET_UNCERTAIN
        else:
            n = int(row[0])
        payload = encode_batch(Batch(device, epoch, n, n, [], list(gaps)))
        self._insert_salvaged(epoch, device, n, n, 0, payload, int(time.time() * 1000), None)
        self._ensure_epoch(epoch, device, n + 1)
        self._db.execute("UPDATE epochs SET next_carrier=? WHERE epoch=?", (n + 1, epoch))
        self._bump("gap_records", len(gaps))

    # -- size cap ---------------------------------------------------------------

    def _pages(self) -> tuple[int, int]:
        pc = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pc), int(free)

    def used_bytes(self) -> int:
        """Bytes of the main file in use (free pages are reused, so they do not count)."""
        pc, free = self._pages()
        return (pc - free) * PAGE_SIZE

    def _budget(self) -> int:
        """The configured cap, the only limit that drops data (read afresh at every commit).

        A full file system is not a reason to drop what was committed: it is
        read anew at every write (SQLite says SQLITE_FULL), nothing about it is
        pinned, and the commit that does not fit is refused instead (see ``commit``).
        """
        return self.db_budget

    def _fits_on_disk(self, extra: int) -> bool:
        """The budget for new samples, re-read at every commit: may ``extra`` bytes be written?

        While the reserve file stands, yes: SQLite says when the file system is
        full, and the reserve is then given up (``_make_room``). Once it is gone
        (or could never be made), its size stays a floor that only
        acknowledgements, sealing and checkpoints may use: a commit goes ahead
        only if it leaves that much free, or fits in the file's own free pages.
        Without the floor, new samples would take the room the deletes of acked
        batches need, and a full card could never drain (nothing is pinned:
        when space returns, the next commit sees it).
        """
        if self.reserve_bytes <= 0 or self.reserve_path.exists():
            return True
        if self._disk_free() - 2 * extra >= self.reserve_bytes:
            return True
        return self._pages()[1] * PAGE_SIZE >= 2 * extra

    def _fs_total(self) -> int:
        return self._statvfs()[0]

    def _disk_free(self) -> int:
        return self._statvfs()[1]

    def _statvfs(self) -> tuple[int, int]:
        """(size, bytes free to us) of the file system under the buffer; zeros if unknown."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return 0, 0
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def _ensure_reserve(self) -> None:
        """(Re)create the ballast file if it is missing and the file system has room for it."""
        if self.reserve_bytes <= 0 or self.reserve_path.exists():
            return
        if self._disk_free() < 2 * self.reserve_bytes:
            return  # taking the last free space ourselves would only move the problem
        try:
            make_with_real_blocks(self.reserve_path, self.reserve_bytes)
        except OSError as exc:
            log.warning("buffer: cannot create the space reserve %s: %s", self.reserve_path, exc)

    def _release_reserve(self) -> bool:
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        self.reserve_releases += 1
        log.error("buffer: file system full, released the %d-byte space reserve", self.reserve_bytes)
        return True

    def _enforce_cap(self, extra: int) -> None:
        """Drop the oldest data until ``extra`` more bytes fit under the budget."""
        budget = self._budget()
        if self.used_bytes() + extra <= budget:
            return
        target = int(budget * CAP_HYSTERESIS) - extra
        self._drop_until(target, f"buffer full: cap of {budget} bytes reached")

    def _drop_until(self, target_used: int, why: str) -> int:
        """Drop oldest data (one transaction) until the pages in use are at most ``target_used``."""
        dropped = 0
        with self._tx():
            while self.used_bytes() > target_used:
                n = self._drop_oldest(why)
                if n == 0:
                    break  # nothing left to drop
                dropped += n
        if dropped:
            # Counted only now the drop is committed: a rolled-back drop (a full disk)
            # must not move the count (it once went negative and sealing stopped).
            self._unsealed = self._count_unsealed()
            log.warning("%s: dropped %d samples (gap records written)", why, dropped)
        return dropped

    def _drop_oldest(self, why: str) -> int:
        """Drop the oldest unit of data, with its gap record; returns samples dropped."""
        row = self._db.execute(
            "SELECT epoch, first_seq, last_seq, device, n_samples FROM salvaged"
            " WHERE n_samples > 0 ORDER BY rowid LIMIT 1"
        ).fetchone()
        if row:
            epoch, first, last, device, n = row
            self._db.execute("DELETE FROM salvaged WHERE epoch=? AND first_seq=?", (epoch, first))
            self._add_carrier(epoch, device, [Gap(first, last, f"{why}: salvaged batch dropped")])
            self._bump("batches_dropped")
            self._bump("samples_dropped", n)
            return int(n)
        row = self._db.execute(
            "SELECT first_seq, last_seq, n_samples FROM batches WHERE n_samples > 0 ORDER BY first_seq LIMIT 1"
        ).fetchone()
        if row:
            first, last, n = row
            self._db.execute("DELETE FROM batches WHERE first_seq=?", (first,))
            # Gap records that batch carried were not delivered: they wait for the next one.
            self._db.execute("UPDATE gaps SET sent_in=NULL WHERE sent_in=?", (first,))
            self._gap(first, last, f"{why}: sealed batch dropped")
            self._bump("batches_dropped")
            self._bump("samples_dropped", n)
            return int(n)
        seqs = [r[0] for r in self._db.execute(
            "SELECT seq FROM samples ORDER BY seq LIMIT ?", (DROP_CHUNK_SAMPLES,))]
        if not seqs:
            return 0
        self._db.execute("DELETE FROM samples WHERE seq <= ?", (seqs[-1],))
        for a, b in recovery._ranges(seqs):
            self._gap(a, b, f"{why}: unsealed samples dropped")
        self._bump("samples_dropped", len(seqs))
        return len(seqs)

    def _gap(self, first: int, last: int, reason: str) -> None:
        """Record a gap of this epoch, extending the previous unsent one if it is adjacent."""
        reason = gap_reason(reason)  # a reason the receiver refuses would sink the batch's gaps
        prev = self._db.execute(
            "SELECT id, last_seq, reason FROM gaps WHERE sent_in IS NULL ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if prev and prev[1] + 1 == first and prev[2] == reason:
            self._db.execute("UPDATE gaps SET last_seq=? WHERE id=?", (last, prev[0]))
            return
        self._db.execute(
            "INSERT INTO gaps (first_seq, last_seq, reason) VALUES (?,?,?)", (first, last, reason)
        )
        self._bump("gap_records")

    def _make_room(self) -> None:
        """The file system is full: make room for this buffer's writes without dropping data.

        Give up the ballast (so the WAL can be checkpointed and a delete or a
        commit logged), then checkpoint, so the next transactions overwrite the
        WAL from its start instead of growing it, into pages the main file
        already owns (freed pages are reused). What still does not fit is
        refused by the caller, never made to fit by dropping committed data.
        """
        self._rollback_quietly()
        self._release_reserve()
        self._checkpoint()

    def _checkpoint(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        except sqlite3.DatabaseError as exc:
            if not recovery.is_disk_full(exc):
                raise

    # -- write side -----------------------------------------------------------

    @_recovering
    def commit(self, samples: list[Sample]) -> list[int]:
        """Insert a group of samples in one transaction; returns their sequence numbers.

        When this returns, the samples are durable (WAL + synchronous=FULL) and
        the device owes them to the store. Each row carries its checksum
        (``buffer.rowcheck``), computed here: no extra write, no extra fsync.
        Raises ``BufferFullError`` (nothing stored, nothing lost) when the file
        system is full even after ``_make_room``: keep the samples and call
        again later. Committed data is never dropped to make room for new data
        on a full file system; only the configured cap drops the oldest.
        """
        if not samples:
            return []
        if self._unborn and not self._be_born():
            return self._refuse()
        if self._carried:
            try:
                self._own_up_to_carried()  # before the commit moves last_seq past the note
            except BufferFullError:
                return self._refuse()
        # Refuse early, before encoding anything, when even a small row per sample cannot fit
        # (held samples are offered again every few seconds while the card stays full).
        if not self._fits_on_disk(len(samples) * 64):
            return self._refuse()
        enc = _VALUES_ENCODER
        rows: list[tuple[Any, ...] | None] = []
        refused: list[tuple[int, str, bytes]] = []  # (index, why, the sample as given)
        for i, s in enumerate(samples):
            why = _admit(s)
            vals = enc(s.values) if why is None else ""
            if len(vals) >= SMALL_SAMPLE_BYTES:
                # Large enough that no batch might carry it (payload or inflated limit): the exact
                # check, an encode, is paid only here, never by an ordinary sample.
                why = sample_never_fits(s, _encode_alone)
            if why is None:
                rows.append((s.sensor, s.t_utc_ms, s.t_mono_ms, str(s.time_src), s.boot_id, vals,
                             ",".join(s.flags)))
            else:
                rows.append(None)
                refused.append((i, why, repr(s).encode("utf-8", "replace")[:65536]))
        # What the rows will take in pages, roughly (record overhead + b-tree slack).
        extra = (sum(len(r[5]) + len(r[4]) + 64 for r in rows if r)
                 + sum(len(raw) + 64 for _, _, raw in refused)) * 5 // 4
        if not self._fits_on_disk(extra):
            return self._refuse()
        try:
            first = self._insert_with_room(rows, extra, refused)
        except sqlite3.DatabaseError as exc:
            if not recovery.is_disk_full(exc):
                raise
            log.error("buffer: disk full, making room (%s)", exc)
            self._make_room()
            try:
                first = self._insert_with_room(rows, extra, refused)
            except sqlite3.DatabaseError as exc2:
                self._rollback_quietly()
                if not recovery.is_disk_full(exc2):
                    raise
                self.disk_full = True
                self.refused_commits += 1
                raise BufferFullError(f"buffer {self.path}: {exc2}") from exc2
        seqs = list(range(first, first + len(samples)))
        self._highwater.mark(self.epoch, seqs[-1])  # durable now: the witness may say so
        for s, q in zip(samples, seqs):
            s.seq = q
        self._unsealed += len(samples) - len(refused)
        if refused:
            log.error("buffer: %d samples refused at commit (%s), kept in bad_rows with a gap record",
                      len(refused), refused[0][1])
        self._stuck_at = None  # a write went through: housekeeping may find room too
        if self.disk_full:
            self.disk_full = False
            log.warning("buffer: commits are written again after the file system was full")
            self.housekeep()
        return seqs

    def _refuse(self) -> NoReturn:
        self.disk_full = True
        self.refused_commits += 1
        raise BufferFullError(f"buffer {self.path}: file system full (its last {self.reserve_bytes}"
                              " bytes are kept for acknowledgements and sealing)")

    def _insert_with_room(self, rows: list[tuple[Any, ...] | None], extra: int,
                          refused: list[tuple[int, str, bytes]]) -> int:
        """Insert the rows with consecutive numbers after the last one ever used; returns the first.

        A refused sample (None in ``rows``) takes its number too, and goes to
        ``bad_rows`` with a gap record in the same transaction: nothing handed
        to ``commit`` is lost without a record, and no batch ever holds it.
        """
        try:
            self._enforce_cap(extra)
        except sqlite3.DatabaseError as exc:
            # No room even to drop: the insert below will say so (or succeed).
            if not recovery.is_disk_full(exc):
                raise
            self._rollback_quietly()
        with self._tx():
            # The numbers are chosen here, inside the write transaction (one writer), so
            # the checksum can cover them; AUTOINCREMENT still never hands them out again.
            first = self.last_seq() + 1
            crc = rowcheck.commit_crc
            self._db.executemany(
                "INSERT INTO samples (seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags, crc)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                [(q, *r, crc(q, *r)) for q, r in enumerate(rows, first) if r is not None],
            )
            if refused:
                now_ms = int(time.time() * 1000)
                for i, why, raw in refused:
                    self._db.execute("INSERT INTO bad_rows VALUES (?,?,?,?)",
                                     (first + i, f"refused at commit: {why}", raw, now_ms))
                    self._gap(first + i, first + i, f"sample refused at commit: {why}")
                self._bump("samples_refused", len(refused))
                self._set_last_seq(first + len(rows) - 1)  # a refused last sample still used its number
            return first

    def housekeep(self) -> None:
        """Cheap unless there is work: delete deferred acks, re-create the space reserve.

        The agent calls it every tick, so both happen as soon as room returns.
        """
        if self._unborn:
            return  # nothing to keep house for; the first commit with room makes the file
        if self._exclusive:
            self._share_again()
        if not self._held_ready:
            self._held_ready = self._held.ensure()
        if self._deferred_acks:
            self._flush_acks()
        if self.reserve_bytes > 0 and not self.disk_full and not self.reserve_path.exists():
            self._ensure_reserve()

    def _still_stuck(self) -> bool:
        """True while nothing that gives room changed since a write last gave up.

        Every ``STUCK_RETRY_EVERY``-th call says False anyway: room can also come
        from what the signature does not see (a WAL reset by a checkpoint).
        """
        if self._stuck_at is None:
            return False
        if self._stuck_at != self._room_signature():
            self._stuck_at = None
            return False
        self._stuck_skips += 1
        if self._stuck_skips >= STUCK_RETRY_EVERY:
            self._stuck_skips = 0
            return False
        return True

    def _room_signature(self) -> tuple[int, int]:
        """What a full file system's room depends on: its free bytes and this file's free pages."""
        return self._disk_free(), self._pages()[1]

    def _flush_acks(self) -> None:
        if self._still_stuck():
            return  # nothing freed since the last try
        keys = sorted(self._deferred_acks)
        try:
            with self._tx():
                for key in keys:
                    self._delete_batch(key)
        except sqlite3.DatabaseError as exc:
            self._rollback_quietly()
            if not recovery.is_disk_full(exc):
                raise
            self._stuck_at = self._room_signature()
            return  # still no room: they stay hidden and are tried again
        self._stuck_at = None
        self._deferred_acks.difference_update(keys)
        log.warning("buffer: %d acknowledged batches deleted after the file system was full", len(keys))

    @_recovering
    @_tolerate_full(_RAISE)
    def add_gap(self, first_seq: int, last_seq: int, reason: str) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO gaps (first_seq, last_seq, reason) VALUES (?,?,?)",
                (first_seq, last_seq, reason),
            )
            self._bump("gap_records")

    @_recovering
    @_tolerate_full(_RAISE)
    def record_lost(self, n: int, reason: str) -> tuple[int, int]:
        """Own up to ``n`` samples that were taken but never committed (held in memory, then lost).

        They get sequence numbers like committed samples, used by nothing but a
        gap record: the store learns how many were lost and why, in order with
        the rest, and an epoch's numbers stay exactly 1..last_seq for the oracle.
        """
        with self._tx():
            first, last = self._lose(n, reason)
        self._highwater.mark(self.epoch, last)
        return first, last

    def _lose(self, n: int, reason: str) -> tuple[int, int]:
        """``record_lost`` inside the caller's transaction."""
        first = self.last_seq() + 1
        last = first + n - 1
        self._set_last_seq(last)
        self._gap(first, last, reason)
        self._bump("samples_lost_wal" if reason == WAL_LOST_REASON else "samples_lost_in_memory", n)
        return first, last

    def _set_last_seq(self, last: int) -> None:
        """Numbers up to ``last`` are used (by a gap record): AUTOINCREMENT never hands them out."""
        self._db.execute("UPDATE sqlite_sequence SET seq=max(seq, ?) WHERE name='samples'", (last,))
        if self._db.execute("SELECT changes()").fetchone()[0] == 0:
            self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('samples', ?)", (last,))

    # -- samples held in memory on a full card (buffer.heldledger) ------------

    def note_held(self, held: int, owed: int) -> None:
        """The agent holds ``held`` samples a full card refused (``owed`` more already discarded).

        Written in place to the side file and fsynced, so a stop, a kill or a
        power cut that loses them still leaves their count; the next open turns
        it into gap records. Costs nothing while nothing is held.
        """
        if not (held or owed or self._noted or self._carried) or self._unborn:
            return
        try:
            last = self.last_seq()
        except sqlite3.DatabaseError as exc:
            log.error("buffer: cannot note %d held samples: %s", held, exc)  # the next write finds the damage
            return
        note = HeldNote(self.epoch, last, held, owed, list(self._carried))
        empty = not (held or owed or self._carried)
        if self._held_ready and self._held.write(None if empty else note):
            self._noted = not empty

    def _take_held_note(self) -> None:
        """At open: what the last run noted and never settled becomes gap records."""
        if self._unborn:
            return
        self._held_ready = self._held.ensure()
        note = self._held.read()
        last = self.last_seq()
        if note is not None and note.epoch == self.epoch and note.last_seq == last:
            # (Otherwise none, or settled since: every settling write takes a new sequence number.)
            self._carried = note.losses()
            self._noted = True
        wal_lost = self._highwater.behind(self.epoch, last)
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

    @_recovering
    @_tolerate_full(_RAISE)
    def _own_up_to_carried(self) -> None:
        carried = list(self._carried)
        with self._tx():
            for n, reason in carried:
                first, last = self._lose(n, reason)
                log.error("buffer: %d samples lost at the last run's end, owned up to as gap %d-%d (%s)",
                          n, first, last, reason)
        self._carried = []
        self._highwater.mark(self.epoch, self.last_seq())
        # The note is void now (last_seq moved past it); clear it anyway so it is not read again.
        if self._held_ready and self._held.write(None):
            self._noted = False

    @_recovering
    def count_unsync(self, boot_id: str) -> int:
        """Unsealed samples of this boot stamped before the clock was trusted."""
        return self._db.execute(
            "SELECT count(*) FROM samples WHERE boot_id=? AND time_src='unsync'", (boot_id,)
        ).fetchone()[0]

    @_recovering
    @_tolerate_full(0)
    def correct_unsync(self, boot_id: str, offset_ms: int) -> int:
        """Re-stamp this boot's unsynchronised samples from their monotonic time.

        Only samples of the same boot can be corrected: their monotonic clock is
        the one the offset was measured on. Sealed batches are never touched.
        """
        with self._tx():
            cur = self._db.execute(
                # The checksum is re-made only for a row that verified as it was: a damaged
                # row must not be blessed by its correction (it is set aside at sealing).
                "UPDATE samples SET t_utc_ms = t_mono_ms + ?1, time_src = 'corrected', crc = CASE"
                f" WHEN crc = row_crc({_CRC_ARGS}) THEN"
                f" row_crc({_CRC_ARGS.replace('t_utc_ms', 't_mono_ms + ?1').replace('time_src', QUOTED_CORRECTED)})"
                " ELSE crc END WHERE boot_id=?2 AND time_src='unsync'",
                (offset_ms, boot_id),
            )
        return cur.rowcount

    @property
    def unsealed_count(self) -> int:
        return self._unsealed

    @_recovering
    @_tolerate_full(None)
    def seal(self, max_samples: int, now_utc_ms: int) -> SealedBatch | None:
        """Seal the oldest unsealed samples (at most ``max_samples``) into one batch.

        Every row is verified first (``buffer.rowcheck``): a row whose checksum
        does not match or that cannot be decoded is set aside in ``bad_rows``
        with its bytes as read, and a gap record owns up to it, in the same
        transaction as the batch. Sealing goes on with the rest: one bad row
        must not stop every tick.
        """
        # Gaps the WAL lost travel alone, in a gaps-only batch named after their range, never
        # merged into a batch of samples: a cut that took back a delivered seal brings those
        # samples back unsealed, and their re-seal must give the very bytes of the original
        # (encoding is deterministic) so the receiver answers "duplicate", not "different".
        gaps_rows = self._db.execute(
            "SELECT id, first_seq, last_seq, reason FROM gaps WHERE sent_in IS NULL AND reason=?"
            " ORDER BY id LIMIT ?", (WAL_LOST_REASON, MAX_GAPS_PER_BATCH)).fetchall()
        samples: list[Sample] = []
        rows: list[tuple[Any, ...]] = []
        if not gaps_rows:
            rows, samples = self._sealable(max_samples, now_utc_ms)  # first: its set-aside gaps ride too
            gaps_rows = self._db.execute(
                "SELECT id, first_seq, last_seq, reason FROM gaps WHERE sent_in IS NULL AND reason!=?"
                " ORDER BY id LIMIT ?", (WAL_LOST_REASON, MAX_GAPS_PER_BATCH)).fetchall()
        gaps_rows = _within_gap_budget(gaps_rows)
        if not samples and not gaps_rows:
            return None
        gaps = [Gap(g[1], g[2], gap_reason(g[3])) for g in gaps_rows]  # rows of an older version too
        try:
            samples, payload = self._fit(samples, gaps)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # Something the checks above did not foresee: set aside the rows that do not
            # encode alone, and let the next call seal the rest (never the same failure twice).
            by_seq = {r[0]: r for r in rows}
            culprits = [(by_seq[x.seq], f"cannot be encoded: {type(exc).__name__}") for x in samples
                        if not _encodes(x)]
            if not culprits:
                raise
            self._set_aside(culprits, now_utc_ms)
            return None
        except _TooLarge as big:
            by_seq = {r[0]: r for r in rows}
            self._set_aside([(by_seq[big.sample.seq], f"too large for any batch: {big}")], now_utc_ms)
            return None
        if samples:
            first, last = samples[0].seq, samples[-1].seq
        else:
            # Gaps alone still travel: they ride in an empty batch named after the gap range.
            first = min(g[1] for g in gaps_rows)
            last = max(g[2] for g in gaps_rows)
        assert first is not None and last is not None
        batch = Batch(self.device_id, self.epoch, first, last, samples, gaps)
        digest = content_hash(payload)
        with self._tx():
            if self._db.execute("SELECT 1 FROM batches WHERE first_seq=?", (first,)).fetchone():
                # Only a gaps-only batch can collide (its range was a batch before); such
                # gaps are already known to the receiver through that rejected range.
                self._db.executemany("UPDATE gaps SET sent_in=-1 WHERE id=?", [(g[0],) for g in gaps_rows])
                return None
            self._db.execute(
                "INSERT INTO batches VALUES (?,?,?,?,?,?,?)",
                (
                    first,
                    last,
                    len(samples),
                    payload,
                    digest,
                    now_utc_ms,
                    min((s.t_utc_ms for s in samples if s.t_utc_ms is not None), default=None),
                ),
            )
            if samples:
                self._db.execute("DELETE FROM samples WHERE seq BETWEEN ? AND ?", (first, last))
                # The seal watermark: after a corruption, what is missing above it
                # was never sent, so it is known lost (see recovery.salvage).
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('sealed_through', ?)", (str(last),))
            if gaps_rows:
                self._db.executemany("UPDATE gaps SET sent_in=? WHERE id=?", [(first, g[0]) for g in gaps_rows])
        self._unsealed -= len(samples)
        return SealedBatch(batch.batch_id, first, last, len(samples), payload, digest, self.epoch)

    def _sealable(self, max_samples: int, now_utc_ms: int) -> tuple[list[tuple[Any, ...]], list[Sample]]:
        """The oldest unsealed rows and the samples among them that can travel.

        Every row is verified first (``buffer.rowcheck``); one that fails, or
        that verifies and still could not travel (a row from before checksums, a
        value a driver should never have given: the receiver would refuse the
        whole batch, or it would not even encode), is set aside with a gap record.
        """
        rows = self._db.execute(
            f"SELECT {rowcheck.SELECT_COLS} FROM samples ORDER BY seq LIMIT ?", (max_samples,)
        ).fetchall()
        samples: list[Sample] = []
        bad: list[tuple[tuple[Any, ...], str]] = []
        for r in rows:
            checked = rowcheck.check_row(r)
            smp = checked.sample
            why = checked.why if smp is None else sample_problem(smp)
            if why:
                bad.append((r, why if smp is None else f"cannot travel: {why}"))
            else:
                samples.append(smp)  # type: ignore[arg-type]
        if bad:
            self._set_aside(bad, now_utc_ms)
        return rows, samples

    def _fit(self, samples: list[Sample], gaps: list[Gap]) -> tuple[list[Sample], bytes]:
        """The longest prefix of ``samples`` whose batch the receiver's limits allow, encoded.

        Halved until it fits (``core.batch_limits``): only a batch over a limit pays for
        more than one encode. A single sample over a limit raises ``_TooLarge``.
        """
        n = len(samples)
        while True:
            part = samples[:n]
            first = part[0].seq if part else min(g.first_seq for g in gaps)
            last = part[-1].seq if part else max(g.last_seq for g in gaps)
            assert first is not None and last is not None
            payload = encode_batch(Batch(self.device_id, self.epoch, first, last, part, gaps))
            why = batch_problem(part, len(gaps), payload)
            if why is None:
                return part, payload
            if n <= 1:
                if not part:
                    raise ValueError(f"a gaps-only batch over the limits: {why}")
                if gaps:
                    # One sample plus the pending gaps is too much, which says nothing about the
                    # sample: the gaps go first in a batch of their own, the sample next time
                    # (alone, and only then "too large for any batch" if it still does not fit).
                    return self._fit([], gaps)
                raise _TooLarge(part[0], why)
            n //= 2

    def _set_aside(self, bad: list[tuple[tuple[Any, ...], str]], now_utc_ms: int) -> None:
        """Move rows that cannot be sealed to ``bad_rows``, each owned up to by a gap record."""
        with self._tx():
            for r, why in bad:
                self._db.execute(
                    "INSERT INTO bad_rows VALUES (?,?,?,?)", (r[0], why, rowcheck.raw_bytes(r), now_utc_ms)
                )
                self._db.execute("DELETE FROM samples WHERE rowid=?", (r[0],))
                if isinstance(r[0], int) and r[0] > 0:
                    self._gap(r[0], r[0], f"unsealable row set aside: {why}")
                self._bump("rows_set_aside")
        self._unsealed -= len(bad)
        log.error("buffer: %d unsealable rows set aside in bad_rows (%s)", len(bad), bad[0][1])

    # -- read side ------------------------------------------------------------

    def _where(self, key: Key) -> tuple[str, str, tuple[Any, ...]] | None:
        """(table, WHERE clause, params) that name the batch ``key``, or None if not ours."""
        if isinstance(key, int):
            return "batches", "first_seq=?", (key,)
        try:
            device, epoch, first, last = parse_batch_id(key)
        except PayloadError:
            return None
        if epoch == self.epoch:
            return ("batches", "first_seq=? AND last_seq=?", (first, last)) if device == self.device_id else None
        return "salvaged", "epoch=? AND first_seq=? AND last_seq=? AND device=?", (epoch, first, last, device)

    def _own(self, r: tuple[Any, ...]) -> SealedBatch:
        return SealedBatch(batch_id(self.device_id, self.epoch, r[0], r[1]), r[0], r[1], r[2], r[3], r[4], self.epoch)

    @staticmethod
    def _salv(r: tuple[Any, ...]) -> SealedBatch:
        return SealedBatch(batch_id(r[6], r[5], r[0], r[1]), r[0], r[1], r[2], r[3], r[4], r[5])

    @_recovering
    def pending(self, limit: int, exclude: Iterable[Key] = frozenset()) -> list[SealedBatch]:
        """Sealed batches not yet acknowledged, oldest first (earlier epochs before this one).

        ``exclude`` holds batches already in flight: ints are first_seq of this
        epoch's batches (the old form), strings are batch ids (any epoch).
        """
        ex = set(exclude) | self._deferred_acks
        out: list[SealedBatch] = []
        sources = (
            (f"SELECT {_SALV_COLS} FROM salvaged ORDER BY rowid", self._salv),
            (f"SELECT {_BATCH_COLS} FROM batches ORDER BY first_seq", self._own),
        )
        for sql, make in sources:
            offset = 0
            while len(out) < limit:
                rows = self._db.execute(f"{sql} LIMIT ? OFFSET ?", (limit + len(ex), offset)).fetchall()
                if not rows:
                    break
                offset += len(rows)
                for r in rows:
                    sb = make(r)
                    if sb.batch_id in ex or (sb.epoch == self.epoch and sb.first_seq in ex):
                        continue
                    out.append(sb)
                    if len(out) >= limit:
                        break
        return out

    @_recovering
    def newest(self, limit: int, exclude: Iterable[Key] = frozenset()) -> list[SealedBatch]:
        """This epoch's newest sealed batches, newest first: fresh data while a backlog drains."""
        ex = set(exclude) | self._deferred_acks
        rows = self._db.execute(
            f"SELECT {_BATCH_COLS} FROM batches ORDER BY first_seq DESC LIMIT ?", (limit + len(ex),)
        ).fetchall()
        out = [sb for sb in map(self._own, rows) if sb.batch_id not in ex and sb.first_seq not in ex]
        return out[:limit]

    @_recovering
    def get(self, key: Key) -> SealedBatch | None:
        """A batch by this epoch's first_seq, or by batch id (any epoch); None if gone (or acked)."""
        sb = self._peek(key)
        return None if sb is None or sb.batch_id in self._deferred_acks else sb

    def _peek(self, key: Key) -> SealedBatch | None:
        """A batch by key, acknowledged or not."""
        where = self._where(key)
        if where is None:
            return None
        table, cond, params = where
        cols = _BATCH_COLS if table == "batches" else _SALV_COLS
        r = self._db.execute(f"SELECT {cols} FROM {table} WHERE {cond}", params).fetchone()
        if r is None:
            return None
        return self._own(r) if table == "batches" else self._salv(r)

    @_recovering
    def acknowledge(self, key: Key) -> bool:
        """The receiver committed this batch: delete it. True if it was here.

        On a full file system whose room is gone even after ``_make_room`` the
        ack is still recorded: the batch is hidden from ``get``/``pending``/
        ``newest`` at once (so it is not sent again) and deleted by
        ``housekeep`` when there is room.
        """
        done = self._acknowledge(key)
        if done is not None:
            return done
        sb = self.get(key)
        if sb is None:
            return False
        self._deferred_acks.add(sb.batch_id)
        self._bump_quietly("acks_deferred")
        return True

    @_tolerate_full(None)
    def _acknowledge(self, key: Key) -> bool | None:
        with self._tx():
            return self._delete_batch(key)

    def _delete_batch(self, key: Key) -> bool:
        """Delete an acknowledged batch (inside the caller's transaction)."""
        where = self._where(key)
        if where is None:
            return False
        table, cond, params = where
        if table == "batches":
            first = self._db.execute(f"SELECT first_seq FROM batches WHERE {cond}", params).fetchone()
            cur = self._db.execute(f"DELETE FROM batches WHERE {cond}", params)
            if first:
                # Gaps carried by that batch are delivered with it.
                self._db.execute("DELETE FROM gaps WHERE sent_in=?", (first[0],))
        else:
            cur = self._db.execute(f"DELETE FROM salvaged WHERE {cond}", params)
        return cur.rowcount > 0

    def _bump_quietly(self, name: str) -> None:
        """Count in its own transaction if the file system lets us; a count is not worth an error."""
        try:
            with self._tx():
                self._bump(name)
        except sqlite3.DatabaseError as exc:
            self._rollback_quietly()
            if not recovery.is_disk_full(exc):
                raise

    @_recovering
    @_tolerate_full(False)
    def reject(self, key: Key, last_seq: int, reason: str, *, by: str = "receiver") -> bool:
        """The receiver (or ``by`` someone else) refused this batch for good: drop it, own up with a gap."""
        where = self._where(key)
        if where is None:
            return False
        table, cond, params = where
        why = gap_reason(f"rejected by {by}: {reason}"[:500])
        with self._tx():
            if table == "batches":
                row = self._db.execute(f"SELECT first_seq, n_samples FROM batches WHERE {cond}",
                                       params).fetchone()
                cur = self._db.execute(f"DELETE FROM batches WHERE {cond}", params)
                if cur.rowcount and row[1] > 0:
                    # The gap records it carried were not delivered: back in the queue with their
                    # own reasons, for the gaps-only batch that replaces it (acking that one deletes
                    # the gaps it carries, so marked "sent" here they would be lost unsaid).
                    self._db.execute("UPDATE gaps SET sent_in=NULL WHERE sent_in=?", (row[0],))
                    self._db.execute(
                        "INSERT INTO gaps (first_seq, last_seq, reason) VALUES (?,?,?)",
                        (row[0], last_seq, why),
                    )
                    self._bump("gap_records")
                elif cur.rowcount:
                    # A gaps-only batch refused: sent again it would be refused again, forever.
                    # Its records stay marked sent (-1: not delivered); the loss they told of stays
                    # visible in persisted counters (heartbeat: gaps_undelivered), not only the log.
                    n_gaps, n_seqs = self._db.execute(
                        "SELECT count(*), coalesce(sum(last_seq - first_seq + 1), 0) FROM gaps WHERE sent_in=?",
                        (row[0],)).fetchone()
                    self._db.execute("UPDATE gaps SET sent_in=-1 WHERE sent_in=?", (row[0],))
                    self._bump("gap_records_undelivered", n_gaps)
                    self._bump("samples_in_undelivered_gaps", n_seqs)
                    log.error("buffer: gaps-only batch %s refused (%s): its gap records are not delivered",
                              key, why)
            else:
                row = self._db.execute(
                    f"SELECT epoch, device, first_seq, last_seq, n_samples FROM salvaged WHERE {cond}", params
                ).fetchone()
                cur = self._db.execute(f"DELETE FROM salvaged WHERE {cond}", params)
                if row and row[4] > 0:
                    # A rejected carrier gets no carrier of its own: that could loop.
                    self._add_carrier(row[0], row[1], [Gap(row[2], row[3], why)])
        return cur.rowcount > 0

    @_recovering
    def stats(self) -> BufferStats:
        nb, backlog, oldest_b = self._db.execute(
            "SELECT count(*), coalesce(sum(n_samples),0), min(oldest_utc_ms) FROM batches"
        ).fetchone()
        ns, sbacklog, oldest_sv = self._db.execute(
            "SELECT count(*), coalesce(sum(n_samples),0), min(oldest_utc_ms) FROM salvaged"
        ).fetchone()
        oldest_s = self._db.execute("SELECT min(t_utc_ms) FROM samples").fetchone()[0]
        present = [t for t in (oldest_b, oldest_s, oldest_sv) if t is not None]
        oldest = min(present) if present else None
        c = self.counters()
        # Batches acknowledged but not yet deleted (a full card) are no longer owed.
        hidden = [sb.n_samples for k in self._deferred_acks if (sb := self._peek(k)) is not None]
        return BufferStats(
            unsealed=self._unsealed,
            batches=nb + ns - len(hidden),
            backlog_samples=backlog + sbacklog + self._unsealed - sum(hidden),
            oldest_unsent_utc_ms=oldest,
            last_seq=self.last_seq(),
            file_bytes=self.file_bytes(),
            samples_dropped=c.get("samples_dropped", 0),
            gap_records=c.get("gap_records", 0),
            quarantined=c.get("quarantined", 0),
            salvaged_batches=ns,
            quarantine_bytes=recovery.quarantine_bytes(self.quarantine_dir),
            gaps_undelivered=c.get("gap_records_undelivered", 0),
        )

    def file_bytes(self) -> int:
        """Database + WAL as they take space on the card."""
        return sum(
            os.path.getsize(p) for p in (self.path, Path(str(self.path) + "-wal")) if p.exists()
        )

    def last_seq(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='samples'").fetchone()
        return int(row[0]) if row else 0

    def integrity_ok(self) -> bool:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def close(self) -> None:
        self._db.close()
        self._highwater.close()


def _admit(s: Sample) -> str | None:
    """Make a sample fit for the wire, or say why it cannot be: checked at commit.

    The rules are the receiver's own (``core.sample_rules``, the one function
    both sides call): a sample the receiver would refuse is refused here alone,
    not with the whole batch it would ride in. NaN and infinity are no
    measurement: stored as unknown (None) and flagged ``non_finite`` (as the
    agent does with a driver's readings). A flag with a comma, or an empty one,
    is refused, not split or dropped (flags are stored comma-joined).
    """
    # One pass for a sample that travels (every commit of every sample): the rules refuse
    # non-finite floats, so None also says there is nothing to replace.
    why = sample_problem(s)
    if why is None:
        return None
    vals = s.values
    if isinstance(vals, dict) and any(isinstance(v, float) and not math.isfinite(v) for v in vals.values()):
        s.values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in vals.items()}
        s.flags = (*s.flags, "non_finite")
        return sample_problem(s)
    return why


def _within_gap_budget(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The first gap rows whose text stays within ``GAP_TEXT_BUDGET`` (at least one): gap records
    alone must never push a batch over a limit ``_fit`` can only meet by dropping samples. The
    budget guards the compressed payload limit too (random text does not compress). The rest
    ride in the next batch."""
    budget, out = GAP_TEXT_BUDGET, []
    for r in rows:
        budget -= len(str(r[3]).encode("utf-8", "replace")) + 48
        if budget < 0 and out:
            break
        out.append(r)
    return out


def _encode_alone(samples: Sequence[Sample]) -> bytes:
    """A batch of these samples alone (numbered from 1), as sealing would encode it."""
    return encode_batch(Batch("d", "e", 1, len(samples), [
        Sample(s.sensor, s.t_utc_ms, s.t_mono_ms, s.time_src, s.values, s.flags, i, s.boot_id)
        for i, s in enumerate(samples, 1)], []))


def _encodes(s: Sample) -> bool:
    try:
        _encode_alone([s])
    except (ValueError, TypeError, OverflowError, RecursionError):
        return False
    return True


class _TooLarge(Exception):
    """One sample alone breaks a batch limit: it can never travel (set aside at sealing)."""

    def __init__(self, sample: Sample, why: str) -> None:
        super().__init__(why)
        self.sample = sample


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is None:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:
            # SQLite may already have rolled back (SQLITE_FULL, SQLITE_CORRUPT).
            self._db.execute("ROLLBACK")
