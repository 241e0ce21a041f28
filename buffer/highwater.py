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
import zlib
from pathlib import Path

from buffer.heldledger import make_with_real_blocks

log = logging.getLogger(__name__)

SIZE = 4096  # one block, overwritten in place
RECORD = 96  # bytes written per commit: "epoch last_seq crc", padded
# The largest number the file may name. Far above any real buffer (2^50 samples at 1 kHz is 35,000
# years), far below SQLite's 2^63 - 1: a value past it could only be damage, and believing it would
# burn the number space (every later commit failing) or not even fit an INTEGER (every open failing).
MAX_SEQ = 2**50


def _check(epoch: str, last_seq: int) -> str:
    """CRC32 of the record: one flipped bit in the digits must not read as a loss."""
    return "%08x" % zlib.crc32(f"seq:{epoch} {last_seq}".encode("ascii", "replace"))


class HighWater:
    """The side file ``<buffer>.seq`` (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._failed = False  # logged once; a missing witness only costs the detection
        self.damaged = False  # the last read found a record that fails its check (see ``read``)

    def read(self) -> tuple[str, int] | None:
        """(epoch, last_seq) on file, or None (missing, blank, unreadable or damaged).

        A record that fails its CRC, or names a number past ``MAX_SEQ``, is
        damaged: ignored with a warning (``damaged`` set), never taken for a
        loss; the next ``mark`` rewrites it. A record of two fields (from
        before the checksum) is treated the same way: nothing shows a bit flip
        in it, and believing one invents a loss (a digit 2 -> 6 reads as 40
        numbers lost) or a loss under an epoch that never existed. An upgrade
        costs one open's detection of a cut WAL, never a false gap record.
        """
        self.damaged = False
        try:
            with open(self.path, "rb") as f:
                raw = f.read(RECORD).rstrip(b"\0 \n")
        except OSError:
            return None
        if not raw:
            return None
        try:
            fields = raw.decode("ascii").split()
            epoch, seq = fields[0], int(fields[1])
            # Only the exact bytes ``mark`` writes: int() also reads "0009", "+9", "1_0" and
            # split() other separators, and the CRC covers the number, not the text.
            ok = (len(fields) == 3 and fields[2] == _check(epoch, seq)
                  and raw == f"{epoch} {seq} {fields[2]}".encode("ascii"))
        except (UnicodeDecodeError, ValueError, IndexError):
            ok, epoch, seq, fields = False, "", 0, []
        if len(fields) == 2 and not ok:
            self.damaged = True
            log.warning("buffer: %s holds a record from before the checksum (%r): not evidence of a"
                        " loss, ignored and rewritten in the checked form", self.path, raw[:RECORD])
            return None
        if not ok or not 0 <= seq < MAX_SEQ:
            self.damaged = True
            log.warning("buffer: %s is damaged (%r): ignored (never taken for a loss), rewritten",
                        self.path, raw[:RECORD])
            return None
        return epoch, seq

    def behind(self, epoch: str, last_seq: int) -> int:
        """How many numbers of ``epoch`` were committed past ``last_seq`` (0: none known)."""
        found = self.read()
        if found is None or found[0] != epoch:
            return 0
        return max(0, found[1] - last_seq)

    def mark(self, epoch: str, last_seq: int) -> None:
        """Record ``last_seq`` as durable (call after the commit returned)."""
        body = f"{epoch} {last_seq} {_check(epoch, last_seq)}\n".encode("ascii", "replace")
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

    def move_to(self, folder: Path) -> None:
        """Leave a copy in a quarantine folder (a witness of the epoch for salvage), then blank it.

        Blanked, not deleted: the quarantined epoch is accounted for by salvage;
        the next epoch must not take its numbers for its own loss.
        """
        found = self.read()
        if found is not None:
            copy = HighWater(folder / self.path.name)
            copy.mark(*found)
            copy.close()
        if self.path.exists():
            try:
                self.close()
                fd = os.open(self.path, os.O_RDWR)
                try:
                    os.pwrite(fd, b"\0" * RECORD, 0)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.error("buffer: cannot blank %s (%s)", self.path, exc)

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
