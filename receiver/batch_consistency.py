"""A batch's sequence numbers must tell one story: each declared number a sample, a gap, or owned up to.

The decoders check that every sample lies inside ``first..last`` and no number is
a sample twice; they do not check that the batch's numbers agree with each other.
An outside tester got these stored (issue 13): a batch declaring 1..100 with three
samples and no gap rows, samples 1..6 plus a gap row 1..6 (a number delivered and
lost at once), ``last`` = 2^62 with six samples. What the van's buffer seals
(buffer/seal.py, buffer/recover.py) decides what is consistent, so an honest van is
never refused:

* A batch with samples is named after them: ``first`` is its lowest sample number
  and ``last`` its highest (sealing takes ``first, last`` from the samples, salvage
  seals runs of samples). Anything else declares numbers the batch has no claim
  to: rejected.
* No sample number lies in one of the batch's own gap rows (sealing clips a gap
  row that covers samples, buffer/gaprows.py): delivered and lost at once is
  rejected.
* A batch without samples carries gap rows: it is named after their hull
  (``min first .. max last``, a gaps-only batch) or after one number (a dead
  epoch's gap carrier, recover.py ``_add_carrier``). No samples and no gaps, or
  another range: rejected.
* Numbers between a batch's samples that are neither samples nor in its gap rows
  are *not* refused: an honest van sends them after a power cut (the gap for
  numbers the WAL lost travels first, alone, in a gaps-only batch, and the next
  batch's samples straddle them) or when its gap rows are deferred by the gap
  budget. Refusing would drop that batch's real samples. They are gapped
  explicitly instead (``RECEIVER_GAP_REASON``), so no number the batch declares
  is silently unaccounted for; where the van's own gap row has the same range the
  store keeps one row (its key is the range).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from core.errors import PayloadError
from core.wire import Batch, Gap

RECEIVER_GAP_REASON = "receiver: declared by this batch, neither a sample nor in a gap row of it"
# How both stores insert gap rows: a row of the same
# range is kept, except that the van's own reason replaces the receiver's (its gap-carrying batch
# can arrive after the batch whose samples straddle the numbers).
GAP_UPSERT = (" ON CONFLICT (device, epoch, first_seq, last_seq) DO UPDATE SET reason = excluded.reason,"
              " batch_id = excluded.batch_id"
              f" WHERE gaps.reason = '{RECEIVER_GAP_REASON}' AND excluded.reason <> gaps.reason")


def check_consistency(batch: Batch) -> Batch:
    """``batch``, with receiver gap rows for uncovered numbers between its samples; or ``PayloadError``."""
    if not batch.samples:
        return _check_sampleless(batch)
    seqs = sorted(s.seq for s in batch.samples)  # type: ignore[type-var]  (decoders set every seq)
    lo, hi = seqs[0], seqs[-1]
    if (batch.first_seq, batch.last_seq) != (lo, hi):
        raise PayloadError(
            f"batch declares seqs {batch.first_seq}-{batch.last_seq} but its {len(seqs)} samples span"
            f" {lo}-{hi}: a batch is named after its first and last sample")
    covered = _merged([(g.first_seq, g.last_seq) for g in batch.gaps])
    starts = [a for a, _ in covered]
    for q in seqs:
        i = bisect_right(starts, q) - 1
        if i >= 0 and q <= covered[i][1]:
            raise PayloadError(f"seq {q} is both a sample and in a gap row"
                               f" {covered[i][0]}-{covered[i][1]} of the same batch")
    holes = _uncovered(_holes(seqs), covered)
    if not holes:
        return batch
    return Batch(batch.device, batch.epoch, batch.first_seq, batch.last_seq, batch.samples,
                 [*batch.gaps, *(Gap(a, b, RECEIVER_GAP_REASON) for a, b in holes)])


def _check_sampleless(batch: Batch) -> Batch:
    if not batch.gaps:
        raise PayloadError("batch has neither samples nor gap rows")
    hull = (min(g.first_seq for g in batch.gaps), max(g.last_seq for g in batch.gaps))
    if batch.first_seq != batch.last_seq and (batch.first_seq, batch.last_seq) != hull:
        raise PayloadError(
            f"batch without samples declares seqs {batch.first_seq}-{batch.last_seq}; its gap rows span"
            f" {hull[0]}-{hull[1]} (a gaps-only batch is named after them, a gap carrier after one number)")
    return batch


def _merged(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive ranges, sorted, overlapping or adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _holes(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """The ranges strictly between consecutive sorted ``seqs`` that no sample holds."""
    return [(p + 1, q - 1) for p, q in zip(seqs, seqs[1:]) if q > p + 1]


def _uncovered(holes: list[tuple[int, int]], covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """What of ``holes`` no range of ``covered`` (merged, sorted) holds."""
    out: list[tuple[int, int]] = []
    j = 0
    for a, b in holes:
        while j < len(covered) and covered[j][1] < a:
            j += 1
        k, start = j, a
        while k < len(covered) and covered[k][0] <= b:
            if covered[k][0] > start:
                out.append((start, covered[k][0] - 1))
            start = max(start, covered[k][1] + 1)
            k += 1
        if start <= b:
            out.append((start, b))
    return out
