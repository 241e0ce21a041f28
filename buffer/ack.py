"""The receiver's answers: acknowledge (delete; deferred on a full card) or reject (drop, own up)."""

from __future__ import annotations

import logging
import sqlite3
from typing import Callable

from buffer import recovery
from core.sample_rules import gap_reason
from core.wire import Gap
from buffer.handle import FileHandle
from buffer.records import Key, SealedBatch
from buffer.seams import BatchFinder, CarrierWriter, Stuck, Tally

log = logging.getLogger("buffer.store")  # the name the one-class store logged under


class Acknowledger:
    """The receiver's answers: deletes acknowledged batches, drops rejected ones with a gap record.

    Owns the acks a full card deferred (``deferred``): the outbox hides those batches, and
    ``flush`` deletes them once there is room.
    """

    def __init__(self, handle: FileHandle, outbox: BatchFinder, carriers: CarrierWriter, tally: Tally,
                 stuck: Stuck, deferred: set[str]) -> None:
        self._h = handle
        self._outbox = outbox
        self._carriers = carriers
        self._tally = tally
        self._stuck = stuck
        # Acknowledged batches whose delete the full card refused, by batch id: never
        # handed out again (the outbox reads the same set), deleted by ``flush`` once there
        # is room. Not kept across a restart: the resync at the next connection has the
        # receiver ack them again.
        self.deferred = deferred

    def acknowledge(self, key: Key, delete: Callable[[Key], bool | None],
                    get: Callable[[Key], SealedBatch | None] | None = None) -> bool:
        """The receiver committed this batch: delete it. True if it was here.

        On a full file system whose room is gone even after ``Room.make_room`` the
        ack is still recorded: the batch is hidden from ``get``/``pending``/
        ``newest`` at once (so it is not sent again) and deleted by
        ``housekeep`` when there is room.
        """
        done = delete(key)  # ``delete`` below, as the facade's full-card guard runs it: None if no room
        if done is not None:
            return done
        sb = (get or self._outbox.get)(key)  # the facade passes its guarded ``get``
        if sb is None:
            return False
        self.deferred.add(sb.batch_id)
        self._tally.bump_quietly("acks_deferred")
        return True

    def delete(self, key: Key) -> bool:
        with self._h.tx():
            return self._delete_batch(key)

    def _delete_batch(self, key: Key) -> bool:
        """Delete an acknowledged batch (inside the caller's transaction)."""
        where = self._outbox.where(key)
        if where is None:
            return False
        table, cond, params = where
        if table == "batches":
            first = self._h.db.execute(f"SELECT first_seq FROM batches WHERE {cond}", params).fetchone()
            cur = self._h.db.execute(f"DELETE FROM batches WHERE {cond}", params)
            if first:
                # Gaps carried by that batch are delivered with it.
                self._h.db.execute("DELETE FROM gaps WHERE sent_in=?", (first[0],))
            # Ack evidence, in the same transaction: every number up to here was delivered or
            # owned up to. Salvage must not take a batch absent from a damaged file as delivered;
            # above this mark it owns up instead (recovery._salvage_into).
            self._h.db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('acked_through', coalesce("
                "(SELECT min(first_seq) - 1 FROM batches),"
                " (SELECT value FROM meta WHERE key='sealed_through'), '0'))")
        else:
            cur = self._h.db.execute(f"DELETE FROM salvaged WHERE {cond}", params)
        return cur.rowcount > 0

    def reject(self, key: Key, last_seq: int, reason: str, *, by: str = "receiver") -> bool:
        """The receiver (or ``by`` someone else) refused this batch for good: drop it, own up with a gap."""
        where = self._outbox.where(key)
        if where is None:
            return False
        table, cond, params = where
        why = gap_reason(f"rejected by {by}: {reason}"[:500])
        with self._h.tx():
            if table == "batches":
                row = self._h.db.execute(f"SELECT first_seq, n_samples FROM batches WHERE {cond}",
                                       params).fetchone()
                cur = self._h.db.execute(f"DELETE FROM batches WHERE {cond}", params)
                if cur.rowcount and row[1] > 0:
                    # The gap records it carried were not delivered: back in the queue with their
                    # own reasons, for the gaps-only batch that replaces it (acking that one deletes
                    # the gaps it carries, so marked "sent" here they would be lost unsaid).
                    self._h.db.execute("UPDATE gaps SET sent_in=NULL WHERE sent_in=?", (row[0],))
                    self._h.db.execute(
                        "INSERT INTO gaps (first_seq, last_seq, reason) VALUES (?,?,?)",
                        (row[0], last_seq, why),
                    )
                    self._tally.bump("gap_records")
                elif cur.rowcount:
                    # A gaps-only batch refused: sent again it would be refused again, forever.
                    # Its records stay marked sent (-1: not delivered); the loss they told of stays
                    # visible in persisted counters (heartbeat: gaps_undelivered), not only the log.
                    n_gaps, n_seqs = self._h.db.execute(
                        "SELECT count(*), coalesce(sum(last_seq - first_seq + 1), 0) FROM gaps WHERE sent_in=?",
                        (row[0],)).fetchone()
                    self._h.db.execute("UPDATE gaps SET sent_in=-1 WHERE sent_in=?", (row[0],))
                    self._tally.bump("gap_records_undelivered", n_gaps)
                    self._tally.bump("samples_in_undelivered_gaps", n_seqs)
                    log.error("buffer: gaps-only batch %s refused (%s): its gap records are not delivered",
                              key, why)
            else:
                row = self._h.db.execute(
                    f"SELECT epoch, device, first_seq, last_seq, n_samples FROM salvaged WHERE {cond}", params
                ).fetchone()
                cur = self._h.db.execute(f"DELETE FROM salvaged WHERE {cond}", params)
                if row and row[4] > 0:
                    # A rejected carrier gets no carrier of its own: that could loop.
                    self._carriers.add_carrier(row[0], row[1], [Gap(row[2], row[3], why)])
        return cur.rowcount > 0

    def flush(self) -> None:
        if self._stuck.still_stuck():
            return  # nothing freed since the last try
        keys = sorted(self.deferred)
        try:
            with self._h.tx():
                for key in keys:
                    self._delete_batch(key)
        except sqlite3.DatabaseError as exc:
            self._h.rollback_quietly()
            if not recovery.is_disk_full(exc):
                raise
            self._stuck.mark_stuck()
            return  # still no room: they stay hidden and are tried again
        self._stuck.clear_stuck()
        self.deferred.difference_update(keys)
        log.warning("buffer: %d acknowledged batches deleted after the file system was full", len(keys))
