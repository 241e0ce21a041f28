"""The time spine's reference, kept beside the buffer so a restarted agent of the same boot resumes it.

``TimeKeeper`` judges clock steps against its spine (utc - monotonic). Kept only in memory, a
restart after a step (made while the agent was down, or seen and not yet decided) would trust the
stepped clock at once, though this boot's earlier samples were stamped on the old spine (t14,
finding 3). This file records ``boot_id offset_ms last_ms mono_ms crc`` of the last decided spine; the next
run of the *same boot* resumes it, and a reference that left it is then judged as a step (flagged,
decided by another reference or by ``confirm_s``), exactly as if the agent had never stopped.

No fsync: the record is only believed within the boot that wrote it, and within a boot the page
cache survives an agent's crash; a power cut ends the boot and with it the record's meaning. A
damaged or foreign record (CRC, another boot) is ignored: the run starts as after a boot.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from buffer.sidefile import crc

log = logging.getLogger(__name__)

FILE_NAME = "time.ref"
# Written at most this often while the spine does not move (its last stamp grows): a run that
# ends between writes under-reports the newest stamp by this much, so the overlap a backward
# re-base flags after a restart may miss that many seconds of the old run. Any re-base or
# first offset is written at once.
SAVE_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class SpineRecord:
    boot_id: str
    offset_ms: int
    last_ms: int | None
    mono_ms: int  # the monotonic time it was written: a record from "later" is no record of this boot


def _text(r: SpineRecord) -> str:
    return f"{r.boot_id} {r.offset_ms} {r.last_ms if r.last_ms is not None else '-'} {r.mono_ms}"


def load(path: Path, boot_id: str, mono_ms: int) -> SpineRecord | None:
    """The record of this boot, or None (none, damaged, or another boot's).

    The monotonic clock never goes back within a boot: a record written at a later monotonic
    time than now belongs to another boot (or another simulated clock), whatever its boot id."""
    try:
        line = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    parts = line.split(" ")
    if len(parts) != 5 or crc(" ".join(parts[:4])) != parts[4] or parts[0] != boot_id:
        return None
    try:
        offset = int(parts[1])
        last = None if parts[2] == "-" else int(parts[2])
        written = int(parts[3])
    except ValueError:
        return None
    if written > mono_ms:
        return None
    return SpineRecord(boot_id, offset, last, written)


def save(path: Path, rec: SpineRecord) -> bool:
    """Write atomically (tmp + rename); False if the card refused (a full card: tried again later)."""
    text = _text(rec)
    tmp = Path(str(path) + ".tmp")
    try:
        tmp.write_text(f"{text} {crc(text)}\n", "ascii")
        os.replace(tmp, path)
        return True
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.debug("time reference not saved: %s", exc)
        return False
