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
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SIZE = 4096  # one block: written whole, in place
HELD_REASON = "card full: samples held in memory lost when the agent ended"
OWED_REASON = "card full: samples held in memory past the limit discarded"


def make_with_real_blocks(path: Path, size: int) -> None:
    """Write ``size`` zero bytes to ``path`` atomically and fsync: a sparse file would reserve nothing."""
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            chunk = b"\0" * min(size, 65536)
            for _ in range(0, size, len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class HeldNote:
    epoch: str
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


class HeldLedger:
    """The side file ``<buffer>.held`` (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ensure(self) -> bool:
        """Make the file with real blocks if it is missing; False if there is no room yet."""
        if self.path.exists():
            return True
        try:
            make_with_real_blocks(self.path, SIZE)
        except OSError as exc:
            log.warning("buffer: cannot make %s yet: %s", self.path, exc)
            return False
        return True

    def write(self, note: HeldNote | None) -> bool:
        """Overwrite the block with ``note`` (None: clear it) and fsync; False if that failed."""
        body = b"" if note is None else json.dumps({
            "epoch": note.epoch, "last_seq": note.last_seq, "held": note.held, "owed": note.owed,
            "carried": [list(c) for c in note.carried[:20]],  # bounded: one block
        }).encode()
        if len(body) > SIZE:
            body = body[:0]  # cannot happen with 20 short entries; never write past the block
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
        """The note on file, or None (no file, cleared, or unreadable: logged)."""
        try:
            raw = self.path.read_bytes().rstrip(b"\0")
        except OSError:
            return None
        if not raw:
            return None
        try:
            d = json.loads(raw)
            return HeldNote(str(d["epoch"]), int(d["last_seq"]), int(d["held"]), int(d["owed"]),
                            [(int(n), str(r)) for n, r in d.get("carried", [])])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("buffer: %s is unreadable (%s): samples held at the last stop cannot be counted",
                      self.path, exc)
            return None
