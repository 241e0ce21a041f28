"""Samples in: one transaction (one fsync) per group, checked and checksummed at commit."""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from typing import Any, Callable, NoReturn, Sequence

from buffer import recovery, rowcheck
from buffer.errors import BufferFullError
from buffer.handle import FileHandle
from buffer.seams import GapRecorder, Space, Tally, Witness
from core.sample import Sample
from core.batch_limits import SMALL_SAMPLE_BYTES, sample_never_fits
from core.sample_rules import sample_problem
from core.wire import Batch, encode_batch

log = logging.getLogger("buffer.store")  # the name the one-class store logged under

# One encoder for every commit: json.dumps with separators builds a new one per call.
_VALUES_ENCODER = json.JSONEncoder(separators=(",", ":")).encode

# row_crc's arguments in SQL, text as bytes (see buffer.rowcheck).
_CRC_ARGS = "seq, CAST(sensor AS BLOB), t_utc_ms, t_mono_ms, CAST(time_src AS BLOB), CAST(boot_id AS BLOB)," \
    " CAST(vals AS BLOB), CAST(flags AS BLOB)"

QUOTED_CORRECTED = "'corrected'"


class Committer:
    """Samples in: checks, numbers and writes them, one transaction per group."""

    def __init__(self, handle: FileHandle, room: Space, gaps: GapRecorder, tally: Tally, witness: Witness,
                 on_room_again: Callable[[], None]) -> None:
        self._h = handle
        self._room = room
        self._gaps = gaps
        self._tally = tally
        self._witness = witness
        # Called when a commit goes through after the file system was full (Buffer.housekeep):
        # deferred acks and the ballast wait for exactly that moment.
        self._on_room_again = on_room_again

    def commit(self, samples: list[Sample]) -> list[int]:
        """Insert a group of samples in one transaction; returns their sequence numbers.

        When this returns, the samples are durable (WAL + synchronous=FULL) and
        the device owes them to the store. Each row carries its checksum
        (``buffer.rowcheck``), computed here: no extra write, no extra fsync.
        Raises ``BufferFullError`` (nothing stored, nothing lost) when the file
        system is full even after ``Room.make_room``: keep the samples and call
        again later. Committed data is never dropped to make room for new data
        on a full file system; only the configured cap drops the oldest.
        """
        if not samples:
            return []
        # (A card full at start and losses of the last run are the facade's: Buffer.commit.)
        # Refuse early, before encoding anything, when even a small row per sample cannot fit
        # (held samples are offered again every few seconds while the card stays full).
        if not self._room.fits_on_disk(len(samples) * 64):
            return self.refuse()
        enc = _VALUES_ENCODER
        rows: list[tuple[Any, ...] | None] = []
        refused: list[tuple[int, str, bytes]] = []  # (index, why, the sample as given)
        for i, s in enumerate(samples):
            why = _admit(s)
            vals = enc(s.values) if why is None else ""
            if len(vals) >= SMALL_SAMPLE_BYTES:
                # Large enough that no batch might carry it (payload or inflated limit): the exact
                # check, an encode, is paid only here, never by an ordinary sample.
                why = sample_never_fits(s, _encode_alone)
            if why is None:
                rows.append((s.sensor, s.t_utc_ms, s.t_mono_ms, str(s.time_src), s.boot_id, vals,
                             ",".join(s.flags)))
            else:
                rows.append(None)
                refused.append((i, why, repr(s).encode("utf-8", "replace")[:65536]))
        # What the rows will take in pages, roughly (record overhead + b-tree slack).
        extra = (sum(len(r[5]) + len(r[4]) + 64 for r in rows if r)
                 + sum(len(raw) + 64 for _, _, raw in refused)) * 5 // 4
        if not self._room.fits_on_disk(extra):
            return self.refuse()
        try:
            first = self._insert_with_room(rows, extra, refused)
        except sqlite3.DatabaseError as exc:
            if not recovery.is_disk_full(exc):
                raise
            log.error("buffer: disk full, making room (%s)", exc)
            self._room.make_room()
            try:
                first = self._insert_with_room(rows, extra, refused)
            except sqlite3.DatabaseError as exc2:
                self._h.rollback_quietly()
                if not recovery.is_disk_full(exc2):
                    raise
                self._room.disk_full = True
                self._room.refused_commits += 1
                raise BufferFullError(f"buffer {self._h.path}: {exc2}") from exc2
        seqs = list(range(first, first + len(samples)))
        self._witness.mark(self._h.epoch, seqs[-1])  # durable now: the witness may say so
        for s, q in zip(samples, seqs):
            s.seq = q
        self._h.unsealed += len(samples) - len(refused)
        if refused:
            log.error("buffer: %d samples refused at commit (%s), kept in bad_rows with a gap record",
                      len(refused), refused[0][1])
        self._room.clear_stuck()  # a write went through: housekeeping may find room too
        if self._room.disk_full:
            self._room.disk_full = False
            log.warning("buffer: commits are written again after the file system was full")
            self._on_room_again()
        return seqs

    def refuse(self) -> NoReturn:
        self._room.disk_full = True
        self._room.refused_commits += 1
        raise BufferFullError(f"buffer {self._h.path}: file system full (its last {self._room.reserve_bytes}"
                              " bytes are kept for acknowledgements and sealing)")

    def _insert_with_room(self, rows: list[tuple[Any, ...] | None], extra: int,
                          refused: list[tuple[int, str, bytes]]) -> int:
        """Insert the rows with consecutive numbers after the last one ever used; returns the first.

        A refused sample (None in ``rows``) takes its number too, and goes to
        ``bad_rows`` with a gap record in the same transaction: nothing handed
        to ``commit`` is lost without a record, and no batch ever holds it.
        """
        try:
            self._room.enforce_cap(extra)
        except sqlite3.DatabaseError as exc:
            # No room even to drop: the insert below will say so (or succeed).
            if not recovery.is_disk_full(exc):
                raise
            self._h.rollback_quietly()
        with self._h.tx():
            # The numbers are chosen here, inside the write transaction (one writer), so
            # the checksum can cover them; AUTOINCREMENT still never hands them out again.
            first = self._h.last_seq() + 1
            crc = rowcheck.commit_crc
            self._h.db.executemany(
                "INSERT INTO samples (seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags, crc)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                [(q, *r, crc(q, *r)) for q, r in enumerate(rows, first) if r is not None],
            )
            if refused:
                now_ms = int(time.time() * 1000)
                for i, why, raw in refused:
                    self._h.db.execute("INSERT INTO bad_rows VALUES (?,?,?,?)",
                                     (first + i, f"refused at commit: {why}", raw, now_ms))
                    self._gaps.gap(first + i, first + i, f"sample refused at commit: {why}")
                self._tally.bump("samples_refused", len(refused))
                self._gaps.set_last_seq(first + len(rows) - 1)  # a refused last sample still used its number
            return first

    def count_unsync(self, boot_id: str) -> int:
        """Unsealed samples of this boot stamped before the clock was trusted."""
        return self._h.db.execute(
            "SELECT count(*) FROM samples WHERE boot_id=? AND time_src='unsync'", (boot_id,)
        ).fetchone()[0]

    def correct_unsync(self, boot_id: str, offset_ms: int) -> int:
        """Re-stamp this boot's unsynchronised samples from their monotonic time.

        Only samples of the same boot can be corrected: their monotonic clock is
        the one the offset was measured on. Sealed batches are never touched.
        """
        with self._h.tx():
            cur = self._h.db.execute(
                # The checksum is re-made only for a row that verified as it was: a damaged
                # row must not be blessed by its correction (it is set aside at sealing).
                "UPDATE samples SET t_utc_ms = t_mono_ms + ?1, time_src = 'corrected', crc = CASE"
                f" WHEN crc = row_crc({_CRC_ARGS}) THEN"
                f" row_crc({_CRC_ARGS.replace('t_utc_ms', 't_mono_ms + ?1').replace('time_src', QUOTED_CORRECTED)})"
                " ELSE crc END WHERE boot_id=?2 AND time_src='unsync'",
                (offset_ms, boot_id),
            )
        return cur.rowcount


