"""What every part of ``Buffer`` shares: the state ``Buffer.__init__`` sets up, and the transaction.

The parts (buffer.opening, .epoch, .commit, .seal, .ack, ...) are mixins of one object, so a
method moved out of the old one-class store reads and writes the very attributes it did.
The annotations below only name that state for readers; ``Buffer.__init__`` sets it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from buffer.guards import _Tx
from buffer.heldledger import HeldLedger
from buffer.highwater import HighWater
from buffer.identity import IdentityFile


class BufferBase:
    """The state of one buffer (set by ``Buffer.__init__``; see buffer.store)."""

    path: Path
    device_id: str
    quarantine_dir: Path
    max_bytes: int
    wal_pages: int
    wal_limit_bytes: int
    db_budget: int
    reserve_path: Path
    reserve_bytes: int
    disk_full: bool
    refused_commits: int
    reserve_releases: int
    epoch: str
    _db: sqlite3.Connection
    _stuck_at: tuple[int, int] | None
    _stuck_skips: int
    _deferred_acks: set[str]
    _exclusive: bool
    _unborn: bool
    _check_deferred: bool
    _held: HeldLedger
    _identity: IdentityFile
    _damaged_epoch: str | None
    _lost_witness: tuple[str, int] | None  # (epoch, last_seq) a new birth owned up to as gone
    _highwater: HighWater
    _held_ready: bool
    _last_held: tuple[int, int]
    held_unnoted: int
    _noted: bool
    _carried: list[tuple[int, str]]
    _unsealed: int

    def _tx(self) -> "_Tx":
        return _Tx(self._db)

    def _rollback_quietly(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass  # SQLite may have rolled back on its own (SQLITE_FULL, SQLITE_CORRUPT)
