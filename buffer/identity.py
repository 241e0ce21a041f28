"""The buffer's epoch and device id, also kept outside the database.

A bit flipped in the table definitions (page 1, ``sqlite_master``) can make
every table of the file unreadable, ``meta`` with it; salvage then cannot even
say *which* epoch was lost. This small file beside the buffer, written when an
epoch is born (and at an open that finds it missing), lets salvage name the
loss anyway: "epoch X: rows after seq N unreadable", with the open-ended range
the architecture allows. It is copied into the quarantine folder with the
damaged file.

The record carries a CRC over epoch and device (``check``; a file from before
it is read as before), and a buffer believes only a file naming its own device:
van A's ``.id`` copied beside van B's damaged buffer must not make B salvage its
samples under A's name and epoch (the receiver refuses a device that does not
match the topic, and the samples would reach the store neither as samples nor
as a gap).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

from buffer.sidefile import crc

log = logging.getLogger(__name__)


def epoch_check(epoch: str) -> str:
    """The checksum kept beside the epoch in ``meta`` (key ``epoch_check``).

    Why both this and the side file: one flipped bit in the epoch text still
    reads as an epoch, and the buffer would carry on under a new identity
    silently. Two copies (``meta`` and this file) can tell that they differ,
    not which one is right; the checksum says which copy ``meta`` really wrote.
    """
    return "%08x" % zlib.crc32(b"epoch:" + epoch.encode("utf-8", "surrogateescape"))


def vouched_epoch(meta_epoch: str, check: str | None, side: str | None) -> tuple[bool, str | None]:
    """(meta's epoch can be trusted, the true epoch as far as known).

    Trusted when the side file agrees (two independent copies), or when the
    checksum matches (the side file is the stale or damaged copy), or when
    neither witness exists (a file from before both). Otherwise ``meta`` is
    damaged: the side file names the true epoch if it has one.
    """
    if side == meta_epoch or check == epoch_check(meta_epoch):
        return True, meta_epoch
    if side is None and check is None:
        return True, meta_epoch
    return False, side


def _id_check(epoch: str, device: str) -> str:
    return crc(f"id:{epoch} {device}")


class IdentityFile:
    def __init__(self, path: Path, device: str | None = None) -> None:
        """``device``: the buffer's configured id; None (a quarantine copy) reads any device's file."""
        self.path = path
        self.device = device

    def read(self) -> tuple[str, str] | None:
        """(epoch, device), or None if missing, unreadable, damaged or another device's (warned)."""
        try:
            d = json.loads(self.path.read_bytes())
            epoch, device = str(d["epoch"]), str(d["device"])
            check = d.get("check")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if check is not None and check != _id_check(epoch, device):
            log.warning("buffer: %s fails its check (epoch %r, device %r): ignored", self.path,
                        epoch[:40], device[:40])
            return None
        if self.device is not None and device != self.device:
            log.warning("buffer: %s names device %r, not this buffer's %r (a file from another van):"
                        " ignored, rewritten", self.path, device[:40], self.device)
            return None
        return epoch, device

    def epoch_of(self) -> str | None:
        found = self.read()
        return found[0] if found else None

    def write(self, epoch: str, device: str) -> None:
        """Replace the file atomically (fsynced); a full card only delays it (logged)."""
        if self.read() == (epoch, device) and b'"check"' in self._raw():
            return
        tmp = Path(str(self.path) + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"epoch": epoch, "device": device, "check": _id_check(epoch, device)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("buffer: cannot write %s: %s", self.path, exc)
            tmp.unlink(missing_ok=True)

    def _raw(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError:
            return b""

    def copy_to(self, folder: Path, epoch: str | None) -> None:
        """Leave a copy in a quarantine folder, if it names ``epoch`` (or no epoch is known)."""
        found = self.read()
        if found is None or (epoch is not None and found[0] != epoch):
            return
        IdentityFile(folder / self.path.name).write(*found)
