"""The buffer's figures: persistent counters (heartbeat), stats, sizes."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterable

from buffer import recovery
from buffer.handle import FileHandle
from buffer.records import BufferStats, SealedBatch


class Counters:
    """The persistent counters of one buffer file, and the figures ``stats`` reports."""

    def __init__(self, handle: FileHandle, quarantine_dir: Path) -> None:
        self._h = handle
        self._quarantine_dir = quarantine_dir

    def bump(self, name: str, by: int = 1) -> None:
        """Add to a persistent counter; call inside the transaction it counts."""
        if by:
            self._h.db.execute(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                (name, by, by),
            )

    def counters(self) -> dict[str, int]:
        """Persistent counters: samples_dropped, batches_dropped, gap_records, disk_full, ..."""
        return {str(k): int(v) for k, v in self._h.db.execute("SELECT name, value FROM counters")}

    def bump_quietly(self, name: str) -> None:
        """Count in its own transaction if the file system lets us; a count is not worth an error."""
        try:
            with self._h.tx():
                self.bump(name)
        except sqlite3.DatabaseError as exc:
            self._h.rollback_quietly()
            if not recovery.is_disk_full(exc):
                raise

    def stats(self, hidden: Iterable[SealedBatch]) -> BufferStats:
        """``hidden``: batches acknowledged but not yet deleted (a full card): no longer owed."""
        db = self._h.db
        nb, backlog, oldest_b = db.execute(
            "SELECT count(*), coalesce(sum(n_samples),0), min(oldest_utc_ms) FROM batches"
        ).fetchone()
        ns, sbacklog, oldest_sv = db.execute(
            "SELECT count(*), coalesce(sum(n_samples),0), min(oldest_utc_ms) FROM salvaged"
        ).fetchone()
        oldest_s = db.execute("SELECT min(t_utc_ms) FROM samples").fetchone()[0]
        present = [t for t in (oldest_b, oldest_s, oldest_sv) if t is not None]
        oldest = min(present) if present else None
        c = self.counters()
        hidden_n = [sb.n_samples for sb in hidden]
        unsealed = self._h.unsealed
        return BufferStats(
            unsealed=unsealed,
            batches=nb + ns - len(hidden_n),
            backlog_samples=backlog + sbacklog + unsealed - sum(hidden_n),
            oldest_unsent_utc_ms=oldest,
            last_seq=self._h.last_seq(),
            file_bytes=self.file_bytes(),
            samples_dropped=c.get("samples_dropped", 0),
            gap_records=c.get("gap_records", 0),
            quarantined=c.get("quarantined", 0),
            salvaged_batches=ns,
            quarantine_bytes=recovery.quarantine_bytes(self._quarantine_dir),
            gaps_undelivered=c.get("gap_records_undelivered", 0),
        )

    def file_bytes(self) -> int:
        """Database + WAL as they take space on the card."""
        path = self._h.path
        return sum(
            os.path.getsize(p) for p in (path, Path(str(path) + "-wal")) if p.exists()
        )

    def integrity_ok(self) -> bool:
        return self._h.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
