"""Batches of earlier epochs kept in ``salvaged``: salvaged ones, and carriers of their gap records."""

from __future__ import annotations

import time

from buffer import recovery
from buffer.handle import FileHandle
from buffer.seams import Tally
from core.wire import Batch, Gap, content_hash, encode_batch


class Carriers:
    """Writes rows of ``salvaged`` and ``epochs`` (inside the caller's transaction)."""

    def __init__(self, handle: FileHandle, tally: Tally) -> None:
        self._h = handle
        self._tally = tally

    def insert_salvaged(self, epoch: str, device: str, first: int, last: int, n: int,
                        payload: bytes, sealed_ms: int, oldest_ms: int | None) -> None:
        self._h.db.execute(
            "INSERT OR IGNORE INTO salvaged VALUES (?,?,?,?,?,?,?,?,?)",
            (epoch, first, last, device, n, payload, content_hash(payload), sealed_ms, oldest_ms),
        )

    def ensure_epoch(self, epoch: str, device: str, base: int) -> None:
        self._h.db.execute(
            "INSERT INTO epochs VALUES (?, ?, ?) ON CONFLICT(epoch)"
            " DO UPDATE SET next_carrier = max(next_carrier, excluded.next_carrier)",
            (epoch, device, base),
        )

    def add_carrier(self, epoch: str, device: str, gaps: list[Gap]) -> None:
        """Gap records of an earlier epoch travel in a sample-less batch of that epoch.

        It is named after a sequence number past the epoch's end, so its id is
        new to the receiver (which refuses a known id with other bytes).
        """
        if not gaps:
            return
        row = self._h.db.execute("SELECT next_carrier FROM epochs WHERE epoch=?", (epoch,)).fetchone()
        if row is None:
            top = self._h.db.execute(
                "SELECT coalesce(max(last_seq), 0) FROM salvaged WHERE epoch=?", (epoch,)
            ).fetchone()[0]
            n = max(top, max(g.last_seq for g in gaps)) + recovery.CARRIER_OFFSET_UNCERTAIN
        else:
            n = int(row[0])
        payload = encode_batch(Batch(device, epoch, n, n, [], list(gaps)))
        self.insert_salvaged(epoch, device, n, n, 0, payload, int(time.time() * 1000), None)
        self.ensure_epoch(epoch, device, n + 1)
        self._h.db.execute("UPDATE epochs SET next_carrier=? WHERE epoch=?", (n + 1, epoch))
        self._tally.bump("gap_records", len(gaps))
