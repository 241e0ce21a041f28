"""The open buffer file as its parts share it: the connection, the epoch, the unsealed count.

One ``FileHandle`` per ``Buffer``; every part (committer, sealer, outbox, ...) holds the same
one and reads ``handle.db`` afresh at each use, because the connection is replaced under them:
recovery reopens after a quarantine, a card full at start swaps an in-memory stand-in for the
real file, and a card with room again leaves exclusive mode. A part that kept the connection
it was built with would write to a closed (or quarantined) file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from buffer.guards import _Tx


class FileHandle:
    """The buffer file one ``Buffer`` has open; only ``buffer.opening`` and recovery swap ``db``."""

    def __init__(self, path: Path, device_id: str) -> None:
        self.path = path
        self.device_id = device_id
        self.db: sqlite3.Connection  # set by the first open
        self.epoch: str  # likewise (buffer.epoch)
        # Unsealed rows, counted at open and kept by commit, seal and the cap: ``stats`` and the
        # agent ask every tick, a count(*) each time would read the whole table.
        self.unsealed = 0

    def tx(self) -> _Tx:
        """One BEGIN IMMEDIATE ... COMMIT: one fsync."""
        return _Tx(self.db)

    def rollback_quietly(self) -> None:
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass  # SQLite may have rolled back on its own (SQLITE_FULL, SQLITE_CORRUPT)

    def count_unsealed(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM samples").fetchone()[0])

    def last_seq(self) -> int:
        """The last sequence number handed out (to a sample or a gap record)."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name='samples'").fetchone()
        return int(row[0]) if row else 0