def _admit(s: Sample) -> str | None:
    """Make a sample fit for the wire, or say why it cannot be: checked at commit.

    The rules are the receiver's own (``core.sample_rules``, the one function
    both sides call): a sample the receiver would refuse is refused here alone,
    not with the whole batch it would ride in. NaN and infinity are no
    measurement: stored as unknown (None) and flagged ``non_finite`` (as the
    agent does with a driver's readings). A flag with a comma, or an empty one,
    is refused, not split or dropped (flags are stored comma-joined).
    """
    # One pass for a sample that travels (every commit of every sample): the rules refuse
    # non-finite floats, so None also says there is nothing to replace.
    why = sample_problem(s)
    if why is None:
        return None
    vals = s.values
    if isinstance(vals, dict) and any(isinstance(v, float) and not math.isfinite(v) for v in vals.values()):
        s.values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in vals.items()}
        s.flags = (*s.flags, "non_finite")
        return sample_problem(s)
    return why


def _encode_alone(samples: Sequence[Sample]) -> bytes:
    """A batch of these samples alone (numbered from 1), as sealing would encode it."""
    return encode_batch(Batch("d", "e", 1, len(samples), [
        Sample(s.sensor, s.t_utc_ms, s.t_mono_ms, s.time_src, s.values, s.flags, i, s.boot_id)
        for i, s in enumerate(samples, 1)], []))


def _encodes(s: Sample) -> bool:
    try:
        _encode_alone([s])
    except (ValueError, TypeError, OverflowError, RecursionError):
        return False
    return True
