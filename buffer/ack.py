"""The receiver's answers: acknowledge (delete; deferred on a full card) or reject (drop, own up)."""

from __future__ import annotations

import logging
import sqlite3

from buffer import recovery
from core.sample_rules import gap_reason
from core.wire import Gap
from buffer.base import BufferBase
from buffer.guards import _recovering, _tolerate_full
from buffer.records import Key

log = logging.getLogger("buffer.store")  # the name the one-class store logged under


class AckMixin(BufferBase):
    """Buffer's part: the receiver's answers (see the module docstring)."""

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
