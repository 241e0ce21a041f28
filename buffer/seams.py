"""The seams between the buffer's parts: what each needs of the others, as small Protocols.

Each part (``buffer.commit.Committer``, ``buffer.seal.Sealer``, ``buffer.ack.Acknowledger``, ...)
takes its collaborators in its constructor typed by these, never by the concrete class, so it can
be built and tested against fakes (tests/test_buffer_seams.py) and none reaches into another's state.
"""

from __future__ import annotations

from typing import Protocol

from buffer.records import Key, SealedBatch
from core.wire import Gap


class Tally(Protocol):
    """Persistent counters (buffer.counters.Counters)."""

    def bump(self, name: str, by: int = 1) -> None: ...

    def bump_quietly(self, name: str) -> None: ...


class GapRecorder(Protocol):
    """Gap records of this epoch (buffer.gaps.GapLog); called inside the caller's transaction."""

    def gap(self, first: int, last: int, reason: str) -> None: ...

    def set_last_seq(self, last: int) -> None: ...

    def lose(self, n: int, reason: str) -> tuple[int, int]: ...


class CarrierWriter(Protocol):
    """Gap records of an earlier epoch, in a carrier batch of that epoch (buffer.carriers.Carriers)."""

    def add_carrier(self, epoch: str, device: str, gaps: list[Gap]) -> None: ...


class Witness(Protocol):
    """The last durable number, outside the WAL (buffer.highwater.HighWater)."""

    def mark(self, epoch: str, seq: int) -> None: ...


class Space(Protocol):
    """Room on the card as a commit sees it (buffer.room.Room)."""

    disk_full: bool
    refused_commits: int
    reserve_bytes: int

    def fits_on_disk(self, extra: int) -> bool: ...

    def enforce_cap(self, extra: int) -> None: ...

    def make_room(self) -> None: ...

    def clear_stuck(self) -> None: ...


class Stuck(Protocol):
    """Whether a write that found no room should be tried again yet (buffer.room.Room)."""

    def still_stuck(self) -> bool: ...

    def mark_stuck(self) -> None: ...

    def clear_stuck(self) -> None: ...


class BatchFinder(Protocol):
    """Sealed batches by key (buffer.outbox.Outbox)."""

    def where(self, key: Key) -> tuple[str, str, tuple[object, ...]] | None: ...

    def get(self, key: Key) -> SealedBatch | None: ...


class SalvageWriter(CarrierWriter, Protocol):
    """Rows of earlier epochs a salvage writes (buffer.carriers.Carriers), inside its transaction."""

    def insert_salvaged(self, epoch: str, device: str, first: int, last: int, n: int,
                        payload: bytes, sealed_ms: int, oldest_ms: int | None) -> None: ...

    def ensure_epoch(self, epoch: str, device: str, base: int) -> None: ...


class OpenRoom(Protocol):
    """The sizes and room an open needs (buffer.room.Room)."""

    wal_pages: int
    wal_limit_bytes: int
    reserve_bytes: int
    disk_full: bool

    def disk_free(self) -> int: ...


class EpochSource(Protocol):
    """The open file's epoch (buffer.epoch.EpochKeeper)."""

    damaged_epoch: str | None

    def init_epoch(self, real: bool = True, *, exclusive: bool = False, unborn: bool = False) -> str: ...
