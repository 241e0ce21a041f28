"""Gap records of this epoch: numbers owned up to as lost or dropped, with their reason."""

from __future__ import annotations

import logging

from core.sample_rules import gap_reason
from buffer.handle import FileHandle
from buffer.highwater import MAX_SEQ
from buffer.seams import Tally, Witness

log = logging.getLogger("buffer.store")  # the name the one-class store logged under


# The gap reason for numbers a commit made durable that an open no longer finds (buffer.highwater).
# Their batches may have gone out before the loss: the receiver subtracts what it holds.
WAL_LOST_REASON = "WAL lost committed transactions: samples missing at open (may include delivered ones)"


class GapLog:
    """Writes this epoch's gap records and the numbers they use up."""

    def __init__(self, handle: FileHandle, tally: Tally, witness: Witness) -> None:
        self._h = handle
        self._tally = tally
        self._witness = witness

    def gap(self, first: int, last: int, reason: str) -> None:
        """Record a gap of this epoch, extending the previous unsent one if it is adjacent."""
        reason = gap_reason(reason)  # a reason the receiver refuses would sink the batch's gaps
        prev = self._h.db.execute(
            "SELECT id, last_seq, reason FROM gaps WHERE sent_in IS NULL ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if prev and prev[1] + 1 == first and prev[2] == reason:
            self._h.db.execute("UPDATE gaps SET last_seq=? WHERE id=?", (last, prev[0]))
            return
        self._h.db.execute(
            "INSERT INTO gaps (first_seq, last_seq, reason) VALUES (?,?,?)", (first, last, reason)
        )
        self._tally.bump("gap_records")

    def add_gap(self, first_seq: int, last_seq: int, reason: str) -> None:
        with self._h.tx():
            self._h.db.execute(
                "INSERT INTO gaps (first_seq, last_seq, reason) VALUES (?,?,?)",
                (first_seq, last_seq, reason),
            )
            if type(last_seq) is int and 0 < last_seq < MAX_SEQ:
                # The numbers are used by the gap: no sample gets one (sealing clips a gap to last_seq).
                self.set_last_seq(last_seq)
            self._tally.bump("gap_records")

    def record_lost(self, n: int, reason: str) -> tuple[int, int]:
        """Own up to ``n`` samples that were taken but never committed (held in memory, then lost).

        They get sequence numbers like committed samples, used by nothing but a
        gap record: the store learns how many were lost and why, in order with
        the rest, and an epoch's numbers stay exactly 1..last_seq for the oracle.
        """
        with self._h.tx():
            first, last = self.lose(n, reason)
        self._witness.mark(self._h.epoch, last)
        return first, last

    def lose(self, n: int, reason: str) -> tuple[int, int]:
        """``record_lost`` inside the caller's transaction."""
        first = self._h.last_seq() + 1
        if type(n) is not int or not 0 < n < MAX_SEQ - first:
            # An empty or inverted gap would make the receiver refuse the batch with its real samples.
            log.warning("buffer: record_lost(%r) refused: not a count of samples; nothing recorded", n)
            return first, first - 1
        last = first + n - 1
        self.set_last_seq(last)
        self.gap(first, last, reason)
        self._tally.bump("samples_lost_wal" if reason == WAL_LOST_REASON else "samples_lost_in_memory", n)
        return first, last

    def set_last_seq(self, last: int) -> None:
        """Numbers up to ``last`` are used (by a gap record): AUTOINCREMENT never hands them out."""
        self._h.db.execute("UPDATE sqlite_sequence SET seq=max(seq, ?) WHERE name='samples'", (last,))
        if self._h.db.execute("SELECT changes()").fetchone()[0] == 0:
            self._h.db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('samples', ?)", (last,))
