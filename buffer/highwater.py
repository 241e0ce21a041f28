"""The last sequence number a commit made durable, kept outside the WAL.

SQLite replays a WAL up to its first invalid frame; a WAL cut short *at a
frame boundary* (a file system that lost the tail of an fsynced file, a bad
copy) ends exactly like a clean one, and the transactions after the cut are
gone without a trace: their numbers are simply handed out again. This side
file records ``epoch last_seq`` after every commit that moved ``last_seq``, so
an open that finds the database behind it owns up to the difference with a
gap record and a counter (``samples_lost_wal``), and never reuses the numbers.

Cost on the card (measured, docs/durability.md): one block overwritten in
place and one ``fdatasync`` per commit. The file is made once with real blocks
and only ever overwritten, so a full card cannot refuse it, and
``fdatasync`` skips the inode (mtime) write. It is written *after* the
database's commit returned: it can lag behind the database (a cut between the
two: no alarm, nothing lost) but never run ahead of what was durable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from buffer.heldledger import make_with_real_blocks

log = logging.getLogger(__name__)

SIZE = 4096  # one block, overwritten in place
RECORD = 96  # bytes written per commit: "epoch last_seq", padded


class HighWater:
    """The side file ``<buffer>.seq`` (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._failed = False  # logged once; a missing witness only costs the detection

    def read(self) -> tuple[str, int] | None:
        """(epoch, last_seq) on file, or None (missing, blank or unreadable)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(RECORD).rstrip(b"\0 \n")
        except OSError:
            return None
        try:
            epoch, seq = raw.decode("ascii").split()
            return epoch, int(seq)
        except (UnicodeDecodeError, ValueError):
            return None

    def behind(self, epoch: str, last_seq: int) -> int:
        """How many numbers of ``epoch`` were committed past ``last_seq`` (0: none known)."""
        found = self.read()
        if found is None or found[0] != epoch:
            return 0
        return max(0, found[1] - last_seq)

    def mark(self, epoch: str, last_seq: int) -> None:
        """Record ``last_seq`` as durable (call after the commit returned)."""
        body = f"{epoch} {last_seq}\n".encode("ascii", "replace")
        if len(body) > RECORD:
            return  # an epoch is 16 hex digits: cannot happen; never write past the record
        try:
            if self._fd is None:
                if not self.path.exists():
                    make_with_real_blocks(self.path, SIZE)
                self._fd = os.open(self.path, os.O_RDWR)
            os.pwrite(self._fd, body.ljust(RECORD, b"\0"), 0)
            os.fdatasync(self._fd)
        except OSError as exc:
            self.close()
            if not self._failed:
                log.error("buffer: cannot write %s (%s): a WAL cut short would go unnoticed", self.path, exc)
            self._failed = True
            return
        self._failed = False

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
