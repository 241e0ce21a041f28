"""Sealing: the oldest unsealed samples (and pending gaps) into one immutable batch."""

from __future__ import annotations

import logging
from typing import Any

from buffer import gaprows, recovery, rowcheck
from core.sample import Sample
from core.batch_limits import GAP_TEXT_BUDGET, MAX_GAPS_PER_BATCH, batch_problem
from core.sample_rules import gap_reason, sample_problem
from core.wire import Batch, Gap, content_hash, encode_batch
from buffer.commit import _encodes
from buffer.gaps import WAL_LOST_REASON
from buffer.handle import FileHandle
from buffer.records import SealedBatch
from buffer.seams import GapRecorder, Tally

log = logging.getLogger("buffer.store")  # the name the one-class store logged under


class Sealer:
    """Batches out: reads the oldest unsealed rows, verifies, encodes, and stores one batch.

    Knows the samples only as rows of the file (whoever committed them); owns up to what it
    cannot seal through the ``GapRecorder`` and counts through the ``Tally`` it is given.
    """

    def __init__(self, handle: FileHandle, gaps: GapRecorder, tally: Tally) -> None:
        self._h = handle
        self._gaps = gaps
        self._tally = tally

    def seal(self, max_samples: int, now_utc_ms: int) -> SealedBatch | None:
        """Seal the oldest unsealed samples (at most ``max_samples``) into one batch.

        Every row is verified first (``buffer.rowcheck``): a row whose checksum
        does not match or that cannot be decoded is set aside in ``bad_rows``
        with its bytes as read, and a gap record owns up to it, in the same
        transaction as the batch. Sealing goes on with the rest: one bad row
        must not stop every tick.
        """
        # Gaps the WAL lost travel alone, in a gaps-only batch named after their range, never
        # merged into a batch of samples: a cut that took back a delivered seal brings those
        # samples back unsealed, and their re-seal must give the very bytes of the original
        # (encoding is deterministic) so the receiver answers "duplicate", not "different".
        self._check_gaps()
        gaps_rows = self._h.db.execute(
            "SELECT id, first_seq, last_seq, reason FROM gaps WHERE sent_in IS NULL AND reason=?"
            " ORDER BY id LIMIT ?", (WAL_LOST_REASON, MAX_GAPS_PER_BATCH)).fetchall()
        samples: list[Sample] = []
        rows: list[tuple[Any, ...]] = []
        if not gaps_rows:
            rows, samples = self._sealable(max_samples, now_utc_ms)  # first: its set-aside gaps ride too
            gaps_rows = self._h.db.execute(
                "SELECT id, first_seq, last_seq, reason FROM gaps WHERE sent_in IS NULL AND reason!=?"
                " ORDER BY id LIMIT ?", (WAL_LOST_REASON, MAX_GAPS_PER_BATCH)).fetchall()
        gaps_rows = _within_gap_budget(gaps_rows)
        if not samples and not gaps_rows:
            return None
        gaps = [Gap(g[1], g[2], gap_reason(g[3])) for g in gaps_rows]  # rows of an older version too
        try:
            samples, payload = self._fit(samples, gaps)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # Something the checks above did not foresee: set aside the rows that do not
            # encode alone, and let the next call seal the rest (never the same failure twice).
            by_seq = {r[0]: r for r in rows}
            culprits = [(by_seq[x.seq], f"cannot be encoded: {type(exc).__name__}") for x in samples
                        if not _encodes(x)]
            if not culprits:
                raise
            self._set_aside(culprits, now_utc_ms)
            return None
        except _TooLarge as big:
            by_seq = {r[0]: r for r in rows}
            self._set_aside([(by_seq[big.sample.seq], f"too large for any batch: {big}")], now_utc_ms)
            return None
        if samples:
            first, last = samples[0].seq, samples[-1].seq
        else:
            # Gaps alone still travel: they ride in an empty batch named after the gap range.
            first = min(g[1] for g in gaps_rows)
            last = max(g[2] for g in gaps_rows)
        assert first is not None and last is not None
        batch = Batch(self._h.device_id, self._h.epoch, first, last, samples, gaps)
        digest = content_hash(payload)
        with self._h.tx():
            if self._h.db.execute("SELECT 1 FROM batches WHERE first_seq=?", (first,)).fetchone():
                # Only a gaps-only batch can collide (its range was a batch before); such
                # gaps are already known to the receiver through that rejected range.
                self._h.db.executemany("UPDATE gaps SET sent_in=-1 WHERE id=?", [(g[0],) for g in gaps_rows])
                return None
            self._h.db.execute(
                "INSERT INTO batches VALUES (?,?,?,?,?,?,?)",
                (
                    first,
                    last,
                    len(samples),
                    payload,
                    digest,
                    now_utc_ms,
                    min((s.t_utc_ms for s in samples if s.t_utc_ms is not None), default=None),
                ),
            )
            if samples:
                self._h.db.execute("DELETE FROM samples WHERE seq BETWEEN ? AND ?", (first, last))
                # The seal watermark: after a corruption, what is missing above it
                # was never sent, so it is known lost (see recovery.salvage).
                self._h.db.execute("INSERT OR REPLACE INTO meta VALUES ('sealed_through', ?)", (str(last),))
            if gaps_rows:
                self._h.db.executemany("UPDATE gaps SET sent_in=? WHERE id=?", [(first, g[0]) for g in gaps_rows])
        self._h.unsealed -= len(samples)
        return SealedBatch(batch.batch_id, first, last, len(samples), payload, digest, self._h.epoch)

    def _check_gaps(self) -> None:
        """Unsent gap rows checked against the numbers before they travel (``buffer.gaprows``).

        An empty, inverted or non-integral row never rides in a batch: the receiver refuses it
        with the batch's real samples, or the codec raises at every seal. Dropped, logged with
        its bytes, counted (``gaps_invalid``). A row reaching past the last number or over
        samples is clipped to what no sample holds (same counter); a row marked sent in a batch
        that does not exist goes back in the queue (``gaps_resent``)."""
        resend = gaprows.orphaned_sent(self._h.db)
        if resend:
            log.error("buffer: gap rows %r marked sent in no batch: sent again", resend[:5])
            with self._h.tx():
                self._h.db.executemany("UPDATE gaps SET sent_in=NULL WHERE id=?", [(i,) for i in resend])
                self._tally.bump("gaps_resent", len(resend))
        row = self._h.db.execute("SELECT value FROM meta WHERE key='sealed_through'").fetchone()
        sealed = int(row[0]) if row and str(row[0]).isdigit() else 0
        fixes = gaprows.repairs(self._h.db, self._h.last_seq(), sealed)
        if not fixes:
            return
        for f in fixes:
            log.error("buffer: gap row %r %s: %s", f.row[:4], f.why,
                      f"sent as {f.keep}" if f.keep else "never sent")
        with self._h.tx():
            for f in fixes:
                self._h.db.execute("DELETE FROM gaps WHERE id=?", (f.row[0],))
                self._h.db.executemany("INSERT INTO gaps (first_seq, last_seq, reason) VALUES (?,?,?)",
                                     [(a, b, f.row[3]) for a, b in f.keep])
            self._tally.bump("gaps_invalid", len(fixes))

    def _sealable(self, max_samples: int, now_utc_ms: int) -> tuple[list[tuple[Any, ...]], list[Sample]]:
        """The oldest unsealed rows and the samples among them that can travel.

        Every row is verified first (``buffer.rowcheck``); one that fails, or
        that verifies and still could not travel (a row from before checksums, a
        value a driver should never have given: the receiver would refuse the
        whole batch, or it would not even encode), is set aside with a gap record.
        """
        rows = self._h.db.execute(
            f"SELECT {rowcheck.SELECT_COLS} FROM samples ORDER BY seq LIMIT ?", (max_samples,)
        ).fetchall()
        samples: list[Sample] = []
        bad: list[tuple[tuple[Any, ...], str]] = []
        for r in rows:
            checked = rowcheck.check_row(r)
            smp = checked.sample
            why = checked.why if smp is None else sample_problem(smp)
            if why:
                bad.append((r, why if smp is None else f"cannot travel: {why}"))
            else:
                samples.append(smp)  # type: ignore[arg-type]
        if bad:
            self._set_aside(bad, now_utc_ms)
        return rows, samples

    def _fit(self, samples: list[Sample], gaps: list[Gap]) -> tuple[list[Sample], bytes]:
        """The longest prefix of ``samples`` whose batch the receiver's limits allow, encoded.

        Halved until it fits (``core.batch_limits``): only a batch over a limit pays for
        more than one encode. A single sample over a limit raises ``_TooLarge``.
        """
        n = len(samples)
        while True:
            part = samples[:n]
            first = part[0].seq if part else min(g.first_seq for g in gaps)
            last = part[-1].seq if part else max(g.last_seq for g in gaps)
            assert first is not None and last is not None
            payload = encode_batch(Batch(self._h.device_id, self._h.epoch, first, last, part, gaps))
            why = batch_problem(part, len(gaps), payload)
            if why is None:
                return part, payload
            if n <= 1:
                if not part:
                    raise ValueError(f"a gaps-only batch over the limits: {why}")
                if gaps:
                    # One sample plus the pending gaps is too much, which says nothing about the
                    # sample: the gaps go first in a batch of their own, the sample next time
                    # (alone, and only then "too large for any batch" if it still does not fit).
                    return self._fit([], gaps)
                raise _TooLarge(part[0], why)
            n //= 2

    def _set_aside(self, bad: list[tuple[tuple[Any, ...], str]], now_utc_ms: int) -> None:
        """Move rows that cannot be sealed to ``bad_rows``, each owned up to by a gap record."""
        with self._h.tx():
            unsure: list[str] = []
            owned_now: list[tuple[int, int]] = []  # through the seam: maybe not in the table yet
            for r, why in bad:
                self._h.db.execute(
                    "INSERT INTO bad_rows VALUES (?,?,?,?)", (r[0], why, rowcheck.raw_bytes(r), now_utc_ms)
                )
                self._h.db.execute("DELETE FROM samples WHERE rowid=?", (r[0],))
                self._tally.bump("rows_set_aside")
                if self._plausible_own_number(r[0]):
                    self._gaps.gap(r[0], r[0], f"unsealable row set aside: {why}")
                    owned_now.append((r[0], r[0]))
                else:
                    unsure.append(why)
            # Always look for holes, not only when a key was implausible: a damaged key can land
            # on a plausible number (a gap repair may already have yielded it to the row), and
            # then the true number is still a hole nothing owns.
            self._own_up_to_holes(f"unsealable row set aside, its number damaged: {(unsure or [bad[0][1]])[0]}",
                                  owned_now, quiet=not unsure)
        self._h.unsealed -= len(bad)
        log.error("buffer: %d unsealable rows set aside in bad_rows (%s)", len(bad), bad[0][1])


    def _unsealed_range(self) -> tuple[int, int]:
        """(first, last) numbers an unsealed row can truly have: above the seal watermark,
        up to the last number handed out. Both come from rows the row checksum does not cover
        but a flipped bit in one sample's key cannot reach."""
        mark = self._h.db.execute("SELECT value FROM meta WHERE key='sealed_through'").fetchone()
        lo = int(mark[0]) + 1 if mark and str(mark[0]).isdigit() else 1
        top = self._h.db.execute("SELECT seq FROM sqlite_sequence WHERE name='samples'").fetchone()
        return lo, int(top[0]) if top and isinstance(top[0], int) else 0

    def _is_free(self, q: int) -> bool:
        """No row holds ``q`` and no gap record owns it."""
        return (self._h.db.execute("SELECT 1 FROM samples WHERE seq=?", (q,)).fetchone() is None
                and self._h.db.execute("SELECT 1 FROM gaps WHERE ? BETWEEN first_seq AND last_seq",
                                       (q,)).fetchone() is None)

    def _plausible_own_number(self, key: object) -> bool:
        """Once its checksum fails, a row's key (its seq) is untrusted too: believed only if it is
        a number an unsealed row can have that nothing else holds (checked after its DELETE)."""
        if not isinstance(key, int) or isinstance(key, bool):
            return False
        lo, hi = self._unsealed_range()
        return lo <= key <= hi and self._is_free(key)

    def _own_up_to_holes(self, reason: str, owned_now: list[tuple[int, int]], quiet: bool = False) -> None:
        """A damaged key: the true number is one that no row holds and no gap owns inside the
        unsealed range (the neighbours' numbers and the watermarks are the evidence). Own up to
        every such hole; never a number at or below the seal watermark (sent, maybe delivered)."""
        lo, hi = self._unsealed_range()
        held = [q for (q,) in self._h.db.execute("SELECT seq FROM samples WHERE seq BETWEEN ? AND ? ORDER BY seq",
                                                  (lo, hi))]
        owned = self._h.db.execute("SELECT first_seq, last_seq FROM gaps WHERE last_seq >= ? AND first_seq <= ?",
                                   (lo, hi)).fetchall()
        holes = recovery.missing(lo, hi, recovery.ranges(held) + [tuple(g) for g in owned] + owned_now)
        for a, b in holes:
            self._gaps.gap(a, b, reason)
        if not holes and not quiet:
            log.error("buffer: a set-aside row's true number is not found (%s); kept in bad_rows", reason)


def _within_gap_budget(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The first gap rows whose text stays within ``GAP_TEXT_BUDGET`` (at least one): gap records
    alone must never push a batch over a limit ``_fit`` can only meet by dropping samples. The
    budget guards the compressed payload limit too (random text does not compress). The rest
    ride in the next batch."""
    budget, out = GAP_TEXT_BUDGET, []
    for r in rows:
        budget -= len(str(r[3]).encode("utf-8", "replace")) + 48
        if budget < 0 and out:
            break
        out.append(r)
    return out


class _TooLarge(Exception):
    """One sample alone breaks a batch limit: it can never travel (set aside at sealing)."""

    def __init__(self, sample: Sample, why: str) -> None:
        super().__init__(why)
        self.sample = sample
