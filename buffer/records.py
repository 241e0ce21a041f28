"""What the buffer hands out: sealed batches, its figures, and the key that names a batch."""

from __future__ import annotations

from dataclasses import dataclass

Key = int | str  # first_seq of this epoch's batch, or any batch id "device/epoch/first-last"


@dataclass(frozen=True, slots=True)
class SealedBatch:
    batch_id: str
    first_seq: int
    last_seq: int
    n_samples: int
    payload: bytes
    sha256: str
    epoch: str = ""  # the epoch the batch belongs to (an earlier one if salvaged)


@dataclass(frozen=True, slots=True)
class BufferStats:
    unsealed: int
    batches: int
    backlog_samples: int
    oldest_unsent_utc_ms: int | None
    last_seq: int
    file_bytes: int
    samples_dropped: int = 0  # by the size cap / disk full, each covered by a gap record
    gap_records: int = 0  # gap records the buffer wrote (cap, reject, salvage)
    quarantined: int = 0  # databases moved to quarantine since this file was made
    salvaged_batches: int = 0  # earlier-epoch batches still waiting for their ack
    quarantine_bytes: int = 0
    gaps_undelivered: int = 0  # gap records in gaps-only batches the receiver refused (never stored)
