"""What ``buffer.opening``, the one part still mixed into ``Buffer``, reads of the facade.

Every other job is an object of its own (buffer.commit.Committer, buffer.seal.Sealer,
buffer.outbox.Outbox, buffer.ack.Acknowledger, buffer.room.Room, buffer.recover.Recovery,
buffer.gaps.GapLog, buffer.carriers.Carriers, buffer.counters.Counters,
buffer.epoch.EpochKeeper, buffer.held.HeldSamples) that ``Buffer.__init__`` builds and wires.
Opening stays with the facade because it swaps the connection every part shares. The
annotations below only name that state for readers; ``Buffer.__init__`` sets it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from buffer.identity import IdentityFile

if TYPE_CHECKING:
    from buffer.epoch import EpochKeeper
    from buffer.handle import FileHandle
    from buffer.held import HeldSamples
    from buffer.recover import Recovery
    from buffer.room import Room


class BufferBase:
    """The state of one buffer (set by ``Buffer.__init__``; see buffer.store)."""

    path: Path
    device_id: str
    disk_full: bool
    epoch: str
    _file: "FileHandle"
    _room: "Room"
    _epochs: "EpochKeeper"
    _recovery: "Recovery"
    _held_samples: "HeldSamples"
    _identity: IdentityFile
    # A card already full at start (buffer.opening): exclusive mode, no database file yet.
    _exclusive: bool
    _unborn: bool
    _check_deferred: bool
