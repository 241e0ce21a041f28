"""Gap rows checked against the numbers before they travel: damage must not stall, sink or invent.

Gap rows carry no checksum. A damaged one used to be sent as read: a non-integral number
stopped every seal (the codec raises), a range past the last number claimed the next
samples lost before they were taken, a range widened over samples claimed stored samples
lost, and a ``sent_in`` naming no batch hid a real loss for good. Here each unsent row is
checked at seal time and the caller repairs it (drop, clip, or back in the queue), counted.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from buffer.recovery import _missing  # the same range arithmetic as salvage's

# sent_in of a gap whose gaps-only batch was refused or collided: "sent, not delivered" (buffer.ack).
NOT_DELIVERED = -1


@dataclass(frozen=True)
class Repair:
    """One unsent gap row that cannot travel as it is: ``keep`` are the ranges that still can."""

    row: tuple[Any, ...]  # (id, first_seq, last_seq, reason)
    keep: list[tuple[int, int]]
    why: str


def orphaned_sent(db: sqlite3.Connection) -> list[int]:
    """Ids of gap rows marked sent in a batch that is neither in the outbox nor acknowledged.

    An acknowledgement deletes the batch and the gaps it carried in one transaction, so a
    row still here names an outbox batch, or ``NOT_DELIVERED``; anything else is damage and
    the row was never delivered: it goes back in the queue."""
    return [r[0] for r in db.execute(
        "SELECT id FROM gaps WHERE sent_in IS NOT NULL AND sent_in IS NOT ?"
        " AND sent_in NOT IN (SELECT first_seq FROM batches)", (NOT_DELIVERED,))]


def repairs(db: sqlite3.Connection, top: int, sealed_through: int) -> list[Repair]:
    """The unsent gap rows that name something other than numbers no sample holds, up to ``top``.

    A gap never names a number past ``top`` (the last handed out) nor one an unsealed sample or
    a full outbox batch holds. A row that overlaps samples is evidently damaged; of what is left,
    the part at or below the seal watermark (``sealed_through``: delivered or in the outbox,
    most likely samples) is not believed either.
    """
    out: list[Repair] = []
    for row in db.execute("SELECT id, first_seq, last_seq, reason FROM gaps WHERE sent_in IS NULL").fetchall():
        a, b = row[1], row[2]
        if type(a) is not int or type(b) is not int:
            out.append(Repair(row, [], "numbers that are not integers"))
            continue
        if not 1 <= a <= b:
            out.append(Repair(row, [], "names no samples (first > last)"))
            continue
        if a > top:
            out.append(Repair(row, [], f"past the last number handed out ({top})"))
            continue
        hi = min(b, top)
        taken = [(q, q) for (q,) in db.execute("SELECT seq FROM samples WHERE seq BETWEEN ? AND ?", (a, hi))]
        taken += [(int(f), int(t)) for f, t in db.execute(
            "SELECT first_seq, last_seq FROM batches WHERE n_samples > 0 AND n_samples = last_seq - first_seq + 1"
            " AND first_seq <= ? AND last_seq >= ?", (hi, a))]
        if not taken and hi == b:
            continue
        keep = _missing(a, hi, taken)
        why = f"reaches past the last number handed out ({top})" if hi < b else ""
        if taken:
            keep = [(max(f, sealed_through + 1), t) for f, t in keep if t > sealed_through]
            why = (why + "; " if why else "") + f"covers {len(taken)} sample(s) or batch(es)"
        out.append(Repair(row, keep, why))
    return out

