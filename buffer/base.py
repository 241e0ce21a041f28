"""What the parts still mixed into ``Buffer`` share: the facade's state and its collaborators.

Opening (buffer.opening) and samples held in memory (buffer.held) are still mixins of the
facade; every other job is an object of its own (buffer.commit.Committer, buffer.seal.Sealer,
buffer.outbox.Outbox, buffer.ack.Acknowledger, buffer.room.Room, buffer.recover.Recovery,
buffer.gaps.GapLog, buffer.carriers.Carriers, buffer.counters.Counters,
buffer.epoch.EpochKeeper) that ``Buffer.__init__`` builds and wires. The annotations below only
name that state for readers; ``Buffer.__init__`` sets it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from buffer.heldledger import HeldLedger
from buffer.highwater import HighWater
from buffer.identity import IdentityFile

if TYPE_CHECKING:
    from buffer.carriers import Carriers
    from buffer.counters import Counters
    from buffer.epoch import EpochKeeper
    from buffer.gaps import GapLog
    from buffer.handle import FileHandle
    from buffer.recover import Recovery
    from buffer.room import Room


class BufferBase:
    """The state of one buffer (set by ``Buffer.__init__``; see buffer.store)."""

    path: Path
    device_id: str
    quarantine_dir: Path
    disk_full: bool
    epoch: str
    _file: "FileHandle"
    _room: "Room"
    _counters: "Counters"
    _gaps: "GapLog"
    _carriers: "Carriers"
    _recovery: "Recovery"
    _epochs: "EpochKeeper"
    _exclusive: bool
    _unborn: bool
    _check_deferred: bool
    _held: HeldLedger
    _identity: IdentityFile
    _highwater: HighWater
    _held_ready: bool
    _last_held: tuple[int, int]
    held_unnoted: int
    _noted: bool
    _carried: list[tuple[int, str]]
