"""The buffer's figures: persistent counters (heartbeat), stats, sizes, the last number used."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from buffer import recovery
from buffer.base import BufferBase
from buffer.guards import _recovering
from buffer.records import BufferStats


class CountersMixin(BufferBase):
    """Buffer's part: the buffer's figures (see the module docstring)."""

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
