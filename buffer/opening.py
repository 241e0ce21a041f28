"""Opening the buffer file: connection and pragmas, the check at open, a card full at start."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Callable

from buffer import recovery, rowcheck
from buffer.handle import FileHandle
from buffer.identity import IdentityFile
from buffer.schema import PAGE_SIZE, SCHEMA
from buffer.seams import EpochSource, OpenRoom

log = logging.getLogger("buffer.store")  # the name the one-class store logged under

# Below this much free space an I/O error at open is taken for a full card (see Opener._no_room).
NO_ROOM_BYTES = 64 * PAGE_SIZE


class Opener:
    """Opens the buffer file into the shared ``FileHandle``: the only part that swaps ``handle.db``.

    Owns how the file is open: ``exclusive`` while a card full at start left no room for the
    -shm file, ``unborn`` while there is no database file at all (an in-memory stand-in).
    """

    def __init__(self, handle: FileHandle, room: OpenRoom, epochs: EpochSource, identity: IdentityFile,
                 after_birth: Callable[[], None]) -> None:
        self._h = handle
        self._room = room
        self._epochs = epochs
        self._identity = identity
        # What a file born late owes (Buffer: the held note rebased, pending salvages).
        self._after_birth = after_birth
        self.path = handle.path
        self.device_id = handle.device_id
        # A card already full at start (see ``_open_without_room``): True while the
        # connection is exclusive (no -shm file could be made), or while there is no
        # database file yet at all (``unborn``: an empty one in memory stands in).
        self.exclusive = False
        self.unborn = False
        self.check_deferred = False  # quick_check could not run read-only for want of room

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
        db.execute(f"PRAGMA wal_autocheckpoint={self._room.wal_pages}")
        # After a checkpoint resets the WAL, truncate it back to this size: it
        # cannot grow without bound, and keeps this much space as a reserve a
        # full disk cannot take away (the next transactions overwrite it).
        db.execute(f"PRAGMA journal_size_limit={self._room.wal_limit_bytes}")
        # No VACUUM, ever: it rewrites the whole file (SD wear), needs twice the
        # space (impossible on a full disk) and a power cut in the middle of it
        # is the riskiest moment of the file's life. The freelist does the job.
        db.executescript(SCHEMA)
        if "crc" not in {r[1] for r in db.execute("PRAGMA table_info(samples)")}:
            db.execute("ALTER TABLE samples ADD COLUMN crc INTEGER")  # a file from before checksums
        db.create_function("row_crc", 8, rowcheck.row_crc, deterministic=True)
        return db

    def open(self) -> None:
        try:
            self._h.db = self._connect()
            self.exclusive = False
        except sqlite3.DatabaseError as exc:
            if not self._no_room(exc):
                raise
            self._h.db = self._open_without_room(exc)
        try:
            self._h.epoch = self._epochs.init_epoch(real=not self.unborn, exclusive=self.exclusive,
                                                       unborn=self.unborn)
        except sqlite3.DatabaseError as exc:
            # The card had room for the schema but not for the epoch birth's COMMIT
            # (~130 KiB free): start as on a card full at open, not crash-loop.
            if self.unborn or not self._no_room(exc):
                raise
            self._h.rollback_quietly()
            self._h.db.close()
            self._h.db = self._open_without_room(exc)
            self._h.epoch = self._epochs.init_epoch(real=not self.unborn, exclusive=self.exclusive,
                                                       unborn=self.unborn)
        self._h.unsealed = self._h.count_unsealed()
        if not self.unborn:  # a stand-in's epoch is never real; its block is the .held note's
            self._identity.write(self._h.epoch, self.device_id)

    def _no_room(self, exc: BaseException) -> bool:
        """An error that means "the card is full", not "the file is bad".

        SQLITE_FULL, or SQLITE_IOERR while the file system has (almost) no room:
        making or growing the -shm file on a full card fails as a plain I/O error.
        """
        if recovery.is_disk_full(exc):
            return True
        return (isinstance(exc, sqlite3.OperationalError) and "disk i/o error" in str(exc).lower()
                and self._room.disk_free() < NO_ROOM_BYTES)

    def _open_without_room(self, exc: BaseException) -> sqlite3.Connection:
        """Open on a card that is already full: the agent must start anyway.

        An existing buffer opens in exclusive mode (no -shm file needed): its
        sealed backlog can be read and sent, acks deferred, commits refused
        until there is room. A buffer that does not exist yet cannot be made:
        an empty database in memory stands in (nothing is ever written to it;
        ``commit`` refuses) and the real file is made at the first commit that
        finds room (``be_born``).
        """
        log.error("buffer %s: card full at open (%s): opening without a -shm file", self.path, exc)
        try:
            db = self._connect(exclusive=True)
            if db.execute("SELECT 1 FROM meta WHERE key='epoch'").fetchone():
                self.exclusive = True
                self._room.disk_full = True
                return db
            db.close()
        except sqlite3.DatabaseError as exc2:
            if not self._no_room(exc2):
                raise
        log.error("buffer %s: no room to create the buffer; samples are held until there is", self.path)
        self.unborn = True
        self._room.disk_full = True
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        db.executescript(SCHEMA)
        db.create_function("row_crc", 8, rowcheck.row_crc, deterministic=True)
        return db

    def be_born(self) -> bool:
        """Make the real database file once the card has room; False while it has not."""
        if self._room.disk_free() < NO_ROOM_BYTES:
            return False
        try:
            db = self._connect()
        except sqlite3.DatabaseError as exc:
            if not self._no_room(exc):
                raise
            return False
        stand_in, self._h.db = self._h.db, db
        try:
            self._h.epoch = self._epochs.init_epoch(exclusive=self.exclusive, unborn=self.unborn)
        except sqlite3.DatabaseError as exc:
            self._h.db = stand_in
            db.close()
            if not self._no_room(exc):
                raise
            return False
        stand_in.close()
        self.unborn = False
        self._identity.write(self._h.epoch, self.device_id)  # the stand-in's epoch was never real
        self._h.unsealed = self._h.count_unsealed()
        log.warning("buffer %s: created now that the card has room (epoch %s)", self.path, self._h.epoch)
        self._after_birth()
        return True

    def share_again(self) -> None:
        """Leave the exclusive mode a full card forced at open, once the card has room."""
        if self._room.disk_free() < max(2 * self._room.reserve_bytes, NO_ROOM_BYTES):
            return
        self._h.db.close()
        try:
            self._h.db = self._connect()
            self.exclusive = False
            log.warning("buffer %s: card has room again, back to shared mode", self.path)
        except sqlite3.DatabaseError as exc:
            if not self._no_room(exc):
                raise
            self._h.db = self._connect(exclusive=True)

    def check_in_place(self) -> None:
        """The check at open that a full card prevented, run on the (exclusive) connection."""
        rows = [str(r[0]) for r in self._h.db.execute("PRAGMA quick_check").fetchall()]
        self.check_deferred = False
        if rows != ["ok"]:
            raise sqlite3.DatabaseError("database disk image is malformed: quick_check: " + "; ".join(rows[:5]))

    def check_files(self) -> str | None:
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
                self.check_deferred = True
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

    def peek_epoch(self) -> str | None:
        if self._epochs.damaged_epoch is not None:
            return self._epochs.damaged_epoch  # meta's epoch failed its check: the side file's
        try:
            conn = sqlite3.connect(self.path.as_uri() + "?immutable=1", uri=True)
            try:
                row = conn.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            finally:
                conn.close()
        except (sqlite3.DatabaseError, UnicodeDecodeError):
            return self._identity.epoch_of()
        return str(row[0]) if row else None
