"""Samples a full card kept in memory, owned up to outside the database.

While the card refuses commits the agent holds samples in memory; if it then
stops (or is killed, or the power goes) they are gone, and nothing in the
database can say so: writing there is exactly what the full card refuses. So
the count lives in a side file of one fixed block beside the buffer, made with
real blocks while there is room and only ever *overwritten in place* (and
fsynced) afterwards: overwriting blocks a file already owns needs no free
space, on a tmpfs as on ext4 (no copy-on-write under an SD card's ext4).

A note says: at ``last_seq`` of ``epoch``, ``held`` samples were in memory and
``owed`` more had been discarded past the memory bound, plus ``carried`` losses
of earlier runs not yet written to the database. The buffer turns a note into
gap records at the next open (or the first commit that finds room). A note is
void once the database has moved past its ``last_seq``: every write that
settles what it describes (committing the held samples, recording the loss)
takes a new sequence number, so a note is never applied twice.

A buffer that could not even be created (a card full at its first start,
``Buffer._unborn``) still notes what it holds: the file is one block, where the
database's birth needs far more. Such a note names no epoch (``epoch`` "") and
``last_seq`` 0; it is believed by the first database born after it while that
database has numbered nothing yet.

The note is evidence of a loss, so it is protected like ``.seq``: a CRC over the
record, believed only in the exact form ``write`` makes, every count within
``0 <= n < MAX_SEQ``, and only for this device (a note copied from another van
is not this van's loss). An unbelievable note is ignored with a warning
(``ignored`` set; the buffer counts it), never raised: a van that cannot start
loses more than the note could ever say.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from buffer.sidefile import MAX_SEQ, crc, device_tag, make_with_real_blocks

__all__ = ["HeldLedger", "HeldNote", "make_with_real_blocks", "HELD_REASON", "OWED_REASON"]

log = logging.getLogger(__name__)

SIZE = 4096  # one block: written whole, in place
MAX_CARRIED = 20  # bounded: one block
HELD_REASON = "card full: samples held in memory lost when the agent ended"
OWED_REASON = "card full: samples held in memory past the limit discarded"


@dataclass
class HeldNote:
    epoch: str  # "": noted before the buffer was ever created (no epoch yet)
    last_seq: int
    held: int = 0
    owed: int = 0
    carried: list[tuple[int, str]] = field(default_factory=list)

    def losses(self) -> list[tuple[int, str]]:
        """(samples, reason) this note owns up to if the agent ended after writing it."""
        out = list(self.carried)
        if self.owed:
            out.append((self.owed, OWED_REASON))
        if self.held:
            out.append((self.held, HELD_REASON))
        return out

    def believable(self) -> str | None:
        """Why these numbers cannot be true (None: they can)."""
        counts = [self.last_seq, self.held, self.owed] + [n for n, _ in self.carried]
        if any(type(n) is not int for n in counts):
            return "a count that is not an integer"
        if not all(0 <= n < MAX_SEQ for n in (self.last_seq, self.held, self.owed)):
            return "a count out of bounds"
        if any(not 0 < n < MAX_SEQ for n, _ in self.carried):
            return "a carried loss out of bounds"
        if self.last_seq + sum(counts[1:]) >= MAX_SEQ:
            return "losses past the number space"
        if len(self.epoch) > 64 or not self.epoch.isalnum() and self.epoch != "":
            return "an epoch that is not one"
        return None


def _record(note: HeldNote, device: str) -> bytes:
    """The one form a note is written in (and the only one believed)."""
    return json.dumps({
        "epoch": note.epoch, "last_seq": note.last_seq, "held": note.held, "owed": note.owed,
        "carried": [[n, r] for n, r in note.carried[:MAX_CARRIED]], "device": device_tag(device),
    }).encode("ascii")


def _check(record: bytes) -> str:
    return crc("held:" + record.decode("ascii"))


class HeldLedger:
    """The side file ``<buffer>.held`` of the buffer of ``device`` (see the module docstring)."""

    def __init__(self, path: Path, device: str) -> None:
        self.path = path
        self.device = device
        self.ignored = False  # the last read found a note it could not believe (warned)
        self._warned_ensure = False

    def ensure(self) -> bool:
        """Make the file with real blocks if it is missing; False if there is no room yet."""
        if self.path.exists():
            return True
        try:
            make_with_real_blocks(self.path, SIZE)
        except OSError as exc:
            if not self._warned_ensure:  # retried at every refused commit: said once
                log.warning("buffer: cannot make %s yet: %s", self.path, exc)
            self._warned_ensure = True
            return False
        return True

    def write(self, note: HeldNote | None) -> bool:
        """Overwrite the block with ``note`` (None: clear it) and fsync; False if that failed."""
        body = b""
        if note is not None:
            record = _record(note, self.device)
            body = record + b"\n" + _check(record).encode("ascii") + b"\n"
        if len(body) > SIZE:
            body = b""  # cannot happen with 20 short entries; never write past the block
        try:
            with open(self.path, "r+b") as f:
                f.write(body.ljust(SIZE, b"\0"))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            log.error("buffer: cannot write %s: %s", self.path, exc)
            return False
        return True

    def read(self) -> HeldNote | None:
        """The note on file, or None (no file, cleared, or not believable: warned, ``ignored``)."""
        self.ignored = False
        try:
            raw = self.path.read_bytes()
        except OSError:
            return None
        raw = raw[:raw.index(b"\0")] if b"\0" in raw else raw
        if not raw:
            return None
        lines = raw.split(b"\n")
        why: str | None = None
        note: HeldNote | None = None
        try:
            d = json.loads(lines[0])
            note = HeldNote(d["epoch"], d["last_seq"], d["held"], d["owed"],
                            [(n, r) for n, r in d["carried"]])
            if len(lines) != 3 or lines[2] != b"" or lines[1].decode("ascii") != _check(lines[0]):
                why = "no valid checksum (damaged, or written before the checksum)"
            elif d.get("device") != device_tag(self.device):
                why = "written by another device"
            elif not isinstance(note.epoch, str) or not all(isinstance(r, str) for _, r in note.carried):
                why = "fields of the wrong type"
            elif _record(note, self.device) != lines[0]:
                why = "not in the exact form written"
            else:
                why = note.believable()
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as exc:
            why = f"unreadable ({type(exc).__name__})"
        if why is not None:
            self.ignored = True
            log.warning("buffer: %s is not believable (%s: %r): ignored, never taken for a loss; samples"
                        " held at the last stop cannot be counted", self.path, why, raw[:120])
            return None
        return note
