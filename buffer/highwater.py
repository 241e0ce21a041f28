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

from buffer.sidefile import MAX_SEQ, device_tag, make_with_real_blocks

__all__ = ["HighWater", "MAX_SEQ", "RECORD", "SIZE"]

log = logging.getLogger(__name__)

SIZE = 4096  # one block, overwritten in place
RECORD = 96  # bytes written per commit: "epoch last_seq device-tag crc\n", padded with zeros


def _check(epoch: str, last_seq: int, tag: str | None = None) -> str:
    """CRC32 of the record: one flipped bit in the digits must not read as a loss.

    ``tag`` (``sidefile.device_tag``) binds the record to its device: van A's ``.seq``
    copied beside van B's buffer must not make B own up to A's numbers. Records of
    three fields (no tag, before the binding) are still read as before."""
    text = f"seq:{epoch} {last_seq}" + ("" if tag is None else f" {tag}")
    return "%08x" % zlib.crc32(text.encode("ascii", "replace"))


class HighWater:
    """The side file ``<buffer>.seq`` (see the module docstring)."""

    def __init__(self, path: Path, device: str | None = None) -> None:
        """``device``: the buffer's device id; None (a quarantine copy) believes any device's record."""
        self.path = path
        self.device = device
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
                block = f.read(RECORD)
        except OSError:
            return None
        # The record is the bytes up to its newline; the zero padding after it is not part of
        # it (a flipped bit there must not void the check). No newline: the block without its padding.
        raw = block.split(b"\n", 1)[0] if b"\n" in block else block.rstrip(b"\0 ")
        if not raw.strip(b"\0"):
            return None
        tag: str | None = None
        try:
            fields = raw.decode("ascii").split(" ")
            epoch, seq = fields[0], int(fields[1])
            tag = fields[2] if len(fields) == 4 else None
            # Only the exact bytes ``mark`` writes: int() also reads "0009", "+9", "1_0" and
            # split() other separators, and the CRC covers the number, not the text.
            ok = (len(fields) in (3, 4) and fields[-1] == _check(epoch, seq, tag)
                  and raw == " ".join([epoch, str(seq)] + fields[2:]).encode("ascii"))
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
        if tag is not None and self.device is not None and tag != device_tag(self.device):
            self.damaged = True  # rewritten with this device's record, like damage
            log.warning("buffer: %s was written by another device (%r, not %r's): not this buffer's"
                        " numbers, ignored and rewritten", self.path, raw[:RECORD], self.device)
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
        tag = None if self.device is None else device_tag(self.device)
        head = f"{epoch} {last_seq}" + ("" if tag is None else f" {tag}")
        body = f"{head} {_check(epoch, last_seq, tag)}\n".encode("ascii", "replace")
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
            copy = HighWater(folder / self.path.name, self.device)
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
