"""Room on the card: the size cap (drops the oldest, with gap records) and a full file system
(never drops: the ballast file, checkpoints, a write that gave up tried again when room changes)."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from buffer import recovery
from buffer.handle import FileHandle
from buffer.heldledger import make_with_real_blocks
from buffer.schema import PAGE_SIZE
from buffer.seams import CarrierWriter, GapRecorder, Tally
from core.wire import Gap

log = logging.getLogger("buffer.store")  # the name the one-class store logged under

# Keep the budget this far below the cap: a full buffer frees 10 % at once
# instead of dropping a little at every commit.
CAP_HYSTERESIS = 0.9

DROP_CHUNK_SAMPLES = 256  # unsealed samples dropped per step (one gap record per run)

# On a full file system, a write that found no room is tried again when room changes,
# and at least every this many calls (about every 30 s at one tick a second).
STUCK_RETRY_EVERY = 30


class Room:
    """The space budget of one buffer file: its sizes, the cap, the ballast, a full card."""

    def __init__(self, handle: FileHandle, tally: Tally, gaps: GapRecorder, carriers: CarrierWriter, *,
                 max_bytes: int, wal_autocheckpoint: int, reserve_bytes: int | None) -> None:
        self._h = handle
        self._tally = tally
        self._gaps = gaps
        self._carriers = carriers
        path = handle.path
        self.max_bytes = int(max_bytes)
        self.wal_pages = max(8, min(int(wal_autocheckpoint), self.max_bytes // PAGE_SIZE // 8))
        self.wal_limit_bytes = self.wal_pages * PAGE_SIZE
        # The WAL may pass the checkpoint mark by one transaction before it is
        # reset: reserve twice its limit, the rest is for the main file.
        self.db_budget = self.max_bytes - 2 * self.wal_limit_bytes
        if self.db_budget < 64 * PAGE_SIZE:
            raise ValueError(f"max_bytes={max_bytes} is too small for a buffer")
        self.reserve_path = Path(str(path) + ".reserve")
        self.reserve_bytes = 2 * self.wal_limit_bytes if reserve_bytes is None else int(reserve_bytes)
        # On a small card the configured WAL and reserve would take a good part of it
        # (the defaults are 4 MiB and 8 MiB): scale both down to 1/16 of the file system.
        fs_pages = self.fs_total() // PAGE_SIZE
        if fs_pages:
            self.wal_pages = max(8, min(self.wal_pages, fs_pages // 16))
            self.wal_limit_bytes = self.wal_pages * PAGE_SIZE
            self.reserve_bytes = min(self.reserve_bytes, fs_pages // 16 * PAGE_SIZE)
        # True from a commit the file system refused until a commit succeeds.
        self.disk_full = False
        self.refused_commits = 0  # since this object was made (not kept: writing it needs room)
        self.reserve_releases = 0  # times the ballast file was given up, likewise
        # (free bytes, free pages) when a write last gave up for want of room; None: not stuck.
        self.stuck_at: tuple[int, int] | None = None
        self._stuck_skips = 0

    def pages(self) -> tuple[int, int]:
        pc = self._h.db.execute("PRAGMA page_count").fetchone()[0]
        free = self._h.db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pc), int(free)

    def used_bytes(self) -> int:
        """Bytes of the main file in use (free pages are reused, so they do not count)."""
        pc, free = self.pages()
        return (pc - free) * PAGE_SIZE

    def budget(self) -> int:
        """The configured cap, the only limit that drops data (read afresh at every commit).

        A full file system is not a reason to drop what was committed: it is
        read anew at every write (SQLite says SQLITE_FULL), nothing about it is
        pinned, and the commit that does not fit is refused instead (see ``commit``).
        """
        return self.db_budget

    def fits_on_disk(self, extra: int) -> bool:
        """The budget for new samples, re-read at every commit: may ``extra`` bytes be written?

        While the reserve file stands, yes: SQLite says when the file system is
        full, and the reserve is then given up (``make_room``). Once it is gone
        (or could never be made), its size stays a floor that only
        acknowledgements, sealing and checkpoints may use: a commit goes ahead
        only if it leaves that much free, or fits in the file's own free pages.
        Without the floor, new samples would take the room the deletes of acked
        batches need, and a full card could never drain (nothing is pinned:
        when space returns, the next commit sees it).
        """
        if self.reserve_bytes <= 0 or self.reserve_path.exists():
            return True
        if self.disk_free() - 2 * extra >= self.reserve_bytes:
            return True
        return self.pages()[1] * PAGE_SIZE >= 2 * extra

    def fs_total(self) -> int:
        return self._statvfs()[0]

    def disk_free(self) -> int:
        return self._statvfs()[1]

    def _statvfs(self) -> tuple[int, int]:
        """(size, bytes free to us) of the file system under the buffer; zeros if unknown."""
        try:
            st = os.statvfs(self._h.path.parent)
        except OSError:
            return 0, 0
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def ensure_reserve(self) -> None:
        """(Re)create the ballast file if it is missing and the file system has room for it."""
        if self.reserve_bytes <= 0 or self.reserve_path.exists():
            return
        if self.disk_free() < 2 * self.reserve_bytes:
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

    def enforce_cap(self, extra: int) -> None:
        """Drop the oldest data until ``extra`` more bytes fit under the budget."""
        budget = self.budget()
        if self.used_bytes() + extra <= budget:
            return
        target = int(budget * CAP_HYSTERESIS) - extra
        self._drop_until(target, f"buffer full: cap of {budget} bytes reached")

    def _drop_until(self, target_used: int, why: str) -> int:
        """Drop oldest data (one transaction) until the pages in use are at most ``target_used``."""
        dropped = 0
        with self._h.tx():
            while self.used_bytes() > target_used:
                n = self._drop_oldest(why)
                if n == 0:
                    break  # nothing left to drop
                dropped += n
        if dropped:
            # Counted only now the drop is committed: a rolled-back drop (a full disk)
            # must not move the count (it once went negative and sealing stopped).
            self._h.unsealed = self._h.count_unsealed()
            log.warning("%s: dropped %d samples (gap records written)", why, dropped)
        return dropped

    def _drop_oldest(self, why: str) -> int:
        """Drop the oldest unit of data, with its gap record; returns samples dropped."""
        db = self._h.db
        row = db.execute(
            "SELECT epoch, first_seq, last_seq, device, n_samples FROM salvaged"
            " WHERE n_samples > 0 ORDER BY rowid LIMIT 1"
        ).fetchone()
        if row:
            epoch, first, last, device, n = row
            db.execute("DELETE FROM salvaged WHERE epoch=? AND first_seq=?", (epoch, first))
            self._carriers.add_carrier(epoch, device, [Gap(first, last, f"{why}: salvaged batch dropped")])
            self._tally.bump("batches_dropped")
            self._tally.bump("samples_dropped", n)
            return int(n)
        row = db.execute(
            "SELECT first_seq, last_seq, n_samples FROM batches WHERE n_samples > 0 ORDER BY first_seq LIMIT 1"
        ).fetchone()
        if row:
            first, last, n = row
            db.execute("DELETE FROM batches WHERE first_seq=?", (first,))
            # Gap records that batch carried were not delivered: they wait for the next one.
            db.execute("UPDATE gaps SET sent_in=NULL WHERE sent_in=?", (first,))
            self._gaps.gap(first, last, f"{why}: sealed batch dropped")
            self._tally.bump("batches_dropped")
            self._tally.bump("samples_dropped", n)
            return int(n)
        seqs = [r[0] for r in db.execute(
            "SELECT seq FROM samples ORDER BY seq LIMIT ?", (DROP_CHUNK_SAMPLES,))]
        if not seqs:
            return 0
        db.execute("DELETE FROM samples WHERE seq <= ?", (seqs[-1],))
        for a, b in recovery._ranges(seqs):
            self._gaps.gap(a, b, f"{why}: unsealed samples dropped")
        self._tally.bump("samples_dropped", len(seqs))
        return len(seqs)

    def make_room(self) -> None:
        """The file system is full: make room for this buffer's writes without dropping data.

        Give up the ballast (so the WAL can be checkpointed and a delete or a
        commit logged), then checkpoint, so the next transactions overwrite the
        WAL from its start instead of growing it, into pages the main file
        already owns (freed pages are reused). What still does not fit is
        refused by the caller, never made to fit by dropping committed data.
        """
        self._h.rollback_quietly()
        self._release_reserve()
        self.checkpoint()

    def checkpoint(self) -> None:
        try:
            self._h.db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        except sqlite3.DatabaseError as exc:
            if not recovery.is_disk_full(exc):
                raise

    def still_stuck(self) -> bool:
        """True while nothing that gives room changed since a write last gave up.

        Every ``STUCK_RETRY_EVERY``-th call says False anyway: room can also come
        from what the signature does not see (a WAL reset by a checkpoint).
        """
        if self.stuck_at is None:
            return False
        if self.stuck_at != self.signature():
            self.stuck_at = None
            return False
        self._stuck_skips += 1
        if self._stuck_skips >= STUCK_RETRY_EVERY:
            self._stuck_skips = 0
            return False
        return True

    def signature(self) -> tuple[int, int]:
        """What a full file system's room depends on: its free bytes and this file's free pages."""
        return self.disk_free(), self.pages()[1]

    def mark_stuck(self) -> None:
        """A write gave up for want of room: not tried again until the room changes."""
        self.stuck_at = self.signature()

    def clear_stuck(self) -> None:
        """A write went through: housekeeping may find room too."""
        self.stuck_at = None
